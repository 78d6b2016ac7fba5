"""Running a file's lines through the fake engine: whole-file failures, per-line failures,
the every-line-once invariant, resuming, and the bound on requests in flight (SPEC §3, §5, §8)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    CHAT,
    assert_every_line_once,
    chat_line,
    completion_line,
    read_jsonl,
    write_jsonl,
)

from runner.client import LocalClient
from runner.fake_engine import FakeEngine
from runner.journal import Journal, Tally
from runner.lines import FileRejected, Limits
from runner.run import RunOptions, fail_remaining, run_lines, scan_file
from runner.types import EngineOutput, EngineRequest, ModelSpec


class RecordingEngine(FakeEngine):
    """The fake engine, remembering the key of every request it was given."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.added: list[str] = []

    def add(self, request: EngineRequest) -> None:
        self.added.append(request.key)
        super().add(request)


def make_engine(**engine) -> RecordingEngine:
    return RecordingEngine(ModelSpec(alias="fake", source="x", backend="fake", engine=engine))


class WatchedClient:
    """Wraps a client to count outputs and the requests submitted but not yet returned."""

    def __init__(self, client: LocalClient) -> None:
        self.client = client
        self.info = client.info
        self.outstanding: set[str] = set()
        self.most_outstanding = 0
        self.outputs = 0

    def submit(self, requests: list[EngineRequest]) -> None:
        self.outstanding.update(request.key for request in requests)
        self.most_outstanding = max(self.most_outstanding, len(self.outstanding))
        self.client.submit(requests)

    def poll(self, timeout: float) -> list[EngineOutput]:
        outputs = self.client.poll(timeout)
        self.outputs += len(outputs)
        self.outstanding.difference_update(output.key for output in outputs)
        return outputs

    def abort(self, keys: list[str]) -> None:
        self.outstanding.difference_update(keys)
        self.client.abort(keys)

    def close(self) -> None:
        self.client.close()

    def __getattr__(self, name: str):
        return getattr(self.client, name)  # whatever else the client offers, unchanged


def run(
    path: Path,
    out: Path,
    engine: FakeEngine | None = None,
    limits: Limits | None = None,
    stop_after: int | None = None,
    **options,
) -> tuple[WatchedClient, int]:
    """scan_file then run_lines, as a job does; returns the client and the line count."""
    limits = limits or Limits()
    summary = scan_file(path, limits)
    client = WatchedClient(LocalClient(engine or make_engine()))
    journal = Journal(out)

    def should_stop() -> bool:
        return stop_after is not None and client.outputs >= stop_after

    run_options = RunOptions(endpoint=summary.endpoint, model="fake", limits=limits, **options)
    progress = run_lines(path, journal, client, run_options, summary.lines, should_stop=should_stop)
    journal.close()
    assert progress.total == summary.lines
    return client, summary.lines


def custom_ids(path: Path) -> list[str]:
    return [record["custom_id"] for record in read_jsonl(path)]


# ------------------------------------------------------------------------ whole-file failures


def rejected(path: Path, limits: Limits | None = None) -> FileRejected:
    with pytest.raises(FileRejected) as caught:
        scan_file(path, limits or Limits())
    return caught.value


def test_an_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert rejected(path).code == "empty_file"


def test_a_file_of_blank_lines_is_rejected(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n  \n\r\n\t\n\n")
    assert rejected(path).code == "empty_file"


def test_a_file_without_a_valid_line_is_rejected_naming_the_first_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [b"", b"not json", b"[1]", chat_line(5)])
    error = rejected(path)
    assert error.code == "no_valid_lines"
    assert error.line == 2
    assert "line 2" in error.message and "not valid JSON" in error.message


def test_binary_junk_is_rejected_as_not_utf8(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(bytes(random.Random(7).randrange(128, 256) for _ in range(3000)))
    error = rejected(path)
    assert error.code == "invalid_encoding"
    assert "UTF-8" in error.message


def test_latin1_text_is_rejected_as_not_utf8_naming_the_line(tmp_path):
    good = json.dumps(chat_line("q1")).encode()
    latin = json.dumps(chat_line("q2", "crème brûlée"), ensure_ascii=False).encode("latin-1")
    path = write_jsonl(tmp_path / "latin.jsonl", [good, good.replace(b"q1", b"q3"), latin])
    error = rejected(path)
    assert error.code == "invalid_encoding"
    assert error.line == 3
    assert "line 3" in error.message


def test_too_many_lines_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [chat_line(f"q{i}") for i in range(4)])
    scan_file(path, Limits(max_lines=4))
    error = rejected(path, Limits(max_lines=3))
    assert error.code == "too_many_lines"
    assert "3" in error.message


