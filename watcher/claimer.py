"""The claim thread: claiming a file (an fsync of up to the whole file, a rename, and a scan
that counts and checks every line) happens here, off the main loop, so that events, cancels,
sidecars and the watchdog are served while a large file is taken.

The loop hands over complete files in the order they settled, a few at a time, and takes
back what each claim came to, in the same order; the claim itself is what it was on the
loop (`watcher.claim`), so a claim's order and its spool record are unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from runner.durable import is_disk_trouble
from watcher.claim import ClaimInterrupted
from watcher.jobs import Job

log = structlog.get_logger()

WINDOW = 2  # files handed over and not yet taken back: one claimed, the next one waiting


@dataclass
class Outcome:
    """What claiming one file came to: a job, nothing (refused or gone), the file still in
    the inbox for a disk error before anything moved (`retry`), or a claim cut short after
    the file moved (`interrupted`: its spool folder is picked up again later)."""

    path: Path
    job: Job | None = None
    retry: OSError | None = None
    interrupted: ClaimInterrupted | None = None
    skipped: bool = False  # not tried: an earlier claim met a disk error

    @property
    def disk_trouble(self) -> bool:
        interrupted = self.interrupted is not None and is_disk_trouble(self.interrupted.error)
        return self.retry is not None or interrupted


class Claimer:
    """One thread that claims the files it is handed, one after the other."""

    def __init__(self, claim: Callable[[Path], Outcome], wake: Callable[[], None]) -> None:
        self.claim = claim
        self.wake = wake
        self.handed: queue.Queue[Path | None] = queue.Queue()
        self.done: queue.Queue[Outcome] = queue.Queue()
        self.in_flight: dict[Path, None] = {}  # handed over and not taken back, in order
        self.thread: threading.Thread | None = None
        self.held_back = threading.Event()  # set by a disk error; the loop lifts it

    def room(self) -> bool:
        return len(self.in_flight) < WINDOW

    def hand(self, path: Path) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="claimer", daemon=True)
            self.thread.start()
        self.held_back.clear()
        self.in_flight[path] = None
        self.handed.put(path)

    def holds(self, folder: Path, stem: str) -> bool:
        """Whether a file of this stem in this folder is being claimed right now."""
        return any(path.parent == folder and path.stem == stem for path in self.in_flight)

    def take(self) -> Outcome | None:
        """What the next claim handed over came to, in the order they were handed; None
        while it runs. One at a time: an error while the loop deals with one leaves the
        others here for its next turn."""
        try:
            outcome = self.done.get_nowait()
        except queue.Empty:
            return None
        self.in_flight.pop(outcome.path, None)
        return outcome

    def stop(self, timeout: float) -> None:
        """Let the claim under way finish (within `timeout`); no new one starts. One cut
        short by the process ending is picked up at the next start, as after a crash."""
        if self.thread is None:
            return
        self.held_back.set()
        self.handed.put(None)
        self.thread.join(timeout)

    def _work(self) -> None:
        while True:
            path = self.handed.get()
            if path is None:
                return
            if self.held_back.is_set():
                outcome = Outcome(path, skipped=True)
            else:
                outcome = self._claim(path)
                if outcome.disk_trouble:
                    self.held_back.set()  # the next file waits with this one for the disk
            self.done.put(outcome)
            self.wake()

    def _claim(self, path: Path) -> Outcome:
        try:
            return self.claim(path)
        except Exception:  # noqa: BLE001 - the thread must outlive one odd file
            log.exception("claim_crashed", path=str(path))
            return Outcome(path)
