"""The inbox's eyes: file events and rescans name candidates, and never do any work.

An event handler runs on watchdog's observer thread, where slow work would stall every later
event, so it only turns an event into a `Candidate` for the service's queue. Events are hints:
a rescan (`scan_inbox`) finds what no event announced (lost or overflowed events, network
mounts, files that were there before the service started).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

IGNORED_PREFIXES = (".", "~$")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", "~")

# Suffixes are matched exactly as SPEC section 2 spells them, so that a job's ticket,
# cancel file and sidecars always share its stem in one spelling.
USER_SUFFIXES = {".jsonl": "job", ".yaml": "ticket", ".yml": "ticket", ".cancel": "cancel"}
SIDECAR_SUFFIXES = (".status", ".eta")
CANDIDATE_KINDS = frozenset({"job", "ticket", "cancel", "sidecar"})
# The events InboxHandler acts on. Left to its default, the watcher also reports every open
# and every read of anything in the inbox, the folder itself included: each fsync of the
# folder after a sidecar is written would be two more events for it to go through.
WATCHED_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


def classify(name: str) -> str:
    """'ignored', 'job', 'ticket', 'cancel', 'sidecar' or 'other' (SPEC section 2)."""
    if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
        return "ignored"
    stem, suffix = os.path.splitext(name)
    if not stem:
        return "other"
    if suffix in SIDECAR_SUFFIXES:
        return "sidecar"
    return USER_SUFFIXES.get(suffix, "other")


def stem_of(name: str) -> str:
    """The name without its kind's suffix: `data.jsonl` -> `data`, the stem sidecars share."""
    return os.path.splitext(name)[0]


@dataclass(frozen=True)
class Candidate:
    path: Path
    hint: str  # "created", "modified", "closed", "moved" or "scan"


def inbox_relative(path: str, root: str) -> tuple[str, ...] | None:
    """The parts of `path` below the inbox when it is a file the inbox may hold, else None.

    Only `inbox/<name>` and `inbox/<folder>/<name>` count, and only inside a plain folder:
    never one whose own name is ignored (`.Trash-1000`, an rsync temporary folder) or names
    a kind the inbox holds (a folder called `x.jsonl` is refused, not looked into).
    """
    parts = tuple(os.path.relpath(path, root).split(os.sep))
    if parts[0] in (os.curdir, os.pardir):
        return None
    if len(parts) == 2 and classify(parts[0]) != "other":
        return None
    return parts if len(parts) in (1, 2) else None


class InboxHandler(FileSystemEventHandler):
    """Turns watchdog events into candidates; runs on the observer thread, so does no I/O."""

    def __init__(self, put: Callable[[Candidate], object], inbox: Path) -> None:
        super().__init__()
        self.put = put
        self.root = os.path.abspath(inbox)

    def _offer(self, raw_path: bytes | str, hint: str) -> None:
        path = os.path.abspath(os.fsdecode(raw_path))
        parts = inbox_relative(path, self.root)
        if parts is not None and classify(parts[-1]) in CANDIDATE_KINDS:
            self.put(Candidate(Path(path), hint))

    def on_created(self, event: FileSystemEvent) -> None:
        # A new subfolder needs nothing here: the native observer watches it by itself, and
        # rescans pick up anything that landed in it before the watch was added.
        if not event.is_directory:
            self._offer(event.src_path, "created")

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._offer(event.src_path, "modified")

    def on_closed(self, event: FileSystemEvent) -> None:
        self._offer(event.src_path, "closed")

    def on_moved(self, event: FileSystemEvent) -> None:
        # A renamed-in folder (say an uploaded model subfolder) is covered by the next rescan.
        if not event.is_directory:
            self._offer(event.dest_path, "moved")


def start_observer(
    inbox: Path, put: Callable[[Candidate], object], polling: bool, poll_interval: float = 1.0
) -> BaseObserver:
    """Watch the inbox recursively (inotify, or polling for network mounts) and start it."""
    observer: BaseObserver = PollingObserver(timeout=poll_interval) if polling else Observer()
    observer.schedule(
        InboxHandler(put, inbox), str(inbox), recursive=True, event_filter=WATCHED_EVENTS
    )
    observer.start()
    return observer


def _scan_folder(folder: str, found: list[Candidate], descend: bool) -> None:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return  # a subfolder removed while we looked: nothing left to find in it
    for entry in entries:
        kind = classify(entry.name)
        if kind in CANDIDATE_KINDS:
            # Symlinks, FIFOs and even a folder named x.jsonl are handed on all the same:
            # the settler refuses them with a reason the user can read in the log.
            found.append(Candidate(Path(entry.path), "scan"))
        elif descend and kind == "other" and entry.is_dir(follow_symlinks=False):
            _scan_folder(entry.path, found, descend=False)


def scan_inbox(inbox: Path) -> list[Candidate]:
    """Every candidate in inbox/ and its immediate subfolders; symlinked folders not followed."""
    found: list[Candidate] = []
    _scan_folder(os.path.abspath(inbox), found, descend=True)
    return found
