"""Settling: a file is complete only after standing still for settle_seconds, never earlier."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import requires_tool
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from watcher.inbox import Candidate, classify, scan_inbox, start_observer
from watcher.settle import Settler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def settle_at(settler: Settler, clock: FakeClock, moment: float):
    clock.now = moment
    return settler.settle()


def test_a_still_file_is_complete_once_after_settle_seconds(inbox: Path, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    settler.note(path, "created")
    assert settle_at(settler, clock, 0.0).complete == []
    assert settle_at(settler, clock, 4.9).complete == []
    assert settler.pending() == [path]
    assert settle_at(settler, clock, 5.0).complete == [path]
    assert settle_at(settler, clock, 10.0).complete == []
    assert settler.pending() == []


def test_close_and_rename_hints_never_complete_a_file_on_their_own(inbox: Path, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    for hint in ("closed", "moved", "scan"):
        settler.note(path, hint)
        assert settle_at(settler, clock, clock.now + 1).complete == []
    assert settle_at(settler, clock, 6.0).complete == [path]


def test_a_change_restarts_the_wait(inbox: Path, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    settler.note(path, "scan")
    settle_at(settler, clock, 0.0)
    with open(path, "a") as handle:
        handle.write("{}\n")
    assert settle_at(settler, clock, 3.0).complete == []
    assert settle_at(settler, clock, 7.9).complete == []
    assert settle_at(settler, clock, 8.0).complete == [path]


def test_a_modify_event_restarts_the_wait_even_when_lstat_sees_no_change(inbox, clock) -> None:
    # A network mount with a coarse mtime may show no change for a rewrite of equal size.
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    settler.note(path, "scan")
    settle_at(settler, clock, 0.0)
    clock.now = 4.0
    settler.note(path, "modified")
    assert settle_at(settler, clock, 5.0).complete == []
    assert settle_at(settler, clock, 9.9).complete == []
    assert settle_at(settler, clock, 10.0).complete == [path]


def test_a_replaced_file_of_the_same_size_and_mtime_restarts_the_wait(inbox, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text('{"a": 1}\n')
    settler = Settler(5.0, clock)
    settler.note(path, "scan")
    settle_at(settler, clock, 0.0)
    before = os.lstat(path)
    replacement = inbox / ".a.jsonl.new"
    replacement.write_text('{"b": 2}\n')
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    assert os.lstat(path).st_size == before.st_size
    assert os.lstat(path).st_ino != before.st_ino
    assert settle_at(settler, clock, 3.0).complete == []
    assert settle_at(settler, clock, 7.9).complete == []
    assert settle_at(settler, clock, 8.0).complete == [path]


def test_a_completed_name_dropped_again_waits_anew(inbox: Path, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    settler.note(path, "created")
    settle_at(settler, clock, 0.0)
    assert settle_at(settler, clock, 5.0).complete == [path]
    settler.note(path, "created")
    assert settle_at(settler, clock, 6.0).complete == []
    assert settle_at(settler, clock, 11.0).complete == [path]


def test_a_file_that_vanishes_is_dropped_silently(inbox: Path, clock) -> None:
    path = inbox / "a.jsonl"
    path.write_text("{}\n")
    settler = Settler(5.0, clock)
    settler.note(path, "created")
    settle_at(settler, clock, 0.0)
    path.unlink()
    result = settle_at(settler, clock, 10.0)
    assert (result.complete, result.refused) == ([], [])
    assert settler.pending() == []


def test_a_name_noted_but_never_there_is_dropped(inbox: Path, clock) -> None:
    settler = Settler(0.0, clock)
    settler.note(inbox / "ghost.jsonl", "moved")
    settler.note(inbox / "no-folder" / "ghost.jsonl", "created")
    result = settler.settle()
    assert (result.complete, result.refused, settler.pending()) == ([], [], [])


def test_a_symlink_to_a_system_file_is_refused(inbox: Path, clock) -> None:
    path = inbox / "x.jsonl"
    path.symlink_to("/etc/passwd")
    settler = Settler(0.0, clock)
    settler.note(path, "created")
    result = settler.settle()
    assert result.complete == []
    assert result.refused == [
        (path, "x.jsonl is a symbolic link; batchbox takes only regular files")
    ]
    assert settler.pending() == []


def test_a_symlink_outside_is_refused_and_its_target_left_alone(tmp_path, inbox, clock) -> None:
    target = tmp_path / "outside" / "real.jsonl"
    target.parent.mkdir()
    target.write_text("{}\n")
    before = os.stat(target)
    path = inbox / "x.jsonl"
    path.symlink_to(target)
    settler = Settler(0.0, clock)
    settler.note(path, "scan")
    result = settler.settle()
    assert [reason for _, reason in result.refused] == [
        "x.jsonl is a symbolic link; batchbox takes only regular files"
    ]
    assert os.stat(target) == before


def test_a_fifo_is_refused_without_ever_being_opened(inbox: Path, clock) -> None:
    path = inbox / "x.jsonl"
    os.mkfifo(path)
    settler = Settler(0.0, clock)
    settler.note(path, "created")
    results = []
    # Opening a FIFO with no writer blocks forever; a thread lets the test fail instead.
    worker = threading.Thread(target=lambda: results.append(settler.settle()), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=2)
    assert not worker.is_alive(), "settle() blocked on the FIFO"
    assert time.monotonic() - started < 1
    assert results[0].refused == [
        (path, "x.jsonl is a named pipe (FIFO); batchbox takes only regular files")
    ]


def test_a_folder_named_like_a_job_is_refused(inbox: Path, clock) -> None:
    path = inbox / "x.jsonl"
    path.mkdir()
    settler = Settler(0.0, clock)
    settler.note(path, "scan")
    assert settler.settle().refused == [
        (path, "x.jsonl is a folder; batchbox takes only regular files")
    ]


def test_a_refusal_is_reported_once_per_thing(tmp_path: Path, inbox: Path, clock) -> None:
    path = inbox / "x.jsonl"
    path.symlink_to("/etc/passwd")
    settler = Settler(0.0, clock)
    settler.note(path, "scan")
    assert len(settler.settle().refused) == 1
    settler.note(path, "scan")  # the next rescan finds it again
    assert settler.settle().refused == []
    path.unlink()
    path.symlink_to("/etc/hostname")  # a new link: a new thing to tell the user about
    settler.note(path, "created")
    assert len(settler.settle().refused) == 1
    path.unlink()
    path.write_text("{}\n")  # replaced by a proper file: settles like any other
    settler.note(path, "created")
    assert settler.settle().complete == [path]


def test_a_slow_writer_is_not_complete_before_its_last_write_and_settle_seconds(
    inbox: Path,
) -> None:
    # Like scp or SMB: writes into the final name, closes and reopens between chunks.
    settle_seconds, pause, chunks = 0.5, 0.3, 5
    path = inbox / "slow.jsonl"
    hints: queue.Queue[str] = queue.Queue()
    last_write_started: list[float] = []

    def write() -> None:
        for index in range(chunks):
            last_write_started[:] = [time.monotonic()]
            with open(path, "a") as handle:
                handle.write(f'{{"chunk": {index}}}\n')
            hints.put("closed")
            time.sleep(pause)

    writer = threading.Thread(target=write)
    settler = Settler(settle_seconds)
    writer.start()
    completions: list[float] = []
    deadline = time.monotonic() + chunks * pause + 3
    while time.monotonic() < deadline and not completions:
        while not hints.empty():
            settler.note(path, hints.get())
        settler.note(path, "scan")  # as a rescan would, so the first chunk is seen too
        if settler.settle().complete == [path]:
            completions.append(time.monotonic())
        time.sleep(0.02)
    writer.join()
    assert completions, "the file was never declared complete"
    assert completions[0] >= last_write_started[0] + settle_seconds
    assert completions[0] <= last_write_started[0] + settle_seconds + 2.0
    assert path.read_text().count("\n") == chunks


# --- real uploads, through handler and settler --------------------------------------------


class Recorder(FileSystemEventHandler):
    """Every raw event, to prove the temporary was really written before being renamed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.names.append(os.path.basename(os.fsdecode(event.src_path)))


