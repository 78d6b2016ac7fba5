"""Names in the inbox are never trusted (SPEC §11): a FIFO, socket, folder or symlink under a
sidecar, ticket, cancel or model-folder name is skipped and logged once, never opened,
followed or deleted through, and stops nothing."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatekit import start_gated, stop_gated
from servicekit import (
    Harness,
    Server,
    chat_file,
    drop,
    finished,
    read_json,
    start_service,
    stop_service,
    wait_for,
    write_config,
)
from structlog.testing import capture_logs

from watcher.sidecars import sweep_status_files

OLD_FINAL = b'{"status": "completed", "completed_at": "2001-01-01T00:00:00+00:00"}\n'


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    (tmp_path / "box").mkdir()
    harness = start_service(tmp_path / "box")
    yield harness
    stop_service(harness)


def skipped(logs: list[dict], path: Path) -> list[dict]:
    return [
        entry
        for entry in logs
        if entry["event"] == "inbox_name_skipped" and entry["path"] == str(path)
    ]


def drop_and_finish(harness: Harness, name: str, data: bytes) -> dict:
    inbox, outbox = harness.inbox, harness.outbox
    drop(inbox, name, data)
    status = inbox / f"{Path(name).stem}.status"

    def done() -> bool:  # read only once it is the service's own file
        return stat.S_ISREG(os.lstat(status).st_mode) and finished(status, outbox)

    harness.run_until(lambda: os.path.lexists(status) and done(), 30)
    return read_json(status)


def test_a_fifo_and_a_link_to_dev_zero_named_like_status_files_stop_nothing(
    tmp_path: Path,
) -> None:
    """The sweep of old `.status` files once opened a FIFO and blocked for good (SIGTERM
    did not end it), and would read a link to /dev/zero without end."""
    config = write_config(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "x.status")
    (inbox / "zero.status").symlink_to("/dev/zero")
    server = Server(config).start()
    try:
        drop(inbox, "good.jsonl", chat_file(3))
        wait_for(lambda: finished(inbox / "good.status", tmp_path / "outbox"), 60, "good.jsonl")
        code, _ = server.terminate()  # within its stop timeout (servicekit waits no longer)
    finally:
        server.kill()
    assert code == 0
    assert stat.S_ISFIFO(os.lstat(inbox / "x.status").st_mode)
    assert os.readlink(inbox / "zero.status") == "/dev/zero"
    for name in ("x.status", "zero.status"):
        notes = server.events("inbox_name_skipped")
        assert len([note for note in notes if note["path"].endswith(name)]) == 1, notes


def test_the_sweep_reads_and_removes_only_regular_files_of_bounded_size(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "fake").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "old.status").write_bytes(OLD_FINAL)
    (inbox / "old.status").write_bytes(OLD_FINAL)  # the one thing to remove
    (inbox / "fake" / "old.status").write_bytes(OLD_FINAL)
    os.mkfifo(inbox / "fifo.status")
    (inbox / "zero.status").symlink_to("/dev/zero")
    (inbox / "link.status").symlink_to(outside / "old.status")
    (inbox / "folder.status").mkdir()
    huge = inbox / "huge.status"
    huge.write_bytes(OLD_FINAL[:-2] + b" " * (2 << 20) + b"}\n")  # final and old, but 2 MiB
    (inbox / "linked").symlink_to(outside, target_is_directory=True)

    done = threading.Event()

    def sweep_twice() -> None:
        sweep_status_files(inbox, keep_hours=1)
        sweep_status_files(inbox, keep_hours=1)
        done.set()

    with capture_logs() as logs:
        sweeper = threading.Thread(target=sweep_twice, daemon=True)
        sweeper.start()
        if not done.wait(60):
            os.close(os.open(inbox / "fifo.status", os.O_WRONLY | os.O_NONBLOCK))  # let it go
            pytest.fail("the sweep blocked on a FIFO named like a status file")
    assert not (inbox / "old.status").exists() and not (inbox / "fake" / "old.status").exists()
    assert (outside / "old.status").read_bytes() == OLD_FINAL  # never reached through a link
    assert os.readlink(inbox / "link.status") == str(outside / "old.status")
    assert stat.S_ISFIFO(os.lstat(inbox / "fifo.status").st_mode)
    assert (inbox / "folder.status").is_dir() and huge.is_file()
    for name in ("fifo.status", "zero.status", "link.status", "huge.status"):
        assert len(skipped(logs, inbox / name)) == 1, (name, logs)


def test_sidecars_are_written_over_links_and_fifos_never_through_them(
    harness: Harness, tmp_path: Path
) -> None:
    inbox = harness.inbox
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"keep me\n")
    (inbox / "linked.status").symlink_to(secret)
    (inbox / "linked.eta").symlink_to(secret)
    os.mkfifo(inbox / "piped.eta")
    (inbox / "foldered.status").mkdir()
    with capture_logs() as logs:
        for stem in ("linked", "piped"):
            drop_and_finish(harness, f"{stem}.jsonl", chat_file(3, prefix=stem))
        drop(inbox, "foldered.jsonl", chat_file(3, prefix="f"))
        harness.run_until(lambda: (harness.outbox / "foldered" / "status.json").is_file(), 30)
    assert secret.read_bytes() == b"keep me\n"
    assert read_json(inbox / "linked.status")["status"] == "completed"
    assert not os.path.lexists(inbox / "linked.eta") and not os.path.lexists(inbox / "piped.eta")
    assert read_json(harness.outbox / "foldered" / "status.json")["status"] == "completed"
    assert (inbox / "foldered.status").is_dir() and not any((inbox / "foldered.status").iterdir())
    # Written several times over (validating, queued, in progress, ...), said once.
    assert len(skipped(logs, inbox / "foldered.status")) == 1, logs


def test_a_cancel_or_ticket_that_is_not_a_regular_file_is_never_acted_on(
    harness: Harness, tmp_path: Path
) -> None:
    inbox = harness.inbox
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"keep me\n")
    (inbox / "kept.cancel").symlink_to(secret)
    os.mkfifo(inbox / "piped.yaml")
    with capture_logs() as logs:
        kept = drop_and_finish(harness, "kept.jsonl", chat_file(2, prefix="k"))
        piped = drop_and_finish(harness, "piped.jsonl", chat_file(2, prefix="p"))
    assert kept["status"] == "completed"  # a link named like a cancel is not a cancel
    assert os.readlink(inbox / "kept.cancel") == str(secret) and secret.read_bytes() == b"keep me\n"
    assert piped["status"] == "completed" and piped["metadata"] == {}
    assert stat.S_ISFIFO(os.lstat(inbox / "piped.yaml").st_mode)
    assert len(skipped(logs, inbox / "kept.cancel")) == 1, logs
    assert len(skipped(logs, inbox / "piped.yaml")) == 1, logs


def test_names_of_model_folders_taken_by_a_file_or_a_link_do_not_stop_the_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "box"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "fake").write_bytes(b"not a folder\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (inbox / "other").symlink_to(outside, target_is_directory=True)
    (outside / "lured.jsonl").write_bytes(chat_file(2))
    with capture_logs() as logs:
        harness = start_service(root)
        try:
            (inbox / "ticketed.yaml").write_text("model: other\n")
            done = drop_and_finish(harness, "ticketed.jsonl", chat_file(2, prefix="t"))
            harness.tick_for(1.5)  # a rescan or two: nothing in the linked folder is taken
        finally:
            stop_service(harness)
    assert done["status"] == "completed" and done["model"] == "other"
    assert (inbox / "fake").read_bytes() == b"not a folder\n"
    assert sorted(path.name for path in outside.iterdir()) == ["lured.jsonl"]
    assert len(skipped(logs, inbox / "fake")) == 1, logs
    assert not [entry for entry in logs if "lured" in str(entry.get("input"))]


def test_a_model_folder_swapped_for_a_link_leads_no_sidecar_out_of_the_inbox(
    tmp_path: Path,
) -> None:
    harness, engines = start_gated(tmp_path / "box")
    inbox = harness.inbox
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        drop(inbox / "fake", "q.jsonl", chat_file(3))
        harness.run_until(lambda: engines.asked.is_set(), 30)
        os.rename(inbox / "fake", tmp_path / "moved-away")
        (inbox / "fake").symlink_to(outside, target_is_directory=True)
        engines.gate.set()
        harness.run_until(lambda: (harness.outbox / "fake").is_dir(), 30)
    finally:
        stop_gated(harness, engines)
    assert list(outside.iterdir()) == []
    [folder] = (harness.outbox / "fake").iterdir()
    assert read_json(folder / "status.json")["status"] == "completed"
