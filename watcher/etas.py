"""The estimator writes the ETA: each job's estimate at validation, the `.eta` of every queued
job as the queue moves, and the running job's time left from its engine's progress."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from benchmarks.estimator import load_seconds_for
from benchmarks.refine import Refined, refine
from watcher.estimates import estimate_job, history
from watcher.forecast import eta_basis
from watcher.jobqueue import JobQueue, Planned, plan_queue
from watcher.jobs import Job, write_eta, write_status
from watcher.sidecars import now
from watcher.worker import Running

# The sidecars of queued jobs are brought up to date QUEUE_MIN_SECONDS after a change of the
# queue and at least every QUEUE_SECONDS. Each write is an fsync, so a job's sidecars are
# rewritten only when what they show has changed (or to refresh a stale `.eta`), front of the
# queue first; a long queue is done over several turns of the loop (SLICE_SECONDS each), and
# the next pass waits UPKEEP_RATIO times as long as the last one took, so that keeping a long
# queue's sidecars current never takes more than a fifth of the loop's time.
QUEUE_MIN_SECONDS = 1.0
QUEUE_SECONDS = 5.0
UPKEEP_RATIO = 4.0
SLICE_SECONDS = 0.5
ETA_REFRESH_SECONDS = 60.0
ETA_SLACK_SECONDS = 5.0  # an expected finish that moved less than this is not rewritten


# -- the running job -----------------------------------------------------------------------


def refined(running: Running) -> Refined | None:
    """The running job's time left, from the tokens its engine has processed; None until
    its engine's counters first move (the estimate before the run stands until then)."""
    progress = running.latest
    if running.run_started is None or progress is None or running.job.estimate is None:
        return None
    if running.counted_at is None:
        return None
    earlier_prompt, earlier_completion = running.earlier_tokens or (0, 0)
    return refine(
        running.job.estimate,
        time.monotonic() - running.run_started,
        earlier_prompt + progress.engine_prompt_tokens,
        earlier_completion + progress.engine_completion_tokens,
        running.job.completed + running.job.failed,
        running.job.total,
        finished_completion=progress.tally.completion_tokens,
        in_flight=progress.in_flight,
        counted=running.counted_at - running.run_started,
    )


def load_left(running: Running) -> float:
    """The seconds of its model's load still to come, by the model's earlier loads."""
    began = running.started if running.loading_began is None else running.loading_began
    return max(running.load_seconds - (time.monotonic() - began), 0.0)


def running_left(running: Running) -> float:
    estimated = float((running.job.estimate or {}).get("run_seconds", 0.0))
    if running.run_started is None:  # still loading its model, or about to start
        return estimated + load_left(running)
    better = refined(running)
    if better is None:
        return max(estimated - (time.monotonic() - running.run_started), 1.0)
    return better.seconds_left


def loading_basis(running: Running) -> str:
    model = running.job.model
    left = load_left(running)
    if left > 0:
        return f"loading {model}, about {left:.0f} s left ({running.load_basis})"
    return (
        f"loading {model}, longer than expected ({running.load_basis}): the rest of the "
        "load is not counted"
    )


def write_running_eta(running: Running) -> None:
    left = running_left(running)
    better = refined(running)
    basis = (running.job.estimate or {}).get("basis", "no estimate")
    if running.job.loading_since is not None:
        write_eta(running.job, left, f"{basis}; {loading_basis(running)}")
        return
    basis += f"; running, {round(100 * running.done)}% of requests done"
    if better is None and running.run_started is not None:
        basis += "; no engine counters yet, the estimate before the run less the time run"
    if better is not None:
        basis += ", refined from the tokens processed so far"
        if better.overrun:
            basis += "; the job runs longer than estimated, so the rest is expected at its own pace"
    write_eta(running.job, left, basis)


# -- the queue -----------------------------------------------------------------------------


class QueueEtas:
    """Keeps the `.eta` and `.status` of queued jobs current as the queue moves."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.changed = False
        self.pass_unfinished = False
        self.pass_seconds = 0.0  # time spent on the current or last pass
        self.last_update = 0.0
        self.eta_written: dict[str, float] = {}  # job id -> when its queued `.eta` was written

    def forget(self, job: Job) -> None:
        """The job left the queue."""
        self.changed = True
        self.eta_written.pop(job.id, None)

    def planned(
        self, queue: JobQueue, running: Running | None, loaded: str | None
    ) -> list[tuple[int, Job, Planned]]:
        """Each queued job with its place (from 1) and when it is expected to start and end."""
        records = history(self.state)
        jobs = list(queue)
        plans = plan_queue(
            jobs,
            {job.id: float((job.estimate or {}).get("run_seconds", 0.0)) for job in jobs},
            {job.model or "": load_seconds_for(job.model or "", records) for job in jobs},
            running.job.model if running else loaded,
            running_left(running) if running else None,
        )
        return [(position, job, plans[job.id]) for position, job in enumerate(jobs, start=1)]

    def place_new(self, job: Job, queue: JobQueue, running: Running | None, loaded: str | None):
        """Show a job that just joined the queue where it stands."""
        self.changed = True
        for position, queued, plan in self.planned(queue, running, loaded):
            if queued is job:
                job.queue_position = position
                self.show_eta(job, plan)

    def estimate_again(self, queue: JobQueue) -> None:
        """Estimate the queued jobs again from what the history has learnt meanwhile (the
        pace of an engine just loaded); the next update shows the new ETAs."""
        for job in queue:
            job.estimate = estimate_job(job, self.state).as_dict()
        self.changed = True

    def update_due(self) -> bool:
        if self.pass_unfinished:
            return True
        since = time.monotonic() - self.last_update
        if since < UPKEEP_RATIO * self.pass_seconds:
            return False
        return since >= QUEUE_SECONDS or (self.changed and since >= QUEUE_MIN_SECONDS)

    def update(self, queue: JobQueue, running: Running | None, loaded: str | None) -> None:
        """Rewrite the sidecars of the queued jobs whose place or expected finish changed,
        for one slice of time; a pass left unfinished goes on at the next turn."""
        started = time.monotonic()
        if not self.pass_unfinished:
            self.changed = False
            self.pass_seconds = 0.0
        self.pass_unfinished = False
        for position, job, plan in self.planned(queue, running, loaded):
            if time.monotonic() - started >= SLICE_SECONDS:
                self.pass_unfinished = True
                break
            moved = job.queue_position != position
            job.queue_position = position
            if self.show_eta(job, plan, force=moved) or moved:
                write_status(job)
        self.last_update = time.monotonic()
        self.pass_seconds += self.last_update - started

    def show_eta(self, job: Job, plan: Planned, force: bool = True) -> bool:
        """Write a queued job's `.eta` when forced, when its expected finish moved, or when it
        is due a refresh; whether it was written (its `.status` carries the same eta)."""
        finish = now() + timedelta(seconds=round(plan.finish))
        slack = max(ETA_SLACK_SECONDS, 0.02 * plan.finish)
        moved = job.eta is None or abs((finish - job.eta).total_seconds()) >= slack
        written = self.eta_written.get(job.id)
        stale = written is None or time.monotonic() - written >= ETA_REFRESH_SECONDS
        if not (force or moved or stale):
            return False
        write_eta(job, plan.finish, eta_basis(job, plan))
        self.eta_written[job.id] = time.monotonic()
        return True
