"""The appliance's own work, without a model: how fast lines are read, checked and written,
and whether memory stays flat as files grow.

    python benchmarks/host_rate.py [--lines 100000]

1. Host rate: `scan_file` (the check before queueing) and `run_lines` (check, hand to the
   engine, write results) over a chat file, with an engine that answers at once, in CPU
   seconds of this process, so other load on the machine does not count.
2. Memory: `batchbox run` with the fake engine (in its child process, as in production) on
   a 5,000-line and a 200,000-line file; peak resident memory of the process tree for each,
   and their ratio (target: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import PeakMemory  # noqa: E402
from runner.client import LocalClient  # noqa: E402
from runner.fake_engine import FakeEngine  # noqa: E402
from runner.journal import Journal  # noqa: E402
from runner.lines import Limits  # noqa: E402
from runner.run import RunOptions, run_lines, scan_file  # noqa: E402
from runner.types import (  # noqa: E402
    Choice,
    EngineOutput,
    EngineRequest,
    ModelSpec,  # noqa: E402
)


class InstantEngine(FakeEngine):
    """Answers every request at once with a fixed reply: only the host's work is left."""

    def add(self, request: EngineRequest) -> None:
        self.waiting.append((request, 8))

    def step(self) -> list[EngineOutput]:
        finished = [
            EngineOutput(
                key=request.key,
                prompt_tokens=tokens,
                choices=[Choice(0, "a short answer", "stop", 3)],
            )
            for request, tokens in self.waiting
        ]
        self.waiting.clear()
        return finished


def write_file(path: Path, lines: int, seed: int = 1) -> Path:
    chooser = random.Random(seed)
    with open(path, "w") as handle:
        for index in range(lines):
            words = " ".join("word" for _ in range(chooser.randint(5, 60)))
            handle.write(
                json.dumps(
                    {
                        "custom_id": f"r{index}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "messages": [
                                {"role": "system", "content": "You are helpful."},
                                {"role": "user", "content": f"Question {index}: {words}"},
                            ],
                            "max_tokens": chooser.randint(8, 256),
                            "temperature": 0.7,
                        },
                    }
                )
                + "\n"
            )
    return path


def host_rate(work: Path, lines: int, repeats: int = 3) -> None:
    """Each pass `repeats` times: CPU time still varies with what else the machine runs (a
    busy sibling core slows this one), so the best and the median are both printed."""
    data = write_file(work / "rate.jsonl", lines)
    scans, runs = [], []
    for attempt in range(repeats):
        started = time.process_time()
        summary = scan_file(data, Limits())
        scans.append(time.process_time() - started)
        engine = InstantEngine(ModelSpec("instant", "none", backend="fake"))
        options = RunOptions(endpoint="/v1/chat/completions", model="instant")
        started = time.process_time()
        journal = Journal(work / f"rate-out-{attempt}")
        progress = run_lines(data, journal, LocalClient(engine), options, summary.lines)
        journal.close()
        runs.append(time.process_time() - started)
        assert progress.tally.completed == lines
    print(
        f"host rate over {lines} lines, best (median) of {repeats}: "
        f"check {lines / min(scans):,.0f} ({lines / statistics.median(scans):,.0f}) lines/s, "
        f"check + engine hand-off + write {lines / min(runs):,.0f} "
        f"({lines / statistics.median(runs):,.0f}) lines/s (CPU seconds of one core)"
    )


def peak_of_run(work: Path, lines: int) -> tuple[int, float]:
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "default_model": "fake",
                "state": "state",
                "outbox": "outbox",
                "inbox": "inbox",
                "models": {
                    "fake": {
                        "path": "none",
                        "backend": "fake",
                        "engine": {"fake_batch": 512, "fake_output_tokens": 4},
                    }
                },
            }
        )
    )
    data = write_file(work / f"memory-{lines}.jsonl", lines)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "-c", str(config), "run", str(data)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    memory = PeakMemory(process.pid)
    if process.wait() != 0:
        raise SystemExit(f"batchbox run on {lines} lines failed")
    return memory.done(), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--large", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchbox-host-"))
    host_rate(work, args.lines, args.repeats)
    small, small_seconds = peak_of_run(work, args.small)
    large, large_seconds = peak_of_run(work, args.large)
    print(
        f"peak memory of batchbox run (service and engine process): {args.small} lines "
        f"{small / 2**20:.0f} MiB in {small_seconds:.0f} s, {args.large} lines "
        f"{large / 2**20:.0f} MiB in {large_seconds:.0f} s; ratio {large / small:.2f} "
        "(target at most 1.2)"
    )


if __name__ == "__main__":
    main()
