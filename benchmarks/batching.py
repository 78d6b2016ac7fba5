"""Continuous batching replayed: the engine steps a job takes, and how its progress runs.

vLLM decodes one token of every request in the batch at each step, and a request that ends
frees its slot for the next. Replaying that with the answers' lengths counts a job's steps:
a job whose requests all fit in one batch takes as many steps as its longest answer, and
the last answers, decoded nearly alone, cost steps rather than tokens. The estimator
(benchmarks.estimator) fits its time model on these steps, and benchmarks.refine reads a
running job's progress off the replay.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Any

from benchmarks.lengths import SIMULATED

DEFAULT_CONCURRENCY = 256


def concurrency_of(
    requests: int, record: dict[str, Any] | None = None, tokens_per_request: float = 0.0
) -> int:
    """Requests decoded together: the job's, at most the engine's batch, the runner's
    in-flight limit, and what fits in the KV cache (each request holds its prompt and its
    answer, in whole blocks: 128 tokens on a CPU, 16 on a GPU unless the record says)."""
    record = record or {}
    settings = record.get("engine_settings") or {}
    batch = settings.get("max_num_seqs") or DEFAULT_CONCURRENCY
    in_flight = settings.get("max_in_flight") or batch
    limit = min(requests, int(batch), int(in_flight))
    cache = settings.get("kv_cache_tokens")
    if cache and tokens_per_request > 0:
        on_cpu = str(record.get("hardware") or "").startswith("CPU")
        block = settings.get("kv_block_size") or (128 if on_cpu else 16)
        limit = min(limit, int(cache // (block * math.ceil(tokens_per_request / block))))
    return max(1, limit)


def replay(lengths: list[float], concurrency: int, requests: int) -> tuple[float, list]:
    """Continuous batching replayed: each request, in a fixed shuffled order, takes the first
    free of `concurrency` slots for its length. Returns the steps, and the progress as the
    share of the steps done at each tenth of the completion tokens.

    A job with more than SIMULATED requests is replayed with fewer in the same ratio to the
    batch, which keeps its steps and the shape of its progress."""
    if not lengths:
        return 0.0, []
    order = list(lengths)
    random.Random(0).shuffle(order)
    slots = [0.0] * max(1, min(round(concurrency * len(order) / max(requests, 1)), len(order)))
    changes: dict[float, int] = {}
    for length in order:
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + length)
        changes[start] = changes.get(start, 0) + 1
        changes[start + length] = changes.get(start + length, 0) - 1
    running, tokens, previous, curve = 0, 0.0, 0.0, [(0.0, 0.0)]
    for step in sorted(changes):
        tokens += running * (step - previous)
        running += changes[step]
        previous = step
        curve.append((tokens, step))
    total_tokens, steps = curve[-1]
    if steps <= 0:
        return 0.0, []
    progress = []
    for tenth in range(1, 11):
        target = total_tokens * tenth / 10
        for (tokens_a, steps_a), (tokens_b, steps_b) in zip(curve, curve[1:]):
            if tokens_b >= target - 1e-9:
                share = (target - tokens_a) / (tokens_b - tokens_a) if tokens_b > tokens_a else 1
                progress.append([tenth / 10, (steps_a + share * (steps_b - steps_a)) / steps])
                break
    return steps, [[0.0, 0.0], *progress]


def sample_lengths(record: dict[str, Any], requests: int) -> list[float]:
    """A finished job's answer lengths, one per request (at most SIMULATED), from its sample."""
    lengths = sorted(float(tokens) for _, tokens, _ in record.get("completion_samples") or [])
    if not lengths:
        mean = record.get("completion_tokens", 0) / max(requests, 1)
        return [mean] * min(requests, SIMULATED)
    kept = min(requests, SIMULATED)
    return [lengths[int((i + 0.5) * len(lengths) / kept)] for i in range(kept)]


def record_features(record: dict[str, Any]) -> tuple[float, float, float]:
    """(C, S, P) of a finished job, its steps replayed from its own answers' lengths."""
    requests = record["request_counts"].get("completed", 0)
    completion = float(record.get("completion_tokens", 0))
    prompt = float(record.get("prompt_tokens", 0))
    concurrency = concurrency_of(requests, record, (prompt + completion) / max(requests, 1))
    if completion <= 0:
        return 0.0, requests / concurrency, prompt  # pooling: one slot of a step a request
    steps, _ = replay(sample_lengths(record, requests), concurrency, requests)
    return completion, steps, prompt
