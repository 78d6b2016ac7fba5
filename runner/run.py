"""Running a job's lines through an engine: check the file, feed the engine, write results.

`scan_file` reads the file once to count and check it before it is queued; `run_lines` reads
it again and keeps the engine fed with a bounded number of requests in flight, writing the
results of each batch the engine returns to the journal before it waits again. Neither holds
the file or its results in memory, nor a set of its custom_ids: those are kept as hashes
(runner.idset), exact all the same.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.client import EngineClient, EngineDied
from runner.idset import IdSet
from runner.journal import ERRORS, RESULTS, SOLO_CRASHES, CrashBook, Journal, Tally
from runner.lines import (
    FileRejected,
    Limits,
    LineError,
    ParsedLine,
    RawLine,
    parse_line,
    read_line_at,
    read_raw_lines,
)
from runner.replies import error_record, result_line
from runner.types import EngineOutput, EngineRequest


@dataclass
class FileSummary:
    """What the first read of a file learned, for routing, the queue and the estimate."""

    lines: int = 0  # non-blank lines: every one ends in results or errors
    valid: int = 0
    endpoint: str | None = None
    models: set[str] = field(default_factory=set)
    prompt_chars: int = 0
    max_tokens: Counter[int | None] = field(default_factory=Counter)  # requests per value
    choices: int = 0
    first_error: LineError | None = None


class LineChecker:
    """Turns raw lines into parsed lines or errors, with the rules that span lines.

    It keeps the custom_ids seen as hashes in an IdSet, which re-reads a line of the file
    to confirm a match, so that no set of ids is held in memory.
    """

    def __init__(
        self,
        limits: Limits,
        defaults: dict[str, Any] | None,
        endpoint: str | None,
        source: Path,
        expected: int = 0,
    ):
        self.limits = limits
        self.defaults = defaults
        self.endpoint = endpoint
        self.source = source
        wide = source.stat().st_size >= 1 << 32
        self.seen = IdSet(self._recall, expected, wide)

    def _recall(self, place: int) -> str | None:
        raw = read_line_at(self.source, place, self.limits.max_line_bytes)
        try:
            checked = parse_line(raw, self.limits, self.defaults)
        except FileRejected:
            return None
        return checked.custom_id

    def _add(self, custom_id: str, raw: RawLine) -> bool:
        """Note a line's custom_id; False when an earlier line has it."""
        return self.seen.add(custom_id, raw.offset)

    def check(self, raw: RawLine) -> ParsedLine | LineError:
        parsed = parse_line(raw, self.limits, self.defaults)
        if isinstance(parsed, LineError):
            # A bad line still holds its custom_id: a later line may not reuse it, or the
            # id would stand in both errors.jsonl and results.jsonl.
            if parsed.custom_id is not None:
                self._add(parsed.custom_id, raw)
            return parsed
        if not self._add(parsed.custom_id, raw):
            return LineError(
                parsed.line,
                parsed.custom_id,
                "duplicate_custom_id",
                f"custom_id {parsed.custom_id!r} is used by an earlier line",
            )
        self.endpoint = self.endpoint or parsed.url
        if parsed.url != self.endpoint:
            return LineError(
                parsed.line,
                parsed.custom_id,
                "mixed_endpoints",
                f"url {parsed.url} differs from the file's endpoint {self.endpoint}; "
                "use one endpoint per file",
            )
        return parsed


