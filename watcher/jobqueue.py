"""The queue: higher priority first, then first come, first served; a job that was running
when the service stopped goes first again, so it resumes before anything new starts."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from watcher.jobs import Job, JobStatus


def _order(job: Job) -> tuple[bool, int, int]:
    return (job.status is not JobStatus.IN_PROGRESS, -job.priority, job.sequence)


class JobQueue:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def push(self, job: Job) -> None:
        """Put the job in its place: after every job that goes before it or ties with it."""
        self.jobs.insert(bisect.bisect_right(self.jobs, _order(job), key=_order), job)

    def index(self, job: Job) -> int:
        """The job's place from 0, found by its order rather than by a walk of the queue."""
        place = bisect.bisect_left(self.jobs, _order(job), key=_order)
        while self.jobs[place] is not job:
            place += 1  # ties in order: a job recovered with the same sequence
        return place

    def pop(self) -> Job | None:
        return self.jobs.pop(0) if self.jobs else None

    def remove(self, job: Job) -> None:
        self.jobs.remove(job)

    def find(self, sidecar_dir, stem: str) -> Job | None:
        return next(
            (job for job in self.jobs if job.sidecar_dir == sidecar_dir and job.stem == stem), None
        )

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self):
        return iter(list(self.jobs))


@dataclass(frozen=True)
class Planned:
    """When a job is expected to start and finish, in seconds from now, and why."""

    start: float
    finish: float
    ahead: int
    load: bool


def plan_queue(
    queued: list[Job],
    run_seconds: dict[str, float],
    load_seconds: dict[str, float],
    loaded_model: str | None,
    running_left: float | None,
) -> dict[str, Planned]:
    """Walk the queue in order, adding each job's run time and a model load at each switch.

    `running_left` is the running job's remaining seconds, None when nothing runs;
    `loaded_model` is the model whose engine is loaded (or will be, for the running job).
    """
    plans: dict[str, Planned] = {}
    clock = running_left or 0.0
    model = loaded_model
    ahead = 0 if running_left is None else 1
    for job in queued:
        load = job.model != model
        start = clock + (load_seconds.get(job.model or "", 0.0) if load else 0.0)
        finish = start + run_seconds.get(job.id, 0.0)
        plans[job.id] = Planned(start=start, finish=finish, ahead=ahead, load=load)
        clock, model, ahead = finish, job.model, ahead + 1
    return plans
