"""Receiving a multipart upload as a stream, straight into its file.

Starlette's own form parsing spools a file part into a temporary file of its own first (in
`/tmp`, then copied); here python-multipart's streaming parser is fed the body as it
arrives, and the file part goes to its final place in chunks, so memory stays flat however
large the file, and the upload stops at `limits.max_file_bytes`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from watcher.api.errors import ApiError, bad_request

WRITE_BYTES = 1 << 20  # what is gathered before one write, done off the event loop
FIELD_BYTES = 1024  # a text field (purpose) is a word, not a document
FIELDS = frozenset({"purpose"})
# An upload refused for its size is read on, without being kept, up to this much more, so
# that the client, still sending, gets the 413 rather than a reset connection.
DRAIN_BYTES = 64 << 20
MULTIPART_OVERHEAD = 64 << 10  # boundaries and part headers around the file itself
MAX_FILENAME = 512


class TooLarge(Exception):
    pass


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The file is larger than the limit of {limit} bytes (limits.max_file_bytes).",
        param="file",
        code="file_too_large",
    )


@dataclass
class Upload:
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    finished: bool = False


class _Receiver:
    """The parser's callbacks: the file part into `target`, the text fields into a dict."""

    def __init__(self, target: Path, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.upload = Upload()
        self.handle: BinaryIO | None = None
        self.pending = bytearray()
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.part: str | None = None  # "file", a field's name, or None for a part ignored
        self.value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header_value.extend(data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.headers = {}
        self.part = None
        self.value = bytearray()

    def header_end(self) -> None:
        self.headers[bytes(self.header_name).lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def headers_finished(self) -> None:
        kind, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if kind != b"form-data" or not name:
            raise bad_request("Every part of the upload needs a form-data name.")
        if name == "file":
            if self.handle is not None or self.upload.filename is not None:
                raise bad_request("Upload one file per request.", "file")
            filename = options.get(b"filename")
            if filename is None:
                raise bad_request("The 'file' part must be a file, with a filename.", "file")
            # Only ever the object's `filename`; never part of a path.
            self.upload.filename = filename.decode("utf-8", "replace")[:MAX_FILENAME]
            self.handle = open(self.target, "xb")
            self.part = "file"
        elif name in FIELDS:
            if name in self.upload.fields:
                raise bad_request(f"'{name}' is given twice.", name)
            self.part = name
        else:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part == "file":
            self.upload.size += end - start
            if self.upload.size > self.limit:
                raise TooLarge
            self.pending += memoryview(data)[start:end]
        elif self.part is not None:
            self.value += data[start:end]
            if len(self.value) > FIELD_BYTES:
                raise bad_request(f"'{self.part}' is too long.", self.part)

    def part_end(self) -> None:
        if self.part is not None and self.part != "file":
            self.upload.fields[self.part] = self.value.decode("utf-8", "replace")
        self.part = None

    def end(self) -> None:
        self.upload.finished = True

    async def flush(self, force: bool = False) -> None:
        if self.handle is not None and self.pending and (force or len(self.pending) >= WRITE_BYTES):
            data = bytes(self.pending)
            self.pending.clear()
            await run_in_threadpool(self.handle.write, data)

    async def finish(self) -> None:
        await self.flush(force=True)
        if self.handle is not None:
            handle, self.handle = self.handle, None
            await run_in_threadpool(_sync_and_close, handle)

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.target.unlink(missing_ok=True)


def _sync_and_close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise bad_request("Upload the file as multipart/form-data, with a 'file' part.", "file")
    return boundary


async def drain(chunks: AsyncIterator[bytes], limit: int = DRAIN_BYTES) -> None:
    """Read what the client still sends, keeping none of it, up to `limit` bytes."""
    drained = 0
    async for chunk in chunks:
        drained += len(chunk)
        if drained > limit:
            return


async def receive_upload(
    chunks: AsyncIterator[bytes], content_type: str | None, target: Path, limit: int
) -> Upload:
    """Parse the body into `target` (created here) and the text fields; the file is durable
    when this returns. On any error `target` is gone and the error raised."""
    receiver = _Receiver(target, limit)
    try:
        parser = MultipartParser(boundary_of(content_type), receiver.callbacks())
    except (ValueError, MultipartParseError):
        raise bad_request("The multipart boundary is not valid.", "file") from None
    try:
        async for chunk in chunks:
            parser.write(chunk)
            await receiver.flush()
        parser.finalize()
        if not receiver.upload.finished:
            raise bad_request("The upload ended before its last part.", "file")
        await receiver.finish()
    except TooLarge:
        receiver.discard()
        await drain(chunks)
        raise too_large(limit) from None
    except MultipartParseError as error:
        receiver.discard()
        await drain(chunks)
        raise bad_request(f"The upload is not valid multipart/form-data: {error}", "file") from None
    except ApiError:
        receiver.discard()
        await drain(chunks)
        raise
    except BaseException:
        receiver.discard()
        raise
    if receiver.upload.filename is None:
        target.unlink(missing_ok=True)
        raise bad_request("Missing required parameter: 'file'.", "file")
    return receiver.upload
