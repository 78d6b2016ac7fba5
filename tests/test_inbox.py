"""Inbox events and rescans name candidates: the right names, nothing for ignored ones."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from watcher.inbox import Candidate, InboxHandler, classify, scan_inbox, start_observer, stem_of

IGNORED_NAMES = [
    ".data.jsonl.Xy12Ab",  # rsync's temporary
    ".syncthing.data.jsonl.tmp",  # Syncthing's temporary
    "._data.jsonl",  # macOS resource fork over SMB
    ".DS_Store",
    ".data.jsonl",
    "~$data.jsonl",  # Office lock file
    "data.jsonl.tmp",
    "data.jsonl.part",
    "data.jsonl.partial",
    "data.jsonl.filepart",  # WinSCP
    "data.jsonl.crdownload",  # Chrome
    "data.jsonl~",  # editor backup
    "data.tmp",
    "data.part",
]


@pytest.mark.parametrize("name", IGNORED_NAMES)
def test_ignored_names(name: str) -> None:
    assert classify(name) == "ignored"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("data.jsonl", "job"),
        ("Data.JSONL", "other"),
        ("my.data.v2.jsonl", "job"),
        ("data.yaml", "ticket"),
        ("data.yml", "ticket"),
        ("data.YAML", "other"),
        ("data.cancel", "cancel"),
        ("data.status", "sidecar"),
        ("data.eta", "sidecar"),
        ("data.json", "other"),
        ("data.jsonl.gz", "other"),
        ("notes.txt", "other"),
        ("README", "other"),
        ("data.STATUS", "other"),  # the service writes its sidecars in one spelling only
    ],
)
def test_kinds(name: str, kind: str) -> None:
    assert classify(name) == kind


def test_stem_is_the_name_without_its_kind() -> None:
    assert stem_of("my.data.v2.jsonl") == "my.data.v2"
    assert stem_of("data.jsonl") == "data"


def _handler(inbox: Path) -> tuple[InboxHandler, list[Candidate]]:
    got: list[Candidate] = []
    return InboxHandler(got.append, inbox), got


def test_handler_turns_file_events_into_candidates(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    handler, got = _handler(inbox)
    handler.dispatch(FileCreatedEvent(str(inbox / "a.jsonl")))
    handler.dispatch(FileModifiedEvent(str(inbox / "a.jsonl")))
    handler.dispatch(FileClosedEvent(str(inbox / "a.jsonl")))
    handler.dispatch(FileMovedEvent(str(inbox / ".b.jsonl.Xy12Ab"), str(inbox / "b.jsonl")))
    handler.dispatch(FileCreatedEvent(str(inbox / "m1" / "c.jsonl")))
    handler.dispatch(FileCreatedEvent(str(inbox / "c.yaml")))
    handler.dispatch(FileCreatedEvent(str(inbox / "c.cancel")))
    handler.dispatch(FileMovedEvent(str(inbox / ".c.status.1234.tmp"), str(inbox / "c.status")))
    assert got == [
        Candidate(inbox / "a.jsonl", "created"),
        Candidate(inbox / "a.jsonl", "modified"),
        Candidate(inbox / "a.jsonl", "closed"),
        Candidate(inbox / "b.jsonl", "moved"),
        Candidate(inbox / "m1" / "c.jsonl", "created"),
        Candidate(inbox / "c.yaml", "created"),
        Candidate(inbox / "c.cancel", "created"),
        Candidate(inbox / "c.status", "moved"),
    ]


@pytest.mark.parametrize("name", IGNORED_NAMES + ["notes.txt", "data.json"])
def test_handler_puts_nothing_for_ignored_and_other_names(tmp_path: Path, name: str) -> None:
    inbox = tmp_path / "inbox"
    handler, got = _handler(inbox)
    for event in (FileCreatedEvent, FileModifiedEvent, FileClosedEvent):
        handler.dispatch(event(str(inbox / name)))
        handler.dispatch(event(str(inbox / "m1" / name)))
    handler.dispatch(FileMovedEvent(str(inbox / "x"), str(inbox / name)))
    assert got == []


def test_handler_ignores_folders_deletions_and_places_outside(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    handler, got = _handler(inbox)
    handler.dispatch(DirCreatedEvent(str(inbox / "m1")))
    handler.dispatch(DirCreatedEvent(str(inbox / "x.jsonl")))
    handler.dispatch(DirModifiedEvent(str(inbox)))
    handler.dispatch(DirMovedEvent(str(tmp_path / "m2"), str(inbox / "m2")))
    handler.dispatch(FileDeletedEvent(str(inbox / "a.jsonl")))
    handler.dispatch(FileOpenedEvent(str(inbox / "a.jsonl")))
    handler.dispatch(FileClosedNoWriteEvent(str(inbox / "a.jsonl")))  # our own reads
    handler.dispatch(FileMovedEvent(str(inbox / "a.jsonl"), str(tmp_path / "state" / "a.jsonl")))
    handler.dispatch(FileCreatedEvent(str(inbox / "m1" / "deeper" / "a.jsonl")))
    handler.dispatch(FileCreatedEvent(str(inbox / ".Trash-1000" / "a.jsonl")))
    handler.dispatch(FileCreatedEvent(str(tmp_path / "a.jsonl")))
    handler.dispatch(FileCreatedEvent(str(tmp_path / "inbox-other" / "a.jsonl")))
    handler.dispatch(FileCreatedEvent(str(inbox)))
    assert got == []


def test_handler_does_no_io(tmp_path: Path) -> None:
    # The inbox does not even exist: the handler must still answer from the names alone.
    inbox = tmp_path / "missing"
    handler, got = _handler(inbox)
    handler.dispatch(FileCreatedEvent(os.fsencode(inbox / "a.jsonl")))
    assert got == [Candidate(inbox / "a.jsonl", "created")]


def _wait_for(events: queue.Queue, wanted: set[Path], seconds: float = 5.0) -> set[Path]:
    seen: set[Path] = set()
    deadline = time.monotonic() + seconds
    while not wanted <= seen and time.monotonic() < deadline:
        try:
            seen.add(events.get(timeout=0.05).path)
        except queue.Empty:
            continue
    return seen


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_observer_names_new_files(tmp_path: Path, polling: bool) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "m1").mkdir(parents=True)
    events: queue.Queue[Candidate] = queue.Queue()
    observer = start_observer(inbox, events.put, polling=polling, poll_interval=0.1)
    try:
        (inbox / "a.jsonl").write_text("{}\n")
        (inbox / "m1" / "b.jsonl").write_text("{}\n")
        (inbox / ".c.jsonl.Xy12Ab").write_text("{}\n")
        seen = _wait_for(events, {inbox / "a.jsonl", inbox / "m1" / "b.jsonl"})
    finally:
        observer.stop()
        observer.join(timeout=5)
    assert {inbox / "a.jsonl", inbox / "m1" / "b.jsonl"} <= seen
    assert all(not path.name.startswith(".") for path in seen)


def test_scan_finds_files_in_inbox_and_model_folders(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "m1" / "deeper").mkdir(parents=True)
    (inbox / ".Trash-1000").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "elsewhere.jsonl").write_text("{}\n")
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    for name in ["a.jsonl", "a.yaml", "a.cancel", "a.status", "notes.txt", *IGNORED_NAMES]:
        (inbox / name).write_text("x")
    (inbox / "m1" / "b.jsonl").write_text("{}\n")
    (inbox / "m1" / "deeper" / "too-deep.jsonl").write_text("{}\n")
    (inbox / ".Trash-1000" / "trashed.jsonl").write_text("{}\n")
    os.mkfifo(inbox / "pipe.jsonl")  # handed on (never opened) so the settler can refuse it
    found = scan_inbox(inbox)
    assert all(candidate.hint == "scan" for candidate in found)
    assert sorted(candidate.path for candidate in found) == sorted(
        [
            inbox / "a.jsonl",
            inbox / "a.yaml",
            inbox / "a.cancel",
            inbox / "a.status",
            inbox / "pipe.jsonl",
            inbox / "m1" / "b.jsonl",
        ]
    )


def test_scan_of_a_missing_inbox_finds_nothing(tmp_path: Path) -> None:
    assert scan_inbox(tmp_path / "missing") == []
