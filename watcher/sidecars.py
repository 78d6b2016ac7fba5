"""The `.status` and `.eta` sidecars: the one builder of their documents, their writing, and
the sweep that removes final `.status` files once they have stood long enough.

Documents are built from plain values here and nowhere else, so a refusal, a queued job and
a finished one all carry every key of SPEC section 4. Every write is atomic (temporary file,
fsync, rename), so a reader never sees a torn file.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import structlog

from runner.durable import is_disk_trouble, write_json_atomic

log = structlog.get_logger()

STATUS, ETA = ".status", ".eta"
FINAL_STATES = ("completed", "failed", "cancelled")


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def status_document(
    *,
    id: str | None,  # noqa: A002 - the key's name in the format
    input: str,  # noqa: A002 - the key's name in the format
    status: str,
    model: str | None = None,
    endpoint: str | None = None,
    counts: tuple[int, int, int] = (0, 0, 0),
    queue_position: int | None = None,
    created_at: datetime | None = None,
    in_progress_at: datetime | None = None,
    completed_at: datetime | None = None,
    eta: datetime | None = None,
    usage: tuple[int, int] = (0, 0),
    throughput: tuple[float, float] | None = None,
    outbox: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """A `.status` document in SPEC section 4's format; `more` adds keys after those."""
    total, completed, failed = counts
    return {
        "id": id,
        "input": input,
        "model": model,
        "endpoint": endpoint,
        "status": status,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "queue_position": queue_position,
        "created_at": iso(created_at),
        "in_progress_at": iso(in_progress_at),
        "completed_at": iso(completed_at),
        "updated_at": iso(now()),
        "eta": iso(eta),
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
        "throughput": None
        if throughput is None
        else {
            "tokens_per_second": round(throughput[0], 1),
            "requests_per_second": round(throughput[1], 2),
        },
        "outbox": outbox,
        "errors": errors or [],
        **more,
    }


def eta_document(eta: datetime, seconds: float, written: datetime, basis: str) -> dict[str, Any]:
    """An `.eta` document: when the job is expected to finish, and what that rests on."""
    return {
        "eta": iso(eta),
        "seconds_remaining": round(seconds),
        "written_at": iso(written),
        "basis": basis,
    }


def write_sidecar(path: Path, document: dict[str, Any], scratch: Path | None = None) -> None:
    """Write a sidecar atomically, from a temporary file in `scratch` (the job's spool
    folder) where there is one: each temporary made in the inbox would be four more events
    for the inbox's watcher to go through. A name the inbox cannot hold (too long, taken by
    a folder) is logged and the job goes on without it; a full or failing disk is raised."""
    try:
        write_json_atomic(path, document, scratch)
    except OSError as error:
        if is_disk_trouble(error):
            raise
        log.warning("sidecar_not_written", path=str(path), error=str(error))


def write_refusal(path: Path, inbox: Path, reason: str, code: str) -> None:
    """Say beside a file that looks like a job but cannot be taken why it was refused."""
    log.warning("file_refused", path=str(path), reason=reason)
    moment = now()
    name = os.fsdecode(path.relative_to(inbox)).encode("utf-8", "replace").decode()
    document = status_document(
        id=None,
        input=name,
        status="failed",
        created_at=moment,
        completed_at=moment,
        errors=[{"code": code, "message": reason}],
    )
    try:
        write_json_atomic(path.with_name(f"{path.stem}{STATUS}"), document)
    except OSError as error:  # its folder went away meanwhile: the log says it all
        log.warning("status_not_written", path=str(path), error=str(error))


def sweep_status_files(inbox: Path, keep_hours: float) -> None:
    """Remove final `.status` sidecars older than `keep_hours`."""
    cutoff = now() - timedelta(hours=keep_hours)
    # Symlinked folders are not followed: the sweep deletes files only inside the inbox.
    subfolders = [path for path in inbox.iterdir() if path.is_dir() and not path.is_symlink()]
    for folder in [inbox, *subfolders]:
        for path in folder.glob(f"*{STATUS}"):
            if is_expired(path, cutoff):
                path.unlink(missing_ok=True)


def is_expired(path: Path, cutoff: datetime) -> bool:
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    if not isinstance(document, dict) or document.get("status") not in FINAL_STATES:
        return False
    finished = document.get("completed_at") or document.get("updated_at")
    try:
        return finished is not None and datetime.fromisoformat(finished) < cutoff
    except ValueError:
        return False
