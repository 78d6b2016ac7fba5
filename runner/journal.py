"""A job's partial results: `results.jsonl` and `errors.jsonl` in its work folder.

Finished requests are gathered in memory and written together, at the latest when the
runner next waits on the engine, and made durable in small groups (fsync). A kill loses
only what was not written yet: requests that simply run again on resume, never twice in the
files. A run that resumes reads what is there, cuts a torn last line, and learns which
requests are done: results by `custom_id`, errors by the input line they came from. A failed
write or fsync cuts the files back to their last good fsync.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from runner.durable import fsync_dir, write_atomic
from runner.idset import IdSet

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
BUFFER_BYTES = 1 << 18  # lines held before a write, at most: a few hundred results


@dataclass
class Tally:
    """What a job has done so far: the figures progress, status and benchmarks report."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # A uniform sample of the choices' [max_tokens, tokens, stopped by itself], from which
    # the estimator learns how long this model's answers run.
    samples: list[list] = field(default_factory=list)
    sampled: int = 0
    chooser: random.Random = field(default_factory=lambda: random.Random(0), repr=False)
    weight: float = field(default=0.0, repr=False)
    next_kept: int = field(default=0, repr=False)  # the number of the next choice kept

    def add_sample(self, max_tokens: int, tokens: int, stopped: bool, keep: int = 500) -> None:
        self.sampled += 1
        if len(self.samples) < keep:
            self.samples.append([max_tokens, tokens, stopped])
            if len(self.samples) == keep:
                self.weight = math.exp(math.log(self._uniform()) / keep)
                self._skip()
        elif self.sampled == self.next_kept:
            # Reservoir sampling that draws where the next kept choice falls (Li's
            # "Algorithm L"): every choice seen has the same chance to be kept, and the
            # ones between cost no random draw.
            self.samples[self.chooser.randrange(keep)] = [max_tokens, tokens, stopped]
            self.weight *= math.exp(math.log(self._uniform()) / keep)
            self._skip()

    def _uniform(self) -> float:
        return self.chooser.random() or 1e-300  # in (0, 1): both logarithms stay finite

    def _skip(self) -> None:
        gap = math.floor(math.log(self._uniform()) / math.log1p(-self.weight))
        self.next_kept = self.sampled + gap + 1

    def add_result(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.completed += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def add_record(self, record: dict) -> None:
        """Count a result read back from `results.jsonl`."""
        usage = record["response"]["body"].get("usage") or {}
        self.add_result(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0) or 0)


