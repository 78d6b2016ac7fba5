"""Benchmark records: one per finished job, in its outbox folder and in the history.

The history is a JSON-lines file appended with fsync; a reader skips a torn last line, so a
crash while appending costs at most that one record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from runner.durable import append_line_durably

HISTORY = "benchmarks.jsonl"
PACES = "paces.jsonl"  # what engines timed at their load: no jobs, so kept apart


def _rate(amount: float, seconds: float) -> float:
    return round(amount / seconds, 3) if seconds > 0 else 0.0


def build_record(
    *,
    job_id: str,
    status: str,
    model: str,
    source: str,
    endpoint: str | None,
    engine: dict[str, Any],
    counts: dict[str, int],
    prompt_tokens: int,
    completion_tokens: int,
    prompt_chars: int,
    requested_max_tokens: int | None,
    load_seconds: float,
    run_seconds: float,
    estimate: dict[str, Any] | None,
    finished_at: str,
    metadata: dict[str, Any] | None = None,
    completion_samples: list[list] | None = None,
    input_name: str | None = None,
    runs: int = 1,
) -> dict[str, Any]:
    """Everything SPEC section 6 names, in one flat-enough dict."""
    total_tokens = prompt_tokens + completion_tokens
    requests = counts.get("completed", 0) + counts.get("failed", 0)
    estimated = (estimate or {}).get("run_seconds")
    return {
        "job_id": job_id,
        "input": input_name,  # the file as dropped: `dir/stem.jsonl`
        "status": status,
        "finished_at": finished_at,
        "model": model,
        "source": source,
        "endpoint": endpoint,
        "hardware": engine.get("hardware"),
        "engine_version": engine.get("engine_version"),
        "engine_settings": engine.get("settings", {}),
        "request_counts": counts,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_chars": prompt_chars,
        "requested_max_tokens": requested_max_tokens,
        "load_seconds": round(load_seconds, 3),
        "run_seconds": round(run_seconds, 3),
        # how many runs the job took: more than one after a stop, a crash or a full disk,
        # with run_seconds their sum
        "runs": runs,
        "throughput": {
            "requests_per_second": _rate(requests, run_seconds),
            "prompt_tokens_per_second": _rate(prompt_tokens, run_seconds),
            "completion_tokens_per_second": _rate(completion_tokens, run_seconds),
            "total_tokens_per_second": _rate(total_tokens, run_seconds),
        },
        "estimate": estimate,
        "estimate_error": (
            round((estimated - run_seconds) / run_seconds, 4)
            if estimated is not None and run_seconds > 0
            else None
        ),
        "metadata": metadata or {},
        # [max_tokens, tokens, stopped by itself] for a sample of the answers
        "completion_samples": completion_samples or [],
    }


def pace_record(
    *, model: str, source: str, engine: dict[str, Any], pace: dict[str, Any], finished_at: str
) -> dict[str, Any]:
    """The pace an engine measured at its load (runner.pace), for the estimator until the
    model has jobs of its own here. It is no job: it has no requests, tokens or run time."""
    return {
        "job_id": f"pace_{model}_{finished_at}",
        "kind": "pace",
        "finished_at": finished_at,
        "model": model,
        "source": source,
        "hardware": engine.get("hardware"),
        "engine_version": engine.get("engine_version"),
        "engine_settings": engine.get("settings", {}),
        "pace": pace,
    }


def knows_pace(state: Path, model: str) -> bool:
    """Whether the state tells the model's pace here: a pace its engine timed, or a job (or
    calibration) of it that ran something."""
    if any(record.get("model") == model for record in read_paces(state)):
        return True
    return any(
        record.get("model") == model
        and record.get("run_seconds", 0) > 0
        and (record.get("request_counts") or {}).get("completed", 0) > 0
        for record in read_history(state)
    )


def append_history(state: Path, record: dict[str, Any]) -> None:
    append_line_durably(state / HISTORY, orjson.dumps(record))


def append_pace(state: Path, record: dict[str, Any]) -> None:
    append_line_durably(state / PACES, orjson.dumps(record))


def read_paces(state: Path) -> Iterator[dict[str, Any]]:
    return read_history(state, PACES)


def read_history(state: Path, name: str = HISTORY) -> Iterator[dict[str, Any]]:
    path = state / name
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for line in handle:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn line from a crash while appending
            if isinstance(record, dict):
                yield record
