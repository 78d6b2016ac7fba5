"""A job and its eight states: the one place a job's status changes.

Every change goes through `move`, which refuses a transition the lifecycle does not have,
and every `mark_*` function writes the job's record in the spool and its `.status` sidecar in
the same call, so no state change can go unreported. The record on disk is a typed,
versioned structure (`JobRecord`), independent of this module's attribute names.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from runner.durable import write_atomic
from watcher.inboxnames import remove_file
from watcher.sidecars import ETA, STATUS, eta_document, now, status_document, write_sidecar

JOB_RECORD = "job.json"
OUT = "out"  # the folder inside a job's spool folder that becomes its outbox folder
RECORD_VERSION = 1


class JobStatus(str, Enum):
    VALIDATING = "validating"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


# Where each state may go. Staying in a state is always allowed: a restart writes a
# recovered job's state again. `batchbox run` has no queue: its job goes from validating
# straight to in_progress.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING: frozenset(
        {JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.FINALIZING}
    ),
    JobStatus.QUEUED: frozenset(
        {JobStatus.IN_PROGRESS, JobStatus.CANCELLING, JobStatus.FINALIZING}
    ),
    JobStatus.IN_PROGRESS: frozenset({JobStatus.CANCELLING, JobStatus.FINALIZING}),
    JobStatus.CANCELLING: frozenset({JobStatus.FINALIZING}),
    JobStatus.FINALIZING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class TransitionError(Exception):
    """A status change the lifecycle does not have: a bug, never a user's doing."""


class RecordError(ValueError):
    """A job record that cannot be read as one."""


def new_job_id(moment: datetime) -> str:
    return f"batch_{moment.strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(2)}"


@dataclass
class Job:
    id: str
    stem: str
    subdir: str  # the inbox subfolder it was dropped in ("" for the inbox itself)
    work: Path  # the job's spool folder
    sidecar_dir: Path | None  # where .status and .eta stand; None for `batchbox run`
    sequence: int = 0
    priority: int = 0
    model: str | None = None
    endpoint: str | None = None
    status: JobStatus = JobStatus.VALIDATING
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime = field(default_factory=now)
    in_progress_at: datetime | None = None
    completed_at: datetime | None = None
    eta: datetime | None = None
    queue_position: int | None = None
    tokens_per_second: float | None = None
    requests_per_second: float | None = None
    outbox: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    prompt_chars: int = 0
    max_tokens: list[list[int | None]] = field(default_factory=list)  # [value, requests] pairs
    estimate: dict[str, Any] | None = None  # the estimate written before the run
    has_ticket: bool = False
    origin: str | None = None  # the file `batchbox run` was given, to resume a stopped run
    final: str | None = None  # how the job ends, set when finalizing starts
    input_signature: list[int] | None = None  # size, mtime and inode when it was validated
    engine_kind: str | None = None  # what runs its model, when it was validated
    # Seconds the engine ran this job, over every run: a job resumed after a stop or a
    # crash is recorded with its whole time, not its last run's (kept every status write).
    run_seconds: float = 0.0
    runs: int = 0
    loading_since: datetime | None = None  # while its model loads; not kept in the record
    # What the engine has done for the job while it runs, for its `.status` (not recorded:
    # worked out again from the engine when the job runs).
    progress: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return self.work / OUT

    @property
    def input_name(self) -> str:
        return f"{self.subdir}/{self.stem}.jsonl" if self.subdir else f"{self.stem}.jsonl"

    def sidecar(self, suffix: str) -> Path | None:
        return None if self.sidecar_dir is None else self.sidecar_dir / f"{self.stem}{suffix}"

    def status_document(self) -> dict[str, Any]:
        """The `.status` sidecar, in SPEC section 4's format."""
        throughput = None
        if self.tokens_per_second is not None:
            throughput = (self.tokens_per_second, self.requests_per_second or 0.0)
        return status_document(
            id=self.id,
            input=self.input_name,
            model=self.model,
            endpoint=self.endpoint,
            status=self.status.value,
            counts=(self.total, self.completed, self.failed),
            queue_position=self.queue_position,
            created_at=self.created_at,
            in_progress_at=self.in_progress_at,
            completed_at=self.completed_at,
            eta=self.eta,
            usage=(self.prompt_tokens, self.completion_tokens),
            throughput=throughput,
            outbox=self.outbox,
            errors=self.errors,
            engine="loading" if self.loading_since else None,
            loading_since=self.loading_since,
            priority=self.priority,
            metadata=self.metadata,
            progress=self.progress if self.status is JobStatus.IN_PROGRESS else None,
        )

    def final_document(self, final: JobStatus) -> dict[str, Any]:
        """The status the job will have once delivered, for the outbox's `status.json`,
        written before the job's own status may say so."""
        finished = dataclasses.replace(self, status=final, completed_at=now(), eta=None)
        return finished.status_document()

    def summary(self) -> dict[str, Any]:
        """The one log line a finished job gets."""
        return {
            "job": self.id,
            "input": self.input_name,
            "model": self.model,
            "status": self.status.value,
            "completed": self.completed,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "outbox": self.outbox,
        }


class JobRecord(msgspec.Struct, kw_only=True):
    """A job as its spool record `job.json` holds it. Field names here are the format: a
    record written by this version loads in the next, and keys it does not know are
    ignored, so a record from a newer batchbox with added keys still loads."""

    version: int = RECORD_VERSION
    id: str
    stem: str
    subdir: str
    work: str
    sidecar_dir: str | None
    sequence: int = 0
    priority: int = 0
    model: str | None = None
    endpoint: str | None = None
    status: JobStatus = JobStatus.VALIDATING
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime
    in_progress_at: datetime | None = None
    completed_at: datetime | None = None
    eta: datetime | None = None
    queue_position: int | None = None
    tokens_per_second: float | None = None
    requests_per_second: float | None = None
    outbox: str | None = None
    errors: list[dict[str, Any]] = []
    metadata: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    prompt_chars: int = 0
    max_tokens: list[list[int | None]] = []
    estimate: dict[str, Any] | None = None
    has_ticket: bool = False
    origin: str | None = None
    final: str | None = None
    input_signature: list[int] | None = None
    engine_kind: str | None = None
    run_seconds: float = 0.0
    runs: int = 0


