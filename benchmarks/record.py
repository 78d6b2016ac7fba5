"""Benchmark records: one per finished job, in its outbox folder and in the history.

The history is a JSON-lines file appended with fsync; a reader skips a torn last line, so a
crash while appending costs at most that one record. A long-lived reader (the service) keeps
it in memory with `History`, which parses each record once, and keeps the file bounded by
compacting it to what estimates can use (`compact`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock

from runner.durable import append_line_durably, write_atomic

HISTORY = "benchmarks.jsonl"
PACES = "paces.jsonl"  # what engines timed at their load: no jobs, so kept apart
# Appending and compacting take this lock, so that a compaction (a rewrite and a rename) in
# one process cannot lose a record another process (`batchbox run`, `bench`) appends.
HISTORY_LOCK = "benchmarks.lock"
# Records kept by a compaction: the newest KEEP of each model, endpoint and hardware, and the
# newest KEEP with a model load time of each model. Estimates use the last twenty or so, and
# the rest is headroom for estimators that look further back.
KEEP = 100


def _rate(amount: float, seconds: float) -> float:
    return round(amount / seconds, 3) if seconds > 0 else 0.0


def build_record(
    *,
    job_id: str,
    status: str,
    model: str,
    source: str,
    endpoint: str | None,
    engine: dict[str, Any],
    counts: dict[str, int],
    prompt_tokens: int,
    completion_tokens: int,
    prompt_chars: int,
    requested_max_tokens: int | None,
    load_seconds: float,
    run_seconds: float,
    estimate: dict[str, Any] | None,
    finished_at: str,
    metadata: dict[str, Any] | None = None,
    completion_samples: list[list] | None = None,
    input_name: str | None = None,
    runs: int = 1,
    engine_kind: str | None = None,
) -> dict[str, Any]:
    """Everything SPEC section 6 names, in one flat-enough dict."""
    total_tokens = prompt_tokens + completion_tokens
    requests = counts.get("completed", 0) + counts.get("failed", 0)
    estimated = (estimate or {}).get("run_seconds")
    return {
        "job_id": job_id,
        "input": input_name,  # the file as dropped: `dir/stem.jsonl`
        "status": status,
        "finished_at": finished_at,
        "model": model,
        "source": source,
        "endpoint": endpoint,
        "hardware": engine.get("hardware"),
        "engine_version": engine.get("engine_version"),
        "engine_settings": engine.get("settings", {}),
        "engine_kind": engine_kind,  # what runs the model: ETAs are learnt per backend
        "request_counts": counts,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_chars": prompt_chars,
        "requested_max_tokens": requested_max_tokens,
        "load_seconds": round(load_seconds, 3),
        "run_seconds": round(run_seconds, 3),
        # how many runs the job took: more than one after a stop, a crash or a full disk,
        # with run_seconds their sum
        "runs": runs,
        "throughput": {
            "requests_per_second": _rate(requests, run_seconds),
            "prompt_tokens_per_second": _rate(prompt_tokens, run_seconds),
            "completion_tokens_per_second": _rate(completion_tokens, run_seconds),
            "total_tokens_per_second": _rate(total_tokens, run_seconds),
        },
        "estimate": estimate,
        "estimate_error": (
            round((estimated - run_seconds) / run_seconds, 4)
            if estimated is not None and run_seconds > 0
            else None
        ),
        "metadata": metadata or {},
        # [max_tokens, tokens, stopped by itself] for a sample of the answers
        "completion_samples": completion_samples or [],
    }


def pace_record(
    *,
    model: str,
    source: str,
    engine: dict[str, Any],
    pace: dict[str, Any],
    finished_at: str,
    engine_kind: str | None = None,
) -> dict[str, Any]:
    """The pace an engine measured at its load (runner.pace), for the estimator until the
    model has jobs of its own here. It is no job: it has no requests, tokens or run time."""
    return {
        "job_id": f"pace_{model}_{finished_at}",
        "kind": "pace",
        "finished_at": finished_at,
        "model": model,
        "source": source,
        "hardware": engine.get("hardware"),
        "engine_version": engine.get("engine_version"),
        "engine_settings": engine.get("settings", {}),
        "engine_kind": engine_kind,
        "pace": pace,
    }


def knows_pace(state: Path, model: str, engine_kind: str | None = None) -> bool:
    """Whether the state tells the model's pace here, on this engine (when named): a pace its
    engine timed, or a job (or calibration) of it that ran something."""

    def ours(record: dict[str, Any]) -> bool:
        kind = record.get("engine_kind")
        return record.get("model") == model and (engine_kind is None or kind in (None, engine_kind))

    if any(ours(record) for record in read_paces(state)):
        return True
    return any(
        ours(record)
        and record.get("run_seconds", 0) > 0
        and (record.get("request_counts") or {}).get("completed", 0) > 0
        for record in read_history(state)
    )


def append_history(state: Path, record: dict[str, Any]) -> None:
    with FileLock(state / HISTORY_LOCK):
        append_line_durably(state / HISTORY, orjson.dumps(record))


def parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a torn line from a crash while appending
        if isinstance(record, dict):
            yield record


def append_pace(state: Path, record: dict[str, Any]) -> None:
    append_line_durably(state / PACES, orjson.dumps(record))


def read_paces(state: Path) -> Iterator[dict[str, Any]]:
    return read_history(state, PACES)


def read_history(state: Path, name: str = HISTORY) -> Iterator[dict[str, Any]]:
    path = state / name
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for line in handle:
            yield from parse_lines(line)


def compact(records: Iterable[dict[str, Any]], keep: int = KEEP) -> list[dict[str, Any]]:
    """The records worth keeping, in their order: the newest `keep` of each model, endpoint
    and hardware, and the newest `keep` with a load time of each model. A record appended
    twice (a delivery cut short and done again) is kept once, as the estimator counts it."""
    unique: dict[Any, dict[str, Any]] = {}
    for index, record in enumerate(records):
        unique.setdefault(record.get("job_id") or ("no id", index), record)
    ordered = list(unique.values())
    kinds: Counter = Counter()
    loads: Counter = Counter()
    kept = []
    for record in reversed(ordered):
        kind = (record.get("model"), record.get("endpoint"), record.get("hardware"))
        kinds[kind] += 1
        timed = _number(record.get("load_seconds")) > 0
        if timed:
            loads[record.get("model")] += 1
        if kinds[kind] <= keep or (timed and loads[record.get("model")] <= keep):
            kept.append(record)
    kept.reverse()
    return kept


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else 0.0


class History:
    """The benchmark history of one state folder, parsed once and then followed.

    Each look stats the file and parses only the lines appended since the last look (by this
    process or another: `batchbox run` and `bench` append too), so the cost of a look does
    not grow with the history. A file replaced or cut shorter is read again whole.
    """

    def __init__(self, state: Path) -> None:
        self.state = state
        self.path = state / HISTORY
        self.lock = threading.Lock()
        self.full_reads = 0  # times the whole file was parsed
        self.parsed_lines = 0
        self._records: list[dict[str, Any]] = []
        self._identity: tuple[int, int] | None = None
        self._offset = 0  # the end of the last whole line parsed
        self._lines = 0  # whole lines parsed since the file was last read from its start
        self._compacted = 0  # records kept by the last compaction

    def records(self) -> list[dict[str, Any]]:
        """The records, oldest first; a list of its own, which the history never changes."""
        with self.lock:
            self._follow()
            return self._records

    def _follow(self) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._records, self._identity, self._offset, self._lines = [], None, 0, 0
            return
        identity = (info.st_dev, info.st_ino)
        if identity != self._identity or info.st_size < self._offset:
            self._records, self._identity, self._offset, self._lines = [], identity, 0, 0
            self.full_reads += 1
        if info.st_size == self._offset:
            return
        with open(self.path, "rb") as handle:
            if os.fstat(handle.fileno()).st_ino != identity[1]:
                self._identity = None  # replaced between the stat and the open: next look
                return
            handle.seek(self._offset)
            data = handle.read()
        whole = data.rfind(b"\n") + 1  # a line still being appended is parsed next time
        if whole:
            added = list(parse_lines(data[:whole]))
            lines = data.count(b"\n", 0, whole)
            self.parsed_lines += lines
            self._lines += lines
            # A new list, not an append: a caller may be iterating the one it was given.
            self._records = self._records + added
            self._offset += whole

    def compact(self, keep: int = KEEP, force: bool = True) -> int:
        """Rewrite the file with only what `compact` keeps (atomically: a crash leaves the
        old file or the new); how many records it dropped. Unless forced, only once the
        history has grown to twice what the last compaction kept (and by `keep` at least),
        so that compacting costs a bounded amount per record appended."""
        with self.lock:
            self._follow()
            if not force and len(self._records) < 2 * self._compacted + keep:
                return 0
            with FileLock(self.state / HISTORY_LOCK):
                self._follow()  # what another process appended before the lock
                kept = compact(self._records, keep)
                dropped = len(self._records) - len(kept)
                # Torn or unreadable lines go too, and bytes after the last whole line.
                untidy = self._lines != len(self._records) or self._offset != _size(self.path)
                if dropped or untidy:
                    write_atomic(self.path, b"".join(orjson.dumps(r) + b"\n" for r in kept))
                    info = os.stat(self.path)
                    self._identity, self._offset = (info.st_dev, info.st_ino), info.st_size
                    self._lines = len(kept)
                self._records = kept
                self._compacted = len(kept)
            return dropped


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
