"""Turning benchmark history into an estimate of how long a job will run.

The time model follows how vLLM runs a batch. Each engine step decodes one token of every
request in the batch, at a cost per token and a fixed cost per step, and prefill costs per
prompt token, so a job's run time is

    seconds = per_token * C + per_step * S + per_prompt_token * P

where C is the completion tokens, P the prompt tokens and S the engine steps. The steps are
counted by replaying the batch (benchmarks.batching): B slots (the job's requests, at most
the engine's `max_num_seqs`, the runner's `max_in_flight`, and what the KV cache holds, in
whole blocks), each request taking the first free slot for as long as its answer runs. So a
job whose requests all fit in one batch takes as many steps as its longest answer, and the
last answers, decoded nearly alone, cost steps rather than tokens. The three coefficients
are fitted by non-negative least squares on the relative error over the recent jobs of the
same model and endpoint on this machine; with fewer than three jobs the fit keeps the ratio
between them from cautious defaults and only scales their sum. With no job at all the
defaults stand: about 30 generated tokens a second, slow enough for a busy two-core CPU, so
that a first estimate errs late.

Prompt tokens are the prompt characters times tokens per character, plus what the chat
template adds to each request, both fitted to the history (four characters a token and 32
tokens a chat request until it says otherwise).

Completion tokens are unknown before the run. Each earlier job keeps a sample of its
requests' completion lengths, with each request's `max_tokens` and whether it stopped by
itself or was cut off. A Kaplan-Meier estimate over those samples (cut-off requests are
censored, not short) gives the expected length of a request under any `max_tokens`, and
the evenly spread lengths that the replay of the batch uses. The samples of jobs most like
this one count most: each weighs exp(-d/2), d the squared log2 ratios of the prompt
characters per request and of the `max_tokens` (Beran's kernel-weighted Kaplan-Meier), so
a history of one-word labels does not shorten the forecast for a file of essays.

While a job runs, benchmarks.refine measures its pace, the seconds per unit of modelled
work done, and expects the work left at that pace. A model new here has its engine's pace
timed at its first load (runner.pace): a fit of the time model to the timed steps of that
probe stands in for the cautious defaults.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.batching import DEFAULT_CONCURRENCY, concurrency_of, record_features, replay
from benchmarks.lengths import (
    expected_length,
    natural_tail,
    planned_lengths,
    spread,
    survival_curve,
)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
CHARS_PER_TOKEN = 4.0  # until history says otherwise
CHAT_TEMPLATE_TOKENS = 32.0  # what a chat template adds to each request, until history says
RECENT = 20
# Cautious defaults for a model never run here: about 30 generated tokens a second in a
# batch, 3 alone, 65 prompt tokens a second. Their ratios are those measured for a small
# model on a two-core CPU, so that one or two calibrating jobs only need to fix the scale.
COLD = (0.03, 0.3, 0.015)  # per token, per step, per prompt token
COLD_COMPLETION_TOKENS = 256
COLD_LOAD_SECONDS = 60.0
PRIOR_SHARE = 0.25  # the model's pace counts as much as the job's own until this much is done
LENGTH_QUANTILES = 64  # predicted answer lengths an estimate keeps for refine
PACE_STEPS = 8  # timed steps a pace needs for its own fit (runner.pace times 12 at least)


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
    # what runs the model (runner.types.ModelSpec.engine_kind): records of another backend
    # of the same model (a local engine, a Ray cluster) do not count
    engine_kind: str | None = None


@dataclass(frozen=True)
class Estimate:
    run_seconds: float
    basis: str
    jobs: int
    prompt_tokens: float
    completion_tokens: float
    coefficients: tuple[float, float, float] = COLD
    concurrency: int = DEFAULT_CONCURRENCY
    steps: float = 0.0
    # the replayed job's [share of its completion tokens, share of its steps], by tenths
    progress: list[list[float]] = field(default_factory=list)
    # the predicted answer lengths, evenly spread quantiles (refine weighs the answers still
    # running against them)
    lengths: list[float] = field(default_factory=list)
    longest: int = 0  # the largest max_tokens of the job's requests

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_seconds": round(self.run_seconds, 2),
            "basis": self.basis,
            "jobs": self.jobs,
            "prompt_tokens": round(self.prompt_tokens),
            "completion_tokens": round(self.completion_tokens),
            "steps": round(self.steps, 1),
            "coefficients": list(self.coefficients),
            "concurrency": self.concurrency,
            "progress": [[round(a, 3), round(b, 3)] for a, b in self.progress],
            "lengths": [round(length, 1) for length in self.lengths],
            "longest": self.longest,
        }


def same_engine(record: dict[str, Any], shape: JobShape) -> bool:
    """Whether a record was made on the engine the shape names; records made before
    records named their engine count for any."""
    kind = record.get("engine_kind")
    return shape.engine_kind is None or kind is None or kind == shape.engine_kind


def matching(history: Iterable[dict[str, Any]], shape: JobShape) -> list[dict[str, Any]]:
    """The usable records of the same model, endpoint and (when known) hardware, newest last."""
    seen: set[str] = set()
    records = []
    for record in history:
        if (
            record.get("model") == shape.model
            and record.get("endpoint") == shape.endpoint
            and (shape.hardware is None or record.get("hardware") == shape.hardware)
            and same_engine(record, shape)
            and record.get("run_seconds", 0) > 0
            and record.get("request_counts", {}).get("completed", 0) > 0
            and record.get("job_id") not in seen
        ):
            seen.add(record.get("job_id"))
            records.append(record)
    return records[-RECENT:]


# -- completion lengths ------------------------------------------------------------------


def length_curves(
    records: list[dict[str, Any]], shape: JobShape, caps: Iterable[int]
) -> dict[int, list[tuple[int, float]]]:
    """A survival curve for each of the job's caps, from the earlier jobs' samples, each
    weighted by how alike it is: a factor of two in prompt characters per request, or in
    max_tokens, weighs exp(-1/2); ten, nearly nothing. Jobs of one kind thus predict their
    kind, and a job of labels does not shorten the forecast for a job of essays. Past the
    longest answer seen, the curve goes on as the fitted natural lengths say (natural_tail)."""
    chars = shape.prompt_chars / max(shape.requests, 1)
    samples, likeness = [], []
    for record in records:
        counts = record.get("request_counts") or {}
        total = counts.get("total") or counts.get("completed") or 1
        distance = math.log2((record.get("prompt_chars", 0) / total + 1) / (chars + 1)) ** 2
        for sample in record.get("completion_samples") or []:
            samples.append(sample)
            likeness.append((distance, max(int(sample[0] or 1), 1)))
    curves = {}
    for cap in caps:
        weights = [math.exp(-0.5 * (d + math.log2(c / cap) ** 2)) for d, c in likeness]
        curve = survival_curve(samples, weights)
        curves[cap] = curve + natural_tail(curve, samples, weights, cap)
    return curves


def _caps(shape: JobShape, cold: bool) -> dict[int, int]:
    caps: dict[int, int] = {}
    for cap, count in (shape.max_tokens or {None: shape.requests}).items():
        value = cap or shape.max_model_len
        if cold:
            value = min(value, COLD_COMPLETION_TOKENS)
        caps[value] = caps.get(value, 0) + count
    return caps


# -- the time model -----------------------------------------------------------------------


def model_seconds(coefficients: Sequence[float], features: Sequence[float]) -> float:
    return sum(c * f for c, f in zip(coefficients, features))


def nonnegative_fit(
    rows: list[tuple[float, ...]], targets: Sequence[float] | None = None
) -> tuple[float, ...] | None:
    """Non-negative least squares of sum(c * row) = target (1 unless given), by trying
    every set of active terms."""
    width = len(rows[0]) if rows else 0
    goals = list(targets) if targets is not None else [1.0] * len(rows)
    best, best_error = None, math.inf
    for size in range(1, width + 1):
        for active in itertools.combinations(range(width), size):
            solution = _solve(rows, goals, active)
            if solution is None or min(solution) < 0:
                continue
            coefficients = [0.0] * width
            for index, value in zip(active, solution):
                coefficients[index] = value
            error = sum((model_seconds(coefficients, r) - g) ** 2 for r, g in zip(rows, goals))
            if best is None or error < best_error * (1 - 1e-12) - 1e-15:
                best, best_error = tuple(coefficients), error
    return best


def _solve(
    rows: list[tuple[float, ...]], goals: list[float], active: tuple[int, ...]
) -> list[float] | None:
    """Least squares of sum(c * row[active]) = goal (normal equations; three columns at
    most)."""
    size = len(active)
    matrix = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
    vector = [sum(r[i] * g for r, g in zip(rows, goals)) for i in active]
    scale = max((abs(value) for line in matrix for value in line), default=0.0)
    for column in range(size):  # Gauss-Jordan with partial pivoting
        pivot = max(range(column, size), key=lambda row: abs(matrix[row][column]))
        if abs(matrix[pivot][column]) <= 1e-12 * scale:
            return None
        matrix[column], matrix[pivot] = matrix[pivot], matrix[column]
        vector[column], vector[pivot] = vector[pivot], vector[column]
        for row in range(size):
            if row != column:
                factor = matrix[row][column] / matrix[column][column]
                matrix[row] = [a - factor * b for a, b in zip(matrix[row], matrix[column])]
                vector[row] -= factor * vector[column]
    return [vector[i] / matrix[i][i] for i in range(size)]


def fit_coefficients(
    records: list[dict[str, Any]], prior: Sequence[float] = COLD
) -> tuple[float, float, float]:
    """The time model's coefficients, fitted on the relative error of each record's time."""
    rows = []
    for record in records:
        seconds = record["run_seconds"]
        rows.append(tuple(value / seconds for value in record_features(record)))
    if len(records) < 3:
        # Too few jobs to tell the terms apart: keep the prior's shape (the engine's
        # measured pace, else the cautious defaults), fit only its scale.
        scale = statistics.median(1.0 / max(model_seconds(prior, row), 1e-12) for row in rows)
        return tuple(scale * c for c in prior)  # type: ignore[return-value]
    return nonnegative_fit(rows) or tuple(prior)  # type: ignore[return-value]


def latest_pace(history: Iterable[dict[str, Any]], shape: JobShape) -> dict[str, Any] | None:
    """The last pace the model's engine measured at its load here (runner.pace)."""
    paces = [
        record
        for record in history
        if record.get("kind") == "pace"
        and record.get("model") == shape.model
        and (shape.hardware is None or record.get("hardware") == shape.hardware)
        and same_engine(record, shape)
    ]
    return paces[-1] if paces else None


