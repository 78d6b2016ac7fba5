"""A job from validation to delivery, the same for `batchbox run` and `batchbox serve`.

`validate_job` checks the file and picks the model; `execute_job` runs it and, whatever
happens, finishes it: one wrapper reports the start and the end, so no job can be left
without a final status.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from benchmarks.estimator import Estimate, JobShape, estimate_run
from benchmarks.record import (
    append_history,
    append_pace,
    build_record,
    pace_record,
    read_history,
    read_paces,
)
from runner.client import EngineClient, EngineDied
from runner.durable import (
    copy_tree_durably,
    is_disk_trouble,
    is_out_of_space,
    make_folders_durably,
    rename_durably,
    write_json_atomic,
)
from runner.engine import EngineLoadError, ModelSpec
from runner.journal import CrashBook, Journal, Tally
from runner.lines import FileRejected
from runner.run import Progress, RunOptions, fail_remaining, run_lines, scan_file
from runner.types import CodedError, EngineInfo
from watcher.cli import CommandFailed
from watcher.config import Config
from watcher.jobs import (
    JOB_RECORD,
    Job,
    JobStatus,
    fail_job,
    iso,
    mark_cancelling,
    mark_finalizing,
    mark_finished,
    mark_in_progress,
    now,
    write_status,
)

INPUT = "input.jsonl"
CRASHES = "crashes.json"  # in the job's spool folder, not in what is delivered
# Job-level notes that say a job waits for the disk rather than that it failed; they go
# when it runs again.
WAITING_CODES = ("disk_full", "disk_error")

log = structlog.get_logger()


class JobError(CodedError):
    """The job cannot run; it is delivered as failed with this error."""


class DiskTrouble(CommandFailed):
    """A job stopped because the disk is full or failing: what its journal made durable is
    kept, and it resumes from there once the disk allows (`batchbox run` exits 1)."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        self.code = "disk_full" if is_out_of_space(error) else "disk_error"
        reason = error.strerror or str(error)
        self.reason = (
            f"the disk is full ({reason})"
            if self.code == "disk_full"
            else f"the disk failed a write ({reason})"
        )
        super().__init__(f"{self.reason}; what was done is kept: run the same file again to resume")


class EngineProvider(Protocol):
    def client_for(self, spec: ModelSpec) -> tuple[EngineClient, float]:
        """A client for the model's engine and the seconds spent loading it (0 if kept)."""


def resolve_model(
    config: Config, ticket_model: str | None, subdir: str, line_models: set[str]
) -> str:
    """Ticket, then inbox subfolder, then the lines' one model, then the default."""
    aliases = ", ".join(config.models)
    if ticket_model is not None:
        if ticket_model not in config.models:
            raise JobError(
                "unknown_model",
                f"the ticket names model {ticket_model!r}, which is not configured "
                f"(configured: {aliases})",
            )
        return ticket_model
    if subdir and subdir in config.models:
        return subdir
    if len(line_models) == 1 and next(iter(line_models)) in config.models:
        return next(iter(line_models))
    if config.default_model is not None:
        return config.default_model
    raise JobError(
        "no_model",
        f"no model resolves for this file: name one of {aliases} in a ticket, "
        "drop it into inbox/<model>/, or set default_model",
    )


def validate_job(
    job: Job, config: Config, ticket_model: str | None = None, input_path: Path | None = None
) -> None:
    """Count and check the input, pick its model, and fill in what the queue needs."""
    try:
        summary = scan_file(input_path or job.out / INPUT, config.limits_value, job.defaults)
    except FileRejected as error:
        raise JobError(error.code, error.message, error.line) from None
    job.model = resolve_model(config, ticket_model, job.subdir, summary.models)
    job.endpoint = summary.endpoint
    job.total = summary.lines
    job.prompt_chars = summary.prompt_chars
    job.max_tokens = [[value, count] for value, count in summary.max_tokens.items()]
    job.input_signature = input_signature(input_path or job.out / INPUT)
    served = config.models[job.model].endpoints
    if job.endpoint not in served:
        raise JobError(
            "wrong_endpoint",
            f"model {job.model!r} serves {', '.join(served)}, not {job.endpoint}",
        )


def check_job(job: Job, config: Config, ticket_model: str | None = None) -> None:
    """Validate a claimed job; what makes it fail is recorded in `job.errors`."""
    try:
        validate_job(job, config, ticket_model)
    except JobError as error:
        fail_job(job, error.code, error.message, error.line)


def job_shape(job: Job, hardware: str | None = None) -> JobShape:
    return JobShape(
        model=job.model or "",
        endpoint=job.endpoint,
        requests=job.total,
        prompt_chars=job.prompt_chars,
        max_tokens={value: count for value, count in job.max_tokens},
        hardware=hardware,
    )


def estimate_job(job: Job, state: Path, hardware: str | None = None) -> Estimate:
    return estimate_run(job_shape(job, hardware), [*read_paces(state), *read_history(state)])


