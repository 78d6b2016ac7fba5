"""The API's side of the folder contract (SPEC sections 2, 4, 5 and 7), and nothing more.

A batch is placed in the inbox as `api-<batch id>.jsonl`, a stem no person picks by chance,
with its ticket `api-<batch id>.yaml` beside it. Each is written complete under a name the
service ignores (dot-prefixed) and renamed in, the ticket first, so the data file is never
seen without it. The data is a hard link to the upload where the filesystem allows it, which
is safe because nobody writes to either name afterwards: the service renames its inbox name
into its spool and reads it, the API's name stays in `state/api/`, and the API never writes
to an upload once it is registered. Where a link is refused (a systemd unit gives each
writable path a mount of its own, and `link` does not cross mounts) the data is copied.

Everything read from the inbox is untrusted: sidecars are opened without following links
and only as regular files, and an outbox folder named by a `.status` is used only when its
name is one this batch's folder can have.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from runner.durable import fsync_dir
from watcher.api.storage import read_json_file

STEM_PREFIX = "api-"
TEMPORARY = re.compile(r"\.api-batch_[0-9a-f]{24}\.[0-9a-f]{8}\.tmp")
FINAL = frozenset({"completed", "failed", "cancelled"})
# The errors after which a copy does what a hard link could not.
LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES})
MAX_SIDECAR_BYTES = 1 << 20


# The documents read from the inbox may hold anything anyone wrote there: a value is taken
# only when it has the type its reader expects.


def number(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def stem_for(batch_id: str) -> str:
    return f"{STEM_PREFIX}{batch_id}"


class Contract:
    def __init__(self, inbox: Path, outbox: Path) -> None:
        self.inbox = inbox
        self.outbox = outbox

    # -- placing a batch -------------------------------------------------------------

    def _temporary(self, stem: str) -> Path:
        return self.inbox / f".{stem}.{secrets.token_hex(4)}.tmp"

    def _rename_in(self, temporary: Path, target: Path) -> None:
        try:
            os.rename(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(self.inbox)

    def place_ticket(self, stem: str, ticket: bytes) -> None:
        temporary = self._temporary(stem)
        try:
            with open(temporary, "xb") as handle:
                handle.write(ticket)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._rename_in(temporary, self.inbox / f"{stem}.yaml")

    def place_data(self, stem: str, source: Path) -> bool:
        """Put the upload into the inbox as `<stem>.jsonl`; True if linked, False if copied."""
        temporary = self._temporary(stem)
        try:
            os.link(source, temporary)
            linked = True
        except OSError as error:
            if error.errno not in LINK_REFUSED:
                raise
            linked = False
            try:
                shutil.copyfile(source, temporary)
                with open(temporary, "rb") as handle:
                    os.fsync(handle.fileno())
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        self._rename_in(temporary, self.inbox / f"{stem}.jsonl")
        return linked

    def remove_ticket(self, stem: str) -> None:
        """Undo a placement that did not get as far as its data file."""
        path = self.inbox / f"{stem}.yaml"
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass

    def cancel(self, stem: str) -> None:
        temporary = self._temporary(stem)
        try:
            with open(temporary, "xb") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._rename_in(temporary, self.inbox / f"{stem}.cancel")

    def sweep_temporaries(self) -> int:
        """Remove the temporaries of placements a crash cut short (only the API's own)."""
        removed = 0
        for entry in os.scandir(self.inbox):
            if TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    # -- reading its state ---------------------------------------------------------------

    def data_waiting(self, stem: str) -> bool:
        """The data file is still in the inbox, not yet taken by the service."""
        return os.path.lexists(self.inbox / f"{stem}.jsonl")

    def status(self, stem: str) -> dict[str, Any] | None:
        document = read_json_file(self.inbox / f"{stem}.status", MAX_SIDECAR_BYTES)
        if document is None or document.get("input") != f"{stem}.jsonl":
            return None
        return document

    def eta(self, stem: str) -> dict[str, Any] | None:
        return read_json_file(self.inbox / f"{stem}.eta", MAX_SIDECAR_BYTES)

    def is_outbox_folder(self, stem: str, name: object) -> bool:
        """A name the outbox folder of `<stem>.jsonl` in the inbox can have: `<stem>`,
        `<stem>-2`, ... (SPEC section 5), and nothing that leads elsewhere."""
        return isinstance(name, str) and bool(re.fullmatch(rf"{re.escape(stem)}(-[0-9]+)?", name))

    def delivered(self, stem: str, name: str) -> dict[str, Any] | None:
        """The final status of the folder `name` if it is this batch's delivered folder."""
        if not self.is_outbox_folder(stem, name):
            return None
        document = read_json_file(self.outbox / name / "status.json", MAX_SIDECAR_BYTES)
        if document is None or document.get("input") != f"{stem}.jsonl":
            return None
        return document

    def find_delivered(self, stem: str) -> tuple[str, dict[str, Any]] | None:
        """Look for the batch's folder in the outbox, for when its `.status` is gone (swept
        after `keep_status_hours` while the API was not running)."""
        try:
            names = [entry.name for entry in os.scandir(self.outbox)]
        except FileNotFoundError:
            return None
        for name in sorted(names, key=len):
            if self.is_outbox_folder(stem, name):
                document = self.delivered(stem, name)
                if document is not None:
                    return name, document
        return None

    def open_output(self, folder: str, name: str) -> int | None:
        """A descriptor of `results.jsonl` or `errors.jsonl` in a delivered folder, or None."""
        assert name in ("results.jsonl", "errors.jsonl")
        path = self.outbox / folder / name
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            return None
        return descriptor
