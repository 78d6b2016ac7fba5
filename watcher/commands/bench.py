"""`batchbox bench MODEL`: a short calibration batch, recorded in the benchmark history, so
that the first real job of a model is estimated from a measurement, not a guess."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from runner.types import COMPLETIONS, EMBEDDINGS
from watcher.commands.arguments import known_model
from watcher.commands.run import stop_on_signals, validated_run_job
from watcher.config import Config
from watcher.engines import EngineKeeper
from watcher.errors import EXIT_OK, CommandFailed
from watcher.execute import RunHooks, execute_job
from watcher.jobs import JobStatus
from watcher.logs import configure_logging
from watcher.owner import hold_for_command


def bench_model(args: argparse.Namespace, config: Config) -> int:
    """Run a short calibration batch on a model and record it in the benchmark history, so
    that the first real job of the model is estimated from a measurement, not a guess."""
    configure_logging(sys.stderr)
    known_model(config, args.model, required=True)
    lock = hold_for_command(config.folder("state"), config.folder("inbox"), "bench")
    try:
        return calibrate(args.model, config)
    finally:
        lock.release()


def calibrate(model: str, config: Config) -> int:
    state = config.folder("state")
    # A throwaway outbox inside state/: the record goes to the history, the folder away.
    outbox = state / "bench"
    outbox.mkdir(parents=True, exist_ok=True)
    endpoint = config.models[model].endpoints[0]
    with tempfile.TemporaryDirectory(prefix="batchbox-bench-") as folder:
        path = Path(folder) / f"calibration-{model}.jsonl"
        path.write_bytes(calibration_lines(endpoint))
        job = validated_run_job(config, path, model, outbox)
    job.metadata = {**job.metadata, "calibration": True}
    engines = EngineKeeper()
    with stop_on_signals(config) as stop:
        try:
            hooks = RunHooks(stop_requested=stop.is_set)
            target = execute_job(job, config, engines, outbox, hooks)
        finally:
            engines.close(timeout=stop.seconds_left(otherwise=10.0) / 2)
    if target is None:
        # Nothing to resume: a calibration is only worth it whole.
        shutil.rmtree(job.work, ignore_errors=True)
        raise CommandFailed("the calibration was stopped before it finished; nothing recorded")
    record = json.loads((target / "benchmark.json").read_bytes())
    shutil.rmtree(target, ignore_errors=True)
    if job.status is not JobStatus.COMPLETED:
        raise CommandFailed(f"the calibration {job.status.value}: {job.errors[0]['message']}")
    print(bench_summary(record))
    return EXIT_OK


def bench_summary(record: dict) -> str:
    counts, rates = record["request_counts"], record["throughput"]
    tokens = f"{record['prompt_tokens']} prompt"
    if record["endpoint"] != EMBEDDINGS:
        tokens += f" and {record['completion_tokens']} generated"
    failed = f" ({counts['failed']} failed)" if counts.get("failed") else ""
    speed = f"{rates['total_tokens_per_second']:.0f} tokens/s"
    if record["endpoint"] != EMBEDDINGS:
        speed += f", {rates['completion_tokens_per_second']:.0f} generated tokens/s"
    return (
        f"Calibrated {record['model']} on {record['hardware']}: {counts['completed']} "
        f"{record['endpoint']} requests{failed} with {tokens} tokens ran in "
        f"{record['run_seconds']:.1f} s ({speed}, {rates['requests_per_second']:.2f} "
        f"requests/s); loading the model took {record['load_seconds']:.1f} s. The record is "
        f"in the benchmark history, so the next estimate for {record['model']} rests on it."
    )


# Material for calibration prompts: questions, instructions, and a passage to summarise,
# so that prompt and answer lengths spread the way real batches do.
_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Name three uses of copper.",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Who wrote Pride and Prejudice, and when?",
)
_INSTRUCTIONS = (
    "Write a short poem about autumn leaves.",
    "List five tips for a good night's sleep.",
    "Explain recursion to a ten-year-old.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a polite email declining a meeting invitation.",
    "Give step by step directions for brewing tea.",
)
_PASSAGE = (
    "The river town grew up around a ford where traders crossed with salt and wool. Over "
    "the centuries a stone bridge replaced the ford, mills rose along the banks, and the "
    "market square filled every Thursday with farmers from the hills. When the railway "
    "arrived the mills turned to cloth, the population tripled, and rows of brick houses "
    "climbed the valley sides. A century later the mills closed one by one; some became "
    "flats and studios, and the town learned to live from visitors who came for the old "
    "bridge, the walks along the water and the Thursday market, which never stopped. "
)
_MAX_TOKENS = (8, 16, 32, 64, 128, 256)


def calibration_lines(endpoint: str) -> bytes:
    """~48 chat or completion requests, or 64 embedding inputs, of spread-out shapes."""
    lines = []
    if endpoint == EMBEDDINGS:
        for index in range(64):
            words = _PASSAGE.split()
            text = " ".join(words[: 4 + (index * 37) % 140])  # 4 to 143 words
            lines.append({"custom_id": f"cal{index}", "url": endpoint, "body": {"input": text}})
    else:
        for index in range(48):
            kind = index % 3
            if kind == 0:
                text = _QUESTIONS[index % len(_QUESTIONS)]
            elif kind == 1:
                text = _INSTRUCTIONS[index % len(_INSTRUCTIONS)]
            else:
                text = "Summarise in a few sentences:\n\n" + _PASSAGE * (1 + index % 4)
            body: dict = {"max_tokens": _MAX_TOKENS[index % 6], "temperature": 0.8, "seed": index}
            if endpoint == COMPLETIONS:
                body["prompt"] = text
            else:
                body["messages"] = [{"role": "user", "content": text}]
            lines.append({"custom_id": f"cal{index}", "url": endpoint, "body": body})
    return b"".join(json.dumps({"method": "POST", **line}).encode() + b"\n" for line in lines)
