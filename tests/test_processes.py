"""The tests own their processes (tests/conftest.py): a pytest run in a subprocess starts
a tree like `batchbox serve` and its engine, orphans part of it as a kill -9 of the service
does, and ends; afterwards nothing of the tree is alive, whether the test passed or failed.
The same run without the conftest leaves the orphans running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from processes import kill_tree

TESTS = Path(__file__).resolve().parent

INNER = '''
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A service that starts an engine leading a process group of its own, which starts a
# helper of its own (as vLLM starts its engine core); each writes its pid.
ENGINE = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "a").write(f"helper {helper.pid}\\\\n")
time.sleep(600)
"""
SERVICE = f"""
import subprocess, sys, time
engine = subprocess.Popen([sys.executable, "-c", {ENGINE!r}, sys.argv[1]], process_group=0)
open(sys.argv[1], "a").write(f"engine {{engine.pid}}\\\\n")
time.sleep(600)
"""
PIDS = Path(os.environ["PIDS"])


def start(kind):
    process = subprocess.Popen([sys.executable, "-c", SERVICE, str(PIDS)])
    with PIDS.open("a") as handle:
        handle.write(f"{kind} {process.pid}\\n")
    return process


def wait_for_pids(count):
    deadline = time.monotonic() + 60
    while len(PIDS.read_text().splitlines()) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def module_service():
    yield start("module-service")


def test_a_module_fixture_keeps_its_process_between_tests(module_service):
    assert module_service.poll() is None


def test_a_service_killed_with_sigkill_orphans_its_engine(module_service):
    service = start("service")
    wait_for_pids(6)  # both services, both engines, both helpers
    service.send_signal(signal.SIGKILL)
    service.wait()
    assert module_service.poll() is None, "a test does not end what its module owns"
    assert os.environ["OUTCOME"] == "passed"
'''


def run_inner(folder: Path, outcome: str, with_conftest: bool) -> subprocess.CompletedProcess:
    folder.mkdir()
    (folder / "test_inner.py").write_text(INNER)
    if with_conftest:
        shutil.copyfile(TESTS / "conftest.py", folder / "conftest.py")
    environment = {
        **os.environ,
        "PIDS": str(folder / "pids"),
        "OUTCOME": outcome,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    (folder / "pids").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def started(folder: Path) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for line in (folder / "pids").read_text().splitlines():
        kind, pid = line.split()
        pids.setdefault(kind, []).append(int(pid))
    return pids


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("outcome", ["passed", "failed"])
def test_after_a_run_nothing_its_tests_started_is_alive(tmp_path: Path, outcome: str) -> None:
    inner = run_inner(tmp_path / "run", outcome, with_conftest=True)
    assert inner.returncode == (0 if outcome == "passed" else 1), inner.stdout + inner.stderr
    pids = started(tmp_path / "run")
    assert sorted(pids) == ["engine", "helper", "module-service", "service"], pids
    assert len(pids["engine"]) == len(pids["helper"]) == 2
    alive = [pid for group in pids.values() for pid in group if running(pid)]
    assert alive == [], inner.stdout


def test_without_the_conftest_the_orphans_of_a_killed_service_live_on(tmp_path: Path) -> None:
    inner = run_inner(tmp_path / "run", "passed", with_conftest=False)
    pids = started(tmp_path / "run")
    try:
        assert inner.returncode == 0, inner.stdout + inner.stderr
        # Both engines and their helpers, the killed service's re-parented away from the run.
        orphans = pids["engine"] + pids["helper"]
        assert len(orphans) == 4 and all(running(pid) for pid in orphans), pids
    finally:
        for group in pids.values():
            for pid in group:
                kill_tree(pid)
