"""Intake: candidates named by inbox events and rescans are settled, and complete files are
claimed into the spool in the order they settled, on the claim thread (`watcher.claimer`)."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from runner.durable import is_disk_trouble
from watcher.claim import ClaimError, ClaimInterrupted, ClaimLost, claim_and_validate
from watcher.claimer import Claimer, Outcome
from watcher.config import Config
from watcher.diskwait import DiskWait
from watcher.inbox import Candidate, classify, scan_inbox
from watcher.jobs import Job
from watcher.settle import CHANGE_HINTS, Settler
from watcher.sidecars import write_refusal
from watcher.stems import Stems

log = structlog.get_logger()


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
        self.claimer = Claimer(self.claim, lambda: self.events.put(Candidate(self.inbox, "claim")))
        self.returned: list[Path] = []  # handed over, not claimed for the disk, in order
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
        """Take back what finished claims came to, and hand the claim thread the next
        complete files in the order they settled, while the disk allows."""
        while (outcome := self.claimer.take()) is not None:
            self.take_outcome(outcome)
        self.release_held()
        if self.returned and not self.claimer.in_flight:
            # Back in front, in their order, once every file handed with them is back.
            self.ready = {**dict.fromkeys(self.returned), **self.ready}
            self.returned = []
        while self.ready and self.claimer.room() and not self.returned and not stopping():
            if not self.disk.space_left(len(self.ready)) or not self.disk.ready():
                return
            path = next(iter(self.ready))
            del self.ready[path]
            if path in self.claimer.in_flight:
                continue  # noted again while its claim runs
            if self.waits_for_its_stem(path):
                continue
            self.claimer.hand(path)

    def waits_for_its_stem(self, path: Path) -> bool:
        """Hold a file whose stem belongs to an unfinished job (or to a file being claimed)
        in its folder: it stays in the inbox, untouched, until that job is finished."""
        owner = self.stems.owner_of_file(path)
        if owner is None and not self.claimer.holds(path.parent, path.stem):
            return False
        if path not in self.held:
            holder = owner.name if owner is not None else "a file being taken"
            log.info("file_waits_for_its_stem", path=str(path), job=holder)
        self.held[path] = None
        return True

    def release_held(self) -> None:
        """Files whose stem's job has finished go first in line, as they were first."""
        free = [
            path
            for path in self.held
            if self.stems.owner_of_file(path) is None
            and not self.claimer.holds(path.parent, path.stem)
        ]
        for path in free:
            del self.held[path]
        if free:
            self.ready = {**dict.fromkeys(free), **self.ready}

    def claiming(self, folder: Path, stem: str) -> bool:
        """Whether a file of this stem in this folder is being claimed right now."""
        return self.claimer.holds(folder, stem)

    def stop_claiming(self, timeout: float) -> None:
        """Let the claim under way finish, and take in what it came to."""
        self.claimer.stop(timeout)
        while (outcome := self.claimer.take()) is not None:
            try:
                self.take_outcome(outcome)
            except OSError as error:  # its spool folder has it for the next start
                log.warning("claim_not_taken", path=str(outcome.path), error=str(error))

    def take_outcome(self, outcome: Outcome) -> None:
        """On the loop: queue what a claim made, or let the disk wait hold it back."""
        if outcome.job is not None:
            job = outcome.job
            log.info("job_claimed", job=job.id, input=job.input_name, model=job.model)
            self.stems.hold(job)
            self.on_claimed(job, outcome.path)
        elif outcome.retry is not None:
            # Nothing moved: the file waits in the inbox, first in line, for the disk.
            self.returned.append(outcome.path)
            self.disk.trouble(outcome.retry)
        elif outcome.skipped:
            self.returned.append(outcome.path)
        elif outcome.interrupted is not None:
            interrupted = outcome.interrupted
            log.warning("claim_interrupted", path=str(outcome.path), error=str(interrupted.error))
            self.stems.hold_path(outcome.path, interrupted.work)
            self.disk.wait_with(interrupted.work)
            if is_disk_trouble(interrupted.error):
                self.disk.trouble(interrupted.error)

    def claim(self, path: Path) -> Outcome:
        """Claim one complete file; on the claim thread, which alone keeps `refused`."""
        try:
            stat = path.lstat()
        except OSError:
            return Outcome(path)
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self.refused.get(path) == signature:
            return Outcome(path)  # refused before and unchanged since: once is enough
        problem = unclaimable(path)
        if problem is not None:
            self._refuse(path, signature, problem, "invalid_name")
            return Outcome(path)
        try:
            job = claim_and_validate(path, self.config, time.time_ns())
        except ClaimLost:
            return Outcome(path)
        except ClaimInterrupted as interrupted:
            return Outcome(path, interrupted=interrupted)
        except OSError as error:
            if is_disk_trouble(error):
                return Outcome(path, retry=error)
            write_refusal(
                path, self.inbox, f"{path.name} could not be taken: {error}", "claim_failed"
            )
            return Outcome(path)
        except ClaimError as error:
            reason = f"{path.name} could not be taken: {error}"
            self._refuse(path, signature, reason, "claim_failed")
            return Outcome(path)
        except Exception as error:  # noqa: BLE001 - one odd file must not stop the appliance
            log.exception("claim_crashed", path=os.fsdecode(path))
            self._refuse(path, signature, f"the file could not be taken: {error}", "claim_failed")
            return Outcome(path)
        return Outcome(path, job=job)

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
