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

from runner.durable import is_disk_trouble
from watcher.inboxnames import read_small, real_folders, remove_file, write_file

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
    engine: str | None = None,
    loading_since: datetime | None = None,
    **more: Any,
) -> dict[str, Any]:
    """A `.status` document in SPEC section 4's format; `more` adds keys after those.

    `engine` is "loading" while the job's model loads (since `loading_since`), else null:
    a load can take minutes, and the job is in progress all along."""
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
        "engine": engine,
        "loading_since": iso(loading_since),
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


def encode(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def write_sidecar(path: Path, document: dict[str, Any], scratch: Path | None = None) -> None:
    """Write a sidecar atomically, from a temporary file in `scratch` (the job's spool
    folder) where there is one: each temporary made in the inbox would be four more events
    for the inbox's watcher to go through. A name the inbox cannot hold (too long, taken by
    a folder) is logged and the job goes on without it; a full or failing disk is raised."""
    try:
        write_file(path, encode(document), "sidecar", scratch)
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
        write_file(path.with_name(f"{path.stem}{STATUS}"), encode(document), "sidecar")
    except OSError as error:  # its folder went away meanwhile: the log says it all
        log.warning("status_not_written", path=str(path), error=str(error))


def sweep_status_files(inbox: Path, keep_hours: float) -> None:
    """Remove final `.status` sidecars older than `keep_hours`. Only regular files are read
    (bounded) or removed; symlinked folders are not followed (watcher.inboxnames)."""
    cutoff = now() - timedelta(hours=keep_hours)
    for folder in [inbox, *real_folders(inbox)]:
        for path in folder.glob(f"*{STATUS}"):
            expired = expired_inode(path, cutoff)
            if expired is not None:
                remove_file(path, "status file", inode=expired)


def expired_inode(path: Path, cutoff: datetime) -> int | None:
    """The inode of a final `.status` finished before `cutoff`, else None."""
    try:
        inode = path.lstat().st_ino
        data = read_small(path, "status file")
    except OSError:
        return None
    if data is None:
        return None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get("status") not in FINAL_STATES:
        return None
    finished = document.get("completed_at") or document.get("updated_at")
    try:
        expired = isinstance(finished, str) and datetime.fromisoformat(finished) < cutoff
    except ValueError:
        return None
    return inode if expired else None
