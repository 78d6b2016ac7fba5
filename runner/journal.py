"""A job's partial results: `results.jsonl` and `errors.jsonl` in its work folder.

Each finished request is appended as it finishes and made durable in small groups (write,
flush, fsync). A run that resumes reads what is there, cuts a torn last line, and learns
which requests are done: results by `custom_id`, errors by the input line they came from.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"


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

    def add_sample(self, max_tokens: int, tokens: int, stopped: bool, keep: int = 500) -> None:
        self.sampled += 1
        if len(self.samples) < keep:
            self.samples.append([max_tokens, tokens, stopped])
        else:  # reservoir sampling: every choice seen has the same chance to be kept
            slot = self.chooser.randrange(self.sampled)
            if slot < keep:
                self.samples[slot] = [max_tokens, tokens, stopped]

    def add_result(self, record: dict) -> None:
        self.completed += 1
        usage = record["response"]["body"].get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0) or 0


@dataclass
class Done:
    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)


def cut_torn_tail(path: Path) -> None:
    """Drop a last line that a crash left without its newline."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline != -1:
                keep = position - step + newline + 1
                break
            position -= step
        else:
            keep = 0
        if keep != size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


def read_records(path: Path):
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)


class Journal:
    def __init__(self, folder: Path, sync_every: int = 256, sync_seconds: float = 2.0) -> None:
        self.folder = folder
        self.sync_every = sync_every
        self.sync_seconds = sync_seconds
        self.unsynced = 0
        self.last_sync = time.monotonic()
        self.handles: dict[str, BinaryIO] = {}

    def load(self) -> Done:
        """Read what earlier runs finished, after cutting torn tails."""
        self.folder.mkdir(parents=True, exist_ok=True)
        done = Done()
        for name in (RESULTS, ERRORS):
            cut_torn_tail(self.folder / name)
        for record in read_records(self.folder / RESULTS):
            done.ids.add(record["custom_id"])
            done.tally.add_result(record)
        for record in read_records(self.folder / ERRORS):
            done.lines.add(record["error"]["line"])
            done.tally.failed += 1
        return done

    def _handle(self, name: str) -> BinaryIO:
        if name not in self.handles:
            self.handles[name] = open(self.folder / name, "ab")
        return self.handles[name]

    def write(self, name: str, record: dict) -> None:
        self._handle(name).write(orjson.dumps(record) + b"\n")
        self.unsynced += 1
        if self.unsynced >= self.sync_every or (
            time.monotonic() - self.last_sync >= self.sync_seconds
        ):
            self.sync()

    def sync(self) -> None:
        """Make every written line durable. A failed fsync raises: it is never retried."""
        for handle in self.handles.values():
            handle.flush()
            os.fsync(handle.fileno())
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        # Both files always exist, empty when nothing belongs in them.
        for name in (RESULTS, ERRORS):
            self._handle(name)
        self.sync()
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


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
        from runner.durable import write_atomic

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
