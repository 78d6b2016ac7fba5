"""The estimate of a job, from the benchmark history and the paces engines timed at their
load: what validation asks before a job is queued, and what the queue's ETAs add up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.estimator import RECENT, Estimate, JobShape, estimate_run, load_seconds_for
from benchmarks.record import append_pace, pace_record, read_history, read_paces
from runner.types import EngineInfo
from watcher.config import Config
from watcher.jobs import Job
from watcher.sidecars import iso, now


def job_shape(job: Job, hardware: str | None = None) -> JobShape:
    return JobShape(
        model=job.model or "",
        endpoint=job.endpoint,
        requests=job.total,
        prompt_chars=job.prompt_chars,
        max_tokens={value: count for value, count in job.max_tokens},
        hardware=hardware,
    )


def history(state: Path) -> list[dict[str, Any]]:
    """The benchmark history the estimates rest on."""
    return list(read_history(state))


def estimate_job(job: Job, state: Path, hardware: str | None = None) -> Estimate:
    """The job's run time from the history, and from the paces engines timed at their load
    (what a model with no finished job yet is estimated from)."""
    return estimate_run(job_shape(job, hardware), [*read_paces(state), *history(state)])


def record_pace(job: Job, config: Config, info: EngineInfo) -> None:
    """Record the pace an engine timed at its load (runner.pace), and estimate the job
    again from it: its first estimate had nothing measured to go by."""
    spec = config.model_spec(job.model or "")
    state = config.folder("state")
    settings = {**info.settings, "max_in_flight": config.max_in_flight}
    engine = {"hardware": info.hardware, "engine_version": info.engine_version}
    record = pace_record(
        model=spec.alias,
        source=spec.source,
        engine=engine | {"settings": settings},
        pace=info.pace or {},
        finished_at=iso(now()) or "",
    )
    append_pace(state, record)
    job.estimate = estimate_job(job, state).as_dict()


def expected_load_seconds(model: str, state: Path) -> float:
    """How long loading the model is expected to take, from its earlier loads here."""
    return load_seconds_for(model, history(state))


def expected_load(model: str, state: Path) -> tuple[float, str]:
    """How long loading the model is expected to take, and what that rests on, in words."""
    records = history(state)
    seen = sum(
        1
        for record in records
        if record.get("model") == model and record.get("load_seconds", 0) > 0
    )
    seconds = load_seconds_for(model, records)
    if not seen:
        return seconds, f"no load of {model} seen here yet: a cautious {seconds:.0f} s"
    count = min(seen, RECENT)
    median = "the one" if count == 1 else f"the median of the last {count}"
    return seconds, f"its loads here take {seconds:.0f} s, {median}"
