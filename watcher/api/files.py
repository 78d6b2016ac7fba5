"""Files: uploads (purpose `batch`) kept in `state/api/files/<id>/`, and the output and error
files of finished batches (purpose `batch_output`), whose content is the outbox folder's
`results.jsonl` or `errors.jsonl` and of which the API keeps only a record.

An upload is registered by one rename of its folder, holding both the data and its record,
from `tmp/` into `files/`: a crash before that leaves only something in `tmp/`, which the
next start removes; a crash after it leaves a complete file.
"""

from __future__ import annotations

import bisect
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import structlog

from runner.durable import fsync_dir, make_folders_durably
from watcher.api.contract import Contract
from watcher.api.errors import bad_request, not_found
from watcher.api.storage import (
    CONTENT,
    FILE_PREFIX,
    RECORD,
    ApiFolders,
    is_file_id,
    new_id,
    read_json_file,
    write_record,
)

log = structlog.get_logger()

PUBLIC = ("id", "object", "bytes", "created_at", "filename", "purpose", "status")
OUTPUT_NAMES = {"results.jsonl": "output", "errors.jsonl": "error"}


def public_file(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI `FileObject`: every field of the SDK's type, null where unset."""
    return {key: record[key] for key in PUBLIC} | {"expires_at": None, "status_details": None}


class FileStore:
    def __init__(self, folders: ApiFolders, contract: Contract) -> None:
        self.folders = folders
        self.contract = contract
        self.records: dict[str, dict[str, Any]] = {}
        self.by_owner: dict[str, list[str]] = {}  # ids in ascending order, i.e. by age
        self.lock = threading.Lock()

    def load(self) -> None:
        for entry in os.scandir(self.folders.files):
            if not (is_file_id(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            folder = Path(entry.path)
            if not (folder / RECORD).exists():
                # An output file's folder made just before a crash; its record never written.
                shutil.rmtree(folder, ignore_errors=True)
                continue
            record = read_json_file(folder / RECORD)
            if record is None or record.get("id") != entry.name:
                log.warning("file_record_unreadable", file=entry.name)
                continue
            self._index(record)

    def _index(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records[record["id"]] = record
            bisect.insort(self.by_owner.setdefault(record["owner"], []), record["id"])

    # -- adding ------------------------------------------------------------------------

    def register_upload(self, folder: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Move an upload's folder (its `content` already durable) from tmp/ into files/."""
        write_record(folder / RECORD, record)
        fsync_dir(folder)
        os.rename(folder, self.folders.file_folder(record["id"]))
        fsync_dir(self.folders.files)
        fsync_dir(self.folders.tmp)
        self._index(record)
        return record

    def add_output(
        self, owner: str, batch_id: str, folder: str, name: str, size: int, created_at: int
    ) -> str:
        """Register a delivered `results.jsonl` or `errors.jsonl` as a file of the batch's key."""
        file_id = new_id(FILE_PREFIX)
        record = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": created_at,
            "filename": f"{batch_id}_{OUTPUT_NAMES[name]}.jsonl",
            "purpose": "batch_output",
            "status": "processed",
            "owner": owner,
            "batch_id": batch_id,
            "outbox_folder": folder,
            "outbox_name": name,
        }
        target = self.folders.file_folder(file_id)
        make_folders_durably(target)
        write_record(target / RECORD, record)
        self._index(record)
        return file_id

    # -- reading -----------------------------------------------------------------------

    def get(self, owner: str, file_id: str, param: str | None = None) -> dict[str, Any]:
        record = self.records.get(file_id) if is_file_id(file_id) else None
        if record is None or record["owner"] != owner:
            raise not_found("file", file_id, param)
        return record

    def page(
        self, owner: str, after: str | None, limit: int, order: str, purpose: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        ids = self.by_owner.get(owner, [])
        if after is not None:
            if not is_file_id(after):
                raise bad_request(f"'{after}' is not a file id.", "after")
            if order == "desc":
                candidates = reversed(ids[: bisect.bisect_left(ids, after)])
            else:
                candidates = iter(ids[bisect.bisect_right(ids, after) :])
        else:
            candidates = reversed(ids) if order == "desc" else iter(ids)
        found: list[dict[str, Any]] = []
        for file_id in candidates:
            record = self.records.get(file_id)
            if record is None or (purpose is not None and record["purpose"] != purpose):
                continue
            if len(found) == limit:
                return found, True
            found.append(record)
        return found, False

    def content_path(self, record: dict[str, Any]) -> Path:
        return self.folders.file_folder(record["id"]) / CONTENT

    def open(self, record: dict[str, Any]) -> int | None:
        """A descriptor of the file's content, or None when it is no longer there (an
        outbox folder the owner removed)."""
        if record["purpose"] == "batch_output":
            return self.contract.open_output(record["outbox_folder"], record["outbox_name"])
        try:
            return os.open(self.content_path(record), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    # -- deleting ----------------------------------------------------------------------

    def outputs(self) -> list[dict[str, Any]]:
        return [record for record in self.records.values() if record["purpose"] == "batch_output"]

    def delete(self, owner: str, file_id: str) -> None:
        """Forget a file; an upload's data goes too (a batch made from it has its own link
        or copy in the inbox or the spool, and keeps running). An output file's data is the
        outbox's, which stays."""
        record = self.get(owner, file_id)
        folder = self.folders.file_folder(file_id)
        with self.lock:
            if self.records.pop(file_id, None) is None:
                raise not_found("file", file_id)
            ids = self.by_owner[owner]
            del ids[bisect.bisect_left(ids, file_id)]
        # One rename makes it gone at once; what is left in tmp/ goes now or at the next start.
        doomed = self.folders.tmp / f"deleted-{file_id}"
        os.rename(folder, doomed)
        fsync_dir(self.folders.files)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("file_deleted", file=file_id, purpose=record["purpose"])
