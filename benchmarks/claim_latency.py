"""How long a complete drop waits before `batchbox serve` takes it.

Starts `batchbox serve` with the fake engine in a temporary folder, drops files one at a
time the way a careful uploader does (write `<name>.jsonl.part`, fsync, rename to
`<name>.jsonl`: the rename is the moment the file is complete), and times each from then
until its `.status` sidecar appears, which the service writes as it claims the file. Prints
the median and the 95th percentile against the target of settle_seconds + 1 s.

    python benchmarks/claim_latency.py [--drops 50] [--settle-seconds 1] [--observer native]

Exit status 0 when the 95th percentile meets the target, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = (
    '{{"custom_id": "q{index}", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {{"messages": [{{"role": "user", "content": "Hello {index}"}}], "max_tokens": 8}}}}\n'
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drops", type=int, default=50, help="files to drop (default 50)")
    parser.add_argument("--settle-seconds", type=float, default=1.0)
    parser.add_argument("--rescan-seconds", type=float, default=30.0)
    parser.add_argument("--observer", choices=("native", "polling"), default="native")
    parser.add_argument("--lines", type=int, default=20, help="request lines per file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args()


def batchbox_command() -> list[str]:
    """The `batchbox` beside this Python (a virtualenv), else the module itself."""
    beside = Path(sys.executable).parent / "batchbox"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("batchbox")
    return [found] if found else [sys.executable, "-m", "watcher.cli"]


def write_config(root: Path, arguments: argparse.Namespace) -> Path:
    config = {
        "settle_seconds": arguments.settle_seconds,
        "rescan_seconds": arguments.rescan_seconds,
        "observer": arguments.observer,
        "min_free_bytes": 0,
        "stop_timeout_seconds": 10,
        "default_model": "fake",
        "models": {"fake": {"path": "models/fake", "backend": "fake"}},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_service(
    config: Path, log_path: Path, command: list[str] | None = None, timeout: float = 30
) -> subprocess.Popen:
    """`batchbox serve` (or `command`'s) on the config, its log in `log_path`, once it is
    ready; the script ends, saying why, when it is not within `timeout` seconds."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*(command or batchbox_command()), "-c", str(config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )
    deadline = time.monotonic() + timeout
    while b"service_ready" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"batchbox serve did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    return process


def drop_one(inbox: Path, name: str, data: bytes) -> float:
    """Upload `name` through a `.part` file; the moment it became complete."""
    part = inbox / f"{name}.part"
    with open(part, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(part, inbox / name)
    return time.monotonic()


def wait_for(path: Path, timeout: float) -> float | None:
    """The moment `path` appeared, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return time.monotonic()
        time.sleep(0.002)
    return None


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value at least `fraction` of them do not exceed."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def measure(inbox: Path, arguments: argparse.Namespace) -> list[float]:
    data = "".join(LINE.format(index=index) for index in range(arguments.lines)).encode()
    timeout = arguments.settle_seconds + arguments.rescan_seconds + 10
    latencies = []
    for number in range(arguments.drops):
        name = f"drop{number:04}"
        complete = drop_one(inbox, f"{name}.jsonl", data)
        claimed = wait_for(inbox / f"{name}.status", timeout)
        if claimed is None:
            sys.exit(f"{name}.jsonl was not claimed within {timeout:.0f} s")
        latencies.append(claimed - complete)
        time.sleep(0.05)  # one at a time: the next drop does not share the previous one's wait
    return latencies


def main() -> int:
    arguments = parse_arguments()
    root = Path(tempfile.mkdtemp(prefix="batchbox-claim-latency-"))
    config = write_config(root, arguments)
    service = start_service(config, root / "serve.log")
    try:
        latencies = measure(root / "inbox", arguments)
    finally:
        stopped = time.monotonic()
        service.send_signal(signal.SIGTERM)
        code = service.wait(30)
        stop_seconds = time.monotonic() - stopped
        if not arguments.keep:
            shutil.rmtree(root, ignore_errors=True)
    target = arguments.settle_seconds + 1.0
    median = statistics.median(latencies)
    p95 = percentile(latencies, 0.95)
    print(
        f"drops: {len(latencies)} (settle_seconds {arguments.settle_seconds:g}, "
        f"observer {arguments.observer})"
    )
    print(
        f"claim latency: median {median:.3f} s, 95th percentile {p95:.3f} s, "
        f"min {min(latencies):.3f} s, max {max(latencies):.3f} s"
    )
    print(f"target: {target:.3f} s (settle_seconds + 1 s): {'met' if p95 <= target else 'MISSED'}")
    print(f"SIGTERM: exit status {code} after {stop_seconds:.2f} s")
    if arguments.keep:
        print(f"kept: {root}")
    return 0 if p95 <= target and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
