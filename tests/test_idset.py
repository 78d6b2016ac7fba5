"""Compact custom_id sets and batched journal writes: exact under hash collisions, and a
kill -9 between buffered writes loses and repeats nothing (SPEC §3, §5, §8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import assert_every_line_once, chat_line, read_jsonl, write_jsonl

import runner.idset
from runner.client import LocalClient
from runner.fake_engine import FakeEngine
from runner.idset import IdSet
from runner.journal import ERRORS, RESULTS, Journal
from runner.lines import Limits
from runner.run import RunOptions, fail_remaining, run_lines, scan_file
from runner.types import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = {"status_code": 200, "body": {}}


@pytest.fixture
def colliding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id hashes alike: only the exact comparison can tell them apart."""
    monkeypatch.setattr(runner.idset, "id_hash", lambda custom_id: 42)


def test_an_id_set_is_exact_when_every_hash_collides(colliding: None) -> None:
    names = [f"id{index}" for index in range(300)]
    ids = IdSet(lambda place: names[place])
    assert all(ids.add(name, place) for place, name in enumerate(names))
    assert not ids.add("id7", 999)
    assert "id299" in ids and "id300" not in ids and "" not in ids
    assert len(ids) == 300 and set(ids) == set(names)


def test_an_id_set_keeps_what_it_holds_as_it_grows() -> None:
    names = [f"r{index}" for index in range(5000)]
    ids = IdSet(lambda place: names[place])
    for place, name in enumerate(names):
        assert ids.add(name, place)
    assert all(name in ids for name in names)
    assert "r5000" not in ids
    assert len(ids.hashes) <= 4 * len(names)  # two 8-byte words a slot, half full at most


def mixed_file(path: Path) -> Path:
    """Distinct ids, a duplicate of a valid line and of an invalid one, a line with no id."""
    items = [chat_line(f"q{index}") for index in range(40)]
    items[10] = chat_line("q3")
    items[20] = chat_line("bad", temperature="hot")
    items[21] = chat_line("bad")
    items[30] = b"not json"
    return write_jsonl(path, items)


def run_file(path: Path, out: Path, should_stop=lambda: False, journal=None) -> None:
    summary = scan_file(path, Limits())
    engine = FakeEngine(ModelSpec("fake", "x", backend="fake", engine={"fake_batch": 4}))
    options = RunOptions(endpoint=summary.endpoint, model="fake", max_in_flight=8)
    journal = journal or Journal(out)
    run_lines(path, journal, LocalClient(engine), options, summary.lines, should_stop=should_stop)
    journal.close()


def error_codes(out: Path) -> dict[int, str]:
    return {record["error"]["line"]: record["error"]["code"] for record in read_jsonl(out / ERRORS)}


def test_duplicates_are_exact_when_every_hash_collides(tmp_path: Path, colliding: None) -> None:
    path = mixed_file(tmp_path / "in.jsonl")
    summary = scan_file(path, Limits())
    assert (summary.lines, summary.valid) == (40, 36)
    run_file(path, tmp_path / "out")
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert len(results) == 36 and len(errors) == 4
    codes = error_codes(tmp_path / "out")
    assert codes == {
        11: "duplicate_custom_id",
        21: "invalid_request",
        22: "duplicate_custom_id",
        31: "invalid_json",
    }


def test_resume_is_exact_when_every_hash_collides(tmp_path: Path, colliding: None) -> None:
    path = mixed_file(tmp_path / "in.jsonl")
    outputs = 0

    def stop() -> bool:
        return outputs >= 12

    class Counting(Journal):
        def write_line(self, name: str, line: bytes) -> None:
            nonlocal outputs
            outputs += name == RESULTS
            super().write_line(name, line)

    run_file(path, tmp_path / "out", stop, Counting(tmp_path / "out"))
    first = len(read_jsonl(tmp_path / "out" / RESULTS))
    assert 0 < first < 36
    run_file(path, tmp_path / "out")
    assert_every_line_once(path, tmp_path / "out")
    done = Journal(tmp_path / "out").load()
    assert len(done.ids) == 36 and "q3" in done.ids and "bad" not in done.ids


def test_fail_remaining_is_exact_when_every_hash_collides(tmp_path: Path, colliding: None) -> None:
    path = mixed_file(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    journal = Journal(out)
    journal.load()
    for name in ("q0", "q1", "q2"):
        journal.write(RESULTS, {"custom_id": name, "response": RESPONSE, "error": None})
    journal.close()
    fail_remaining(path, Journal(out), "batch_cancelled", "cancelled", Limits())
    results, errors = assert_every_line_once(path, out)
    assert len(results) == 3 and len(errors) == 37
    codes = error_codes(out)
    assert codes[11] == "duplicate_custom_id" and codes[22] == "duplicate_custom_id"
    assert codes[5] == "batch_cancelled"


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from runner.client import LocalClient
from runner.fake_engine import FakeEngine
from runner.types import ModelSpec
from runner.journal import Journal
from runner.lines import Limits
from runner.run import RunOptions, run_lines, scan_file

class Killed(Journal):
    lines = 0
    def write_line(self, name, line):
        super().write_line(name, line)
        Killed.lines += 1
        if Killed.lines == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: some lines still buffered

path, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = scan_file(path, Limits())
engine = FakeEngine(ModelSpec("fake", "x", backend="fake", engine={{"fake_batch": 64}}))
options = RunOptions(endpoint=summary.endpoint, model="fake", max_in_flight=64)
run_lines(path, Killed(out, sync_every=100_000), LocalClient(engine), options, summary.lines)
"""


def test_a_kill_between_batched_writes_loses_and_repeats_nothing(tmp_path: Path) -> None:
    items = [chat_line(f"q{index}") for index in range(300)]
    items[5] = b"{broken"
    items[7] = chat_line("q1")
    path = write_jsonl(tmp_path / "in.jsonl", items)
    out = tmp_path / "out"
    script = KILLER.format(root=str(ROOT), kill_at=100)
    process = subprocess.run([sys.executable, "-c", textwrap.dedent(script), path, out])
    assert process.returncode == -signal.SIGKILL
    written = len(read_jsonl(out / RESULTS)) + len(read_jsonl(out / ERRORS))
    # What was buffered when the kill came is lost, never half-written...
    assert 0 < written < 100
    assert (out / RESULTS).read_bytes().endswith(b"\n")
    # ...and runs again on resume: every line once.
    run_file(path, out)
    results, errors = assert_every_line_once(path, out)
    assert len(results) == 298 and len(errors) == 2


def test_a_failed_buffered_write_cuts_back_to_the_last_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, sync_every=1000)
    journal.load()
    for index in range(5):
        journal.write(RESULTS, {"custom_id": f"kept{index}", "response": RESPONSE, "error": None})
    journal.sync()
    durable = (tmp_path / RESULTS).read_bytes()
    for index in range(5):
        journal.write(RESULTS, {"custom_id": f"lost{index}", "response": RESPONSE, "error": None})
    real_write = os.write

    def half_then_fail(descriptor: int, data) -> int:
        monkeypatch.setattr(os, "write", failing)
        return real_write(descriptor, bytes(data[:10]))  # a torn line reaches the file

    def failing(descriptor: int, data) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError):
        journal.flush()
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / RESULTS).read_bytes() == durable
    with pytest.raises(OSError):
        journal.write(RESULTS, {"custom_id": "after", "response": RESPONSE, "error": None})
    journal.close()
    assert (tmp_path / RESULTS).read_bytes() == durable
    assert set(Journal(tmp_path).load().ids) == {f"kept{index}" for index in range(5)}
