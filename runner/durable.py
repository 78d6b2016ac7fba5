"""Writes that survive a crash or a power cut: temporary file, fsync, rename, fsync the folder.

A failed fsync raises and is never retried: after a failed fsync the kernel may have dropped
the dirty pages, so a second fsync that succeeds proves nothing.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import orjson


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new, never a mix."""
    # A short name of its own: `path`'s name may already be as long as names can be.
    temporary = path.with_name(f".batchbox-{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: object) -> None:
    write_atomic(path, orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


def rename_durably(source: Path, target: Path) -> None:
    """Rename and make the rename itself durable in both folders."""
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


def append_line_durably(path: Path, line: bytes) -> None:
    """Append one line and fsync. A reader skips a torn last line, so a crash cannot corrupt."""
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