def test_a_file_over_max_file_bytes_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "large.jsonl", [chat_line(f"q{i}") for i in range(4)])
    size = path.stat().st_size
    scan_file(path, Limits(max_file_bytes=size))
    error = rejected(path, Limits(max_file_bytes=size - 1))
    assert error.code == "file_too_large"
    assert str(size) in error.message


def test_scan_counts_lines_and_learns_the_endpoint_and_models(tmp_path):
    items = [
        chat_line("a", model="m1", max_tokens=5),
        b"",
        b"junk",
        chat_line("b", model="m1", n=2),
        completion_line("c"),
    ]
    summary = scan_file(write_jsonl(tmp_path / "in.jsonl", items), Limits())
    assert (summary.lines, summary.valid, summary.lines - summary.valid) == (4, 2, 2)
    assert summary.endpoint == CHAT
    assert summary.models == {"m1"}
    assert summary.max_tokens == {5: 1, None: 1}
    assert summary.choices == 3
    assert summary.first_error.line == 3


# --------------------------------------------------------------------------- per-line results


def test_a_prompt_longer_than_the_model_takes_fails_that_line_only(tmp_path):
    items = [
        chat_line("short", "hi", max_tokens=4),
        chat_line("long", " ".join(["word"] * 40), max_tokens=4),
        chat_line("fits", "hello", max_tokens=4),
    ]
    path = write_jsonl(tmp_path / "in.jsonl", items)
    run(path, tmp_path / "out", make_engine(max_model_len=32))
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert sorted(record["custom_id"] for record in results) == ["fits", "short"]
    [error] = errors
    assert error["custom_id"] == "long"
    assert error["error"]["code"] == "context_length_exceeded"
    assert error["error"]["line"] == 2
    assert "32" in error["error"]["message"]


