"""A job and its eight states, with one transition function per state.

Every transition writes the job's record in the spool and its `.status` sidecar in the same
call, so no state change can go unreported.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import orjson
import structlog

from runner.durable import is_disk_trouble, write_json_atomic

log = structlog.get_logger()

JOB_RECORD = "job.json"
OUT = "out"  # the folder inside a job's spool folder that becomes its outbox folder


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


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


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
    # Seconds the engine ran this job, over every run: a job resumed after a stop or a
    # crash is recorded with its whole time, not its last run's (kept every status write).
    run_seconds: float = 0.0
    runs: int = 0

    @property
    def out(self) -> Path:
        return self.work / OUT

    @property
    def input_name(self) -> str:
        return f"{self.subdir}/{self.stem}.jsonl" if self.subdir else f"{self.stem}.jsonl"

    def status_document(self) -> dict[str, Any]:
        """The `.status` sidecar, in SPEC section 4's format."""
        throughput = None
        if self.tokens_per_second is not None:
            throughput = {
                "tokens_per_second": round(self.tokens_per_second, 1),
                "requests_per_second": round(self.requests_per_second or 0.0, 2),
            }
        return {
            "id": self.id,
            "input": self.input_name,
            "model": self.model,
            "endpoint": self.endpoint,
            "status": self.status.value,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "queue_position": self.queue_position,
            "created_at": iso(self.created_at),
            "in_progress_at": iso(self.in_progress_at),
            "completed_at": iso(self.completed_at),
            "updated_at": iso(now()),
            "eta": iso(self.eta),
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "throughput": throughput,
            "outbox": self.outbox,
            "errors": self.errors,
            "priority": self.priority,
            "metadata": self.metadata,
        }

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

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        for key in ("work", "sidecar_dir"):
            record[key] = str(record[key]) if record[key] is not None else None
        for key in ("created_at", "in_progress_at", "completed_at", "eta"):
            record[key] = iso(record[key])
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        values = dict(record)
        values["status"] = JobStatus(values["status"])
        values["work"] = Path(values["work"])
        if values.get("sidecar_dir") is not None:
            values["sidecar_dir"] = Path(values["sidecar_dir"])
        for key in ("created_at", "in_progress_at", "completed_at", "eta"):
            if values.get(key):
                values[key] = datetime.fromisoformat(values[key])
        return cls(**values)


def load_job(work: Path) -> Job:
    return Job.from_record(orjson.loads((work / JOB_RECORD).read_bytes()))


def sidecar(job: Job, suffix: str) -> Path | None:
    if job.sidecar_dir is None:
        return None
    return job.sidecar_dir / f"{job.stem}{suffix}"


def write_sidecar(path: Path, document: dict[str, Any]) -> None:
    """Write a sidecar atomically. A name the inbox cannot hold (too long, taken by a folder)
    is logged and the job goes on without it; a full or failing disk is raised."""
    try:
        write_json_atomic(path, document)
    except OSError as error:
        if is_disk_trouble(error):
            raise
        log.warning("sidecar_not_written", path=str(path), error=str(error))


def write_status(job: Job) -> None:
    """Persist the job and rewrite its `.status` sidecar, both atomically."""
    write_json_atomic(job.work / JOB_RECORD, job.to_record())
    path = sidecar(job, ".status")
    if path is not None and path.parent.is_dir():
        write_sidecar(path, job.status_document())


def write_eta(job: Job, seconds: float, basis: str) -> None:
    """The `.eta` sidecar: when the job is expected to finish, and what that rests on."""
    path = sidecar(job, ".eta")
    written = now()
    job.eta = written + timedelta(seconds=round(seconds))
    if path is not None and path.parent.is_dir():
        document = {
            "eta": iso(job.eta),
            "seconds_remaining": round(seconds),
            "written_at": iso(written),
            "basis": basis,
        }
        write_sidecar(path, document)


def fail_job(job: Job, code: str, message: str, line: int | None = None) -> None:
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    job.errors.append(error)


def mark_queued(job: Job) -> None:
    job.status = JobStatus.QUEUED
    write_status(job)


def mark_in_progress(job: Job) -> None:
    job.status = JobStatus.IN_PROGRESS
    job.queue_position = None
    job.in_progress_at = job.in_progress_at or now()
    write_status(job)


def mark_cancelling(job: Job) -> None:
    job.status = JobStatus.CANCELLING
    write_status(job)


def mark_finalizing(job: Job) -> None:
    job.status = JobStatus.FINALIZING
    write_status(job)


def mark_finished(job: Job, status: JobStatus) -> None:
    assert status.finished
    job.status = status
    job.queue_position = None
    job.completed_at = now()
    job.eta = None
    eta = sidecar(job, ".eta")
    if eta is not None and eta.is_file():
        eta.unlink(missing_ok=True)  # first, so a reader never sees it beside a final status
    write_status(job)
