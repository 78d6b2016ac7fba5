"""The API's own part of the state folder, `state/api/`, and how it reads and writes there.

```
state/api/keys.json           the keys: names, ids, and a hash of each (never the key)
state/api/files/<file id>/    record.json, and `content` for an upload
state/api/batches/<id>.json   one record per batch
state/api/tmp/                uploads on their way in; emptied at every start
```

Ids carry the time they were made, in milliseconds, before their random part, so that
sorting ids sorts objects by age and a list cursor still works when its object is gone.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from runner.durable import make_folders_durably, remove_temporaries, write_json_atomic

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
KEY_PREFIX = "key_"
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
RECORD = "record.json"
CONTENT = "content"
MAX_RECORD_BYTES = 1 << 20


def new_id(prefix: str) -> str:
    """`prefix` + 12 hex digits of the time in ms + 12 random hex digits."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


def is_batch_id(value: str) -> bool:
    return BATCH_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class ApiFolders:
    root: Path  # state/api

    @property
    def keys(self) -> Path:
        return self.root / "keys.json"

    @property
    def keys_lock(self) -> Path:
        return self.root / "keys.lock"

    @property
    def server_lock(self) -> Path:
        return self.root / "api.lock"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def batches(self) -> Path:
        return self.root / "batches"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def file_folder(self, file_id: str) -> Path:
        assert is_file_id(file_id), file_id  # checked by the caller against its format
        return self.files / file_id

    def batch_record(self, batch_id: str) -> Path:
        assert is_batch_id(batch_id), batch_id
        return self.batches / f"{batch_id}.json"

    def make(self) -> None:
        for folder in (self.files, self.batches, self.tmp):
            make_folders_durably(folder)

    def sweep(self) -> int:
        """Remove what a crash left half made: uploads still in tmp/, and the temporaries
        of atomic writes. Only at start, while no request can be using them."""
        removed = 0
        for entry in list(os.scandir(self.tmp)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        for folder in (self.root, self.files, self.batches):
            removed += remove_temporaries(folder)
        for entry in os.scandir(self.files):
            if entry.is_dir(follow_symlinks=False):
                removed += remove_temporaries(Path(entry.path))
        return removed


def read_json_file(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> dict[str, Any] | None:
    """A JSON object from a regular file, or None for anything else (missing, a link, a FIFO,
    too large, torn, not an object). Opened without following links and without blocking,
    because some of the files read here stand in the inbox, where anyone may put anything."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR, errno.EACCES):
            return None
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def write_record(path: Path, value: dict[str, Any]) -> None:
    write_json_atomic(path, value)
