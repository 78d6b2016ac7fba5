"""The one job that runs: the queue hands it to a worker thread, which runs it through the
engine process and delivers it, while the main loop goes on serving events and sidecars."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from runner.durable import is_disk_trouble
from runner.run import Progress
from watcher.aside import set_aside
from watcher.config import Config
from watcher.deliver import deliver_job
from watcher.execute import DiskTrouble, EngineProvider, RunHooks, execute_job
from watcher.jobs import Job, JobStatus, fail_job

log = structlog.get_logger()


@dataclass
class Running:
    job: Job
    thread: threading.Thread = field(default_factory=lambda: threading.Thread(target=None))
    cancel: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)  # set before `on_end`
    started: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0  # the expected model load before it runs, 0 when loaded
    loading_began: float | None = None  # when the load of its model began, while it loads
    load_basis: str = ""  # what the expected load rests on, in words
    run_started: float | None = None
    done: float = 0.0  # the fraction of the job's requests done
    last_status: float = 0.0
    latest: Progress | None = None
    counters: tuple[int, int] = (0, 0)  # the engine's token counters in this run, last seen
    counted_at: float | None = None  # when they last moved; None until they first do
    # tokens of requests finished before a restart, which this run's engine did not count
    earlier_tokens: tuple[int, int] | None = None
    trouble: OSError | None = None  # the disk error that stopped it, to resume later

    def note_progress(self, progress: Progress) -> None:
        job = self.job
        if self.run_started is None:
            self.run_started = time.monotonic()
        if self.earlier_tokens is None:
            self.earlier_tokens = (progress.tally.prompt_tokens, progress.tally.completion_tokens)
        self.latest = progress
        self.done = (job.completed + job.failed) / job.total if job.total else 1.0
        # The engine's counters include the requests still running, which the usage (the
        # finished requests' tokens) leaves out: how far along the job is, to the token.
        earlier_prompt, earlier_completion = self.earlier_tokens
        job.progress = {
            "prompt_tokens": earlier_prompt + progress.engine_prompt_tokens,
            "completion_tokens": earlier_completion + progress.engine_completion_tokens,
            "in_flight": progress.in_flight,
            "run_seconds": round(job.run_seconds, 2),
        }

    def counters_moved(self, progress: Progress) -> bool:
        """Note the engine's counters; True the first time they move in this run. The first
        counters come after the engine's first step, which on a CPU prefills thousands of
        prompt tokens: seconds after the start."""
        counters = (progress.engine_prompt_tokens, progress.engine_completion_tokens)
        if counters == self.counters:
            return False
        first = self.counted_at is None
        self.counters, self.counted_at = counters, time.monotonic()
        return first

    def note_loading(self, began: float) -> bool:
        """Its model loads, since `began`; True when that load has just begun."""
        new = self.loading_began != began
        self.loading_began = began
        return new


def start_job(
    running: Running,
    config: Config,
    engines: EngineProvider,
    outbox: Path,
    on_progress: Callable[[Running, Progress], None],
    stopping: threading.Event,
    on_end: Callable[[], None],
    on_pace: Callable[[Job], None] = lambda job: None,
    on_loading: Callable[[Running, float], None] = lambda running, began: None,
) -> None:
    """Run the job on a thread of its own; `on_end` is called when it is done, after
    `running.ended` is set, so whoever `on_end` wakes finds the job ended."""
    job = running.job
    hooks = RunHooks(
        on_progress=lambda job, progress: on_progress(running, progress),
        on_pace=on_pace,
        cancel_requested=running.cancel.is_set,
        stop_requested=stopping.is_set,
        on_loading=lambda job, began: on_loading(running, began),
    )

    def work() -> None:
        try:
            execute_job(job, config, engines, outbox, hooks)
        except DiskTrouble as trouble:
            running.trouble = trouble.error
        except Exception as error:  # noqa: BLE001 - a bug must not leave it in_progress
            log.exception("job_crashed", job=job.id)
            if not stopping.is_set():
                running.trouble = fail_crashed(job, config, outbox, error)
        finally:
            running.ended.set()
            on_end()

    running.thread = threading.Thread(target=work, name=f"job-{job.id}", daemon=True)
    log.info("job_started", job=job.id, input=job.input_name, model=job.model)
    running.thread.start()


def fail_crashed(job: Job, config: Config, outbox: Path, error: Exception) -> OSError | None:
    """Deliver a job whose run raised something unforeseen as failed, with what it has; the
    disk error that stopped the delivery, if one did (it is delivered later).

    Not called while the service stops: the error may be the stop itself (an engine ended
    under it), and the job resumes at the next start instead."""
    try:
        fail_job(job, "internal_error", f"the run failed: {type(error).__name__}: {error}")
        deliver_job(job, config, outbox, JobStatus.FAILED)
    except OSError as delivery_error:
        if is_disk_trouble(delivery_error):
            return delivery_error
        set_crashed_aside(job, config, delivery_error)
    except Exception as delivery_error:  # noqa: BLE001 - set aside, the others run on
        set_crashed_aside(job, config, delivery_error)
    return None


def set_crashed_aside(job: Job, config: Config, error: Exception) -> None:
    log.exception("job_not_delivered", job=job.id)
    reason = f"it failed and could not be delivered ({error})"
    set_aside(job.work, config.folder("state"), reason, job)