def run_upload(inbox: Path, upload, spool: Path, seconds: float = 8.0):
    """Watch the inbox while `upload()` runs; claim (move away) what the settler completes."""
    events: queue.Queue[Candidate] = queue.Queue()
    observer = start_observer(inbox, events.put, polling=False)
    recorder = Recorder()
    observer.schedule(recorder, str(inbox), recursive=True)
    settler = Settler(0.3)
    noted: list[Candidate] = []
    completed: list[Path] = []
    try:
        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (completed and _quiet(uploader, settler)):
            _drain(events, settler, noted)
            for path in settler.settle().complete:
                completed.append(path)
                os.rename(path, spool / path.name)  # what claiming does
            time.sleep(0.02)
        uploader.join()
        time.sleep(0.3)  # late events, then a rescan, must not bring it back
        _drain(events, settler, noted)
        for candidate in scan_inbox(inbox):
            settler.note(candidate.path, candidate.hint)
        completed.extend(settler.settle().complete)
    finally:
        observer.stop()
        observer.join(timeout=5)
    return completed, noted, recorder.names


def _quiet(uploader: threading.Thread, settler: Settler) -> bool:
    return not uploader.is_alive() and not settler.pending()


def _drain(events: queue.Queue, settler: Settler, noted: list[Candidate]) -> None:
    while not events.empty():
        candidate = events.get()
        noted.append(candidate)
        if classify(candidate.path.name) == "job":
            settler.note(candidate.path, candidate.hint)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


def make_source(tmp_path: Path) -> Path:
    source = tmp_path / "upload" / "data.jsonl"
    source.parent.mkdir()
    source.write_bytes(b'{"custom_id": "q", "body": {}}\n' * 20_000)
    return source


@requires_tool("rsync")
def test_an_rsync_upload_is_completed_once_and_its_temporary_never_named(
    tmp_path: Path, inbox: Path, spool: Path
) -> None:
    source = make_source(tmp_path)

    def upload() -> None:
        subprocess.run(["rsync", str(source), str(inbox) + "/"], check=True, timeout=30)

    completed, noted, raw_names = run_upload(inbox, upload, spool)
    assert completed == [inbox / "data.jsonl"]
    assert (spool / "data.jsonl").read_bytes() == source.read_bytes()
    temporaries = {name for name in raw_names if name.startswith(".data.jsonl.")}
    assert temporaries, f"rsync wrote no dot-temporary that we saw: {raw_names}"
    assert {candidate.path.name for candidate in noted} == {"data.jsonl"}


def test_a_part_upload_renamed_at_the_end_is_completed_once(
    tmp_path: Path, inbox: Path, spool: Path
) -> None:
    source = make_source(tmp_path)
    data = source.read_bytes()

    def upload() -> None:
        partial = inbox / "data.jsonl.part"
        for start in range(0, len(data), len(data) // 4):
            with open(partial, "ab") as handle:
                handle.write(data[start : start + len(data) // 4])
            time.sleep(0.1)
        os.rename(partial, inbox / "data.jsonl")

    completed, noted, raw_names = run_upload(inbox, upload, spool)
    assert completed == [inbox / "data.jsonl"]
    assert (spool / "data.jsonl").read_bytes() == data
    assert "data.jsonl.part" in raw_names
    assert {candidate.path.name for candidate in noted} == {"data.jsonl"}
