"""When a file dropped now would be finished: the `.eta` the service would write for it.

The service plans its queue in memory; `batchbox estimate` runs in a process of its own and
reads the same facts from where the service leaves them: the spool records (the queue, in
the service's order, with each job's estimate), the running job's `.eta` sidecar (its time
left, as the service last refined it), and the benchmark history (how long each model takes
to load, and which model ran last).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from benchmarks.estimator import load_seconds_for
from watcher.jobqueue import Planned, plan_queue
from watcher.jobs import Job, JobStatus
from watcher.sidecars import ETA, now


@dataclass(frozen=True)
class Forecast:
    seconds: float  # from now until the job is expected to be finished
    run_seconds: float
    plan: Planned
    running_left: float | None  # the running job's time left, None when nothing runs
    load_seconds: float  # the model load in `seconds`, 0 when its engine stays loaded
    basis: str


def eta_basis(job: Job, plan: Planned) -> str:
    """What an ETA in the queue rests on, in words: the estimate, the jobs ahead, a load."""
    parts = [(job.estimate or {}).get("basis", "no estimate")]
    parts.append(f"{plan.ahead} job{'s' if plan.ahead != 1 else ''} ahead in the queue")
    if plan.load:
        parts.append(f"includes loading {job.model}")
    return "; ".join(parts)


def sidecar_seconds_left(job: Job) -> float | None:
    """The time left that the running job's `.eta` sidecar says, counted from now."""
    path = job.sidecar(ETA)
    try:
        document = orjson.loads(path.read_bytes()) if path is not None else None
        eta = datetime.fromisoformat(document["eta"])
    except (OSError, orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        return None
    # The service never says a running job is done before it is.
    return max((eta - now()).total_seconds(), 1.0)


def loaded_model(
    running: Job | None, history: list[dict[str, Any]], idle_unload_seconds: float
) -> str | None:
    """The model whose engine the service holds: the running job's, else that of the job
    finished last, unless the service has unloaded it for idleness since."""
    if running is not None:
        return running.model
    finished = [record for record in history if record.get("finished_at")]
    if not finished:
        return None
    last = max(finished, key=lambda record: record["finished_at"])
    try:
        idle = (now() - datetime.fromisoformat(last["finished_at"])).total_seconds()
    except ValueError:
        return None
    return last.get("model") if idle < idle_unload_seconds else None


def queue_order(job: Job) -> tuple[bool, int, int]:
    return (job.status is not JobStatus.IN_PROGRESS, -job.priority, job.sequence)


def forecast_job(
    job: Job,
    spool: Iterable[Job],
    history: Iterable[dict[str, Any]],
    idle_unload_seconds: float,
) -> Forecast:
    """The ETA of `job`, not yet queued, if it joined the queue now behind the jobs of its
    priority or higher. Jobs of `batchbox run` (no sidecars) are not the service's."""
    history = list(history)
    service_jobs = [other for other in spool if other.sidecar_dir is not None]
    running = next((o for o in service_jobs if o.status is JobStatus.IN_PROGRESS), None)
    ahead = sorted(
        (
            other
            for other in service_jobs
            if other.status is JobStatus.QUEUED and other.priority >= job.priority
        ),
        key=queue_order,
    )
    running_left = None
    if running is not None:
        running_left = sidecar_seconds_left(running)
        if running_left is None:
            running_left = float((running.estimate or {}).get("run_seconds", 0.0))
    queue = [*ahead, job]
    models = {other.model or "" for other in queue}
    plans = plan_queue(
        queue,
        {other.id: float((other.estimate or {}).get("run_seconds", 0.0)) for other in queue},
        {model: load_seconds_for(model, history) for model in models},
        loaded_model(running, history, idle_unload_seconds),
        running_left,
    )
    plan = plans[job.id]
    run_seconds = float((job.estimate or {}).get("run_seconds", 0.0))
    load = plan.start - (plans[ahead[-1].id].finish if ahead else running_left or 0.0)
    return Forecast(plan.finish, run_seconds, plan, running_left, load, eta_basis(job, plan))
