"""The estimate of a job, from the benchmark history and the paces engines timed at their
load: what validation asks before a job is queued, and what the queue's ETAs add up."""

from __future__ import annotations

import structlog

from benchmarks.estimator import RECENT, Estimate, JobShape, estimate_run, load_seconds_for
from benchmarks.record import History, append_pace, pace_record, read_paces
from runner.types import EngineInfo
from watcher.config import Config
from watcher.jobs import Job
from watcher.sidecars import iso, now

log = structlog.get_logger()


def job_shape(job: Job, hardware: str | None = None) -> JobShape:
    return JobShape(
        model=job.model or "",
        endpoint=job.endpoint,
        requests=job.total,
        prompt_chars=job.prompt_chars,
        max_tokens={value: count for value, count in job.max_tokens},
        hardware=hardware,
        engine_kind=job.engine_kind,
    )


def estimate_job(job: Job, history: History, hardware: str | None = None) -> Estimate:
    """The job's run time from the history, and from the paces engines timed at their load
    (what a model with no finished job yet is estimated from)."""
    records = [*read_paces(history.state), *history.records()]
    return estimate_run(job_shape(job, hardware), records)


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
        engine_kind=spec.engine_kind,
    )
    append_pace(state, record)
    job.estimate = estimate_job(job, History(state)).as_dict()


def expected_load_seconds(model: str, history: History) -> float:
    """How long loading the model is expected to take, from its earlier loads here."""
    return load_seconds_for(model, history.records())


def compact_history(history: History, force: bool) -> None:
    """Keep the history file to what estimates use (at a start, or once it has doubled); a
    disk that refuses the rewrite leaves the file as it was, and the service goes on."""
    try:
        dropped = history.compact(force=force)
    except OSError as error:
        log.warning("history_not_compacted", error=str(error))
        return
    if dropped:
        log.info("history_compacted", dropped=dropped, kept=len(history.records()))


def expected_load(model: str, history: History) -> tuple[float, str]:
    """How long loading the model is expected to take, and what that rests on, in words."""
    records = history.records()
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
