"""The API's side of the folder contract, on real files: placing a batch (a hard link where
the filesystem allows one, else a copy), and reading what the inbox says only where it can
be trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from watcher.api.contract import Contract

SHM = Path("/dev/shm")


def contract(root: Path) -> Contract:
    (root / "inbox").mkdir()
    (root / "outbox").mkdir()
    return Contract(root / "inbox", root / "outbox")


def test_the_ticket_comes_first_and_each_file_appears_whole(tmp_path: Path) -> None:
    folders = contract(tmp_path)
    source = tmp_path / "upload"
    source.write_bytes(b'{"custom_id": "a"}\n')
    folders.place_ticket("api-x", b"metadata: {a: b}\n")
    assert sorted(os.listdir(folders.inbox)) == ["api-x.yaml"]
    assert folders.place_data("api-x", source) is True  # linked
    assert sorted(os.listdir(folders.inbox)) == ["api-x.jsonl", "api-x.yaml"]
    assert os.stat(folders.inbox / "api-x.jsonl").st_ino == os.stat(source).st_ino


@pytest.mark.skipif(
    not SHM.is_dir() or os.stat(SHM).st_dev == os.stat("/tmp").st_dev,
    reason="needs /dev/shm on a filesystem other than /tmp",
)
def test_where_no_link_can_be_made_the_data_is_copied(tmp_path: Path) -> None:
    folders = contract(tmp_path)
    source = SHM / f"batchbox-test-{os.getpid()}"
    source.write_bytes(b"x" * 100_000)
    try:
        assert folders.place_data("api-y", source) is False  # copied across filesystems
        assert (folders.inbox / "api-y.jsonl").read_bytes() == source.read_bytes()
        assert [name for name in os.listdir(folders.inbox) if name.startswith(".")] == []
    finally:
        source.unlink()


def test_untrusted_sidecars_are_not_followed(tmp_path: Path) -> None:
    folders = contract(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"input": "api-z.jsonl", "status": "completed"}))
    (folders.inbox / "api-z.status").symlink_to(secret)
    assert folders.status("api-z") is None  # a link is never followed
    os.mkfifo(folders.inbox / "api-w.status")
    assert folders.status("api-w") is None  # nor a FIFO opened to block on
    (folders.inbox / "api-v.status").write_text(
        json.dumps({"input": "api-v.jsonl", "status": "completed", "outbox": "../state"})
    )
    document = folders.status("api-v")
    assert document is not None
    assert folders.delivered("api-v", document["outbox"]) is None  # not a name it can have
    assert not folders.is_outbox_folder("api-v", "api-v/../../state")
    assert folders.is_outbox_folder("api-v", "api-v-2")
