"""API keys: made by `batchbox key add`, of which only a SHA-256 hash is kept.

A key is 32 random bytes (256 bits). For a secret that random, a plain SHA-256 is the right
hash: slow password hashes (bcrypt, argon2) exist to make guessing a *chosen* password
expensive, and nothing can guess a 256-bit random value, so they would only slow down every
request. A hash also means a lookup needs no constant-time comparison of secrets.

The file is written atomically under a lock (`filelock`), so a `key add` while the API runs
is safe; the API rereads it whenever it changes, so added and removed keys count at once.
Each key has an id of its own, and objects belong to that id: a key removed and added again
under the same name is a new key and sees nothing of the old one's.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from filelock import FileLock

from runner.durable import make_folders_durably, write_json_atomic
from watcher.api.storage import KEY_PREFIX, ApiFolders, new_id, read_json_file

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PREFIX = "bb-"


class KeyProblem(Exception):
    """A key command cannot do what was asked; the message says why."""


class BadKeyName(KeyProblem):
    pass


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: str
    hint: str  # the key's first and last few characters, to tell keys apart in a list


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _load(folders: ApiFolders) -> list[dict]:
    document = read_json_file(folders.keys)
    if document is None:
        if folders.keys.exists():
            raise KeyProblem(f"{folders.keys} cannot be read as a key file")
        return []
    return list(document.get("keys", []))


def _save(folders: ApiFolders, records: list[dict]) -> None:
    write_json_atomic(folders.keys, {"keys": records})


def _key(record: dict) -> ApiKey:
    return ApiKey(record["id"], record["name"], record["created_at"], record["hint"])


def add_key(folders: ApiFolders, name: str) -> tuple[ApiKey, str]:
    """Make a key; its record and the key itself, which is not kept anywhere."""
    if NAME.fullmatch(name) is None:
        raise BadKeyName(
            f"{name!r} is not a key name: use letters, digits, '.', '_' and '-', "
            "at most 64, starting with a letter or digit"
        )
    make_folders_durably(folders.root)
    with FileLock(folders.keys_lock):
        records = _load(folders)
        if any(record["name"] == name for record in records):
            raise KeyProblem(f"a key named {name!r} exists; remove it first to replace it")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = {
            "id": new_id(KEY_PREFIX),
            "name": name,
            "hash": hash_key(token),
            "created_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "hint": f"{token[:6]}…{token[-4:]}",
        }
        _save(folders, [*records, record])
    return _key(record), token


def remove_key(folders: ApiFolders, name: str) -> ApiKey:
    with FileLock(folders.keys_lock):
        records = _load(folders)
        kept = [record for record in records if record["name"] != name]
        if len(kept) == len(records):
            known = ", ".join(record["name"] for record in records) or "none"
            raise KeyProblem(f"no key named {name!r} (keys: {known})")
        _save(folders, kept)
    return next(_key(record) for record in records if record["name"] == name)


def list_keys(folders: ApiFolders) -> list[ApiKey]:
    return [_key(record) for record in _load(folders)]


class KeyRing:
    """The running API's view of the keys, reread whenever the file is replaced."""

    def __init__(self, folders: ApiFolders) -> None:
        self.folders = folders
        self.signature: tuple[int, int, int] | None = None
        self.by_hash: dict[str, ApiKey] = {}
        self.lock = threading.Lock()

    def _refresh(self) -> None:
        try:
            info = os.stat(self.folders.keys)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature == self.signature:
            return
        with self.lock:
            try:
                records = _load(self.folders)
            except KeyProblem:
                records = []  # a damaged file lets nobody in, rather than everybody
            self.by_hash = {record["hash"]: _key(record) for record in records}
            self.signature = signature

    def find(self, token: str) -> ApiKey | None:
        self._refresh()
        return self.by_hash.get(hash_key(token))
