"""Intake: candidates named by inbox events and rescans are settled, and complete files are
claimed into the spool, in the order they settled and a slice of time at a time."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from runner.durable import is_disk_trouble
from watcher.claim import ClaimError, ClaimInterrupted, ClaimLost, claim_and_validate
from watcher.config import Config
from watcher.diskwait import DiskWait
from watcher.inbox import Candidate, classify, scan_inbox
from watcher.jobs import Job
from watcher.settle import CHANGE_HINTS, Settler
from watcher.sidecars import write_refusal
from watcher.stems import Stems

log = structlog.get_logger()

SLICE_SECONDS = 0.5  # claiming a burst yields to the rest of the loop this often


class Intake:
    def __init__(
        self,
        config: Config,
        disk: DiskWait,
        on_claimed: Callable[[Job, Path], None],
        on_cancel: Callable[[Path], None],
    ) -> None:
        self.config = config
        self.inbox = config.folder("inbox")
        self.disk = disk
        self.on_claimed = on_claimed
        self.on_cancel = on_cancel
        self.events: queue.Queue[Candidate] = queue.Queue()
        self.settler = Settler(config.settle_seconds)
        # Complete files waiting to be claimed, in the order they settled (an ordered set).
        self.ready: dict[Path, None] = {}
        # Files refused at claim, with what they were then, so a rescan does not repeat it.
        self.refused: dict[Path, tuple[int, int, int]] = {}
        self.last_rescan = 0.0
        # Whose each stem is, and complete files that wait for their stem's job to finish.
        self.stems = Stems()
        self.held: dict[Path, None] = {}

    def take_events(self) -> None:
        while True:
            try:
                candidate = self.events.get_nowait()
            except queue.Empty:
                return
            self.take_candidate(candidate)

    def take_candidate(self, candidate: Candidate) -> None:
        kind = classify(candidate.path.name)
        if kind == "job":
            if candidate.path in self.ready or candidate.path in self.held:
                if candidate.hint not in CHANGE_HINTS:
                    return  # settled already and waiting its turn to be claimed
                # Written to again: it must settle anew.
                self.ready.pop(candidate.path, None)
                self.held.pop(candidate.path, None)
            self.settler.note(candidate.path, candidate.hint)
        elif kind == "cancel":
            self.on_cancel(candidate.path)

    def rescan_if_due(self) -> None:
        if time.monotonic() - self.last_rescan >= self.config.rescan_seconds:
            self.rescan()

    def rescan(self) -> None:
        self.last_rescan = time.monotonic()
        for candidate in scan_inbox(self.inbox):
            self.take_candidate(candidate)

    def settle(self) -> None:
        result = self.settler.settle()
        for path, reason in result.refused:
            write_refusal(path, self.inbox, reason, "not_a_regular_file")
        self.ready.update(dict.fromkeys(result.complete))

    def claim_ready(self, stopping: Callable[[], bool]) -> None:
        """Claim complete files in the order they settled, for a slice of time at most: a
        burst of hundreds of drops must not hold up the start of the first job, cancels and
        the watchdog."""
        started = time.monotonic()
        self.release_held()
        while self.ready and not stopping():
            if time.monotonic() - started >= SLICE_SECONDS:
                return
            if not self.disk.space_left(len(self.ready)) or not self.disk.ready():
                return
            path = next(iter(self.ready))
            del self.ready[path]
            self.claim(path)

    def release_held(self) -> None:
        """Files whose stem's job has finished go first in line, as they were first."""
        free = [path for path in self.held if self.stems.owner_of_file(path) is None]
        for path in free:
            del self.held[path]
        if free:
            self.ready = {**dict.fromkeys(free), **self.ready}

    def claim(self, path: Path) -> None:
        try:
            stat = path.lstat()
        except OSError:
            return
        owner = self.stems.owner_of_file(path)
        if owner is not None:
            if path not in self.held:
                log.info("file_waits_for_its_stem", path=str(path), job=owner.name)
            self.held[path] = None  # untouched until that job is finished
            return
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self.refused.get(path) == signature:
            return  # refused before and unchanged since: once is enough
        problem = unclaimable(path)
        if problem is not None:
            self._refuse(path, signature, problem, "invalid_name")
            return
        try:
            job = claim_and_validate(path, self.config, time.time_ns())
        except ClaimLost:
            return
        except ClaimInterrupted as interrupted:
            log.warning("claim_interrupted", path=str(path), error=str(interrupted.error))
            self.stems.hold_path(path, interrupted.work)
            self.disk.wait_with(interrupted.work)
            if is_disk_trouble(interrupted.error):
                self.disk.trouble(interrupted.error)
            return
        except OSError as error:
            if is_disk_trouble(error):
                # Nothing moved: the file waits in the inbox, first in line, for the disk.
                self.ready = {path: None, **self.ready}
                self.disk.trouble(error)
                return
            write_refusal(
                path, self.inbox, f"{path.name} could not be taken: {error}", "claim_failed"
            )
            return
        except ClaimError as error:
            reason = f"{path.name} could not be taken: {error}"
            self._refuse(path, signature, reason, "claim_failed")
            return
        except Exception as error:  # noqa: BLE001 - one odd file must not stop the appliance
            log.exception("claim_crashed", path=os.fsdecode(path))
            self._refuse(path, signature, f"the file could not be taken: {error}", "claim_failed")
            return
        log.info("job_claimed", job=job.id, input=job.input_name, model=job.model)
        self.stems.hold(job)
        self.on_claimed(job, path)

    def _refuse(self, path: Path, signature: tuple[int, int, int], reason: str, code: str) -> None:
        self.refused[path] = signature
        write_refusal(path, self.inbox, reason, code)


def unclaimable(path: Path) -> str | None:
    """Why a complete file cannot become a job, or None. Its name goes into status files,
    which are UTF-8 JSON."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not UTF-8 text; rename the file"
    return None