@dataclass
class RunHooks:
    """How the caller learns of progress and asks a run to end early."""

    on_progress: Callable[[Job, Progress], None] = lambda job, progress: None
    # the engine measured its pace at load; the job was estimated again from it
    on_pace: Callable[[Job], None] = lambda job: None
    cancel_requested: Callable[[], bool] = lambda: False
    stop_requested: Callable[[], bool] = lambda: False


@dataclass
class RunTimes:
    load_seconds: float = 0.0
    run_seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)
    samples: list[list] = field(default_factory=list)


def take_pace(job: Job, config: Config, info: EngineInfo) -> None:
    """Record the pace the engine measured at its load, and estimate the job again from it:
    its first estimate had nothing measured to go by."""
    spec = config.model_spec(job.model or "")
    state = config.folder("state")
    engine = {"hardware": info.hardware, "engine_version": info.engine_version}
    record = pace_record(
        model=spec.alias,
        source=spec.source,
        engine=engine | {"settings": {**info.settings, "max_in_flight": config.max_in_flight}},
        pace=info.pace or {},
        finished_at=iso(now()) or "",
    )
    append_pace(state, record)
    job.estimate = estimate_job(job, state).as_dict()
    log.info("engine_pace", model=spec.alias, seconds=(info.pace or {}).get("seconds"))


def take_tally(job: Job, tally: Tally) -> None:
    job.completed, job.failed = tally.completed, tally.failed
    job.prompt_tokens, job.completion_tokens = tally.prompt_tokens, tally.completion_tokens


def _apply_progress(job: Job, progress: Progress, run_started: float) -> None:
    tally = progress.tally
    take_tally(job, tally)
    elapsed = time.monotonic() - run_started
    if elapsed > 0:
        job.tokens_per_second = (tally.prompt_tokens + tally.completion_tokens) / elapsed
        job.requests_per_second = (tally.completed + tally.failed) / elapsed


ENGINE_RESTARTS = 8  # engine deaths one job survives; each poison request costs three


def _engine_for(engines: EngineProvider, spec: ModelSpec) -> tuple[EngineClient, float]:
    try:
        return engines.client_for(spec)
    except EngineLoadError as error:
        raise JobError("model_load_failed", str(error)) from None


def run_engine(
    job: Job, config: Config, engines: EngineProvider, hooks: RunHooks, times: RunTimes
) -> JobStatus | None:
    """Run the job's lines; the final status, or None when stopped to resume later.

    When the engine process dies, a new one takes over where the journal says the job is;
    the crash book makes the requests that were in the dead engine run one at a time.
    """
    assert job.model is not None and job.endpoint is not None
    spec = config.model_spec(job.model)
    options = RunOptions(
        endpoint=job.endpoint,
        model=job.model,
        limits=config.limits_value,
        defaults=job.defaults,
        max_in_flight=config.max_in_flight,
    )
    crashes = CrashBook.load(job.work / CRASHES)
    started = run_started = time.monotonic()
    earlier_seconds = job.run_seconds  # of the runs before a stop or a crash
    job.runs += 1

    def progress(update: Progress) -> None:
        _apply_progress(job, update, started)
        job.run_seconds = earlier_seconds + times.run_seconds + time.monotonic() - run_started
        hooks.on_progress(job, update)

    def should_end() -> bool:
        return hooks.cancel_requested() or hooks.stop_requested()

    for attempt in range(ENGINE_RESTARTS + 1):
        client, load_seconds = _engine_for(engines, spec)
        times.load_seconds += load_seconds
        if load_seconds and client.info.pace:
            take_pace(job, config, client.info)
            hooks.on_pace(job)
        times.engine = {
            "hardware": client.info.hardware,
            "engine_version": client.info.engine_version,
            "settings": {**client.info.settings, "max_in_flight": config.max_in_flight},
        }
        if attempt == 0:
            job.errors = [error for error in job.errors if error.get("code") not in WAITING_CODES]
            mark_in_progress(job)
            started = time.monotonic()
        run_started = time.monotonic()
        journal = Journal(job.out)
        try:
            result = run_lines(
                job.out / INPUT, journal, client, options, job.total, progress, should_end, crashes
            )
            times.samples = result.tally.samples
            break
        except EngineDied as error:
            if hooks.stop_requested():
                return None  # the stop ended the engine; the job resumes at the next start
            crashes.record(error.in_engine)
            log.warning(
                "engine_died", job=job.id, reason=str(error), in_engine=len(error.in_engine)
            )
        except FileRejected as error:
            raise JobError(error.code, f"the input changed while it ran: {error.message}") from None
        finally:
            times.run_seconds += time.monotonic() - run_started
            job.run_seconds = earlier_seconds + times.run_seconds
            journal.close()
    else:
        raise JobError(
            "engine_died", f"the engine process died {ENGINE_RESTARTS + 1} times during this job"
        )
    if hooks.cancel_requested():
        return JobStatus.CANCELLED
    if hooks.stop_requested():
        return None
    if job.input_signature and input_signature(job.out / INPUT) != job.input_signature:
        # Someone still holding the file (or a hard link to it) rewrote it after the claim.
        raise JobError(
            "input_changed",
            "the input file changed while the job ran (it was truncated or rewritten after "
            "it was taken); drop it again once it is complete",
        )
    return JobStatus.COMPLETED