@dataclass
class Done:
    ids: IdSet  # custom_ids of the results, kept by their place in results.jsonl
    lines: set[int] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def recall_custom_id(path: Path, offset: int) -> str | None:
    """The custom_id of the journal record at `offset`, read again from the file."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        record = orjson.loads(handle.readline())
    return record.get("custom_id")


def _is_record(name: str, record: object) -> bool:
    """A line the journal itself could have written: what a resume may trust."""
    if not isinstance(record, dict):
        return False
    if name == RESULTS:
        return isinstance(record.get("custom_id"), str) and isinstance(record.get("response"), dict)
    error = record.get("error")
    return isinstance(error, dict) and isinstance(error.get("line"), int)


def load_records(path: Path, name: str, take: Callable[[dict, int], None]) -> None:
    """Hand each record of the file, and its byte offset, to `take`, after cutting the file
    at its first line that is not a whole record. Streams: a 200,000-line journal is never
    held in memory.

    A crash leaves at most a torn last line; a power cut on some filesystems, or a failed
    write-back, can leave zeros or garbage after the last good line. Either way what follows
    the last whole record is cut (and the cut made durable), so those requests run again,
    once.
    """
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            if line.strip():
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    break
                if not _is_record(name, record):
                    break
                take(record, keep)
            keep += len(line)
        size = handle.seek(0, os.SEEK_END)
    if keep != size:
        with open(path, "rb+") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


class _Appender:
    """One journal file, appended with plain writes of whole lines.

    Lines wait in a buffer until `flush`; `size` counts what reached the file, `durable`
    what the last good fsync made safe.
    """

    def __init__(self, path: Path) -> None:
        self.created = not path.exists()
        self.descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.durable = os.fstat(self.descriptor).st_size  # its size at the last good fsync
        self.size = self.durable
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self.buffer)
        try:
            while view:
                written = os.write(self.descriptor, view)
                self.size += written
                view = view[written:]
        finally:
            view.release()
        self.buffer.clear()

    def sync(self) -> None:
        self.flush()
        os.fsync(self.descriptor)
        self.durable = self.size

    def roll_back(self) -> None:
        """Cut the file back to its last good fsync: nothing after it can be trusted."""
        self.buffer.clear()
        try:
            os.ftruncate(self.descriptor, self.durable)
        except OSError:
            pass  # load() cuts whatever is not a whole record at the next start
        self.size = self.durable

    def close(self) -> None:
        os.close(self.descriptor)


class Journal:
    """Appends results and errors as they finish, made durable in groups.

    A failed write or fsync breaks the journal: the files are cut back to what the last good
    fsync made durable, the error is raised, and every later call raises it again. Nothing is
    fsynced twice after a failure, so a failed fsync can never pass for a good one.
    """

    def __init__(self, folder: Path, sync_every: int = 256, sync_seconds: float = 2.0) -> None:
        self.folder = folder
        self.sync_every = sync_every
        self.sync_seconds = sync_seconds
        self.unsynced = 0
        self.last_sync = time.monotonic()
        self.files: dict[str, _Appender] = {}
        self.new_names = False  # a file was created: the folder must be fsynced too
        self.broken: OSError | None = None

    def load(self) -> Done:
        """Read what earlier runs finished, after cutting what follows the last whole record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        results = self.folder / RESULTS
        size = results.stat().st_size if results.exists() else 0
        ids = IdSet(
            lambda offset: recall_custom_id(results, offset), count_lines(results), size >= 1 << 32
        )
        done = Done(ids)

        def result(record: dict, offset: int) -> None:
            done.ids.add(record["custom_id"], offset)
            done.tally.add_record(record)

        def error(record: dict, offset: int) -> None:
            done.lines.add(record["error"]["line"])
            done.tally.failed += 1

        load_records(results, RESULTS, result)
        load_records(self.folder / ERRORS, ERRORS, error)
        return done

    def _file(self, name: str) -> _Appender:
        if name not in self.files:
            appender = _Appender(self.folder / name)
            self.files[name] = appender
            self.new_names = self.new_names or appender.created
        return self.files[name]

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def write(self, name: str, record: dict) -> None:
        self.write_line(name, orjson.dumps(record) + b"\n")

    def write_line(self, name: str, line: bytes) -> None:
        """Append one whole record line (ending in a newline)."""
        self._check()
        try:
            self._file(name).write(line)
        except OSError as error:
            self._break(error)
            raise
        self.unsynced += 1
        if self.unsynced >= self.sync_every or (
            time.monotonic() - self.last_sync >= self.sync_seconds
        ):
            self.sync()

    def flush(self) -> None:
        """Write what waits in the buffers, without an fsync: a kill then loses none of it."""
        self._check()
        try:
            for appender in self.files.values():
                appender.flush()
        except OSError as error:
            self._break(error)
            raise

    def sync(self) -> None:
        """Make every written line durable. A failed fsync raises: it is never retried."""
        self._check()
        try:
            for appender in self.files.values():
                appender.sync()
            if self.new_names:
                fsync_dir(self.folder)
                self.new_names = False
        except OSError as error:
            self._break(error)
            raise
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def _break(self, error: OSError) -> None:
        self.broken = error
        for appender in self.files.values():
            appender.roll_back()

    def close(self) -> None:
        """Sync and close. Both files always exist, empty when nothing belongs in them;
        a broken journal closes without another fsync (its error was raised already)."""
        try:
            if self.broken is None:
                for name in (RESULTS, ERRORS):
                    self._file(name)
                self.sync()
        finally:
            for appender in self.files.values():
                appender.close()
            self.files.clear()


SOLO_CRASHES = 2  # a request that kills the engine this often while alone in it is failed


@dataclass
class CrashBook:
    """Which requests were in the engine when its process died, kept beside the journal.

    All the requests in flight at a crash become suspects; a suspect runs alone next time,
    so a request that brings the engine down is told apart from the ones beside it.
    """

    path: Path
    suspects: set[str] = field(default_factory=set)
    solo: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CrashBook:
        if not path.exists():
            return cls(path)
        data = orjson.loads(path.read_bytes())
        return cls(path, set(data.get("suspects", [])), dict(data.get("solo", {})))

    def save(self) -> None:
        data = {"suspects": sorted(self.suspects), "solo": self.solo}
        write_atomic(self.path, orjson.dumps(data))

    def record(self, in_engine: list[str]) -> None:
        if len(in_engine) == 1:
            key = in_engine[0]
            self.solo[key] = self.solo.get(key, 0) + 1
        self.suspects.update(in_engine)
        self.save()

    def condemned(self, key: str) -> bool:
        return self.solo.get(key, 0) >= SOLO_CRASHES

    def cleared(self, key: str) -> None:
        if key in self.suspects:
            self.suspects.discard(key)
            self.save()
