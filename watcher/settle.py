"""Settling: deciding that a dropped file is complete, from what `lstat` shows over time.

No event proves a file complete: an scp or SMB client writes into the final name and may
close and reopen it between chunks, and rsync sets an old modification time before its
rename. So a file is complete only when it is a regular file whose (size, mtime, inode,
ctime) has stayed the same for `settle_seconds` of our own clock, counted from the last
change we saw. Events only say "look again soon".

Nothing here opens a file: `lstat` neither follows a symlink nor blocks on a FIFO.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Signature = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns

# An event that says the bytes changed restarts the wait even if lstat cannot tell yet
# (a coarse mtime on a network mount); closes and renames only ask for a fresh look.
CHANGE_HINTS = frozenset({"created", "modified"})

NOT_REGULAR = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass
class SettleResult:
    complete: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Watched:
    signature: Signature | None = None  # None: no trustworthy look yet, the wait starts anew
    since: float = 0.0  # the settler's clock when the signature was last seen to change


def signature_of(info: os.stat_result) -> Signature:
    return (info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)


def refusal(path: Path, mode: int) -> str | None:
    """Why a path that is not a regular file cannot be a job, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")
    return f"{path.name} is {what}; batchbox takes only regular files"


class Settler:
    """Tracks noted paths until each is complete, refused or gone. Not thread-safe: one owner
    (the service's main loop) notes candidates and calls `settle` now and then."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._watched: dict[Path, _Watched] = {}
        # What was refused, with its signature: a rescan notes a refused symlink again every
        # time, and the user should read about it once, not every rescan; a new link made
        # in its place (even on the same inode) has a new signature and is reported anew.
        self._refused: dict[Path, Signature | None] = {}

    def note(self, path: Path, hint: str) -> None:
        watched = self._watched.setdefault(path, _Watched())
        if hint in CHANGE_HINTS:
            watched.signature = None

    def pending(self) -> list[Path]:
        return sorted(self._watched)

    def settle(self) -> SettleResult:
        """Look at every noted path once; report the ones that became complete or refused."""
        result = SettleResult()
        for path in list(self._watched):
            self._look(path, result)
        return result

    def _look(self, path: Path, result: SettleResult) -> None:
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(path)  # taken away again, or renamed on: nothing to do
            return
        except OSError as error:
            self._refuse(path, None, f"{path.name} cannot be examined: {error.strerror}", result)
            return
        reason = refusal(path, info.st_mode)
        if reason is not None:
            self._refuse(path, signature_of(info), reason, result)
            return
        self._refused.pop(path, None)
        # Read after the lstat, so a change it saw can never be dated before it happened.
        self._track(path, signature_of(info), self.clock(), result)

    def _track(self, path: Path, signature: Signature, now: float, result: SettleResult) -> None:
        watched = self._watched[path]
        if watched.signature != signature:
            watched.signature, watched.since = signature, now
        if now - watched.since >= self.settle_seconds:
            del self._watched[path]
            result.complete.append(path)

    def _refuse(
        self, path: Path, signature: Signature | None, reason: str, result: SettleResult
    ) -> None:
        del self._watched[path]
        if path not in self._refused or self._refused[path] != signature:
            self._refused[path] = signature
            result.refused.append((path, reason))

    def _forget(self, path: Path) -> None:
        del self._watched[path]
        self._refused.pop(path, None)
