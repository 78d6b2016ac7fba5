"""The time left of a running job, from the work its engine has done so far."""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.batching import DEFAULT_CONCURRENCY
from benchmarks.estimator import COLD, PRIOR_SHARE, model_seconds
from benchmarks.lengths import SIMULATED, spread


@dataclass(frozen=True)
class Refined:
    seconds_left: float
    overrun: bool


def steps_done(estimate: dict[str, Any], completion_done: float) -> float:
    """The engine steps behind the completion tokens done so far, from the replayed job's
    progress: early on the batch is full and each step makes many tokens, near the end few."""
    completion = float(estimate.get("completion_tokens", 0))
    steps = float(estimate.get("steps") or 0.0)
    progress = estimate.get("progress") or [[0.0, 0.0], [1.0, 1.0]]
    if completion <= 0 or steps <= 0:
        return 0.0
    share = completion_done / completion
    if share >= 1.0:  # past the prediction: at the job's mean tokens a step
        return steps + (completion_done - completion) / max(completion / steps, 1.0)
    for (tokens_a, steps_a), (tokens_b, steps_b) in zip(progress, progress[1:]):
        if share <= tokens_b:
            within = (share - tokens_a) / (tokens_b - tokens_a) if tokens_b > tokens_a else 1.0
            return steps * (steps_a + within * (steps_b - steps_a))
    return steps


def refine(
    estimate: dict[str, Any],
    elapsed: float,
    prompt_done: float,
    completion_done: float,
    requests_done: int,
    requests_total: int,
    *,
    finished_completion: float | None = None,
    in_flight: int | None = None,
    counted: float | None = None,
) -> Refined:
    """The time left, from the work the engine has actually done so far.

    The engine's counters move once a step ends, and on a CPU a step that prefills thousands
    of prompt tokens takes many seconds. So the pace is the time until the counters last
    moved (`counted`, in seconds from the start like `elapsed`) over the work they count,
    and the time since then is work under way, taken off what is left: the estimate does
    not creep later while a long step runs.

    The engine's token counters include requests still in flight. With the tokens of the
    finished requests and how many are in flight, the answers still running are weighed
    against the predicted lengths: each has run `age` tokens (their tokens over their
    number), so it is one of the predicted answers longer than that, and what it has left
    is what those have left. A job whose answers run longer than predicted thus sees more
    left as soon as fewer of them end than predicted, not only once its predicted tokens
    are spent. The requests not started yet run as predicted. The steps left come from
    replaying that rest through the batch; the pace, seconds per unit of the time model's
    work, from the work done so far, leaning on the model's own (1) until a quarter of the
    job's work is done. Without the two counts (older callers), the work left is the
    predicted work less that done (refine_by_share).
    """
    requests_left = max(requests_total - requests_done, 0)
    if requests_left == 0:
        return Refined(0.0, False)
    lengths = [float(length) for length in estimate.get("lengths") or []]
    if finished_completion is None or in_flight is None or not lengths:
        return refine_by_share(
            estimate, elapsed, prompt_done, completion_done, requests_done, requests_total
        )
    coefficients = estimate.get("coefficients") or COLD
    batch = max(int(estimate.get("concurrency") or DEFAULT_CONCURRENCY), 1)
    running = min(max(in_flight, 0), requests_left, batch)  # the rest of those wait
    waiting = requests_left - running
    age = max(completion_done - finished_completion, 0.0) / running if running else 0.0
    longer = [length - age for length in lengths if length > age]
    overrun = running > 0 and not longer
    # Past every predicted length, an answer still running is taken to be half done, and
    # to end at its max_tokens at the latest.
    longest = float(estimate.get("longest") or 2 * age)
    residuals = longer or [max(min(age, longest - age), 1.0)]
    scale = min(1.0, SIMULATED / max(requests_left, 1))
    running_lengths = spread(residuals, max(round(running * scale), 1 if running else 0))
    waiting_lengths = spread(lengths, round(waiting * scale))
    tokens_left = running * statistics.fmean(residuals) + waiting * statistics.fmean(lengths)
    steps_left = steps_to_finish(running_lengths, waiting_lengths, max(round(batch * scale), 1))
    # Every request in flight has run since about when the oldest started; with more
    # requests than the batch holds, the batch ran full.
    done_steps = max(age, completion_done / min(batch, max(requests_total, 1)))
    prompt_left = max(float(estimate.get("prompt_tokens", 0)) - prompt_done, 0.0)
    left = (tokens_left, min(steps_left, tokens_left), prompt_left)
    done = model_seconds(coefficients, (completion_done, done_steps, prompt_done))
    counted = elapsed if counted is None else min(max(counted, 0.0), elapsed)
    under_way = elapsed - counted
    return Refined(max(paced(coefficients, counted, done, left) - under_way, 1.0), overrun)


def paced(coefficients: Sequence[float], elapsed: float, done: float, left: Sequence[float]):
    """The model's seconds for the work left, at the pace measured so far: seconds per unit
    of work done, leaning on the model's own pace (1) while little of the job is done."""
    rest = model_seconds(coefficients, left)
    prior = max(PRIOR_SHARE * (done + rest), 0.1)
    return rest * (max(elapsed, 0.0) + prior) / (done + prior)


def steps_to_finish(running: list[float], waiting: list[float], slots: int) -> float:
    """Steps until the batch is done: the running answers hold their slots for what they
    have left, the waiting ones (in a fixed shuffled order) take the first slot free."""
    free_at = sorted(running) + [0.0] * max(slots - len(running), 0)
    heapq.heapify(free_at)
    order = list(waiting)
    random.Random(0).shuffle(order)
    for length in order:
        heapq.heappush(free_at, heapq.heappop(free_at) + length)
    return max(free_at, default=0.0)


def refine_by_share(
    estimate: dict[str, Any],
    elapsed: float,
    prompt_done: float,
    completion_done: float,
    requests_done: int,
    requests_total: int,
) -> Refined:
    """The time left as the predicted work less the work done, read off the replayed job's
    progress; past the predicted tokens, the requests left run as long as those so far."""
    requests_left = max(requests_total - requests_done, 0)
    coefficients = estimate.get("coefficients") or COLD
    batch = max(float(estimate.get("concurrency") or DEFAULT_CONCURRENCY), 1.0)
    completion = float(estimate.get("completion_tokens", 0))
    prompt = float(estimate.get("prompt_tokens", 0))
    steps = float(estimate.get("steps") or completion / batch)
    done_steps = steps_done({**estimate, "steps": steps}, completion_done)
    overrun = completion_done >= completion and completion_done > 0
    if overrun:
        in_flight = min(batch, requests_left)
        per_request = completion_done / (requests_done + in_flight / 2)
        completion = completion_done + per_request * (requests_left - in_flight / 2)
        steps = done_steps + per_request * max(requests_left / batch, 1.0)
    done = model_seconds(coefficients, (completion_done, done_steps, prompt_done))
    left = (
        max(completion - completion_done, 0.0),
        min(max(steps - done_steps, 0.0), max(completion - completion_done, 0.0)),
        max(prompt - prompt_done, 0.0),
    )
    # Requests are left, so the end is never now or in the past.
    return Refined(max(paced(coefficients, elapsed, done, left), 1.0), overrun)
