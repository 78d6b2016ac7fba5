"""Running a validated job, the same for `batchbox run` and `batchbox serve`: one wrapper that
reports the start and, whatever happens, finishes the job, so no job can be left without a
final status. The runner turns its lines into results; `watcher.deliver` hands it on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from runner.client import EngineClient, EngineDied, LoadStopped, LoadWatch
from runner.durable import is_disk_trouble, is_out_of_space
from runner.engine_args import engine_problems
from runner.journal import CrashBook, Journal
from runner.lines import FileRejected
from runner.run import Progress, RunOptions, run_lines
from runner.types import EngineLoadDied, EngineLoadError, ModelSpec
from watcher.config import Config
from watcher.deliver import RunTimes, deliver_job, take_tally
from watcher.errors import CommandFailed
from watcher.estimates import record_pace
from watcher.jobs import Job, JobStatus, fail_job, mark_in_progress, write_status
from watcher.sidecars import now
from watcher.spool import CRASHES, INPUT
from watcher.validate import JobError, input_signature

# Job-level notes that say a job waits for the disk rather than that it failed; they go
# when it runs again.
WAITING_CODES = ("disk_full", "disk_error")
ENGINE_RESTARTS = 8  # engine deaths one job survives; each poison request costs three
# Loads a job tries when they are cut short from outside (the OOM killer, a signal); a model
# that reports it cannot load fails the job at the first.
LOAD_TRIES = 3

log = structlog.get_logger()


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
    def client_for(
        self, spec: ModelSpec, watch: LoadWatch | None = None
    ) -> tuple[EngineClient, float]:
        """A client for the model's engine and the seconds spent loading it (0 if kept)."""


@dataclass
class RunHooks:
    """How the caller learns of progress and asks a run to end early. `on_loading` is
    called about twice a second while the job's model loads (`job.loading_since` set),
    with the monotonic time that load began."""

    on_progress: Callable[[Job, Progress], None] = lambda job, progress: None
    # the engine measured its pace at load; the job was estimated again from it
    on_pace: Callable[[Job], None] = lambda job: None
    cancel_requested: Callable[[], bool] = lambda: False
    stop_requested: Callable[[], bool] = lambda: False
    on_loading: Callable[[Job, float], None] = lambda job, began: None


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
    return deliver_job(job, config, outbox, final, times)


def _apply_progress(job: Job, progress: Progress, run_started: float) -> None:
    tally = progress.tally
    take_tally(job, tally)
    elapsed = time.monotonic() - run_started
    if elapsed > 0:
        job.tokens_per_second = (tally.prompt_tokens + tally.completion_tokens) / elapsed
        job.requests_per_second = (tally.completed + tally.failed) / elapsed


def _engine_for(
    engines: EngineProvider, spec: ModelSpec, job: Job, hooks: RunHooks
) -> tuple[EngineClient, float]:
    """The engine for the job's model. A load cut short from outside is tried again, up to
    LOAD_TRIES in all; a model that reports it cannot load fails the job at once. Raises
    LoadStopped when a stop or a cancel ends the load."""
    problems = engine_problems(spec.alias, spec.engine_backend, spec.engine)
    if problems:  # a load that cannot succeed is not started
        raise JobError("invalid_engine_settings", " ".join(problems))

    def on_wait() -> None:  # `began` is the current try's
        job.loading_since = job.loading_since or now()
        hooks.on_loading(job, began)

    watch = LoadWatch(
        should_stop=lambda: hooks.cancel_requested() or hooks.stop_requested(), on_wait=on_wait
    )
    died: EngineLoadDied | None = None
    for attempt in range(1, LOAD_TRIES + 1):
        began = time.monotonic()
        try:
            engine = engines.client_for(spec, watch)
        except EngineLoadDied as error:
            died = error
            log.warning(
                "engine_load_died",
                job=job.id,
                model=spec.alias,
                attempt=attempt,
                tries=LOAD_TRIES,
                reason=str(error),
            )
            continue
        except EngineLoadError as error:
            raise JobError("model_load_failed", str(error)) from None
        finally:
            loaded, job.loading_since = job.loading_since is not None, None
        if loaded:
            write_status(job)  # no longer loading: said at once, not at the next refresh
        return engine
    raise JobError("model_load_failed", f"{died}; the load was tried {LOAD_TRIES} times")


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
        if attempt == 0:
            # In progress from the moment its engine is sought: a load is work for this job,
            # and a polling script sees `"engine": "loading"` meanwhile.
            job.errors = [error for error in job.errors if error.get("code") not in WAITING_CODES]
            mark_in_progress(job)
        try:
            client, load_seconds = _engine_for(engines, spec, job, hooks)
        except LoadStopped:
            # Nothing ran: a cancelled job is delivered as such, a stopped one resumes.
            return JobStatus.CANCELLED if hooks.cancel_requested() else None
        times.load_seconds += load_seconds
        if load_seconds and client.info.pace:
            record_pace(job, config, client.info)
            hooks.on_pace(job)
        times.engine = {
            "hardware": client.info.hardware,
            "engine_version": client.info.engine_version,
            "settings": {**client.info.settings, "max_in_flight": config.max_in_flight},
        }
        if attempt == 0:
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
