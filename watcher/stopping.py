"""Stopping on a signal, in time, whatever the process is doing.

SIGTERM or SIGINT asks for an orderly stop: the running job stops where it is, a model load
is abandoned, the engine is closed. The signal is taken on a thread of its own, from the
file descriptor that Python's C-level handler writes each signal's number to, so a main
thread held in one long system call (the fsync of a large file, a read from a hung network
mount) delays neither the stop nor its deadline.

If the process is still there `timeout` seconds after the signal, or a second signal comes,
every process it started is killed with its process group and the process exits. Nothing is
lost by that: what a job has done is durable in its spool folder at every moment (the kill -9
tests hold the service to that), and the next start carries on from there.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

import psutil
import structlog

log = structlog.get_logger()

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAY_SECONDS = 0.3  # what a forced stop may spend saying so
# Once stopping, threads take turns this often (Python's default is every 5 ms): each step of
# the stop is a few system calls, and each must not wait a whole turn behind a job thread
# busy in Python code, which on a loaded machine added seconds to a stop.
STOPPING_SWITCH_SECONDS = 0.0002
_END = b"\0"  # not a signal number: tells the watching thread to end


def _ignore(number: int, frame: object) -> None:
    """The Python-level handler: the watching thread does the work."""


class SignalStop:
    """While entered, SIGTERM and SIGINT set `requested` (and call `on_stop`) and the process
    ends within `timeout` seconds: by itself, or killed with everything it started."""

    def __init__(
        self,
        timeout: float,
        on_stop: Callable[[], None] = lambda: None,
        exit_status: int = 0,
        last_words: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.on_stop = on_stop
        self.exit_status = exit_status
        self.last_words = last_words  # said on standard error when the stop is forced
        self.requested = threading.Event()
        self.deadline: float | None = None
        self._read = self._write = -1
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._thread: threading.Thread | None = None

    def is_set(self) -> bool:
        return self.requested.is_set()

    def seconds_left(self, otherwise: float) -> float:
        """The seconds until the deadline of a stop under way, else `otherwise`."""
        if self.deadline is None:
            return otherwise
        return max(self.deadline - time.monotonic(), 0.0)

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are handled in the main thread only: the caller's is
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, _ignore)
        self._thread = threading.Thread(target=self._watch, name="signal-stop", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        if self._thread is None:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(self._previous_fd)
        if self.requested.is_set():
            return  # the thread keeps the deadline until the process has exited
        os.write(self._write, _END)
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

    def _watch(self) -> None:
        while True:
            wait = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([self._read], [], [], wait)
            if not readable:
                self._force(f"still running {self.timeout:g} s after the stop was asked for")
            for number in os.read(self._read, 64):
                if number == _END[0]:
                    return
                if number not in SIGNALS:
                    continue  # another handler's signal (pytest-timeout's SIGALRM, say)
                if self.deadline is not None:
                    self._force(f"{signal.Signals(number).name} again while stopping")
                self.deadline = time.monotonic() + self.timeout
                sys.setswitchinterval(min(sys.getswitchinterval(), STOPPING_SWITCH_SECONDS))
                self.requested.set()
                log.info("stop_requested", signal=signal.Signals(number).name)
                self.on_stop()

    def _force(self, reason: str) -> None:
        end_descendants()
        # Said on a thread of its own, given a moment: a main thread blocked in a write to a
        # full pipe holds the stream's lock, and the exit must not wait for it.
        said = threading.Thread(target=self._say, args=(reason,), daemon=True)
        said.start()
        said.join(SAY_SECONDS)
        os._exit(self.exit_status)

    def _say(self, reason: str) -> None:
        log.warning("stop_forced", reason=reason)
        if self.last_words:
            print(f"batchbox: {self.last_words}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def end_descendants() -> None:
    """Kill every process this one started, and the process groups they lead (an engine
    process leads one, which vLLM's engine core joins)."""
    # All of them are found before any is killed: the child of a killed process is handed
    # to another parent and could no longer be found as ours.
    try:
        descendants = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    own_group = os.getpgid(0)
    for process in descendants:
        try:
            if os.getpgid(process.pid) == process.pid != own_group:
                os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for process in descendants:
        try:
            process.kill()
        except psutil.Error:
            pass
