"""Claiming: a complete file leaves the inbox by one atomic rename into the spool.

From the rename on, the service owns the file: it is in `state/jobs/<id>/out/input.jsonl`
and the `.status` sidecar stands where the file was. The ticket beside it moves along.
Inbox, outbox and state are on one filesystem (the service checks that at start with
`watcher.machine.one_filesystem_problem`), so every move here is a rename, never a copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from runner.durable import fsync_dir, fsync_regular_file, rename_durably
from watcher.config import Config
from watcher.inbox import stem_of
from watcher.jobs import Job, fail_job, write_record, write_status
from watcher.machine import one_filesystem_problem
from watcher.spool import INPUT, new_spool_job
from watcher.tickets import find_ticket, read_ticket_into
from watcher.validate import check_job


class ClaimError(Exception):
    """The file could not be taken; nothing of it is in the spool."""


class ClaimLost(ClaimError):
    """The file was gone (or swapped for something else) by the time it was to be taken."""


class ClaimInterrupted(Exception):
    """The file is in the spool, but an error (a full disk) cut the claim short.

    Its spool folder holds a record and the input, exactly as a crash at that moment would
    leave them: the service recovers it from there, the way it does at a start.
    """

    def __init__(self, work: Path, error: OSError) -> None:
        super().__init__(f"the claim of {work.name} was cut short: {error}")
        self.work = work
        self.error = error


def inbox_subdir(path: Path, inbox: Path) -> str:
    """The subfolder a drop came from: "" for the inbox itself, else the model folder name."""
    folder = path.parent
    if folder == inbox:
        return ""
    # A symlinked subfolder would let a drop move a file from anywhere the link points.
    if folder.parent == inbox and not folder.is_symlink():
        return folder.name
    raise ClaimError(f"{path} is not in the inbox or one of its subfolders")


def claim_job(path: Path, config: Config, sequence: int) -> tuple[Job, str | None]:
    """Take a complete file into a new spool job; the job and its ticket's model, if any.

    The job is in state `validating`; when its ticket is bad it already carries the error.
    """
    subdir = inbox_subdir(path, config.folder("inbox"))
    job = new_spool_job(config.folder("state"), stem_of(path.name), subdir, path.parent)
    job.sequence = sequence
    _take_input(path, job, config)
    try:
        write_status(job)  # the sidecar stands in the inbox from the moment the file is gone
        ticket_model = _take_ticket(path, job)
        if job.has_ticket:
            write_status(job)  # the job record keeps the ticket's values for a restart
    except OSError as error:
        raise ClaimInterrupted(job.work, error) from error
    return job, ticket_model


def _take_input(path: Path, job: Job, config: Config) -> None:
    target = job.out / INPUT
    # The record goes first: after a crash, a spool folder holding an input always has a
    # record saying what it is, and a record without an input means the file never left
    # the inbox. The new folders, and the data of the file itself (an uploader need not
    # have synced it), must be durable before its only name moves into the spool.
    try:
        write_record(job)
        for folder in (job.work.parent, job.work.parent.parent):
            fsync_dir(folder)
        fsync_regular_file(path)
    except BaseException:
        shutil.rmtree(job.work, ignore_errors=True)
        raise
    try:
        os.rename(path, target)
    except FileNotFoundError:
        shutil.rmtree(job.work)
        raise ClaimLost(f"{path.name} was gone before it could be taken") from None
    except OSError as error:
        shutil.rmtree(job.work)
        if error.errno == errno.EXDEV:
            raise ClaimError(one_filesystem_problem(config) or str(error)) from None
        raise
    _make_sure_regular(path, target, job)
    # From here on the spool holds the only copy: an error must not undo the claim.
    try:
        fsync_dir(target.parent)
        fsync_dir(path.parent)
    except OSError as error:
        raise ClaimInterrupted(job.work, error) from error


def _make_sure_regular(path: Path, target: Path, job: Job) -> None:
    """Undo the claim when a symlink or FIFO took the file's place after it settled.

    Reading such a thing later would follow the link or block on the pipe forever.
    """
    if stat.S_ISREG(os.lstat(target).st_mode):
        return
    if not os.path.lexists(path):
        os.rename(target, path)  # back where it was, so the settler refuses it with a reason
    elif os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    else:
        target.unlink()
    shutil.rmtree(job.work)
    raise ClaimLost(f"{path.name} was replaced by something that is not a regular file")


def _take_ticket(path: Path, job: Job) -> str | None:
    """Move `<stem>.yaml` (or `.yml`) along and apply it; the model it names, if any."""
    ticket_path = find_ticket(path.parent, job.stem)
    if ticket_path is None:
        return None
    target = job.out / f"{job.stem}{ticket_path.suffix}"
    try:
        fsync_regular_file(ticket_path)
        rename_durably(ticket_path, target)
    except FileNotFoundError:
        return None  # removed by its owner in the meantime: the job runs without one
    if not stat.S_ISREG(os.lstat(target).st_mode):
        # Swapped after find_ticket looked: reading a FIFO would block the service.
        job.has_ticket = True
        fail_job(job, "invalid_ticket", f"ticket {ticket_path.name} is not a regular file")
        return None
    return read_ticket_into(job, target)


def take_ticket_left_behind(job: Job) -> None:
    """Move in the ticket of a job whose claim was cut short after its file moved."""
    if job.sidecar_dir is None or find_ticket(job.out, job.stem) is not None:
        return
    _take_ticket(job.sidecar_dir / f"{job.stem}.jsonl", job)


def claim_and_validate(path: Path, config: Config, sequence: int) -> Job:
    """Claim the file and check it. The job stays `validating`; `job.errors` set means it
    must be delivered as failed (with `finish_job`), else the caller queues it."""
    job, ticket_model = claim_job(path, config, sequence)
    if not job.errors:
        try:
            check_job(job, config, ticket_model)
        except OSError as error:
            raise ClaimInterrupted(job.work, error) from error
        try:
            write_status(job)
        except OSError as error:
            raise ClaimInterrupted(job.work, error) from error
    return job
