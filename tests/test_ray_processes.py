"""A local Ray lives and dies with the engine process that started it, and a Ray job survives
kill -9 of `batchbox serve` like any other (SPEC §8): nothing lost, nothing twice, and no Ray
process left behind, whether the engine process is killed, or ends because `serve` died,
or is closed at a stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from crashkit import Dropped, all_finished, check_site, drop_file, request_file, start_server
from servicekit import Server, write_config

from runner.client import EngineDied, EngineProcess
from runner.types import ModelSpec

pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")

RAY = {"address": "local", "concurrency": 2, "num_cpus": 0.5, "backend": "fake"}


def ray_processes(root: psutil.Process) -> list[psutil.Process]:
    """What a local Ray runs under `root`: its daemons and its workers (the replicas)."""
    found = []
    for process in root.children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "ray::" in command or "/ray/" in command:
            found.append(process)
    return found


def gone(processes: list[psutil.Process], timeout: float = 60) -> list[psutil.Process]:
    """The processes still alive once they have all ended or `timeout` has passed."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [process for process in alive if process.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_engine_process_takes_its_local_ray_with_it() -> None:
    spec = ModelSpec("fake", "none", backend="ray", ray=RAY)
    engine = EngineProcess(spec)
    try:
        ray = ray_processes(psutil.Process(engine.pid))
        names = [" ".join(process.cmdline()) for process in ray]
        assert any("raylet" in name for name in names)
        assert any("gcs_server" in name for name in names)
        assert sum("ray::Replica" in name for name in names) == 2
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDied):
            while True:
                engine.poll(0.5)
    finally:
        engine.close()
    assert gone(ray) == []


def drive(server: Server, root: Path, until: int, timeout: float = 300) -> None:
    """Wait until the journal of the running job holds at least `until` results."""
    deadline = time.monotonic() + timeout
    while results_in_journal(root) < until:
        assert server.process is not None and server.process.poll() is None, server.log()[-3000:]
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)


def results_in_journal(root: Path) -> int:
    return sum(
        path.read_bytes().count(b"\n")
        for path in (root / "state" / "jobs").glob("*/out/results.jsonl")
    )


def test_kill_9_of_serve_during_a_ray_job_loses_and_repeats_nothing(tmp_path: Path) -> None:
    models = {
        "fake": {
            "path": "models/fake",
            "backend": "ray",
            "engine": {"fake_seconds_per_step": 0.02, "fake_batch": 4},
            "ray": RAY,
        }
    }
    config = write_config(
        tmp_path,
        settle_seconds=0.2,
        rescan_seconds=0.5,
        stop_timeout_seconds=20,
        max_in_flight=32,
        models=models,
    )
    dropped = [Dropped("", "spread", request_file("s-", 1500, bad_every=25))]
    drop_file(tmp_path / "inbox", dropped[0])

    server = start_server(config)
    try:
        drive(server, tmp_path, until=50)
        ray = ray_processes(psutil.Process(server.process.pid))
        assert ray, "the engine process runs no Ray"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        # The engine process reads the end of its pipe, closes its replicas and its Ray.
        assert gone(ray) == []
    finally:
        server.kill()
    assert not all_finished(tmp_path, dropped), "the job finished before the kill"

    server = start_server(config)
    try:
        deadline = time.monotonic() + 600
        while not all_finished(tmp_path, dropped):
            assert server.process.poll() is None, server.log()[-3000:]
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        ray = ray_processes(psutil.Process(server.process.pid))
        code, _ = server.terminate()
        assert code == 0, server.log()[-3000:]
    finally:
        server.kill()
    assert gone(ray) == []

    count = check_site(tmp_path, dropped, statuses=("completed",))
    assert count.problems == []
    assert (count.lost, count.duplicated) == (0, 0)
    assert count.lines == 1500
