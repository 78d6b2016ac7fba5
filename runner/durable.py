"""Writes that survive a crash or a power cut: temporary file, fsync, rename, fsync the folder.

A failed fsync raises and is never retried: after a failed fsync the kernel may have dropped
the dirty pages, so a second fsync that succeeds proves nothing. Whoever catches the error
treats what it wrote as not written (the journal cuts itself back to its last good sync).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

import orjson

TEMPORARY_PREFIX = ".batchbox-"
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_NAME = re.compile(r"\.batchbox-[0-9a-f]{12}\.tmp")
# The errors that say the disk, not the code, is at fault: a job that meets one waits and
# resumes instead of failing.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_TROUBLE = OUT_OF_SPACE | {errno.EIO, errno.EROFS}


def is_disk_trouble(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_TROUBLE


def is_out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_regular_file(path: Path) -> None:
    """Make a file's data durable, if it is a regular file; anything else is left alone.

    Opened without following a link and without blocking on a FIFO, so a name swapped for
    something else cannot hang or redirect it.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
            return
        raise
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_folders_durably(folder: Path) -> None:
    """`mkdir -p`, with each new folder's name made durable in its parent."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        fsync_dir(path.parent)


def temporary_name(path: Path, scratch: Path | None = None) -> Path:
    # A short name of its own: `path`'s name may already be as long as names can be.
    name = f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}"
    return scratch / name if scratch is not None else path.with_name(name)


def write_atomic(path: Path, data: bytes, scratch: Path | None = None) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new, never a mix.

    The temporary file is written in `scratch` when given (a folder on the same filesystem),
    so that a watched folder sees one rename into it rather than a file made, written,
    closed and renamed within it."""
    temporary = temporary_name(path, scratch)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_dir(path.parent)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a folder that went away or turned read-only: the start-up sweep removes it


def write_json_atomic(path: Path, value: object, scratch: Path | None = None) -> None:
    write_atomic(path, orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n", scratch)


def remove_temporaries(folder: Path) -> int:
    """Remove the temporary files a crash left in `folder` in the middle of write_atomic."""
    removed = 0
    try:
        names = list(folder.glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"))
    except OSError:
        return 0
    for path in names:
        if TEMPORARY_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def rename_durably(source: Path, target: Path) -> None:
    """Rename and make the rename itself durable in both folders."""
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


def copy_tree_durably(source: Path, target: Path) -> None:
    """Copy a folder of files with every file and the folder itself made durable."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        if path.is_file():
            fsync_regular_file(path)
    for folder in [*sorted(p for p in target.rglob("*") if p.is_dir()), target]:
        fsync_dir(folder)


def append_line_durably(path: Path, line: bytes) -> None:
    """Append one line and fsync. A reader skips a torn last line, so a crash cannot corrupt."""
    created = not path.exists()
    with open(path, "ab+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            # A torn last line gets its own ending, so it cannot spoil the line added now.
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(line.rstrip(b"\n") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)
