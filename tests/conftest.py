"""What every test gets: the processes it starts are its own, and are killed with their whole
tree when it ends, passed or failed; a module's fixtures own what they start until the
module ends, and after the run nothing the tests started is left (see tests/processes.py)."""

from __future__ import annotations

from collections.abc import Iterator

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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEFT_BEHIND:
        return
    terminalreporter.section("processes left running, killed when their owner ended")
    for owner, process in LEFT_BEHIND:
        terminalreporter.line(f"{owner}: {process}")
