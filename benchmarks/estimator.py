"""Turning benchmark history into an estimate of how long a job will run.

The time model follows how vLLM runs a batch. Each engine step costs a fixed part plus a
part per sequence in the batch, and prefill costs per prompt token, so a job's run time is

    seconds = per_token * C + per_step * C / concurrency + per_prompt_token * P

where C is the completion tokens, P the prompt tokens and concurrency the number of
requests decoded together (the job's requests, at most the engine's batch size). The three
coefficients are fitted by non-negative least squares on the relative error over the recent
jobs of the same model and endpoint on this machine; with fewer than three jobs the fit
keeps the ratio between them from cautious defaults and only scales their sum.

Completion tokens are unknown before the run. Each earlier job keeps a sample of its
requests' completion lengths, with each request's `max_tokens` and whether it stopped by
itself or was cut off. A Kaplan-Meier estimate over those samples (cut-off requests are
censored, not short) gives the expected length of a request under any `max_tokens`.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4.0  # until history says otherwise
RECENT = 20
DEFAULT_CONCURRENCY = 256
# Cautious defaults for a model never run here: about 20 generated tokens a second alone.
COLD = (0.005, 0.05, 0.0005)  # per_token, per_step, per_prompt_token
COLD_COMPLETION_TOKENS = 256
COLD_LOAD_SECONDS = 60.0


@dataclass(frozen=True)
class JobShape:
    model: str
    endpoint: str | None
    requests: int
    prompt_chars: int
    # how many requests ask for each max_tokens (None: not set), a compact exact summary
    max_tokens: dict[int | None, int] = field(default_factory=dict)
    hardware: str | None = None
    max_model_len: int = 2048


@dataclass(frozen=True)
class Estimate:
    run_seconds: float
    basis: str
    jobs: int
    prompt_tokens: float
    completion_tokens: float
    coefficients: tuple[float, float, float] = COLD
    concurrency: int = DEFAULT_CONCURRENCY

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_seconds": round(self.run_seconds, 2),
            "basis": self.basis,
            "jobs": self.jobs,
            "prompt_tokens": round(self.prompt_tokens),
            "completion_tokens": round(self.completion_tokens),
            "coefficients": list(self.coefficients),
            "concurrency": self.concurrency,
        }


def matching(history: Iterable[dict[str, Any]], shape: JobShape) -> list[dict[str, Any]]:
    """The usable records of the same model, endpoint and (when known) hardware, newest last."""
    seen: set[str] = set()
    records = []
    for record in history:
        if (
            record.get("model") == shape.model
            and record.get("endpoint") == shape.endpoint
            and (shape.hardware is None or record.get("hardware") == shape.hardware)
            and record.get("run_seconds", 0) > 0
            and record.get("request_counts", {}).get("completed", 0) > 0
            and record.get("job_id") not in seen
        ):
            seen.add(record.get("job_id"))
            records.append(record)
    return records[-RECENT:]


# -- completion lengths ------------------------------------------------------------------


def survival_curve(samples: Sequence[Sequence[Any]]) -> list[tuple[int, float]]:
    """Kaplan-Meier: [(t, P(length > t))] at each length where some request stopped.

    A sample is (max_tokens, tokens, stopped); a request cut off at max_tokens is censored.
    """
    events: dict[int, list[int]] = {}
    for _, tokens, stopped in samples:
        counts = events.setdefault(int(tokens), [0, 0])
        counts[0 if stopped else 1] += 1
    at_risk = len(samples)
    survival, curve = 1.0, []
    for tokens in sorted(events):
        stopped, censored = events[tokens]
        if stopped and at_risk:
            survival *= 1 - stopped / at_risk
            curve.append((tokens, survival))
        at_risk -= stopped + censored
    return curve


def expected_length(curve: list[tuple[int, float]], cap: int) -> float:
    """E[min(cap, L)] = the area under the survival curve from 0 to cap."""
    area, previous_t, previous_s = 0.0, 0, 1.0
    for tokens, survival in curve:
        if tokens >= cap:
            break
        area += (tokens - previous_t) * previous_s
        previous_t, previous_s = tokens, survival
    return area + (cap - previous_t) * previous_s


def predict_completion(shape: JobShape, records: list[dict[str, Any]]) -> float:
    if shape.endpoint == "/v1/embeddings":
        return 0.0
    samples = [sample for record in records for sample in record.get("completion_samples", [])]
    caps = shape.max_tokens or {None: shape.requests}
    if not samples:
        return sum(
            count * min(cap or shape.max_model_len, COLD_COMPLETION_TOKENS)
            for cap, count in caps.items()
        )
    curve = survival_curve(samples)
    return sum(
        count * expected_length(curve, cap or shape.max_model_len) for cap, count in caps.items()
    )


# -- the time model -----------------------------------------------------------------------


def features(completion: float, prompt: float, concurrency: float) -> tuple[float, float, float]:
    return (completion, completion / max(concurrency, 1.0), prompt)


def concurrency_of(requests: int, record: dict[str, Any] | None = None) -> int:
    settings = (record or {}).get("engine_settings") or {}
    batch = settings.get("max_num_seqs") or DEFAULT_CONCURRENCY
    in_flight = settings.get("max_in_flight") or batch
    return max(1, min(requests, int(batch), int(in_flight)))


def _solve(rows: list[tuple[float, ...]], targets: list[float], active: tuple[int, ...]):
    """Least squares over the `active` columns (normal equations; three columns at most)."""
    size = len(active)
    matrix = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
    vector = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in active]
    for column in range(size):  # Gauss-Jordan with partial pivoting
        pivot = max(range(column, size), key=lambda row: abs(matrix[row][column]))
        if abs(matrix[pivot][column]) < 1e-18:
            return None
        matrix[column], matrix[pivot] = matrix[pivot], matrix[column]
        vector[column], vector[pivot] = vector[pivot], vector[column]
        for row in range(size):
            if row != column:
                factor = matrix[row][column] / matrix[column][column]
                matrix[row] = [a - factor * b for a, b in zip(matrix[row], matrix[column])]
                vector[row] -= factor * vector[column]
    return [vector[i] / matrix[i][i] for i in range(size)]


def fit_coefficients(records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Non-negative least squares of relative error, by trying every set of active terms."""
    rows, targets = [], []
    for record in records:
        seconds = record["run_seconds"]
        requests = record["request_counts"].get("completed", 0)
        row = features(
            record.get("completion_tokens", 0),
            record.get("prompt_tokens", 0),
            concurrency_of(requests, record),
        )
        rows.append(tuple(value / seconds for value in row))
        targets.append(1.0)
    if len(records) < 3:
        # Too few jobs to tell the terms apart: keep the cautious shape, fit only its scale.
        scale = statistics.median(
            1.0 / max(sum(c * f for c, f in zip(COLD, row)), 1e-12) for row in rows
        )
        return tuple(scale * c for c in COLD)  # type: ignore[return-value]
    best, best_error = COLD, float("inf")
    for size in (1, 2, 3):
        for active in itertools.combinations(range(3), size):
            solution = _solve(rows, targets, active)
            if solution is None or min(solution) < 0:
                continue
            coefficients = [0.0, 0.0, 0.0]
            for index, value in zip(active, solution):
                coefficients[index] = value
            error = sum((sum(c * f for c, f in zip(coefficients, row)) - 1.0) ** 2 for row in rows)
            if error < best_error - 1e-12:
                best, best_error = tuple(coefficients), error
    return best  # type: ignore[return-value]


