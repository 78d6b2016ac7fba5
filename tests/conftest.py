"""What every test gets: the processes it starts are its own, and are killed with their whole
tree when it ends, passed or failed; a module's fixtures own what they start until the
module ends, and after the run nothing the tests started is left (see tests/processes.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import Owner, become_subreaper

LEFT_BEHIND: list[tuple[str, str]] = []  # (scope, process) killed when its owner ended


def _own(request: pytest.FixtureRequest) -> Iterator[None]:
    owner = Owner.begin()
    try:
        yield
    finally:
        where = request.node.nodeid or "the session"
        LEFT_BEHIND.extend((where, process) for process in owner.end())


@pytest.fixture(scope="session", autouse=True)
def session_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    become_subreaper()
    yield from _own(request)


@pytest.fixture(scope="module", autouse=True)
def module_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own(request)


@pytest.fixture(scope="class", autouse=True)
def class_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own(request)


@pytest.fixture(autouse=True)
def test_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own(request)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, when this machine lets us mount one (it needs root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def memory_path(tmp_path: Path) -> Iterator[Path]:
    """A folder in RAM where there is one: every job costs about twenty fsyncs, which on a
    slow disk would make a test of hundreds or thousands of jobs minutes long without
    testing anything more."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="batchbox-test-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEFT_BEHIND:
        return
    terminalreporter.section("processes left running, killed when their owner ended")
    for owner, process in LEFT_BEHIND:
        terminalreporter.line(f"{owner}: {process}")
