"""Recovery: after a crash, a kill or a stop, every job the spool holds is picked up from its
record, where it was: queued jobs queue again, a running job resumes first, a job stopped
while finishing is delivered once, and what a crash left half-written is removed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from runner.durable import is_disk_trouble, rename_durably
from runner.durable import remove_temporaries as remove_temporaries_in
from watcher.aside import set_aside
from watcher.claim import take_ticket_left_behind
from watcher.config import Config
from watcher.diskwait import DiskWait
from watcher.jobqueue import JobQueue
from watcher.jobs import (
    Job,
    JobStatus,
    RecordError,
    load_job,
    mark_finished,
    mark_queued,
    resume_finishing,
)
from watcher.spool import INPUT, RUNS, spool_folder
from watcher.validate import revalidate

log = structlog.get_logger()

Finish = Callable[[Job, JobStatus], bool]


def remove_temporaries(inbox: Path, state: Path, outbox: Path) -> None:
    """What a crash in the middle of an atomic write left: never a file of the user's, and
    never to be delivered with a job's folder."""
    folders = [inbox, state, outbox]
    folders += [path for path in inbox.iterdir() if path.is_dir() and not path.is_symlink()]
    for work in spool_folder(state).iterdir():
        folders += [work, work / "out"]
    removed = sum(remove_temporaries_in(folder) for folder in folders if folder.is_dir())
    if removed:
        log.info("temporaries_removed", count=removed)


def recover_folder(
    work: Path,
    config: Config,
    queue: JobQueue,
    finish: Finish,
    disk: DiskWait,
    seen: Callable[[Job], None] = lambda job: None,
) -> bool:
    """Recover one spool folder into the queue (or the outbox); False on a disk error.

    `seen` is told of each job read from its record. A job that cannot be recovered for any
    other reason is set aside (watcher.aside): the others must run, and a start must never
    fail over one job."""
    job = None
    try:
        job = load_job(work)
        seen(job)
        recover_job(job, config, queue, finish)
    except OSError as error:
        if not is_disk_trouble(error):
            set_broken_aside(work, config, error, job, queue)
            return True
        if job is not None and job in queue.jobs:
            queue.remove(job)
        disk.wait_with(work)
        disk.trouble(error)
        return False
    except Exception as error:  # noqa: BLE001 - one bad folder must not stop the service
        set_broken_aside(work, config, error, job, queue)
    return True


def set_broken_aside(
    work: Path, config: Config, error: BaseException, job: Job | None, queue: JobQueue
) -> None:
    if job is not None and job in queue.jobs:
        queue.remove(job)
    if job is None or isinstance(error, RecordError):
        reason = f"its record cannot be read ({error})"
    else:
        reason = f"it could not be recovered ({type(error).__name__}: {error})"
        log.error("job_not_recovered", work=str(work), exc_info=error)
    set_aside(work, config.folder("state"), reason, job)


def recover_job(job: Job, config: Config, queue: JobQueue, finish: Finish) -> None:
    if job.sidecar_dir is None:
        hand_back_run(job, config.folder("state"))
        return
    log.info("job_recovered", job=job.id, status=job.status.value)
    if job.status.finished:
        resume_finishing(job)
    if job.status is JobStatus.FINALIZING:
        final = JobStatus(job.final) if job.final else JobStatus.FAILED
        if not job.out.exists() and job.outbox:
            # Delivered before the stop, perhaps before its sidecars were final.
            mark_finished(job, final)
            shutil.rmtree(job.work, ignore_errors=True)
            return
        finish(job, final)
        return
    if job.status is JobStatus.CANCELLING:
        finish(job, JobStatus.CANCELLED)
        return
    if job.status is JobStatus.VALIDATING:
        if not (job.out / INPUT).exists():
            # Recorded, then stopped before the rename: the file is still in the inbox.
            shutil.rmtree(job.work, ignore_errors=True)
            return
        take_ticket_left_behind(job)
        revalidate(job, config)
        if job.errors:
            finish(job, JobStatus.FAILED)
            return
    # Written before it joins the queue: a write that fails leaves it out of the queue,
    # to be adopted again, never in it twice.
    if job.status is not JobStatus.IN_PROGRESS:
        mark_queued(job)
    queue.push(job)


def hand_back_run(job: Job, state: Path) -> None:
    """A `batchbox run` job that an older batchbox kept in the service's spool: moved to the
    runs' own, where running the same file again resumes it. The service never runs it."""
    target = spool_folder(state, RUNS) / job.work.name
    target.parent.mkdir(parents=True, exist_ok=True)
    rename_durably(job.work, target)
    log.info("run_job_handed_back", job=job.id, work=str(target))
