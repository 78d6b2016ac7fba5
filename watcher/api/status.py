"""What the status page shows, from the contract's files only: the `.status` and `.eta`
sidecars in the inbox (the running job, the queue, the jobs finished lately) and the
benchmark history (recent jobs' durations, throughput and estimates, and the two plots).
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.record import HISTORY, read_history
from watcher.api.contract import MAX_SIDECAR_BYTES, number, text
from watcher.api.storage import read_json_file
from watcher.inbox import classify

RUNNING = ("in_progress", "finalizing", "cancelling")
WAITING = ("validating", "queued")
RECENT = 15  # rows of recent jobs
PLOTTED = 100  # jobs in each plot


def _seconds_until(moment: object, now: datetime) -> float | None:
    if not isinstance(moment, str):
        return None
    try:
        return max(0.0, (datetime.fromisoformat(moment) - now).total_seconds())
    except (ValueError, TypeError):  # not a time, or one without its offset
        return None


def sidecars(inbox: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable `.status` in the inbox and its model subfolders."""
    folders = [inbox]
    found = []
    try:
        for entry in os.scandir(inbox):
            if classify(entry.name) == "other" and entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
    except FileNotFoundError:
        return []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.endswith(".status") and classify(entry.name) == "sidecar":
                document = read_json_file(Path(entry.path), MAX_SIDECAR_BYTES)
                if document is not None:
                    found.append((Path(entry.path), document))
    return found


def _job(path: Path, document: dict[str, Any], now: datetime) -> dict[str, Any]:
    counts = document.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}
    total, completed, failed = (number(counts.get(key)) for key in ("total", "completed", "failed"))
    throughput = document.get("throughput")
    speed = throughput.get("tokens_per_second") if isinstance(throughput, dict) else None
    eta = read_json_file(path.with_suffix(".eta"), MAX_SIDECAR_BYTES) or {}
    expected = text(document.get("eta")) or text(eta.get("eta"))
    return {
        "id": text(document.get("id")),
        "input": text(document.get("input")),
        "model": text(document.get("model")),
        "status": text(document.get("status")),
        "total": total,
        "completed": completed,
        "failed": failed,
        "progress": min(1.0, (completed + failed) / total) if total else 0.0,
        "tokens_per_second": speed if isinstance(speed, (int, float)) else None,
        "queue_position": number(document.get("queue_position")) or None,
        "eta": expected,
        "seconds_remaining": _seconds_until(expected, now),
        "basis": text(eta.get("basis")),
        "started_at": text(document.get("in_progress_at")),
    }


class History:
    """The benchmark history, parsed again only when the file changes."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.signature: tuple[int, int, int] | None = None
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def recent(self) -> list[dict[str, Any]]:
        try:
            info = os.stat(self.state / HISTORY)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            return []
        with self.lock:
            if signature != self.signature:
                self.records = [_summary(record) for record in read_history(self.state)][-PLOTTED:]
                self.signature = signature
            return self.records


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the page shows of one benchmark record."""
    throughput = record.get("throughput") or {}
    estimate = record.get("estimate") or {}
    return {
        "job_id": record.get("job_id"),
        "input": record.get("input"),
        "status": record.get("status"),
        "model": record.get("model"),
        "finished_at": record.get("finished_at"),
        "completed": (record.get("request_counts") or {}).get("completed"),
        "failed": (record.get("request_counts") or {}).get("failed"),
        "run_seconds": record.get("run_seconds"),
        "load_seconds": record.get("load_seconds"),
        "tokens_per_second": throughput.get("total_tokens_per_second"),
        "estimate_seconds": estimate.get("run_seconds"),
        "estimate_error": record.get("estimate_error"),
    }


def appliance_status(inbox: Path, history: History) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    running, queue, inputs = [], [], {}
    for path, document in sidecars(inbox):
        state = text(document.get("status"))
        if text(document.get("id")):
            inputs[document["id"]] = text(document.get("input"))
        if state in RUNNING:
            running.append(_job(path, document, now))
        elif state in WAITING:
            queue.append(_job(path, document, now))
    queue.sort(key=lambda job: (job["queue_position"] or 1 << 30, job["input"] or ""))
    records = history.recent()
    recent = [dict(record) for record in records[-RECENT:]][::-1]
    for record in recent:
        record["input"] = record["input"] or inputs.get(record["job_id"])
    return {
        "generated_at": now.replace(microsecond=0).isoformat(),
        "running": running,
        "queue": queue,
        "recent": recent,
        "plots": {
            "throughput": [record["tokens_per_second"] for record in records],
            "eta_error": [record["estimate_error"] for record in records],
        },
    }