# The fields a record and a job share, by name; paths are strings in the record.
_PATHS = ("work", "sidecar_dir")
_SHARED = tuple(name for name in JobRecord.__struct_fields__ if name != "version")


def encode_record(job: Job) -> bytes:
    values = {name: getattr(job, name) for name in _SHARED}
    for name in _PATHS:
        values[name] = None if values[name] is None else str(values[name])
    return msgspec.json.encode(JobRecord(**values))


def decode_record(data: bytes) -> Job:
    try:
        record = msgspec.json.decode(data, type=JobRecord)
    except msgspec.MsgspecError as error:
        raise RecordError(f"not a job record: {error}") from None
    if record.version > RECORD_VERSION:
        raise RecordError(f"written by a newer batchbox (record version {record.version})")
    values = {name: getattr(record, name) for name in _SHARED}
    for name in _PATHS:
        values[name] = None if values[name] is None else Path(values[name])
    return Job(**values)


def load_job(work: Path) -> Job:
    job = decode_record((work / JOB_RECORD).read_bytes())
    job.work = work  # where the folder is now, should it have been moved since it was written
    return job


def write_record(job: Job) -> None:
    """Persist the job's record in the spool, atomically, and nothing else."""
    write_atomic(job.work / JOB_RECORD, encode_record(job))


def write_status(job: Job) -> None:
    """Persist the job's record and rewrite its `.status` sidecar, both atomically."""
    write_record(job)
    show_status(job)


def show_status(job: Job) -> None:
    """Rewrite the `.status` sidecar alone, for what the record need not keep: a queued
    job's place in the queue, which is worked out again at every start."""
    path = job.sidecar(STATUS)
    if path is not None and path.parent.is_dir():
        write_sidecar(path, job.status_document(), _scratch(job))


def write_eta(job: Job, seconds: float, basis: str) -> None:
    """The `.eta` sidecar: when the job is expected to finish, and what that rests on."""
    path = job.sidecar(ETA)
    written = now()
    job.eta = written + timedelta(seconds=round(seconds))
    if path is not None and path.parent.is_dir():
        write_sidecar(path, eta_document(job.eta, seconds, written, basis), _scratch(job))


def _scratch(job: Job) -> Path | None:
    """Where a sidecar's temporary file is written: the job's spool folder, on the inbox's
    filesystem, while it is there (the last `.status` is written after it has gone)."""
    return job.work if job.work.is_dir() else None


def fail_job(job: Job, code: str, message: str, line: int | None = None) -> None:
    """Note a job-level error; the job is delivered as failed by whoever finishes it."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    job.errors.append(error)


def move(job: Job, status: JobStatus) -> None:
    """Change the job's status, refusing a change the lifecycle does not have."""
    if status is not job.status and status not in TRANSITIONS[job.status]:
        raise TransitionError(f"job {job.id} cannot go from {job.status.value} to {status.value}")
    job.status = status


def mark_queued(job: Job) -> None:
    move(job, JobStatus.QUEUED)
    write_status(job)


def mark_in_progress(job: Job) -> None:
    move(job, JobStatus.IN_PROGRESS)
    job.queue_position = None
    job.in_progress_at = job.in_progress_at or now()
    write_status(job)


def mark_cancelling(job: Job) -> None:
    move(job, JobStatus.CANCELLING)
    write_status(job)


def mark_finalizing(job: Job, final: JobStatus) -> None:
    """Finishing begins: the record says how the job ends, so a restart finishes it so."""
    assert final.finished
    if final is JobStatus.CANCELLED and job.status is not JobStatus.FINALIZING:
        mark_cancelling(job)
    job.final = final.value
    move(job, JobStatus.FINALIZING)
    write_status(job)


def mark_finished(job: Job, status: JobStatus) -> None:
    assert status.finished
    move(job, status)
    job.queue_position = None
    job.completed_at = now()
    job.eta = None
    eta = job.sidecar(ETA)
    if eta is not None:
        remove_file(eta, "sidecar")  # first, so a reader never sees it beside a final status
    write_status(job)


def mark_broken(job: Job, code: str, message: str) -> None:
    """A job that cannot be finished: failed, with why, where it was dropped; nothing is
    delivered for it. Its record is written where it can be: it may be what is broken."""
    fail_job(job, code, message)
    if not job.status.finished:
        if job.status is not JobStatus.FINALIZING:
            move(job, JobStatus.FINALIZING)
        job.final = JobStatus.FAILED.value
        move(job, JobStatus.FAILED)
    job.queue_position = None
    job.completed_at = now()
    job.eta = None
    eta = job.sidecar(ETA)
    if eta is not None:
        remove_file(eta, "sidecar")
    try:
        write_record(job)
    except OSError:
        pass
    path = job.sidecar(STATUS)
    if path is not None:
        write_sidecar(path, job.status_document())


def resume_finishing(job: Job) -> None:
    """A record that says finished while its spool folder is still there: the finish was
    cut short after the record was written (records of older versions said the final state
    before delivery). It goes back to finalizing, from where it is finished once."""
    assert job.status.finished
    job.final = job.final or job.status.value
    job.status = JobStatus.FINALIZING
