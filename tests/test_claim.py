"""Claiming: one rename into the spool, the sidecar in its place, the ticket moved along."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

import watcher.jobs
import watcher.spool
from watcher.claim import ClaimError, ClaimLost, claim_and_validate, claim_job
from watcher.config import Config, load_config
from watcher.jobs import JobStatus, load_job
from watcher.spool import INPUT

LINE = {
    "custom_id": "q1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
}
DATA = (json.dumps(LINE) + "\n").encode()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "config.yaml").write_text(
        "models:\n  m1: {path: models/m1, backend: fake}\n  m2: {path: models/m2, backend: fake}\n"
    )
    config = load_config(tmp_path / "config.yaml")
    for alias in config.models:
        (config.folder("inbox") / alias).mkdir(parents=True)
    return config


def drop(config: Config, name: str, data: bytes = DATA, subdir: str = "") -> Path:
    path = config.folder("inbox") / subdir / name
    path.write_bytes(data)
    return path


def spool_folders(config: Config) -> list[Path]:
    jobs = config.folder("state") / "jobs"
    return sorted(jobs.iterdir()) if jobs.is_dir() else []


def read_status(path: Path) -> dict:
    return json.loads(path.read_text())


def test_claim_renames_the_file_into_the_spool(config: Config) -> None:
    path = drop(config, "questions.jsonl")
    inode = os.stat(path).st_ino
    job, ticket_model = claim_job(path, config, sequence=7)
    assert not path.exists()
    spooled = job.out / INPUT
    assert os.stat(spooled).st_ino == inode  # moved by rename, not copied
    assert spooled.read_bytes() == DATA
    assert (job.stem, job.subdir, job.sequence, ticket_model) == ("questions", "", 7, None)
    assert job.work.parent == config.folder("state") / "jobs"
    assert load_job(job.work).id == job.id


def test_the_status_sidecar_stands_where_the_file_was(config: Config) -> None:
    path = drop(config, "questions.jsonl")
    job, _ = claim_job(path, config, sequence=1)
    status = read_status(path.with_name("questions.status"))
    assert status["status"] == "validating"
    assert status["id"] == job.id
    assert status["input"] == "questions.jsonl"
    assert status["errors"] == []


def test_a_file_in_a_model_folder_keeps_its_subfolder(config: Config) -> None:
    path = drop(config, "questions.jsonl", subdir="m2")
    job = claim_and_validate(path, config, sequence=1)
    assert (job.subdir, job.model, job.total, job.errors) == ("m2", "m2", 1, [])
    assert job.status is JobStatus.VALIDATING
    assert job.input_name == "m2/questions.jsonl"
    status = read_status(path.with_name("questions.status"))
    assert (status["model"], status["input"]) == ("m2", "m2/questions.jsonl")


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_the_ticket_moves_along_and_applies(config: Config, suffix: str) -> None:
    path = drop(config, "questions.jsonl", subdir="m2")
    ticket = path.with_name(f"questions{suffix}")
    ticket.write_text(
        "model: m1\npriority: 3\nmetadata: {project: demo}\ndefaults: {temperature: 0.2}\n"
    )
    job, ticket_model = claim_job(path, config, sequence=1)
    assert not ticket.exists()
    assert (job.out / f"questions{suffix}").is_file()
    assert ticket_model == "m1"
    assert (job.priority, job.metadata, job.defaults) == (
        3,
        {"project": "demo"},
        {"temperature": 0.2},
    )
    assert job.has_ticket
    job = claim_and_validate(drop(config, "again.jsonl", subdir="m2"), config, 2)
    assert job.model == "m2"  # no ticket this time: the subfolder decides


def test_the_ticket_model_wins_over_the_subfolder(config: Config) -> None:
    path = drop(config, "questions.jsonl", subdir="m2")
    path.with_name("questions.yaml").write_text("model: m1\n")
    job = claim_and_validate(path, config, sequence=1)
    assert (job.model, job.errors) == ("m1", [])
    assert load_job(job.work).priority == 0


def test_a_vanished_file_is_lost_and_leaves_no_spool_folder(config: Config) -> None:
    path = config.folder("inbox") / "gone.jsonl"
    with pytest.raises(ClaimLost):
        claim_job(path, config, sequence=1)
    assert spool_folders(config) == []
    assert not path.with_name("gone.status").exists()


def test_a_fifo_swapped_in_after_settling_is_put_back_not_read(config: Config) -> None:
    path = config.folder("inbox") / "pipe.jsonl"
    os.mkfifo(path)
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            claim_job(path, config, sequence=1)
        except ClaimLost as error:
            errors.append(error)

    worker = threading.Thread(target=claim, daemon=True)
    worker.start()
    worker.join(timeout=2)
    assert not worker.is_alive(), "claiming blocked on a FIFO"
    assert len(errors) == 1
    assert path.is_fifo()  # back in the inbox, for the settler to refuse with a reason
    assert spool_folders(config) == []


def test_a_symlinked_model_folder_is_not_claimed_from(config: Config, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.jsonl").write_bytes(DATA)
    link = config.folder("inbox") / "linked"
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ClaimError):
        claim_job(link / "secret.jsonl", config, sequence=1)
    assert (elsewhere / "secret.jsonl").exists()
    assert spool_folders(config) == []


@pytest.mark.parametrize(
    ("ticket", "named"),
    [
        ("model: !!python/object/apply:os.system ['true']\n", "python/object"),
        ("model: m1\nengine: {tensor_parallel_size: 8}\n", "engine"),
        ("priority: high\n", "priority"),
        ("metadata: [1, 2]\n", "metadata"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_a_bad_ticket_fails_the_job_naming_the_key(config: Config, ticket: str, named: str) -> None:
    path = drop(config, "questions.jsonl")
    path.with_name("questions.yaml").write_text(ticket)
    job = claim_and_validate(path, config, sequence=1)
    assert [error["code"] for error in job.errors] == ["invalid_ticket"]
    assert named in job.errors[0]["message"]
    assert job.model is None  # never validated or routed by a ticket it could not read
    assert (job.out / "questions.yaml").is_file()  # delivered with the job, for the user to see
    status = read_status(path.with_name("questions.status"))
    assert status["errors"] == job.errors


def test_a_file_no_model_resolves_for_fails_listing_the_models(config: Config) -> None:
    job = claim_and_validate(drop(config, "questions.jsonl"), config, sequence=1)
    assert [error["code"] for error in job.errors] == ["no_model"]
    assert "m1, m2" in job.errors[0]["message"]
    assert read_status(config.folder("inbox") / "questions.status")["errors"] == job.errors


def test_a_file_with_no_valid_line_fails(config: Config) -> None:
    job = claim_and_validate(drop(config, "bad.jsonl", b"not json\n", "m1"), config, 1)
    assert [error["code"] for error in job.errors] == ["no_valid_lines"]


def test_a_job_id_drawn_twice_is_drawn_again(config: Config, monkeypatch) -> None:
    # Ids have four random hex digits per second, so a burst of drops can draw one twice.
    moment = datetime(2026, 11, 26, 18, 30, tzinfo=timezone.utc)
    draws = iter(["abcd", "abcd", "abcd", "beef"])
    monkeypatch.setattr(watcher.spool, "now", lambda: moment)
    monkeypatch.setattr(watcher.jobs.secrets, "token_hex", lambda size: next(draws))
    first, _ = claim_job(drop(config, "a.jsonl"), config, 1)
    second, _ = claim_job(drop(config, "b.jsonl"), config, 2)
    assert (first.id, second.id) == ("batch_20261126T183000_abcd", "batch_20261126T183000_beef")
    assert (first.out / INPUT).read_bytes() == (second.out / INPUT).read_bytes() == DATA
