"""Peak memory of `batchbox serve` while the hostile corpus goes through it.

Starts `batchbox serve` with the fake engine in a temporary folder, measures the resident set
of the idle service, then drops every item of tests/hostilekit.py's corpus (the 50 MB line,
the file over max_lines, the 61 MB sparse file over max_file_bytes, the 100,000-deep JSON,
the tickets, ...) batch by batch, and samples the resident set of the service and of its
children (the engine process) every 0.1 s until every item is handled. Prints the baseline
next to the peaks, for the whole run and for each batch.

    python tests/hostile_memory.py

It lives beside its corpus in tests/, as the measurement of a test corpus, not of a user's
workload.

The drops that stop or freeze the service (hostilekit.SOLO) are left out: they would end
the measurement, not load it.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostilekit import (  # noqa: E402
    CorpusRun,
    HostileServer,
    build_corpus,
    hostile_config,
    run_corpus,
)

MB = 1 << 20
SAMPLE_SECONDS = 0.1
IDLE_SECONDS = 2.0


def resident(process: psutil.Process) -> tuple[int, int]:
    """The resident set of the process alone, and with all its children."""
    try:
        alone = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = alone
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return alone, total


@dataclass
class Sampler:
    """Samples a process tree's memory on a thread, tagging each sample with a phase."""

    process: psutil.Process
    phase: str = "idle"
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    idle: list[int] = field(default_factory=list)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            alone, total = resident(self.process)
            self.samples += 1
            if self.phase == "idle":
                self.idle.append(alone)
            peak_alone, peak_total = self.peaks.get(self.phase, (0, 0))
            self.peaks[self.phase] = (max(peak_alone, alone), max(peak_total, total))
            time.sleep(SAMPLE_SECONDS)

    def peak(self) -> tuple[int, int]:
        busy = [peak for phase, peak in self.peaks.items() if phase != "idle"]
        return max(alone for alone, _ in busy), max(total for _, total in busy)


def measure(folder: Path) -> None:
    items = build_corpus(folder / "outside", secrets.token_hex(6))
    server = HostileServer(hostile_config(folder / "box")).start()
    try:
        assert server.process is not None
        sampler = Sampler(psutil.Process(server.process.pid))
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        time.sleep(IDLE_SECONDS)
        inbox, outbox = server.config.folder("inbox"), server.config.folder("outbox")

        def on_batch(batch: int) -> None:
            sampler.phase = f"batch {batch}"

        run = run_corpus(inbox, outbox, items, on_batch=on_batch)
        sampler.phase = "after"
        time.sleep(1.0)
        sampler.stop.set()
        thread.join(2)
        alive = server.alive()
    finally:
        if server.alive():
            server.terminate()
        server.kill()
    report(sampler, run, alive)


def report(sampler: Sampler, run: CorpusRun, alive: bool) -> None:
    baseline = statistics.median(sampler.idle)
    peak_alone, peak_total = sampler.peak()
    print(f"{len(run.items)} hostile items and {len(run.goods)} good jobs in {run.seconds:.1f} s")
    print(f"{sampler.samples} samples every {SAMPLE_SECONDS} s; service alive at the end: {alive}")
    if run.unhandled or run.stalled_after is not None:
        print(f"not handled: {run.unhandled}; stalled after batch: {run.stalled_after}")
    print()
    print(f"{'':34}{'service':>12}{'+ children':>14}")
    print(f"{'baseline (idle service)':34}{baseline / MB:>10.1f} MB{'':>14}")
    for phase, (alone, total) in sampler.peaks.items():
        if phase == "idle":
            continue
        print(f"{'peak, ' + phase:34}{alone / MB:>10.1f} MB{total / MB:>11.1f} MB")
    print(f"{'peak, whole run':34}{peak_alone / MB:>10.1f} MB{peak_total / MB:>11.1f} MB")
    print(f"{'peak over baseline':34}{(peak_alone - baseline) / MB:>10.1f} MB")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="hostile-memory-") as folder:
        measure(Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