def input_signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def execute_job(
    job: Job, config: Config, engines: EngineProvider, outbox: Path, hooks: RunHooks
) -> Path | None:
    """Run a validated job and deliver it; the outbox folder, or None if stopped early.

    Raises DiskTrouble when the disk fails it: the job then stays in the spool as far as it
    got (its journal cut back to the last good fsync), to resume like after a restart.
    """
    try:
        return _execute(job, config, engines, outbox, hooks)
    except OSError as error:
        if not is_disk_trouble(error):
            raise
        log.warning("job_disk_trouble", job=job.id, error=str(error))
        raise DiskTrouble(error) from error


def _execute(
    job: Job, config: Config, engines: EngineProvider, outbox: Path, hooks: RunHooks
) -> Path | None:
    times = RunTimes()
    try:
        final = run_engine(job, config, engines, hooks, times)
    except JobError as error:
        fail_job(job, error.code, error.message, error.line)
        final = JobStatus.FAILED
    if final is None:
        write_status(job)
        return None
    return finish_job(job, config, outbox, final, times)


def finish_job(
    job: Job, config: Config, outbox: Path, final: JobStatus, times: RunTimes | None = None
) -> Path:
    """Write what is missing, record the benchmark, and deliver the folder in one rename.

    Safe to call again on a job whose finishing was cut short (a crash, a full disk): each
    step is done again or found done, and the folder is delivered once.
    """
    times = times or RunTimes()
    again = job.final is not None  # finishing began before, and may have reached the history
    job.final = final.value  # so that a restart during finalizing knows how it ends
    if final is JobStatus.CANCELLED:
        mark_cancelling(job)
    mark_finalizing(job)
    if final is JobStatus.CANCELLED:
        code, message = "batch_cancelled", "the job was cancelled before this request ran"
    else:
        first = job.errors[0]["message"] if job.errors else "the job failed"
        code, message = "batch_failed", f"the job failed before this request ran: {first}"
    tally = fail_remaining(
        job.out / INPUT,
        Journal(job.out),
        code,
        message,
        config.limits_value,
        job.defaults,
        job.endpoint,
    )
    take_tally(job, tally)
    # A file that failed before it was counted: what fail_remaining saw is its size.
    job.total = max(job.total, tally.completed + tally.failed)
    target = pick_outbox_folder(outbox, job.subdir, job.stem)
    job.outbox = str(target.relative_to(outbox)) if target.is_relative_to(outbox) else str(target)
    record = benchmark_record(job, config, final, times)
    job.status, job.completed_at, job.eta = final, now(), None
    write_json_atomic(job.out / "status.json", job.status_document())
    write_json_atomic(job.out / "benchmark.json", record)
    # The spool now says where it goes, so a restart delivers it once; the sidecar in the
    # inbox says "completed" only once the outbox folder is there.
    write_json_atomic(job.work / JOB_RECORD, job.to_record())
    if not (again and in_history(config.folder("state"), job.id)):
        append_history(config.folder("state"), record)
    deliver_folder(job.out, target)
    mark_finished(job, final)
    shutil.rmtree(job.work, ignore_errors=True)  # the sidecar and the outbox hold the rest
    return target


def in_history(state: Path, job_id: str) -> bool:
    return any(record.get("job_id") == job_id for record in read_history(state))


def benchmark_record(job: Job, config: Config, final: JobStatus, times: RunTimes) -> dict[str, Any]:
    model = job.model or ""
    spec = config.model_spec(model) if model in config.models else None
    requested = [value for value, _ in job.max_tokens if value is not None]
    return build_record(
        job_id=job.id,
        status=final.value,
        model=model,
        source=spec.source if spec else "",
        endpoint=job.endpoint,
        engine=times.engine,
        counts={"total": job.total, "completed": job.completed, "failed": job.failed},
        prompt_tokens=job.prompt_tokens,
        completion_tokens=job.completion_tokens,
        prompt_chars=job.prompt_chars,
        requested_max_tokens=max(requested) if requested else None,
        load_seconds=times.load_seconds,
        run_seconds=max(job.run_seconds, times.run_seconds),
        runs=job.runs,
        estimate=job.estimate,
        finished_at=iso(now()) or "",
        metadata=job.metadata,
        completion_samples=times.samples,
    )


def pick_outbox_folder(outbox: Path, subdir: str, stem: str) -> Path:
    """`outbox/<dir>/<stem>`, with -2, -3, ... when the name is taken."""
    parent = outbox / subdir if subdir else outbox
    make_folders_durably(parent)  # the delivered folder must not vanish with a new parent
    candidate, number = parent / stem, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = parent / f"{stem}-{number}"
    return candidate


def deliver_folder(source: Path, target: Path) -> None:
    """Put a finished folder into the outbox at once: one rename, made durable."""
    try:
        rename_durably(source, target)
    except OSError as error:
        if error.errno != 18:  # EXDEV: another filesystem, which only `run -o` can ask for
            raise
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by a run stopped while copying
        copy_tree_durably(source, staging)
        rename_durably(staging, target)
        shutil.rmtree(source)
