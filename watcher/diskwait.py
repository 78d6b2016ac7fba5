"""Waiting for the disk: after a write fails for a full or failing disk, nothing new is
claimed or started for a while, and the jobs the error cut short wait in the spool, with a
note beside each saying why, to be picked up again from their records once the disk allows.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import structlog

from runner.durable import is_out_of_space
from watcher.execute import DiskTrouble
from watcher.jobs import Job, JobStatus, write_status

log = structlog.get_logger()

# After a write fails for a full or failing disk, nothing is claimed or started for this long
# (doubled at each failure in a row, up to DISK_RETRY_MAX_SECONDS), and after a full disk
# not before free space is back above the floor (min_free_bytes, and DISK_MARGIN_BYTES at
# least, so that a disk with min_free_bytes 0 is not retried while still full).
DISK_RETRY_SECONDS = 30.0
DISK_RETRY_MAX_SECONDS = 600.0
DISK_MARGIN_BYTES = 1 << 20
NOTE_RETRY_SECONDS = 1.0  # how often a waiting job's note is tried again while it fails


class DiskWait:
    def __init__(self, state: Path, min_free_bytes: int) -> None:
        self.state = state
        self.min_free_bytes = min_free_bytes
        self.until = 0.0
        self.needs_space = False
        self.failures = 0
        self.low = False
        # Spool folders of jobs that a disk error cut short, to be picked up again from their
        # records (as at a start) once the disk allows.
        self.waiting_jobs: set[Path] = set()
        # Paused jobs whose note could not be written for want of space: tried again now
        # and then while they wait, so the sidecar says why nothing moves.
        self.unwritten_notes: dict[Path, Job] = {}
        self.last_note_attempt = 0.0

    def trouble(self, error: OSError) -> None:
        """Hold off claiming and starting work for a while, and until there is space."""
        self.failures += 1
        delay = min(DISK_RETRY_SECONDS * 2 ** (self.failures - 1), DISK_RETRY_MAX_SECONDS)
        self.until = max(self.until, time.monotonic() + delay)
        self.needs_space = self.needs_space or is_out_of_space(error)
        log.warning(
            "disk_trouble",
            error=str(error),
            retry_seconds=delay,
            jobs_waiting=len(self.waiting_jobs),
        )

    def succeeded(self) -> None:
        """A job was delivered: the next failure waits the shortest time again."""
        self.failures = 0

    def ready(self) -> bool:
        """Whether work may go on: no disk error lately, or its wait is over and, after a
        full disk, space is back."""
        if not self.until:
            return True
        if time.monotonic() < self.until:
            return False
        if self.needs_space:
            floor = max(self.min_free_bytes, DISK_MARGIN_BYTES)
            if shutil.disk_usage(self.state).free < floor:
                return False
        log.info("disk_ready", jobs_waiting=len(self.waiting_jobs))
        self.until = 0.0
        self.needs_space = False
        return True

    def space_left(self, waiting: int) -> bool:
        """Whether there is room to claim new work (min_free_bytes); said once per change."""
        low = shutil.disk_usage(self.state).free < self.min_free_bytes
        if low != self.low:
            self.low = low
            if low:
                log.warning("low_disk_space", waiting=waiting)
            else:
                log.info("disk_space_back", waiting=waiting)
        return not low

    def wait_with(self, work: Path) -> None:
        """A job's spool folder to pick up again once the disk allows."""
        self.waiting_jobs.add(work)

    def pause_job(self, job: Job, error: OSError) -> None:
        """A job the disk stopped: say so beside it; it resumes from its journal later."""
        trouble = DiskTrouble(error)
        job.errors = [note for note in job.errors if note.get("code") != trouble.code]
        job.errors.append(
            {
                "code": trouble.code,
                "message": f"{trouble.reason}; the job waits and resumes where it stopped",
            }
        )
        # A job stopped while finishing keeps the record delivery wrote: the sidecar must
        # not say "completed" before its outbox folder is there.
        if not (job.status.finished or job.status is JobStatus.FINALIZING):
            self.unwritten_notes[job.work] = job
            self.write_notes()
        self.waiting_jobs.add(job.work)
        self.trouble(error)

    def write_notes(self) -> None:
        """Try again to write the notes of paused jobs that a full disk refused."""
        if time.monotonic() - self.last_note_attempt < NOTE_RETRY_SECONDS:
            return
        self.last_note_attempt = time.monotonic()
        for work, job in list(self.unwritten_notes.items()):
            try:
                write_status(job)
            except OSError as error:
                log.warning("status_not_written", job=job.id, error=str(error))
                return
            del self.unwritten_notes[work]

    def take_waiting(self) -> list[Path]:
        """The waiting jobs' folders, in order, forgotten here: their records count now."""
        folders = sorted(self.waiting_jobs)
        self.waiting_jobs.clear()
        for work in folders:
            self.unwritten_notes.pop(work, None)
        return folders