def pace_coefficients(record: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """The time model fitted to the probe's timed steps ([prompt tokens, completion tokens,
    seconds] each) on their seconds, so that the long prefill steps weigh as much as the
    time they take: a job's time is a sum of such steps.

    A fit that gives some kind of work no cost at all (steps timed on a busy machine, where
    other processes took the cores now and then, scatter too much to tell the terms apart)
    would estimate some jobs at nothing, and one to fewer than PACE_STEPS steps (an older
    probe cut short by a busy machine) fits any three numbers exactly: then the cautious
    defaults are scaled to the probe's total time instead, as the fit scales them to a
    first job."""
    steps = ((record or {}).get("pace") or {}).get("steps") or []
    timed = [(float(c), 1.0, float(p), float(s)) for p, c, s in steps if s > 0]
    if not timed:
        return None
    fitted = None
    if len(timed) >= PACE_STEPS:
        fitted = nonnegative_fit([row[:3] for row in timed], [row[3] for row in timed])
    if fitted is not None and min(fitted) > 0:
        return fitted  # type: ignore[return-value]
    modelled = sum(model_seconds(COLD, row[:3]) for row in timed)
    scale = sum(row[3] for row in timed) / modelled
    return tuple(scale * c for c in COLD)  # type: ignore[return-value]


# -- prompt tokens ------------------------------------------------------------------------


def prompt_model(records: list[dict[str, Any]], endpoint: str | None) -> tuple[float, float]:
    """(tokens per character, tokens each request adds), from the records' prompts.

    Fitted when the records' prompts differ enough in length to tell the two apart; else
    four characters a token, and what is left over is the per-request part.
    """
    points = []
    for record in records:
        completed = record["request_counts"].get("completed", 0)
        total = record["request_counts"].get("total", 0) or completed
        if record.get("prompt_chars", 0) > 0 and record.get("prompt_tokens", 0) > 0:
            points.append((record["prompt_chars"] / total, record["prompt_tokens"] / completed))
    per_char = 1.0 / CHARS_PER_TOKEN
    if not points:
        return per_char, CHAT_TEMPLATE_TOKENS if endpoint == CHAT else 0.0
    lengths = [chars for chars, _ in points]
    if len(points) >= 2 and max(lengths) >= 1.5 * min(lengths):
        fitted = nonnegative_fit([(chars / tokens, 1.0 / tokens) for chars, tokens in points])
        if fitted is not None and fitted[0] > 0:
            return fitted[0], fitted[1]
    extra = statistics.median(tokens - chars * per_char for chars, tokens in points)
    if extra < 0:  # denser text than four characters a token
        return statistics.median(tokens / chars for chars, tokens in points), 0.0
    return per_char, extra


# -- the estimate -------------------------------------------------------------------------


def estimate_run(shape: JobShape, history: Iterable[dict[str, Any]]) -> Estimate:
    history = list(history)
    records = matching(history, shape)
    pace_record = latest_pace(history, shape)
    pace = pace_coefficients(pace_record)
    engine = records[-1] if records else pace_record  # the engine's batch and KV cache
    if records:
        coefficients = fit_coefficients(records, pace or COLD)
        plural = "s" if len(records) != 1 else ""
        basis = f"{len(records)} earlier job{plural} of {shape.model} on this machine"
    elif pace is not None:
        coefficients = pace
        basis = (
            f"no earlier jobs of {shape.model} on this machine: its engine's pace, "
            "measured at its load"
        )
    else:
        coefficients = COLD
        basis = f"no earlier jobs of {shape.model} on this machine: a cautious first guess"
    per_char, per_request = prompt_model(records, shape.endpoint)
    prompt = shape.prompt_chars * per_char + shape.requests * per_request
    sampled = any(record.get("completion_samples") for record in records)
    caps = _caps(shape, cold=not sampled)
    curves = length_curves(records, shape, caps)
    requests = max(shape.requests, 1)
    lengths: list[float] = []
    if shape.endpoint == EMBEDDINGS:
        completion, progress = 0.0, []
        concurrency = concurrency_of(requests, engine, prompt / requests)
        steps = requests / concurrency
    else:
        completion = sum(count * expected_length(curves[cap], cap) for cap, count in caps.items())
        concurrency = concurrency_of(requests, engine, (prompt + completion) / requests)
        planned = planned_lengths(curves, caps)
        steps, progress = replay(planned, concurrency, requests)
        lengths = spread(planned, min(LENGTH_QUANTILES, len(planned)))
    seconds = model_seconds(coefficients, (completion, steps, prompt))
    return Estimate(
        seconds,
        basis,
        len(records),
        prompt,
        completion,
        coefficients,
        concurrency,
        steps,
        progress,
        lengths,
        max((cap or shape.max_model_len for cap in shape.max_tokens), default=0),
    )


def load_seconds_for(model: str, history: Iterable[dict[str, Any]]) -> float:
    """The median time this model took to load here; a cautious minute when never seen."""
    loads = [
        record["load_seconds"]
        for record in history
        if record.get("model") == model and record.get("load_seconds", 0) > 0
    ]
    return statistics.median(loads[-RECENT:]) if loads else COLD_LOAD_SECONDS
