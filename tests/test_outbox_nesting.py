"""No outbox folder is ever created inside another job's outbox folder (SPEC §11), whatever
the names of files, subfolders and model aliases; the `.status` `outbox` key says where each
job went."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from servicekit import (
    Harness,
    chat_file,
    delivered,
    read_json,
    start_service,
    stop_service,
)

from watcher.deliver import pick_outbox_folder


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = start_service(tmp_path)
    yield harness
    stop_service(harness)


def job_folders(outbox: Path) -> list[Path]:
    return sorted(path.parent for path in outbox.rglob("status.json"))


def assert_no_job_folder_in_another(outbox: Path) -> None:
    folders = job_folders(outbox)
    for folder in folders:
        inside = [other for other in folders if other != folder and other.is_relative_to(folder)]
        assert not inside, f"{inside} inside the job folder {folder}"


def deliver(harness: Harness, folder: Path, name: str, prefix: str) -> str:
    """Drop a file and run it through; where its `.status` says it went."""
    result = harness.drop_and_finish(name, chat_file(2, prefix=prefix), folder)
    status = read_json(folder / f"{Path(name).stem}.status")
    assert result.folder == harness.outbox / status["outbox"]
    assert sorted(result.custom_ids) == [f"{prefix}0", f"{prefix}1"]
    return status["outbox"]


def test_a_file_named_like_a_model_then_a_file_in_that_model_folder(harness: Harness) -> None:
    inbox = harness.inbox
    assert deliver(harness, inbox, "fake.jsonl", "root") == "fake-2"  # "fake" is the folder's
    assert deliver(harness, inbox / "fake", "q.jsonl", "sub") == "fake/q"
    assert_no_job_folder_in_another(harness.outbox)


def test_a_file_named_like_any_inbox_folder_leaves_that_name_to_the_folder(
    harness: Harness,
) -> None:
    inbox = harness.inbox
    (inbox / "projects").mkdir()
    assert deliver(harness, inbox, "projects.jsonl", "root") == "projects-2"
    assert deliver(harness, inbox / "projects", "q.jsonl", "sub") == "projects/q"
    assert_no_job_folder_in_another(harness.outbox)


def test_a_folder_made_after_a_job_of_its_name_gets_a_container_of_its_own(
    harness: Harness,
) -> None:
    inbox = harness.inbox
    assert deliver(harness, inbox, "later.jsonl", "root") == "later"
    (inbox / "later").mkdir()
    assert deliver(harness, inbox / "later", "q.jsonl", "one") == "later-2/q"
    assert deliver(harness, inbox / "later", "r.jsonl", "two") == "later-2/r"  # the same one
    assert deliver(harness, inbox, "later-2.jsonl", "three") == "later-2-2"
    assert_no_job_folder_in_another(harness.outbox)
    assert sorted(delivered(harness.outbox / "later").custom_ids) == ["root0", "root1"]


def test_a_model_folder_whose_outbox_name_is_a_job_folder_already(harness: Harness) -> None:
    """An outbox from before, where a job called `fake` took the model folder's name."""
    inbox, outbox = harness.inbox, harness.outbox
    (outbox / "fake").mkdir()
    (outbox / "fake" / "status.json").write_text("{}\n")
    (outbox / "fake-2").symlink_to(outbox / "fake", target_is_directory=True)
    assert deliver(harness, inbox / "fake", "q.jsonl", "sub") == "fake-3/q"
    assert os.listdir(outbox / "fake") == ["status.json"]
    assert_no_job_folder_in_another(outbox)


def test_pick_outbox_folder_numbers_taken_names(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    (outbox / "data").mkdir(parents=True)
    (outbox / "data-2").write_text("a file of someone's")
    reserved = {"fake"}.__contains__
    assert pick_outbox_folder(outbox, "", "data", reserved) == outbox / "data-3"
    assert pick_outbox_folder(outbox, "", "fake", reserved) == outbox / "fake-2"
    assert pick_outbox_folder(outbox, "fake", "data", reserved) == outbox / "fake" / "data"