def scan_file(path: Path, limits: Limits, defaults: dict[str, Any] | None = None) -> FileSummary:
    """Count and check every line; raise FileRejected when the file cannot run at all."""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise FileRejected(
            "file_too_large",
            f"the file has {size} bytes, over the limit of {limits.max_file_bytes}",
        )
    summary = FileSummary()
    checker = LineChecker(limits, defaults, None, path)
    for raw in read_raw_lines(path, limits.max_line_bytes):
        summary.lines += 1
        if summary.lines > limits.max_lines:
            raise FileRejected(
                "too_many_lines", f"the file has more than {limits.max_lines} request lines"
            )
        parsed = checker.check(raw)
        if isinstance(parsed, LineError):
            summary.first_error = summary.first_error or parsed
            continue
        summary.valid += 1
        if parsed.model:
            summary.models.add(parsed.model)
        summary.prompt_chars += parsed.prompt_chars
        summary.max_tokens[parsed.max_tokens] += 1
        summary.choices += parsed.choices
    summary.endpoint = checker.endpoint
    if summary.lines == 0:
        raise FileRejected("empty_file", "the file has no request lines")
    if summary.valid == 0:
        first = summary.first_error
        raise FileRejected(
            "no_valid_lines",
            f"no line of the file is a valid request (line {first.line}: {first.message})",
            first.line,
        )
    return summary


@dataclass
class Progress:
    total: int
    tally: Tally
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    # tokens the engine has processed in this run, finished requests or not
    engine_prompt_tokens: int = 0
    engine_completion_tokens: int = 0


@dataclass
class RunOptions:
    endpoint: str
    model: str
    limits: Limits = field(default_factory=Limits)
    defaults: dict[str, Any] | None = None
    max_in_flight: int = 256
    submit_group: int = 16
    progress_seconds: float = 0.5


class _Feeder:
    """The state of one run: what is in flight and how to write what comes back."""

    def __init__(self, client: EngineClient, journal: Journal, options: RunOptions, tally: Tally):
        self.client = client
        self.journal = journal
        self.options = options
        self.tally = tally
        self.in_flight: dict[str, tuple[int, EngineRequest]] = {}
        self.pending: list[EngineRequest] = []

    def error(self, line: int, custom_id: str | None, code: str, message: str) -> None:
        self.journal.write(ERRORS, error_record(custom_id, line, code, message))
        self.tally.failed += 1

    def send(self, parsed: ParsedLine) -> None:
        request = parsed.request
        self.in_flight[request.key] = (parsed.line, request)
        self.pending.append(request)
        if len(self.pending) >= self.options.submit_group:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.submit(self.pending)
            self.pending = []

    def submitted(self) -> list[str]:
        waiting = {request.key for request in self.pending}
        return [key for key in self.in_flight if key not in waiting]

    def receive(self, timeout: float) -> None:
        for output in self.client.poll(timeout):
            self.finish(output)
        # What came back is written before the next wait: a kill can lose no more than the
        # requests that were in flight, which run again on resume.
        self.journal.flush()

    def finish(self, output: EngineOutput) -> None:
        entry = self.in_flight.pop(output.key, None)
        if entry is None:
            return  # an output for a request aborted earlier
        line, request = entry
        if output.failed:
            self.error(line, request.key, output.error_code, output.error_message or "")
            return
        self.journal.write_line(RESULTS, result_line(request, output, self.options.model))
        self.tally.add_result(output.prompt_tokens, output.completion_tokens)
        max_tokens = request.sampling.get("max_tokens") or (
            self.client.info.max_model_len - output.prompt_tokens
        )
        for choice in output.choices:
            self.tally.add_sample(max_tokens, choice.token_count, choice.finish_reason == "stop")


