"""Batches: each one a file placed in the inbox by the folder contract, followed through its
`.status` sidecar and, once delivered, its outbox folder.

The service's eight states map onto OpenAI's: `queued` is `in_progress` (OpenAI has no
queue; `in_progress_at` stays null until the job really starts), the other seven keep their
names. A batch whose traces are all gone (its `.status` swept after `keep_status_hours` and
its outbox folder removed) is `expired`. Once a batch is seen finished in its outbox folder,
its final state and the ids of its output and error files are kept in its record, so
it is answered from there ever after.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from datetime import datetime
from typing import Any

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from watcher.api.contract import FINAL, Contract, number, stem_for, text
from watcher.api.errors import ApiError, bad_request, not_found
from watcher.api.files import FileStore
from watcher.api.storage import BATCH_PREFIX, ApiFolders, is_batch_id, new_id, read_json_file
from watcher.api.storage import write_record as save

log = structlog.get_logger()

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW = "24h"
OUTPUTS = (("results.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id"))
OPENAI_STATUS = {
    "validating": "validating",
    "queued": "in_progress",
    "in_progress": "in_progress",
    "finalizing": "finalizing",
    "completed": "completed",
    "failed": "failed",
    "cancelling": "cancelling",
    "cancelled": "cancelled",
}


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _openai_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, content in (value or {}).items():
            if len(key) > 64:
                raise ValueError(f"key {key[:20]!r}... is longer than 64 characters")
            if len(content) > 512:
                raise ValueError(f"the value of {key!r} is longer than 512 characters")
        return value


def epoch(moment: object) -> int | None:
    if not isinstance(moment, str):
        return None
    try:
        return int(datetime.fromisoformat(moment).timestamp())
    except ValueError:
        return None


def _counts(document: dict[str, Any] | None) -> dict[str, int]:
    counts = (document or {}).get("request_counts")
    counts = counts if isinstance(counts, dict) else {}
    return {key: number(counts.get(key)) for key in ("total", "completed", "failed")}


def _usage(document: dict[str, Any] | None) -> dict[str, Any] | None:
    usage = (document or {}).get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = number(usage.get("prompt_tokens"))
    completion = number(usage.get("completion_tokens"))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _errors(document: dict[str, Any]) -> dict[str, Any]:
    errors = document.get("errors")
    data = [
        {
            "code": text(error.get("code")),
            "message": text(error.get("message")),
            "line": number(error.get("line")) or None,
            "param": None,
        }
        for error in (errors if isinstance(errors, list) else [])
        if isinstance(error, dict)
    ]
    return {"object": "list", "data": data}


def batch_object(
    record: dict[str, Any], document: dict[str, Any] | None, state: str
) -> dict[str, Any]:
    """The OpenAI `Batch`: every field of the SDK's type, null where unset. `document` is the
    `.status` (or the delivered `status.json`); `state` the service's state, or `expired`."""
    status = "expired" if state == "expired" else OPENAI_STATUS.get(state, "validating")
    cancelling_at = record.get("cancelling_at")
    if cancelling_at is not None and status not in ("completed", "failed", "cancelled", "expired"):
        status = "cancelling"  # asked for; the service takes it within seconds
    document = document or {}
    ended = epoch(document.get("completed_at"))
    created = int(record["created_at"])
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "errors": _errors(document) if status == "failed" else None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": status,
        "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"),
        "created_at": created,
        "in_progress_at": epoch(document.get("in_progress_at")),
        "expires_at": None,  # the window is accepted, not enforced: a batch runs to its end
        "finalizing_at": (
            epoch(document.get("updated_at"))
            if status == "finalizing"
            else (ended if status in ("completed", "failed") else None)
        ),
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": record.get("expired_at") if status == "expired" else None,
        "cancelling_at": cancelling_at
        or (epoch(document.get("updated_at")) if status == "cancelling" else None)
        or (ended if status == "cancelled" else None),
        "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": _counts(document),
        "metadata": record.get("metadata"),
        "model": text(document.get("model")),
        "usage": _usage(document),
    }


