"""The engine's pace, measured in its own process right after it loads.

A model never run on this machine has no history to estimate its first job from, and a
guess can be twenty times off (a small model on a fast CPU, a large one on a slow GPU). So
the engine runs a short probe before it takes work: a batch of synthetic requests whose
answers end at set lengths, then two groups of long prompts. Each engine step is timed,
with the prompt and completion tokens it processed (from the engine's own counters), so
the estimator can fit its time model (a cost per generated token, per step and per prompt
token) to steps where the batch shrinks from full to one and to steps that only prefill.
The probe stops early at its time budget (after ten decode steps and one step of each
prefill group, however late): on an idle two-core CPU it takes about two seconds, on one
that other work keeps busy as long as that work makes it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from runner.types import COMPLETIONS, EMBEDDINGS, Engine, EngineRequest, RequestRejected

BUDGET_SECONDS = 2.0
DECODE_REQUESTS = 16
# Decode steps timed however busy the machine: half the batch has ended by then, enough to
# tell the cost of a token from that of a step.
DECODE_STEPS = 10
# Varied words, so that no two prompts share a block of the prefix cache after the first.
WORDS = (
    "river stone lantern orchard velvet harbour meadow copper thistle window engine "
    "marble sparrow canyon ribbon walnut glacier pepper violin compass"
).split()


def _text(index: int, words: int) -> str:
    stride = index % 5 + 1
    return " ".join(
        [f"Note {index}:"] + [WORDS[(index * 7 + n * stride) % len(WORDS)] for n in range(words)]
    )


def _requests(
    runner: str, prefix: str, first: int, count: int, words: int, max_tokens: int | None
) -> list[EngineRequest]:
    """`count` requests of about `words` words each; answers of `max_tokens`, or of 2, 3,
    4... tokens when None."""
    if runner == "pooling":
        return [
            EngineRequest(f"{prefix}{i}", EMBEDDINGS, [_text(first + i, words)])
            for i in range(count)
        ]
    return [
        EngineRequest(
            f"{prefix}{i}",
            COMPLETIONS,
            _text(first + i, words),
            {"max_tokens": max_tokens or 2 + i, "ignore_eos": True, "temperature": 0.0},
        )
        for i in range(count)
    ]


def _run(
    engine: Engine, requests: list[EngineRequest], found: list, deadline: float, least: int
) -> None:
    """Add the requests and step until they are done or the time is up (after `least` steps
    however late: each phase tells something the others do not), timing each step."""
    steps: list[list[float]] = []
    for request in requests:
        try:
            engine.add(request)
        except RequestRejected:
            continue  # a model with a tiny context: the probe makes do with the rest
    before = engine.counters()
    while engine.has_unfinished():
        if len(steps) >= least and time.monotonic() >= deadline:
            engine.abort([request.key for request in requests])
            break
        started = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - started
        after = engine.counters()  # outside the timed part: reading it costs a few ms
        steps.append([after[0] - before[0], after[1] - before[1], round(seconds, 6)])
        before = after
    found += steps


def measure_pace(engine: Engine, budget_seconds: float = BUDGET_SECONDS) -> dict[str, Any]:
    """Time the engine's steps on synthetic work: [prompt tokens, completion tokens,
    seconds] for each step, and the probe's own seconds."""
    started = time.monotonic()
    runner = engine.info.runner
    steps: list[list[float]] = []
    # A batch whose answers end one after another, 2 to 17 tokens: the steps go from a full
    # batch to a single request, which tells the cost of a step from that of a token.
    decode = _requests(runner, "pace-d", 0, DECODE_REQUESTS, 12, None)
    _run(engine, decode, steps, started + 0.6 * budget_seconds, DECODE_STEPS)
    # Long prompts with one-token answers: steps that are nearly all prefill.
    for group, count in enumerate((2, 4)):
        prefill = _requests(runner, f"pace-p{group}", 100 * (group + 1), count, 160, 1)
        _run(engine, prefill, steps, started + budget_seconds, 1)
    return {"steps": steps, "seconds": round(time.monotonic() - started, 3)}


def with_pace(engine: Engine, budget_seconds: float = BUDGET_SECONDS) -> Engine:
    """The engine, its info carrying the pace measured now."""
    engine.info = replace(engine.info, pace=measure_pace(engine, budget_seconds))
    return engine
