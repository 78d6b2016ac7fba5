"""The estimator writes the ETA: each job's estimate at validation, the `.eta` of every queued
job as the queue moves, and the running job's time left from its engine's progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from benchmarks.estimator import load_seconds_for
from benchmarks.record import History
from benchmarks.refine import Refined, refine
from watcher.estimates import estimate_job
from watcher.forecast import eta_basis
from watcher.jobqueue import JobQueue, Planned, plan_queue
from watcher.jobs import Job, show_status, write_eta, write_status
from watcher.sidecars import now
from watcher.worker import Running

# The sidecars of queued jobs are brought up to date by passes over the queue: one
# QUEUE_MIN_SECONDS after a change of the queue, and one every QUEUE_SECONDS while the
# running job moves on. A pass plans the whole queue (arithmetic only) and rewrites the
# sidecars of the first HEAD jobs whose place or expected finish changed, then of BUDGET
# more, taken in turn through the rest of the queue, so that a pass writes at most
# HEAD + BUDGET jobs' sidecars however long the queue is: the first HEAD jobs are up to
# date within a pass, and every queued job within ceil((queued - HEAD) / BUDGET) passes.
# Each write is an fsync: a job's sidecars are rewritten only when what they show changed
# (or to refresh an `.eta` older than ETA_REFRESH_SECONDS), and a pass on a slow disk stops
# after SLICE_SECONDS, going on where it stopped at the next one.
QUEUE_MIN_SECONDS = 1.0
QUEUE_SECONDS = 5.0
HEAD = 10
BUDGET = 10
SLICE_SECONDS = 0.25
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


@dataclass(frozen=True)
class Slot:
    """A queued job's place in time, as last planned: when it is expected to finish (on the
    monotonic clock), the model loaded by then, and what the `.eta` basis says of it."""

    finish_at: float
    model: str | None
    plan: Planned


class QueueEtas:
    """Keeps the `.eta` and `.status` of queued jobs current as the queue moves, at a cost
    per pass that does not grow with the queue (see HEAD and BUDGET)."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.changed = False
        self.last_update = 0.0
        self.cursor = 0  # where in the queue beyond its head the next pass goes on
        self.slots: dict[str, Slot] = {}  # job id -> its place in time at the last planning
        self.eta_written: dict[str, float] = {}  # job id -> when its queued `.eta` was written
        self.plans = 0  # how many times the whole queue was planned

    def forget(self, job: Job) -> None:
        """The job left the queue."""
        self.changed = True
        self.slots.pop(job.id, None)
        self.eta_written.pop(job.id, None)

    def plan(self, jobs: list[Job], running: Running | None, loaded: str | None) -> None:
        """Plan the whole queue: each job's place in time, from the running job's time left,
        the jobs' estimates, and a model load at each switch."""
        self.plans += 1
        records = self.history.records()
        models = {job.model or "" for job in jobs}
        plans = plan_queue(
            jobs,
            {job.id: float((job.estimate or {}).get("run_seconds", 0.0)) for job in jobs},
            {model: load_seconds_for(model, records) for model in models},
            running.job.model if running else loaded,
            running_left(running) if running else None,
        )
        moment = time.monotonic()
        self.slots = {
            job.id: Slot(moment + plans[job.id].finish, job.model, plans[job.id]) for job in jobs
        }

    def place_new(
        self, job: Job, queue: JobQueue, running: Running | None, loaded: str | None
    ) -> None:
        """Show a job that just joined the queue where it stands, planned after the job
        ahead of it without planning the rest again; the jobs behind it, if it overtook
        any, learn their new places at the next pass."""
        index = queue.index(job)
        ahead = queue.jobs[index - 1] if index else None
        if ahead is not None and ahead.id not in self.slots:
            self.plan(list(queue), running, loaded)  # recovered jobs, never planned yet
        else:
            self.slots[job.id] = self.slot_after(job, ahead, running, loaded)
        if index + 1 < len(queue):
            self.changed = True
        job.queue_position = index + 1
        self.show_eta(job, self.slots[job.id])

    def slot_after(
        self, job: Job, ahead: Job | None, running: Running | None, loaded: str | None
    ) -> Slot:
        moment = time.monotonic()
        if ahead is not None:
            before = self.slots[ahead.id]
            start, model, jobs_ahead = before.finish_at, before.model, before.plan.ahead + 1
        elif running is not None:
            start, model, jobs_ahead = moment + running_left(running), running.job.model, 1
        else:
            start, model, jobs_ahead = moment, loaded, 0
        load = job.model != model
        if load:
            start += load_seconds_for(job.model or "", self.history.records())
        finish = start + float((job.estimate or {}).get("run_seconds", 0.0))
        plan = Planned(start=start - moment, finish=finish - moment, ahead=jobs_ahead, load=load)
        return Slot(finish, job.model, plan)

    def estimate_again(self, queue: JobQueue) -> None:
        """Estimate the queued jobs again from what the history has learnt meanwhile (the
        pace of an engine just loaded); the next pass shows the new ETAs."""
        for job in queue:
            job.estimate = estimate_job(job, self.history).as_dict()
        self.changed = True

    def update_due(self) -> bool:
        since = time.monotonic() - self.last_update
        return since >= QUEUE_SECONDS or (self.changed and since >= QUEUE_MIN_SECONDS)

    def update(
        self,
        queue: JobQueue,
        running: Running | None,
        loaded: str | None,
        give_way: Callable[[], bool] = lambda: False,
    ) -> None:
        """One pass: plan the queue, bring the first HEAD jobs' sidecars up to date, then
        BUDGET more in turn through the rest of the queue. When `give_way` says so (the
        running job has ended, and the next one waits to start), the pass stops between two
        jobs; the next pass comes QUEUE_MIN_SECONDS later, as after any change."""
        started = self.last_update = time.monotonic()
        self.changed = False
        jobs = list(queue)
        self.plan(jobs, running, loaded)
        for position, job in enumerate(jobs[:HEAD], start=1):
            if give_way():
                self.changed = True
                return
            self.refresh(job, position)
        rest = len(jobs) - HEAD
        written = looked = 0
        while looked < rest and written < BUDGET:
            if time.monotonic() - started >= SLICE_SECONDS or give_way():
                break
            index = HEAD + self.cursor % rest
            self.cursor = (self.cursor + 1) % rest
            looked += 1
            written += self.refresh(jobs[index], index + 1)

    def refresh(self, job: Job, position: int) -> bool:
        """Rewrite a queued job's sidecars if what they show changed; whether it did. The
        spool record is rewritten with them only when the expected finish moved, since the
        place in the queue is worked out again at every start."""
        moved = job.queue_position != position
        job.queue_position = position
        if self.show_eta(job, self.slots[job.id], force=moved):
            write_status(job)
            return True
        if moved:
            show_status(job)
        return moved

    def show_eta(self, job: Job, slot: Slot, force: bool = True) -> bool:
        """Write a queued job's `.eta` when forced, when its expected finish moved, or when it
        is due a refresh; whether its expected finish was rewritten (its `.status` and its
        record carry the same eta)."""
        seconds = max(slot.finish_at - time.monotonic(), 0.0)
        finish = now() + timedelta(seconds=round(seconds))
        slack = max(ETA_SLACK_SECONDS, 0.02 * seconds)
        moved = job.eta is None or abs((finish - job.eta).total_seconds()) >= slack
        written = self.eta_written.get(job.id)
        stale = written is None or time.monotonic() - written >= ETA_REFRESH_SECONDS
        if not (force or moved or stale):
            return False
        write_eta(job, seconds, eta_basis(job, slot.plan))
        self.eta_written[job.id] = time.monotonic()
        return moved or stale
