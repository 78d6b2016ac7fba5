"""One job at a time for each stem of an inbox folder: a file whose stem belongs to an
unfinished job waits in the inbox, untouched, until that job is finished, since the two
would share `<stem>.status`, `.eta` and `.cancel`. And a `.cancel` dropped while its job
waits for the disk is kept, and applies once the job is back."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from gatekit import start_gated, stop_gated
from servicekit import chat_file, delivered, drop, finished, read_json
from structlog.testing import capture_logs

from watcher import diskwait


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def test_a_file_whose_stem_has_an_unfinished_job_waits_untouched_then_runs(
    tmp_path: Path,
) -> None:
    harness, engines = start_gated(tmp_path / "box")
    inbox, outbox = harness.inbox, harness.outbox
    first, second = chat_file(3, prefix="first"), chat_file(2, prefix="second")
    try:
        with capture_logs() as logs:
            drop(inbox, "x.jsonl", first)
            harness.run_until(engines.asked.is_set, 30)  # taken, and held at the engine
            first_id = read_json(inbox / "x.status")["id"]
            drop(inbox, "x.jsonl", second)
            harness.run_until(
                lambda: events(logs, "file_waits_for_its_stem")
                or len(events(logs, "job_claimed")) > 1,
                30,
            )
            assert len(events(logs, "job_claimed")) == 1
            assert (inbox / "x.jsonl").read_bytes() == second
            assert read_json(inbox / "x.status")["id"] == first_id
            assert (inbox / "x.eta").is_file()

            engines.gate.set()
            harness.run_until(
                lambda: finished(inbox / "x.status", outbox)
                and read_json(inbox / "x.status")["id"] != first_id,
                30,
            )
    finally:
        stop_gated(harness, engines)
    assert not (inbox / "x.jsonl").exists() and not (inbox / "x.eta").exists()
    assert read_json(inbox / "x.status")["outbox"] == "x-2"
    assert sorted(delivered(outbox / "x").custom_ids) == ["first0", "first1", "first2"]
    assert sorted(delivered(outbox / "x-2").custom_ids) == ["second0", "second1"]
    assert len(events(logs, "file_waits_for_its_stem")) == 1


def test_a_cancel_dropped_while_its_job_waits_for_the_disk_applies_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diskwait, "DISK_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(diskwait, "DISK_RETRY_MAX_SECONDS", 0.2)
    harness, engines = start_gated(tmp_path / "box")
    inbox, outbox = harness.inbox, harness.outbox
    service = harness.service
    full = threading.Event()
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        drop(inbox, "x.jsonl", chat_file(3))
        harness.run_until(engines.asked.is_set, 30)
        full.set()  # the disk fills up just as the job starts: it waits for space
        engines.gate.set()
        harness.run_until(lambda: service.running is None and service.disk.waiting_jobs, 30)
        with capture_logs() as logs:
            (inbox / "x.cancel").write_bytes(b"")
            harness.run_until(
                lambda: not (inbox / "x.cancel").exists() or events(logs, "job_cancel_waits"), 30
            )
        assert (inbox / "x.cancel").exists(), "the cancel was lost while the job waited"
        full.clear()
        harness.run_until(lambda: finished(inbox / "x.status", outbox), 30)
    finally:
        full.clear()
        stop_gated(harness, engines)
    assert read_json(inbox / "x.status")["status"] == "cancelled"
    assert not (inbox / "x.cancel").exists()
    result = delivered(outbox / "x")
    assert result.results == [] and len(result.errors) == 3
    assert {error["error"]["code"] for error in result.errors} == {"batch_cancelled"}
