"""The engine's pace timed at its load, on the real vLLM engine with the shipped chat model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import shipped_config

from benchmarks.estimator import pace_coefficients
from runner.client import EngineProcess
from watcher.config import load_config

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_the_real_engine_times_decode_and_prefill_steps_at_its_load(tmp_path: Path) -> None:
    config = load_config(shipped_config(tmp_path))
    engine = EngineProcess(config.model_spec("smollm2-135m"), pace=True)
    try:
        pace = engine.info.pace
        counted = engine.counters()
    finally:
        engine.close()
    assert pace is not None
    steps = pace["steps"]
    prompts = [prompt for prompt, _, _ in steps]
    completions = [completion for _, completion, _ in steps]
    # vLLM's own counters: the batch of 16 shrinks as its answers (2 to 17 tokens) end, and
    # the long prompts are prefilled in steps of their own.
    assert completions[0] == 16 and min(completions) <= 2
    assert max(prompts) >= 300 and all(seconds > 0 for _, _, seconds in steps)
    assert sum(completions) <= sum(2 + index for index in range(16)) + 6
    # The fit gives every kind of work a cost, so no job is estimated at nothing.
    per_token, per_step, per_prompt_token = pace_coefficients({"pace": pace})
    assert per_token + per_step > 0 and per_prompt_token > 0
    # A job run on this engine counts from here: the probe's tokens are not its own.
    assert counted[0] >= sum(prompts) and counted[1] >= sum(completions)