def run_lines(
    path: Path,
    journal: Journal,
    client: EngineClient,
    options: RunOptions,
    total: int,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    crashes: CrashBook | None = None,
) -> Progress:
    """Run every line not yet in the journal. Returns early, with nothing lost, on a stop.

    When the engine dies, EngineDied carries `in_engine`, the requests it held, for the
    crash book; the next run takes those one at a time.
    """
    done = journal.load()
    resuming = len(done.ids) > 0
    progress = Progress(total=total, tally=done.tally)
    feeder = _Feeder(client, journal, options, done.tally)
    checker = LineChecker(options.limits, options.defaults, options.endpoint, path, total)
    last_report = 0.0
    baseline = client.counters()

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.monotonic()
        if force or now - last_report >= options.progress_seconds:
            progress.in_flight = len(feeder.in_flight)
            prompt, completion = client.counters()
            progress.engine_prompt_tokens = prompt - baseline[0]
            progress.engine_completion_tokens = completion - baseline[1]
            on_progress(progress)
            last_report = now

    stopped = False
    try:
        for raw in read_raw_lines(path, options.limits.max_line_bytes):
            parsed = checker.check(raw)
            if raw.number in done.lines:
                continue
            if isinstance(parsed, LineError):
                feeder.error(parsed.line, parsed.custom_id, parsed.code, parsed.message)
                continue
            if resuming and parsed.custom_id in done.ids:
                continue
            if crashes is not None and parsed.custom_id in crashes.suspects:
                stopped = _run_alone(feeder, parsed, crashes, report, should_stop)
            else:
                feeder.send(parsed)
                while len(feeder.in_flight) >= options.max_in_flight and not stopped:
                    feeder.flush()
                    feeder.receive(0.5)
                    stopped = should_stop()
            report()
            if stopped or should_stop():
                stopped = True
                break
        feeder.flush()
        stopped = _drain(feeder, report, should_stop) or stopped
    except EngineDied as error:
        error.in_engine = feeder.submitted()
        journal.sync()
        raise
    except Exception:
        # The journal could not write (a full disk): the engine must not go on with requests
        # whose results nobody will take; the next run sends them again.
        if feeder.in_flight:
            client.abort(list(feeder.in_flight))
        raise
    if stopped and feeder.in_flight:
        client.abort(list(feeder.in_flight))
    journal.sync()
    report(force=True)
    return progress


def _drain(feeder: _Feeder, report: Callable[..., None], should_stop: Callable[[], bool]) -> bool:
    """Wait for everything in flight; True when asked to stop first."""
    while feeder.in_flight:
        if should_stop():
            return True
        feeder.receive(0.5)
        report()
    return False


def _run_alone(
    feeder: _Feeder,
    parsed: ParsedLine,
    crashes: CrashBook,
    report: Callable[..., None],
    should_stop: Callable[[], bool],
) -> bool:
    """Run a request that was in the engine when it died, with nothing else beside it."""
    if crashes.condemned(parsed.custom_id):
        feeder.error(
            parsed.line,
            parsed.custom_id,
            "engine_crashed",
            f"the engine process died each of the {SOLO_CRASHES} times this request ran "
            "alone in it",
        )
        crashes.cleared(parsed.custom_id)
        return False
    feeder.flush()
    if _drain(feeder, report, should_stop):
        return True
    feeder.send(parsed)
    feeder.flush()
    if _drain(feeder, report, should_stop):
        return True
    crashes.cleared(parsed.custom_id)
    return False


def fail_remaining(
    path: Path,
    journal: Journal,
    code: str,
    message: str,
    limits: Limits,
    defaults: dict[str, Any] | None = None,
    endpoint: str | None = None,
) -> Tally:
    """Write an error for every line not yet in the journal, so none is ever missing.

    Used when a job is cancelled or fails as a whole: the lines that did not run still
    appear, once, in `errors.jsonl`. A line that is wrong in itself gets its own error
    (line_too_long, invalid_json...), the others `code` and `message`.
    """
    done = journal.load()
    checker = LineChecker(limits, defaults, endpoint, path, len(done.ids) + len(done.lines))
    for raw in read_raw_lines(path, limits.max_line_bytes):
        try:
            checked: ParsedLine | LineError | None = checker.check(raw)
        except FileRejected:
            checked = None  # the whole file is at fault, not this line
        if raw.number in done.lines:
            continue
        if isinstance(checked, ParsedLine):
            # Only a valid line that is first with its custom_id can have run.
            if checked.custom_id in done.ids:
                continue
            record = error_record(checked.custom_id, raw.number, code, message)
        elif checked is None:
            record = error_record(None, raw.number, code, message)
        else:
            record = error_record(checked.custom_id, raw.number, checked.code, checked.message)
        journal.write(ERRORS, record)
        done.tally.failed += 1
    journal.close()
    return done.tally
