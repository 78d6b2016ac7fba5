"""One owner of the state folder at a time.

`batchbox serve`, `batchbox run` and `batchbox bench` each hold an exclusive lock on
`state/owner.lock` for as long as they work on the spool and an engine: no job is ever run
by two processes, and no two engines share the GPU. The lock file says who holds it (pid,
command), so whoever finds it taken can name the holder in one sentence.

The rules: a second `serve` exits at once; `serve` waits for a `run` or `bench` to finish
(telling systemd, so that its start does not time out); `run` and `bench` refuse at once
while anyone holds it.

The lock is `flock`, which the kernel drops when the holder dies, even by `kill -9`: a stale
lock file never blocks a start. filelock's native lock is the same call, but it cannot say
who holds it, which is what the sentences here need.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson
import structlog

from watcher.errors import CommandFailed, StartError
from watcher.notify import notify

log = structlog.get_logger()

LOCK_NAME = "owner.lock"
HOLDER_BYTES = 4096  # what a holder's note may take; it is a line of JSON
NOTE_RETRIES, NOTE_RETRY_SECONDS = 5, 0.05
WAIT_POLL_SECONDS = 0.5  # how often a waiting `serve` tries the lock again
EXTEND_SECONDS = 60  # each EXTEND_TIMEOUT_USEC gives systemd's start timeout this long
EXTEND_EVERY_SECONDS = 15  # and is sent again this often, well inside it

# Descriptors of locks held by this process: closed in a forked child, whose copy would
# otherwise keep the lock alive after this process is gone.
_held: set[int] = set()


def _close_in_child() -> None:
    for descriptor in list(_held):
        try:
            os.close(descriptor)  # never LOCK_UN here: that would release the parent's lock
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as its note says; both None when the note cannot be read."""

    pid: int | None
    command: str | None

    def describe(self) -> str:
        if self.pid is None:
            return "another process"
        return f"batchbox {self.command or 'process'} (pid {self.pid})"


class StateBusy(Exception):
    def __init__(self, state: Path, holder: Holder) -> None:
        super().__init__(f"{holder.describe()} holds {state / LOCK_NAME}")
        self.holder = holder


class StateLock:
    """The lock, held until `release` (or until this process ends)."""

    def __init__(self, descriptor: int, path: Path) -> None:
        self.descriptor = descriptor
        self.path = path

    def release(self) -> None:
        if self.descriptor < 0:
            return
        try:
            os.ftruncate(self.descriptor, 0)  # no note is left to name a process that is gone
        except OSError:
            pass
        _held.discard(self.descriptor)
        os.close(self.descriptor)  # closing the last descriptor releases the flock
        self.descriptor = -1


def take_state(state: Path, command: str) -> StateLock:
    """The state folder's lock, at once; StateBusy naming the holder when it is taken."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o664)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(descriptor)
        for _ in range(NOTE_RETRIES):
            if holder.pid is not None:
                break
            time.sleep(NOTE_RETRY_SECONDS)  # taken a moment ago: its note is on its way
            holder = _read_holder(descriptor)
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateBusy(state, holder) from None
        raise
    _held.add(descriptor)
    _write_holder(descriptor, command)
    return StateLock(descriptor, path)


def _write_holder(descriptor: int, command: str) -> None:
    """Say who holds the lock. Only a note: a full disk must not cost the lock itself."""
    note = {
        "pid": os.getpid(),
        "command": command,
        "since": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, orjson.dumps(note) + b"\n", 0)
    except OSError as error:
        log.warning("lock_note_not_written", error=str(error))


def _read_holder(descriptor: int) -> Holder:
    try:
        note = orjson.loads(os.pread(descriptor, HOLDER_BYTES, 0) or b"null")
    except (OSError, orjson.JSONDecodeError):
        return Holder(None, None)
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int):
        return Holder(None, None)  # being written right now, or not ours
    pid, command = note["pid"], note.get("command")
    if not _alive(pid):
        return Holder(None, None)  # a note left by a holder that died before writing its own
    return Holder(pid, command if isinstance(command, str) else None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the commands' rules ----------------------------------------------------------------


def hold_for_command(state: Path, inbox: Path, command: str) -> StateLock:
    """The lock for `run` or `bench`, which refuse at once when it is taken: two engines on
    one GPU run out of memory, and the service owns its spool."""
    try:
        return take_state(state, command)
    except StateBusy as busy:
        holder = busy.holder
        if holder.command == "serve":
            raise CommandFailed(
                f"the service is running (pid {holder.pid}): drop the file into {inbox}/ instead"
            ) from None
        raise CommandFailed(
            f"{holder.describe()} is working on {state} right now; try again once it has ended"
        ) from None


def wait_for_state(state: Path, stopping: threading.Event) -> StateLock | None:
    """The lock for `serve`: another service holding it is an error at once; a `run` or
    `bench` holding it is waited for, telling systemd so (its start timeout is extended).
    None when a stop was asked for while waiting."""
    told: Holder | None = None
    extended = 0.0
    while True:
        try:
            return take_state(state, "serve")
        except StateBusy as busy:
            holder = busy.holder
        if holder.command == "serve":
            raise StartError(
                f"another batchbox serve (pid {holder.pid}) already owns {state}; "
                "only one service may run on a state folder"
            )
        if holder != told:
            told = holder
            lock = str(state / LOCK_NAME)
            log.info("service_waiting", holder=holder.command, pid=holder.pid, lock=lock)
            notify(f"STATUS=waiting for {holder.describe()} to finish before starting")
        if time.monotonic() - extended >= EXTEND_EVERY_SECONDS:
            extended = time.monotonic()
            notify(f"EXTEND_TIMEOUT_USEC={EXTEND_SECONDS * 1_000_000}")
        if stopping.wait(WAIT_POLL_SECONDS):
            return None
