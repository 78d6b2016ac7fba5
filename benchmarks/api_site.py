"""A throwaway site with `batchbox api` running, for the API benchmarks: they drive the API
over HTTP, the way its users meet it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def batchbox_command() -> list[str]:
    beside = Path(sys.executable).parent / "batchbox"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "watcher.cli"]


@dataclass
class Site:
    root: Path
    process: subprocess.Popen
    url: str  # http://host:port/v1
    key: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_bytes(self) -> int:
        """The API process's peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc: peak memory cannot be read here")


@contextmanager
def running_api(api: dict[str, Any] | None = None, keep: bool = False) -> Iterator[Site]:
    """`batchbox api` (no service) in a temporary folder, with a key, until the block ends."""
    root = Path(tempfile.mkdtemp(prefix="batchbox-api-bench-"))
    settings = {"listen": "127.0.0.1:0", **(api or {})}
    config = {
        "default_model": "fake",
        "min_free_bytes": 0,
        "api": settings,
        "models": {"fake": {"path": "models/fake", "backend": "fake"}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    command = [*batchbox_command(), "-c", str(root / "config.yaml")]
    made = subprocess.run([*command, "key", "add", "bench"], capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(made.stderr)
    log = open(root / "api.log", "wb")
    process = subprocess.Popen([*command, "api"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = _wait_ready(root / "api.log", process)
        yield Site(root, process, url, made.stdout.strip().splitlines()[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _wait_ready(log: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"batchbox api exited:\n{log.read_text()}")
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "api_ready":
                return record["url"]
        time.sleep(0.05)
    raise SystemExit("batchbox api did not start")
