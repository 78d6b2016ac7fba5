"""A burst of small files: how fast `batchbox serve` drains hundreds or thousands of one-request
files moved into its inbox at once, and whether a job's cost grows with the queue.

    python benchmarks/burst.py [--sizes 200 1000 2000] [--profile FOLDER]

For each size, a fresh folder and a fresh `batchbox serve` with the fake engine (no delay):
the files are written beside the inbox, then renamed into it in one tight loop, as a script
that writes one file per document does. The clock runs from the first rename until the last
job's folder is in the outbox. Prints, per size, jobs/s and the CPU seconds of the service
(and of its engine process), then the ratio of the time for 1,000 files to the time for 200
(a job whose cost does not depend on the queue gives 5). `--profile` runs each service under
cProfile and writes `burst-<size>.prof` into that folder, with its top functions printed.

Exit status 0 when every size drained within `--timeout` seconds, 1 when one did not.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.claim_latency import (  # noqa: E402 - the repository's root comes first
    batchbox_command,
)
from benchmarks.claim_latency import start_service as start_serve  # noqa: E402

LINE = (
    '{{"custom_id": "d{index}", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {{"messages": [{{"role": "user", "content": "Summarise document {index}"}}], '
    '"max_tokens": 8}}}}\n'
)


@dataclass
class Drained:
    files: int
    delivered: int
    seconds: float
    service_cpu: float
    service_system: float  # of which in the kernel: fsyncs, renames, the inbox's events
    engine_cpu: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--settle-seconds", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per size at most")
    parser.add_argument("--profile", type=Path, help="run the service under cProfile, here")
    parser.add_argument(
        "--folder", type=Path, help="where to make the service's folders (default: the temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    return parser.parse_args()


def service_command(profile: Path | None) -> list[str]:
    if profile is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "watcher.cli"]
    return batchbox_command()


def write_config(root: Path, settle_seconds: float) -> Path:
    config = {
        "settle_seconds": settle_seconds,
        "rescan_seconds": 30,
        "min_free_bytes": 0,
        "stop_timeout_seconds": 30,
        "default_model": "fake",
        "models": {"fake": {"path": "models/fake", "backend": "fake"}},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_service(config: Path, profile: Path | None) -> subprocess.Popen:
    command = service_command(profile)
    return start_serve(config, config.parent / "serve.log", command, timeout=60)


def cpu_seconds(process: psutil.Process) -> tuple[float, float, float]:
    """CPU seconds of the service itself and, of those, in the kernel; and of its child
    processes (the engine)."""
    own = process.cpu_times()
    children = 0.0
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        children += times.user + times.system
    children += own.children_user + own.children_system
    return own.user + own.system, own.system, children


def delivered_count(outbox: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(outbox) if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def drain(files: int, arguments: argparse.Namespace) -> Drained:
    root = Path(tempfile.mkdtemp(prefix=f"batchbox-burst-{files}-", dir=arguments.folder))
    staging = root / "staging"  # on the inbox's filesystem, so that each move is a rename
    staging.mkdir()
    names = [f"doc{index:05}.jsonl" for index in range(files)]
    for index, name in enumerate(names):
        (staging / name).write_text(LINE.format(index=index))
    config = write_config(root, arguments.settle_seconds)
    profile = None
    if arguments.profile is not None:
        arguments.profile.mkdir(parents=True, exist_ok=True)
        profile = (arguments.profile / f"burst-{files}.prof").resolve()
    process = start_service(config, profile)
    watched = psutil.Process(process.pid)
    inbox, outbox = root / "inbox", root / "outbox"
    try:
        started = time.monotonic()
        for name in names:
            os.rename(staging / name, inbox / name)
        deadline = started + arguments.timeout
        count = 0
        while time.monotonic() < deadline:
            count = delivered_count(outbox)
            if count >= files:
                break
            time.sleep(0.1)
        seconds = time.monotonic() - started
        service_cpu, service_system, engine_cpu = cpu_seconds(watched)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            for child in watched.children(recursive=True):
                child.kill()
            process.kill()
            process.wait(10)
        if not arguments.keep:
            shutil.rmtree(root, ignore_errors=True)
    if profile is not None and profile.exists():
        print(f"-- profile of the service, {files} files: {profile}")
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
    return Drained(files, count, seconds, service_cpu, service_system, engine_cpu)


def main() -> int:
    arguments = parse_arguments()
    results: dict[int, Drained] = {}
    for size in arguments.sizes:
        result = drain(size, arguments)
        results[size] = result
        complete = "" if result.delivered >= size else f" (only {result.delivered} delivered)"
        print(
            f"{size:>6} files: {result.seconds:8.1f} s, {result.rate:7.1f} jobs/s, "
            f"service CPU {result.service_cpu:7.1f} s "
            f"({1000 * result.service_cpu / max(result.delivered, 1):.1f} ms a job, "
            f"{100 * result.service_system / max(result.service_cpu, 1e-9):.0f} % in the kernel), "
            f"engine CPU {result.engine_cpu:6.1f} s{complete}",
            flush=True,
        )
    if 200 in results and 1000 in results:
        if all(results[size].delivered >= size for size in (200, 1000)):
            ratio = results[1000].seconds / results[200].seconds
            print(f"time for 1,000 files / time for 200: {ratio:.2f} (5 when a job's cost is flat)")
        else:
            print("time for 1,000 files / time for 200: not measured, a burst did not drain")
    return 0 if all(r.delivered >= r.files for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
