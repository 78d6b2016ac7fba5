"""Turning benchmark history into an estimate of how long a job will run.

The model: a job's run time is proportional to its work, where
work = completion tokens + PROMPT_WEIGHT x prompt tokens. Completion tokens are unknown
before the run; they are predicted per request from earlier jobs of the same model, capped
by each request's `max_tokens`. The seconds per unit of work is the median over the most
recent jobs of the same model, endpoint and hardware.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PROMPT_WEIGHT = 0.1  # prefill runs in parallel over the prompt; a token of it costs far less
CHARS_PER_TOKEN = 4.0  # until history says otherwise
COLD_SECONDS_PER_WORK = 0.05  # 20 generated tokens a second: slow on purpose, never promising
COLD_COMPLETION_TOKENS = 256
RECENT = 20


@dataclass(frozen=True)
class JobShape:
    model: str
    endpoint: str | None
    requests: int
    prompt_chars: int
    # how many requests ask for each max_tokens (None: not set), a compact exact summary
    max_tokens: dict[int | None, int] = field(default_factory=dict)
    hardware: str | None = None


@dataclass(frozen=True)
class Estimate:
    run_seconds: float
    basis: str
    jobs: int
    prompt_tokens: float
    completion_tokens: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_seconds": round(self.run_seconds, 2),
            "basis": self.basis,
            "jobs": self.jobs,
            "prompt_tokens": round(self.prompt_tokens),
            "completion_tokens": round(self.completion_tokens),
        }


def matching(history: Iterable[dict[str, Any]], shape: JobShape) -> list[dict[str, Any]]:
    """The usable records of the same model, endpoint and (when known) hardware, newest last."""
    records = [
        record
        for record in history
        if record.get("model") == shape.model
        and record.get("endpoint") == shape.endpoint
        and (shape.hardware is None or record.get("hardware") == shape.hardware)
        and record.get("run_seconds", 0) > 0
        and record.get("request_counts", {}).get("completed", 0) > 0
    ]
    return records[-RECENT:]


def _work(prompt_tokens: float, completion_tokens: float) -> float:
    return completion_tokens + PROMPT_WEIGHT * prompt_tokens


def estimate_run(shape: JobShape, history: Iterable[dict[str, Any]]) -> Estimate:
    records = matching(history, shape)
    if records:
        prompt_chars = sum(record.get("prompt_chars", 0) for record in records)
        prompt_tokens = sum(record.get("prompt_tokens", 0) for record in records)
        chars_per_token = prompt_chars / prompt_tokens if prompt_tokens else CHARS_PER_TOKEN
        completed = sum(record["request_counts"]["completed"] for record in records)
        per_request = sum(record.get("completion_tokens", 0) for record in records) / completed
        seconds_per_work = statistics.median(
            record["run_seconds"]
            / max(_work(record.get("prompt_tokens", 0), record.get("completion_tokens", 0)), 1)
            for record in records
        )
        basis = f"{len(records)} earlier job{'s' if len(records) != 1 else ''} of {shape.model}"
        basis += " on this machine"
    else:
        chars_per_token = CHARS_PER_TOKEN
        per_request = COLD_COMPLETION_TOKENS
        seconds_per_work = COLD_SECONDS_PER_WORK
        basis = f"no earlier jobs of {shape.model} on this machine: a cautious first guess"
    expected_prompt = shape.prompt_chars / max(chars_per_token, 0.5)
    caps = shape.max_tokens or {None: shape.requests}
    expected_completion = sum(
        count * (per_request if cap is None else min(cap, per_request))
        for cap, count in caps.items()
    )
    if shape.endpoint == "/v1/embeddings":
        expected_completion = 0.0
    run_seconds = seconds_per_work * _work(expected_prompt, expected_completion)
    return Estimate(run_seconds, basis, len(records), expected_prompt, expected_completion)


COLD_LOAD_SECONDS = 60.0


def load_seconds_for(model: str, history: Iterable[dict[str, Any]]) -> float:
    """The median time this model took to load here; a cautious minute when never seen."""
    loads = [
        record["load_seconds"]
        for record in history
        if record.get("model") == model and record.get("load_seconds", 0) > 0
    ]
    return statistics.median(loads[-RECENT:]) if loads else COLD_LOAD_SECONDS


def remaining_seconds(estimated_run: float, elapsed: float, fraction_done: float) -> float:
    """Blend the estimate made before the run with the pace so far, trusting the pace more
    as more of the job is done; never less than zero."""
    if fraction_done <= 0:
        return max(estimated_run - elapsed, 0.0)
    projected = elapsed / fraction_done
    blended = fraction_done * projected + (1 - fraction_done) * max(estimated_run, elapsed)
    return max(blended - elapsed, 0.0)