class BatchStore:
    def __init__(
        self, folders: ApiFolders, contract: Contract, files: FileStore, keep_status_hours: float
    ) -> None:
        self.folders = folders
        self.contract = contract
        self.files = files
        # A batch with no trace left at all is expired only once it is older than a `.status`
        # can stay, so that a batch between its claim and its first `.status` is not.
        self.gone_after = keep_status_hours * 3600 + 3600
        self.records: dict[str, dict[str, Any]] = {}
        self.by_owner: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    # -- records -------------------------------------------------------------------------

    def load(self) -> None:
        """Read every record; finish or undo the creations a crash cut short."""
        for entry in os.scandir(self.folders.batches):
            batch_id = entry.name.removesuffix(".json")
            if not (entry.name.endswith(".json") and is_batch_id(batch_id)):
                continue
            record = read_json_file(self.folders.batch_record(batch_id))
            if record is None or record.get("id") != batch_id:
                log.warning("batch_record_unreadable", batch=batch_id)
                continue
            if not record.get("placed") and not self._settle_placement(record):
                continue
            self._index(record)
        self._drop_orphan_outputs()

    def _drop_orphan_outputs(self) -> None:
        """Output files are registered before their batch's record names them (so that a
        record never names a file that is not there); a crash in between leaves files no
        batch names, which go, and are registered again when the batch is next looked at."""
        for output in self.files.outputs():
            batch = self.records.get(output["batch_id"])
            named = (batch or {}).get("output_file_id"), (batch or {}).get("error_file_id")
            if output["id"] not in named:
                self.files.delete(output["owner"], output["id"])

    def _settle_placement(self, record: dict[str, Any]) -> bool:
        """A record whose placement never finished: kept if its data reached the inbox, else
        undone (its client never heard of it)."""
        stem = stem_for(record["id"])
        if (
            self.contract.data_waiting(stem)
            or self.contract.status(stem) is not None
            or self.contract.find_delivered(stem) is not None
        ):
            record["placed"] = True
            save(self.folders.batch_record(record["id"]), record)
            return True
        self.contract.remove_ticket(stem)
        self.folders.batch_record(record["id"]).unlink(missing_ok=True)
        log.info("batch_creation_undone", batch=record["id"])
        return False

    def _index(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records[record["id"]] = record
            bisect.insort(self.by_owner.setdefault(record["owner"], []), record["id"])

    def _own(self, owner: str, batch_id: str) -> dict[str, Any]:
        record = self.records.get(batch_id) if is_batch_id(batch_id) else None
        if record is None or record["owner"] != owner:
            raise not_found("batch", batch_id)
        return record

    # -- creating --------------------------------------------------------------------------

    def create(self, owner: str, request: CreateBatch) -> dict[str, Any]:
        if request.endpoint not in ENDPOINTS:
            raise bad_request(
                f"Unsupported endpoint '{request.endpoint}'; batchbox runs {', '.join(ENDPOINTS)}.",
                "endpoint",
            )
        if request.completion_window != WINDOW:
            raise bad_request(
                f"Invalid completion_window '{request.completion_window}'; "
                "only '24h' is supported.",
                "completion_window",
            )
        upload = self.files.get(owner, request.input_file_id, "input_file_id")
        if upload["purpose"] != "batch":
            raise bad_request(
                f"File {upload['id']} has purpose '{upload['purpose']}'; a batch needs a file "
                "uploaded with purpose 'batch'.",
                "input_file_id",
            )
        record = {
            "id": new_id(BATCH_PREFIX),
            "owner": owner,
            "input_file_id": upload["id"],
            "endpoint": request.endpoint,
            "completion_window": WINDOW,
            "metadata": request.metadata,
            "created_at": int(time.time()),
            "placed": False,
        }
        path = self.folders.batch_record(record["id"])
        save(path, record)  # first, so that a crash from here on is found at the next start
        stem = stem_for(record["id"])
        ticket = yaml.safe_dump({"metadata": request.metadata or {}}, allow_unicode=True)
        try:
            self.contract.place_ticket(stem, ticket.encode("utf-8"))
            linked = self.contract.place_data(stem, self.files.content_path(upload))
        except BaseException:
            if not self.contract.data_waiting(stem):
                self.contract.remove_ticket(stem)
                path.unlink(missing_ok=True)
                raise
            linked = None  # in the inbox after all: it is placed, and will run
        record["placed"] = True
        save(path, record)
        self._index(record)
        log.info("batch_created", batch=record["id"], file=upload["id"], linked=linked)
        return batch_object(record, None, "validating")

    # -- reading ---------------------------------------------------------------------------

    def view(self, record: dict[str, Any]) -> dict[str, Any]:
        if record.get("final") is not None:
            return batch_object(record, record["final"], record["final"]["status"])
        stem = stem_for(record["id"])
        document = self.contract.status(stem)
        state = text((document or {}).get("status"))
        if document is not None and state in FINAL:
            delivered = self.contract.delivered(stem, document.get("outbox"))
            if delivered is not None:
                return self._finalize(record, document["outbox"], delivered)
        if document is not None:
            return batch_object(record, document, state or "validating")
        if self.contract.data_waiting(stem):
            return batch_object(record, None, "validating")
        found = self.contract.find_delivered(stem)
        if found is not None:
            return self._finalize(record, *found)
        if time.time() - record["created_at"] > self.gone_after:
            record.setdefault("expired_at", int(time.time()))
            return batch_object(record, None, "expired")
        return batch_object(record, None, "validating")  # between its claim and its .status

    def _finalize(
        self, record: dict[str, Any], folder: str, document: dict[str, Any]
    ) -> dict[str, Any]:
        """Keep a finished batch's final state, and register its output and error files."""
        with self.lock:
            if record.get("final") is None:
                ended = epoch(document.get("completed_at")) or int(time.time())
                finished = {key: self._output(record, folder, name, ended) for name, key in OUTPUTS}
                finished |= {"outbox": folder, "final": document}
                save(self.folders.batch_record(record["id"]), record | finished)
                record.update(finished)
        return batch_object(record, record["final"], record["final"]["status"])

    def _output(self, record: dict[str, Any], folder: str, name: str, ended: int) -> str | None:
        descriptor = self.contract.open_output(folder, name)
        if descriptor is None:
            return None
        try:
            size = os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)
        if size == 0:
            return None  # as in OpenAI's API: no file where no request belongs in it
        return self.files.add_output(record["owner"], record["id"], folder, name, size, ended)

    def get(self, owner: str, batch_id: str) -> dict[str, Any]:
        return self.view(self._own(owner, batch_id))

    def page(self, owner: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, `limit` at most, after the batch `after`; and whether more follow."""
        ids = self.by_owner.get(owner, [])
        if after is not None and not is_batch_id(after):
            raise bad_request(f"'{after}' is not a batch id.", "after")
        end = bisect.bisect_left(ids, after) if after is not None else len(ids)
        chosen = ids[max(0, end - limit) : end][::-1]
        return [self.view(self.records[batch_id]) for batch_id in chosen], end > limit

    # -- cancelling ------------------------------------------------------------------------

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        record = self._own(owner, batch_id)
        current = self.view(record)
        if current["status"] in ("completed", "failed", "cancelled", "expired"):
            raise ApiError(
                409,
                f"Cannot cancel a batch that is {current['status']}.",
                code="batch_finished",
            )
        if record.get("cancelling_at") is None:
            self.contract.cancel(stem_for(batch_id))
            with self.lock:
                record["cancelling_at"] = int(time.time())
                save(self.folders.batch_record(batch_id), record)
            log.info("batch_cancel_requested", batch=batch_id)
        return self.view(record)