def test_results_and_errors_are_always_both_there(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a"), chat_line("b")])
    run(path, tmp_path / "out")
    assert (tmp_path / "out" / "errors.jsonl").read_bytes() == b""
    assert sorted(custom_ids(tmp_path / "out" / "results.jsonl")) == ["a", "b"]


def mixed_file(path: Path, count: int, seed: int, bad: bool = True) -> Path:
    """A seeded mixture of good and bad lines, like a real messy upload."""
    chooser = random.Random(seed)
    items: list = []
    used: list[str] = []
    for index in range(count):
        kind = chooser.random() if bad else 0.0
        custom_id = f"q{index}"
        if kind < 0.6:
            body = {"max_tokens": chooser.choice([None, 2, 5, 16])}
            body = {key: value for key, value in body.items() if value is not None}
            if chooser.random() < 0.2:
                body["n"] = 2
            items.append(chat_line(custom_id, f"question {index} " * chooser.randint(1, 5), **body))
            used.append(custom_id)
        elif kind < 0.65:
            items.append(b"")
        elif kind < 0.70:
            items.append(b'{"custom_id": "broken", "method": ')
        elif kind < 0.73:
            items.append(b"[1, 2]")
        elif kind < 0.76:
            items.append(chat_line(f"bad{index}", temperature="hot"))
        elif kind < 0.79:
            items.append({**chat_line(f"bad{index}"), "method": "GET"})
        elif kind < 0.82:
            items.append(completion_line(f"bad{index}"))  # a second endpoint
        elif kind < 0.85 and used:
            items.append(chat_line(chooser.choice(used)))  # a duplicate of a valid line
        elif kind < 0.88:
            items.append(chat_line(f"long{index}", "word " * 100))  # over max_model_len
        elif kind < 0.91:
            items.append(chat_line(f"huge{index}", "x" * 3000))  # over max_line_bytes
        elif kind < 0.94:
            items.append(chat_line(f"bad{index}", stream=True))
        elif kind < 0.97:
            items.append({"custom_id": 12, "method": "POST", "url": CHAT, "body": {}})
        else:
            items.append(chat_line(f"q{index}", max_tokens=50_000))
    return write_jsonl(path, items)


MIXED_LIMITS = Limits(max_line_bytes=2048, max_tokens=1000)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_line_of_a_mixed_file_is_in_exactly_one_output_once(tmp_path, seed):
    path = mixed_file(tmp_path / "mixed.jsonl", 500, seed)
    engine = make_engine(max_model_len=64, fake_batch=7)
    client, lines = run(
        path, tmp_path / "out", engine, MIXED_LIMITS, max_in_flight=32, submit_group=5
    )
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert len(results) + len(errors) == lines
    assert len(results) > 200 and len(errors) > 50
    codes = {record["error"]["code"] for record in errors}
    assert {
        "invalid_json",
        "missing_custom_id",
        "invalid_method",
        "invalid_request",
        "unsupported_parameter",
        "mixed_endpoints",
        "duplicate_custom_id",
        "context_length_exceeded",
        "line_too_long",
        "limit_exceeded",
    } <= codes
    # every request the engine accepted ends as a result, and no other
    assert sorted(engine.added) == sorted(
        [record["custom_id"] for record in results]
        + [r["custom_id"] for r in errors if r["error"]["code"] == "context_length_exceeded"]
    )


def test_results_carry_what_the_line_asked_for(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl", [chat_line("a", max_tokens=3, n=2), chat_line("b", max_tokens=5)]
    )
    run(path, tmp_path / "out")
    records = {record["custom_id"]: record for record in read_jsonl(tmp_path / "out/results.jsonl")}
    body = records["a"]["response"]["body"]
    assert len(body["choices"]) == 2
    assert body["usage"]["completion_tokens"] == 6
    assert records["b"]["response"]["body"]["usage"]["completion_tokens"] == 5


# ---------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("stop_after", [1, 40, 150])
def test_a_stopped_run_resumes_without_running_anything_twice(tmp_path, stop_after):
    path = mixed_file(tmp_path / "mixed.jsonl", 300, seed=11)
    out = tmp_path / "out"
    run(
        path,
        out,
        make_engine(fake_batch=3),
        MIXED_LIMITS,
        stop_after,
        max_in_flight=8,
        submit_group=4,
    )
    first = custom_ids(out / "results.jsonl")
    first_errors = len(read_jsonl(out / "errors.jsonl"))
    assert stop_after <= len(first) < 150 + 8

    second_engine = make_engine(fake_batch=3)
    run(path, out, second_engine, MIXED_LIMITS, max_in_flight=8, submit_group=4)
    results, errors = assert_every_line_once(path, out)
    assert len(errors) >= first_errors
    final = [record["custom_id"] for record in results]
    assert not set(second_engine.added) & set(first), "a finished request ran again"
    assert len(second_engine.added) == len(set(second_engine.added))
    assert sorted(second_engine.added) == sorted(set(final) - set(first))


def test_resuming_a_finished_run_runs_nothing(tmp_path):
    path = mixed_file(tmp_path / "mixed.jsonl", 60, seed=5)
    out = tmp_path / "out"
    run(path, out, limits=MIXED_LIMITS)
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "errors.jsonl")}
    engine = make_engine()
    run(path, out, engine, MIXED_LIMITS)
    assert engine.added == []
    assert {name: (out / name).read_bytes() for name in before} == before


