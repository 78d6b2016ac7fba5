"""Answer lengths: how long a model's answers run, from samples of earlier answers.

A sample is [max_tokens, tokens, stopped by itself]; an answer cut off at its max_tokens
only says that it would have run at least that long. Kaplan-Meier turns the samples into a
survival curve, P(length > t); past the longest answer seen the curve goes on at the rate
at which answers stopped by themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

TAIL_POINTS = 256  # points of the survival curve past the longest answer seen, at most
SIMULATED = 2048  # answer lengths planned at most; a larger job is planned at scale


def survival_curve(
    samples: Sequence[Sequence[Any]], weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Kaplan-Meier: [(t, P(length > t))] at each length where some request stopped.

    A sample is (max_tokens, tokens, stopped); a request cut off at max_tokens is censored.
    With `weights`, each sample counts that much (Beran's kernel-weighted Kaplan-Meier).
    """
    events: dict[int, list[float]] = {}
    for index, (_, tokens, stopped) in enumerate(samples):
        counts = events.setdefault(int(tokens), [0.0, 0.0])
        counts[0 if stopped else 1] += 1.0 if weights is None else weights[index]
    at_risk = float(len(samples)) if weights is None else float(sum(weights))
    survival, curve = 1.0, []
    for tokens in sorted(events):
        stopped, censored = events[tokens]
        if stopped and at_risk > 1e-12:
            survival *= max(1 - stopped / at_risk, 0.0)
            curve.append((tokens, survival))
        at_risk -= stopped + censored
    return curve


def stopping_rate(samples: Sequence[Sequence[Any]], weights: Sequence[float]) -> float:
    """The rate at which answers stop by themselves, per token: the weight of the answers
    that stopped over that of all the tokens the answers ran, cut-off ones included (the
    most likely constant hazard under censoring)."""
    tokens = sum(w * float(t) for (_, t, _), w in zip(samples, weights))
    stops = sum(w for (_, _, stopped), w in zip(samples, weights) if stopped)
    return stops / tokens if tokens > 0 else 0.0


def natural_tail(
    curve: list[tuple[int, float]],
    samples: Sequence[Sequence[Any]],
    weights: Sequence[float],
    cap: int,
) -> list[tuple[int, float]]:
    """The survival curve from the longest answer seen up to `cap`.

    Kaplan-Meier knows nothing past the longest answer seen: the answers still running
    there would all run to the cap, which overestimates a job whose max_tokens is larger
    than any before (a history of max_tokens 32, a job of 64). The answers that stopped by
    themselves, against all the tokens that answers ran, give the rate at which this
    model's answers end; past the data the curve goes on at that rate. (A Weibull fitted the
    same way swung from half to twice the truth when few answers had stopped; the constant
    rate stayed within 17 % on the answers seen here, and erred long when it erred.)"""
    top = max(weights, default=0.0)
    seen = [t for (_, t, _), w in zip(samples, weights) if w >= 1e-3 * top]
    horizon = int(max([*seen, curve[-1][0] if curve else 0]))
    if not seen or cap <= horizon:
        return []
    rate = stopping_rate(samples, weights)
    start = curve[-1][1] if curve else 1.0
    stride = max(1, math.ceil((cap - horizon) / TAIL_POINTS))
    return [
        (t, start * math.exp(-rate * (t - horizon)))
        for t in range(horizon + stride, cap + 1, stride)
    ]


def expected_length(curve: list[tuple[int, float]], cap: int) -> float:
    """E[min(cap, L)] = the area under the survival curve from 0 to cap."""
    area, previous_t, previous_s = 0.0, 0, 1.0
    for tokens, survival in curve:
        if tokens >= cap:
            break
        area += (tokens - previous_t) * previous_s
        previous_t, previous_s = tokens, survival
    return area + (cap - previous_t) * previous_s


def length_at(curve: list[tuple[int, float]], share: float) -> float:
    """The length by which `share` of the answers have stopped: the first t with
    P(L > t) <= 1 - share; infinite when the curve never gets that low."""
    for tokens, survival in curve:
        if survival <= 1.0 - share + 1e-12:
            return float(tokens)
    return math.inf


def planned_lengths(curves: dict[int, list[tuple[int, float]]], caps: dict[int, int]):
    """One answer length per request (at most SIMULATED of them, in proportion): evenly
    spread quantiles of the lengths under each request's cap."""
    scale = min(1.0, SIMULATED / max(sum(caps.values()), 1))
    lengths = []
    for cap, count in caps.items():
        kept = max(1, round(count * scale))
        lengths += [min(cap, length_at(curves[cap], (i + 0.5) / kept)) for i in range(kept)]
    return lengths



def spread(values: Iterable[float], count: int) -> list[float]:
    """`count` evenly spread quantiles of the values."""
    ordered = sorted(values)
    if count <= 0 or not ordered:
        return []
    return [ordered[int((i + 0.5) * len(ordered) / count)] for i in range(count)]
