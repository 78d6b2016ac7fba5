"""The processes the tests start, owned by the scope that started them and killed with their
whole tree when that scope ends, passed or failed (used by tests/conftest.py).

Ownership goes by time: what a test (or a module's fixtures) started is whatever became a
child of pytest while it ran. An engine leads a process group of its own, so when a test
kills `batchbox serve` with SIGKILL the engine is re-parented, and would be lost to a
search of pytest's descendants; pytest is therefore made a child subreaper (Linux), and
every orphan of the tree comes back to it as a child of its own.
"""

from __future__ import annotations

import ctypes
import multiprocessing.resource_tracker
import subprocess
import sys
from dataclasses import dataclass

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

Identity = tuple[int, float]  # pid and start time: a pid alone may have been reused


def become_subreaper() -> bool:
    """Make this process the one orphans of its tree are re-parented to; False off Linux."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def identity(process: psutil.Process) -> Identity | None:
    try:
        return process.pid, process.create_time()
    except psutil.NoSuchProcess:
        return None


def describe(process: psutil.Process) -> str:
    try:
        words = process.cmdline() or [process.name()]
    except psutil.Error:
        return f"pid {process.pid}"
    return f"pid {process.pid}: {' '.join(' '.join(words).split())[:120]}"


def tree_of(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def freeze_tree(root: psutil.Process) -> list[psutil.Process]:
    """SIGSTOP a process and everything below it, the root first: a stopped process starts
    no other, so the tree holds still while it is collected, and none escapes the kill."""
    members: dict[int, psutil.Process] = {}
    while True:
        found = [process for process in tree_of(root) if process.pid not in members]
        if not found:
            return list(members.values())
        for process in found:
            members[process.pid] = process
            try:
                process.suspend()
            except psutil.NoSuchProcess:
                continue


def kill_tree(root: psutil.Process | int, timeout: float = 10.0) -> list[str]:
    """SIGKILL a process and everything below it, and wait until they are gone (reaping
    those that are this process's children). What was alive is returned, described."""
    if isinstance(root, int):
        try:
            root = psutil.Process(root)
        except psutil.NoSuchProcess:
            return []
    members = [process for process in freeze_tree(root) if _alive(process)]
    killed = [describe(process) for process in members]
    _kill(members, timeout)
    _reap(root)
    return killed


def kill_popen_tree(popen: subprocess.Popen, timeout: float = 10.0) -> list[str]:
    """`kill_tree` for a child started with Popen, whose exit status stays with the Popen."""
    if popen.poll() is not None:
        return []
    try:
        members = freeze_tree(psutil.Process(popen.pid))
    except psutil.NoSuchProcess:
        members = []
    killed = [describe(process) for process in members]
    popen.kill()
    popen.wait(timeout)
    _kill(members[1:], timeout)  # re-parented to pytest now: it reaps them
    return killed


def _kill(members: list[psutil.Process], timeout: float) -> None:
    for process in members:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(members, timeout=timeout)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(process: psutil.Process) -> None:
    """Collect a dead child's exit status, so that it does not stay behind as a zombie."""
    try:
        if process.ppid() == psutil.Process().pid:
            process.wait(0)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
        pass


def _tracker_pid() -> int | None:
    # Python's own multiprocessing helper: started once for the whole run, and it ends when
    # pytest does; killed after a test, the next test's engine would warn of its death.
    return getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)


@dataclass
class Owner:
    """The children of pytest that one scope (a test, a module, the session) started."""

    before: set[Identity]

    @classmethod
    def begin(cls) -> Owner:
        return cls({key for key in map(identity, psutil.Process().children()) if key})

    def end(self, keep_tracker: bool = True) -> list[str]:
        """Kill the tree of every child of pytest that was not there when the scope began:
        started in it, or re-parented to pytest (an orphan of what it started)."""
        tracker = _tracker_pid() if keep_tracker else None
        killed: list[str] = []
        for _ in range(10):  # again while killing a tree hands orphans over to pytest
            strays = [
                child
                for child in psutil.Process().children()
                if identity(child) not in self.before and child.pid != tracker
            ]
            if not strays:
                break
            for child in strays:
                killed += kill_tree(child)
        return killed