def tear_last_line(path: Path) -> bytes:
    """Cut the file's last line in half, as a crash during its write would leave it."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])
    return data[start:]


def test_a_torn_last_result_is_cut_and_its_request_runs_once_more(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i}") for i in range(10)])
    out = tmp_path / "out"
    run(path, out)
    torn = json.loads(tear_last_line(out / "results.jsonl"))
    assert not (out / "results.jsonl").read_bytes().endswith(b"\n")

    engine = make_engine()
    run(path, out, engine)
    assert engine.added == [torn["custom_id"]]
    results, errors = assert_every_line_once(path, out)
    assert len(results) == 10 and errors == []


def test_a_torn_last_error_is_cut_and_written_once_more(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a"), b"junk", b"[1]", chat_line("b")])
    out = tmp_path / "out"
    run(path, out)
    torn = json.loads(tear_last_line(out / "errors.jsonl"))
    engine = make_engine()
    run(path, out, engine)
    assert engine.added == []
    results, errors = assert_every_line_once(path, out)
    assert [record["error"]["line"] for record in errors] == [2, torn["error"]["line"]]


# ------------------------------------------------------------------------------ backpressure


@pytest.mark.parametrize(("max_in_flight", "submit_group"), [(1, 1), (5, 2), (5, 16), (20, 3)])
def test_max_in_flight_is_respected(tmp_path, max_in_flight, submit_group):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i}") for i in range(80)])
    client, _ = run(
        path,
        tmp_path / "out",
        make_engine(fake_batch=1),
        max_in_flight=max_in_flight,
        submit_group=submit_group,
    )
    assert client.most_outstanding <= max_in_flight
    assert client.most_outstanding >= min(max_in_flight, 2)
    assert len(custom_ids(tmp_path / "out" / "results.jsonl")) == 80


# ---------------------------------------------------------------------------- fail_remaining


def test_fail_remaining_writes_one_error_per_line_that_did_not_run(tmp_path):
    limits = Limits(max_line_bytes=1024)
    items = (
        [chat_line(f"q{i}") for i in range(30)]
        + [
            b"not json",
            {**chat_line("m1"), "method": "GET"},
            chat_line("huge", "x" * 2000),
            chat_line("q3"),  # a duplicate of a line that ran
            b"",
            chat_line("dup"),
            chat_line("dup"),
        ]
        + [chat_line(f"z{i}") for i in range(5)]
    )
    path = write_jsonl(tmp_path / "in.jsonl", items)
    out = tmp_path / "out"
    run(path, out, make_engine(fake_batch=1), limits, stop_after=5, max_in_flight=4, submit_group=1)
    ran = set(custom_ids(out / "results.jsonl"))
    assert 5 <= len(ran) < 30

    tally = fail_remaining(path, Journal(out), "batch_cancelled", "cancelled first", limits)
    results, errors = assert_every_line_once(path, out)
    assert {record["custom_id"] for record in results} == ran
    assert (tally.completed, tally.failed) == (len(results), len(errors))
    # A line wrong in itself keeps its own error; the others say why they did not run.
    own = {
        31: "invalid_json",
        32: "invalid_method",
        33: "line_too_long",
        34: "duplicate_custom_id",
        37: "duplicate_custom_id",
    }
    for record in errors:
        error = record["error"]
        if error["line"] in own:
            assert error["code"] == own[error["line"]], record
        else:
            assert (error["code"], error["message"]) == ("batch_cancelled", "cancelled first")
    by_line = {record["error"]["line"]: record["custom_id"] for record in errors}
    assert by_line[31] is None  # not JSON
    assert by_line[32] == "m1"  # readable, though the line is bad
    assert by_line[33] is None  # over max_line_bytes: never read
    assert by_line[34] == "q3"
    assert by_line[36] == "dup" and by_line[37] == "dup"
    assert set(by_line) == {number for number in range(1, 43) if number != 35} - {
        number for number in range(1, 31) if f"q{number - 1}" in ran
    }


def test_fail_remaining_on_a_run_that_never_started(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a"), b"junk", b"", chat_line("b")])
    out = tmp_path / "out"
    tally = fail_remaining(path, Journal(out), "batch_failed", "the model failed", Limits())
    results, errors = assert_every_line_once(path, out)
    assert results == [] and (tally.completed, tally.failed) == (0, 3)
    assert [(r["custom_id"], r["error"]["line"]) for r in errors] == [
        ("a", 1),
        (None, 2),
        ("b", 4),
    ]


def test_fail_remaining_after_a_finished_run_adds_nothing(tmp_path):
    path = mixed_file(tmp_path / "mixed.jsonl", 50, seed=3)
    out = tmp_path / "out"
    run(path, out, limits=MIXED_LIMITS)
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "errors.jsonl")}
    fail_remaining(path, Journal(out), "batch_failed", "x", MIXED_LIMITS)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_fail_remaining_on_a_file_with_a_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    write_jsonl(path, [chat_line(f"q{i}") for i in range(6)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    out = tmp_path / "out"
    run(path, out, make_engine(fake_batch=1), stop_after=2, max_in_flight=2, submit_group=1)
    assert "q0" in custom_ids(out / "results.jsonl")
    fail_remaining(path, Journal(out), "batch_cancelled", "cancelled", Limits())
    assert_every_line_once(path, out)


def test_the_sample_of_answer_lengths_is_uniform_over_every_choice():
    kept = Counter()
    for trial in range(300):
        tally = Tally(chooser=random.Random(trial))
        for index in range(2000):
            tally.add_sample(index, 1, True, keep=50)
        assert len(tally.samples) == 50 and tally.sampled == 2000
        assert len({sample[0] for sample in tally.samples}) == 50
        kept.update(sample[0] // 200 for sample in tally.samples)
    # each tenth of the stream holds a tenth of the kept choices (1,500 expected)
    assert all(1300 < kept[tenth] < 1700 for tenth in range(10)), kept
