"""Processes a stop test starts, and what those start, ended when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import psutil


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Owned:
    """Every process a test starts, and what they start, killed when the test ends."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def add(self, pid: int) -> None:
        self.pids.add(pid)
        try:
            self.pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass

    def end(self) -> None:
        for pid in list(self.pids):
            self.add(pid)
        for pid in self.pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def owning() -> Iterator[Owned]:
    """The body of a fixture that owns what a test starts."""
    processes = Owned()
    try:
        yield processes
    finally:
        processes.end()
