"""Names in the inbox are never trusted: the one way the service reads, writes and removes
a name there other than a job's own file (`.status`, `.eta`, `.cancel`, tickets, model
subfolders).

Anyone who can write to the share can put a FIFO, a socket, a device, a folder or a symlink
under any of these names. Opening a FIFO blocks for good, a symlink to `/dev/zero` reads
without end, and a symlinked folder leads a write or a removal out of the inbox. So each
name is looked at with `lstat` first, and anything but a regular file (or, for a model
subfolder, a real folder) is skipped and logged once per name and what stands there; the
folder holding the name is opened without following a link and every step goes through
that descriptor, so a folder swapped for a link midway leads nowhere; a file is opened with
O_NOFOLLOW | O_NONBLOCK and checked again with `fstat` before a bounded read.

A sidecar written over a FIFO or a link replaces that entry (the rename never writes
through it); a folder under a sidecar's name is left alone and the job goes on without
that sidecar (its outbox `status.json` still says everything).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from runner.durable import temporary_name
from watcher.settle import NOT_REGULAR

log = structlog.get_logger()

MAX_SIDECAR_BYTES = 1 << 20  # far above any status document (its ticket values are bounded)
REMEMBERED = 10_000  # skipped names remembered, so each is logged once; forgotten past this

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_skipped: dict[str, tuple[int, int, int]] = {}


def what_is(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")


def note_skipped(path: Path, info: os.stat_result | None, reason: str) -> None:
    """Log that a name was skipped, once for each name and what stands under it."""
    signature = (info.st_mode, info.st_ino, info.st_dev) if info else (0, 0, 0)
    key = os.fsdecode(path)
    if _skipped.get(key) == signature:
        return
    if len(_skipped) >= REMEMBERED:
        _skipped.clear()
    _skipped[key] = signature
    log.warning("inbox_name_skipped", path=key, reason=reason)


def _lstat_in(folder: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_folder(path: Path) -> int | None:
    try:
        return os.open(path, _FOLDER_FLAGS)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None  # gone: nothing to read, write or remove in it
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    kind = what_is(info.st_mode) if info else "not a folder"
    note_skipped(path, info, f"{path.name} is {kind}, not a folder: nothing is done in it")
    return None


@contextmanager
def inbox_folder(path: Path) -> Iterator[int | None]:
    """A descriptor of the folder, opened without following a link: None (and logged once)
    when it is a link or not a folder, None quietly when it is gone."""
    descriptor = _open_folder(path)
    try:
        yield descriptor
    finally:
        if descriptor is not None:
            os.close(descriptor)


def is_regular(path: Path, purpose: str) -> bool:
    """Whether the name is a regular file in a real folder; anything else is logged once."""
    with inbox_folder(path.parent) as folder:
        if folder is None:
            return False
        info = _lstat_in(folder, path.name)
    if info is None:
        return False
    if not stat.S_ISREG(info.st_mode):
        note_skipped(path, info, f"{path.name} is {what_is(info.st_mode)}, not a {purpose}")
        return False
    return True


def read_small(path: Path, purpose: str, limit: int = MAX_SIDECAR_BYTES) -> bytes | None:
    """The bytes of a small regular file, or None when it is missing, is anything else, or
    is larger than `limit` (all but a missing one logged once)."""
    with inbox_folder(path.parent) as folder:
        if folder is None:
            return None
        info = _lstat_in(folder, path.name)
        if info is None:
            return None
        if not stat.S_ISREG(info.st_mode):
            note_skipped(path, info, f"{path.name} is {what_is(info.st_mode)}, not a {purpose}")
            return None
        if info.st_size > limit:
            note_skipped(path, info, f"{path.name} is larger than a {purpose} can be")
            return None
        try:
            descriptor = os.open(path.name, _READ_FLAGS, dir_fd=folder)
        except (FileNotFoundError, OSError) as error:
            if isinstance(error, FileNotFoundError) or error.errno in (errno.ELOOP, errno.ENXIO):
                return None  # swapped since the lstat: looked at again next time
            raise
    try:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode) or opened.st_ino != info.st_ino:
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(descriptor, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(descriptor)
    return None if size > limit else b"".join(chunks)


def write_file(path: Path, data: bytes, purpose: str, scratch: Path | None = None) -> bool:
    """Replace the name with `data` atomically (temporary file, fsync, rename, fsync the
    folder); False when a folder stands under the name, or the folder holding it is gone or
    is not a real folder. The temporary is made in `scratch` when given (a folder of the
    service's on the same filesystem), so the inbox's watcher sees one rename, not a file
    made, written, closed and renamed. A full or failing disk is raised."""
    with inbox_folder(path.parent) as folder:
        if folder is None:
            return False
        info = _lstat_in(folder, path.name)
        if info is not None and stat.S_ISDIR(info.st_mode):
            note_skipped(path, info, f"{path.name} is a folder: the {purpose} is not written")
            return False
        if scratch is not None:
            temporary, where = str(temporary_name(path, scratch)), None
        else:
            temporary, where = temporary_name(path).name, folder
        descriptor = os.open(temporary, _CREATE_FLAGS, 0o666, dir_fd=where)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path.name, src_dir_fd=where, dst_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=where)
            except OSError:
                pass  # the start-up sweep of temporaries removes it
            raise
        os.fsync(folder)
    return True


def remove_file(path: Path, purpose: str, inode: int | None = None) -> bool:
    """Remove the name when it is a regular file (and, given `inode`, still that file);
    anything else under it is left alone and logged once. Whether it was removed."""
    with inbox_folder(path.parent) as folder:
        if folder is None:
            return False
        info = _lstat_in(folder, path.name)
        if info is None:
            return False
        if not stat.S_ISREG(info.st_mode):
            note_skipped(path, info, f"{path.name} is {what_is(info.st_mode)}, not a {purpose}")
            return False
        if inode is not None and info.st_ino != inode:
            return False
        try:
            os.unlink(path.name, dir_fd=folder)
        except FileNotFoundError:
            return False
    return True


def real_folders(folder: Path) -> list[Path]:
    """The folder's subfolders that are real folders, not links to one."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]


def make_model_folders(inbox: Path, aliases: list[str]) -> None:
    """`inbox/<alias>/` for each model. A name taken by anything but a real folder (a file,
    a link) is left as it is and logged: drops for that model go in with a ticket instead."""
    inbox.mkdir(parents=True, exist_ok=True)
    for alias in aliases:
        path = inbox / alias
        try:
            path.mkdir()
            continue
        except FileExistsError:
            pass
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # removed this very moment: made at the next start, or by its owner
        if not stat.S_ISDIR(info.st_mode):
            note_skipped(
                path,
                info,
                f"inbox/{alias} is {what_is(info.st_mode)}, not a folder: files for {alias} "
                "are taken from the inbox itself with a ticket naming the model",
            )