def model_seconds(
    coefficients: Sequence[float], completion: float, prompt: float, concurrency: float
) -> float:
    return sum(c * f for c, f in zip(coefficients, features(completion, prompt, concurrency)))


def estimate_run(shape: JobShape, history: Iterable[dict[str, Any]]) -> Estimate:
    records = matching(history, shape)
    if records:
        chars = sum(record.get("prompt_chars", 0) for record in records)
        tokens = sum(record.get("prompt_tokens", 0) for record in records)
        chars_per_token = chars / tokens if chars and tokens else CHARS_PER_TOKEN
        coefficients = fit_coefficients(records)
        plural = "s" if len(records) != 1 else ""
        basis = f"{len(records)} earlier job{plural} of {shape.model} on this machine"
    else:
        chars_per_token = CHARS_PER_TOKEN
        coefficients = COLD
        basis = f"no earlier jobs of {shape.model} on this machine: a cautious first guess"
    prompt = shape.prompt_chars / max(chars_per_token, 0.5)
    completion = predict_completion(shape, records)
    concurrency = concurrency_of(shape.requests, records[-1] if records else None)
    seconds = model_seconds(coefficients, completion, prompt, concurrency)
    return Estimate(seconds, basis, len(records), prompt, completion, coefficients, concurrency)


# -- while a job runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refined:
    seconds_left: float
    overrun: bool


def refine(
    estimate: dict[str, Any],
    elapsed: float,
    prompt_done: float,
    completion_done: float,
    requests_done: int,
    requests_total: int,
) -> Refined:
    """The time left, from the work the engine has actually done so far.

    The engine's token counters include requests still in flight, so the pace is not biased
    towards the short requests that finish first. The pace corrects the model's speed;
    what is left is the predicted work less the work done. When the job has already done
    more work than predicted, the rest is expected at this job's own tokens per request.
    """
    requests_left = max(requests_total - requests_done, 0)
    if requests_left == 0:
        return Refined(0.0, False)
    coefficients = estimate.get("coefficients") or COLD
    concurrency = estimate.get("concurrency") or DEFAULT_CONCURRENCY
    done = model_seconds(coefficients, completion_done, prompt_done, concurrency)
    speed = elapsed / done if done > 0 and elapsed > 0 else 1.0
    left_prompt = max(float(estimate.get("prompt_tokens", 0)) - prompt_done, 0.0)
    left_completion = float(estimate.get("completion_tokens", 0)) - completion_done
    overrun = left_completion <= 0 and completion_done > 0
    if overrun:
        left_completion = completion_done / max(requests_done, 1) * requests_left
    left = speed * model_seconds(coefficients, max(left_completion, 0.0), left_prompt, concurrency)
    # Requests are left, so the end is never now or in the past.
    return Refined(max(left, 1.0), overrun)


def load_seconds_for(model: str, history: Iterable[dict[str, Any]]) -> float:
    """The median time this model took to load here; a cautious minute when never seen."""
    loads = [
        record["load_seconds"]
        for record in history
        if record.get("model") == model and record.get("load_seconds", 0) > 0
    ]
    return statistics.median(loads[-RECENT:]) if loads else COLD_LOAD_SECONDS
