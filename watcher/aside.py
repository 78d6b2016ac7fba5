"""A job that cannot be finished is set aside, never retried at every start: its spool folder
is renamed into `state/broken/` for a person to look at, and its `.status` says it failed
and why, where that can still be written. The other jobs run on.

What lands here is not a user's doing that validation can catch (a bad file fails as a job
of its own), nor a full or failing disk (the job waits for the disk): it is a spool folder
someone else changed (an unreadable record, an input gone) or an error nobody foresaw while
finishing. Retrying it at each start would fail the same way, and under systemd a start
that fails is restarted in a loop.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from runner.durable import make_folders_durably, rename_durably, write_atomic
from watcher.jobs import Job, mark_broken

log = structlog.get_logger()

BROKEN = "broken"
REASON = "reason.txt"


def set_aside(work: Path, state: Path, reason: str, job: Job | None = None) -> Path | None:
    """Move a job's spool folder to `state/broken/<id>/` with the reason beside it, and fail
    its `.status` when the job is known. Never raises: the folder that was there, or None
    when even the move failed (it is then met again at the next start)."""
    target: Path | None = state / BROKEN / work.name
    try:
        make_folders_durably(target.parent)
        number = 1
        while target.exists() or target.is_symlink():
            number += 1
            target = target.with_name(f"{work.name}-{number}")
        rename_durably(work, target)
    except OSError as error:
        log.error("job_not_set_aside", work=str(work), reason=reason, error=str(error))
        target = None
    else:
        log.error("job_set_aside", work=str(work), kept=str(target), reason=reason)
        try:
            write_atomic(target / REASON, f"{reason}\n".encode())
        except OSError:
            pass  # the log line says it too
    if job is not None:
        if target is not None:
            job.work = target
        kept = f"its spool folder is kept in {target}" if target else "its spool folder is kept"
        try:
            mark_broken(job, "job_not_finished", f"{reason}; {kept} for a person to look at")
        except Exception:  # noqa: BLE001 - what is broken may be the sidecar's folder too
            log.exception("status_not_written", job=job.id)
    return target
