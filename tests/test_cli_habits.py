"""Command-line habits: `-c/--config` before or after the command name, and `batchbox
status` naming each job by the file it came from."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from servicekit import (
    BATCHBOX,
    Harness,
    chat_file,
    read_json,
    start_service,
    status_of,
    stop_service,
    write_config,
)

from watcher.cli import build_parser, main

COMMANDS = [
    ["serve"],
    ["run", "some.jsonl"],
    ["status"],
    ["status", "--json"],
    ["estimate", "some.jsonl"],
    ["check"],
    ["bench", "fake"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda words: " ".join(words))
@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_the_config_is_taken_before_or_after_the_command_name(
    command: list[str], flag: str
) -> None:
    parser = build_parser()
    before = parser.parse_args([flag, "here.yaml", *command])
    after = parser.parse_args([*command, flag, "here.yaml"])
    assert before.config == after.config == "here.yaml"
    assert parser.parse_args(command).config is None  # then $BATCHBOX_CONFIG, ./config.yaml


def test_a_bad_config_after_the_command_is_still_a_usage_error(tmp_path: Path) -> None:
    shown = subprocess.run(
        [BATCHBOX, "status", "-c", str(tmp_path / "nowhere.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 2 and "nowhere.yaml" in shown.stderr, shown.stderr


# -- `batchbox status` names jobs by their files ---------------------------------------------

SLOW = {"fake_seconds_per_step": 0.05, "fake_batch": 2}  # 40 requests a second


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[Harness]:
    """One job done, one running (for minutes, were it left to finish), one queued."""
    harness = start_service(tmp_path, engine=SLOW)
    inbox = harness.inbox
    try:
        harness.drop_and_finish("done.jsonl", chat_file(2), inbox / "other")
        (inbox / "running.jsonl").write_bytes(chat_file(4000))
        harness.run_until(lambda: status_of(inbox / "running.status") == "in_progress", 10)
        (inbox / "fake" / "waiting.jsonl").write_bytes(chat_file(2))
        harness.run_until(lambda: status_of(inbox / "fake" / "waiting.status") == "queued", 10)
        yield harness
    finally:
        stop_service(harness)


def status_output(harness: Harness, capsys: pytest.CaptureFixture, *flags: str) -> str:
    capsys.readouterr()
    assert main(["status", "-c", str(harness.config.root / "config.yaml"), *flags]) == 0
    return capsys.readouterr().out


def test_status_names_the_file_of_the_running_job_the_queue_and_recent_jobs(
    busy: Harness, capsys: pytest.CaptureFixture
) -> None:
    report = json.loads(status_output(busy, capsys, "--json"))
    assert [job["input"] for job in report["running"]] == ["running.jsonl"]
    assert [job["input"] for job in report["queued"]] == ["fake/waiting.jsonl"]
    assert [job["input"] for job in report["recent"]] == ["other/done.jsonl"]

    lines = status_output(busy, capsys).splitlines()
    running = next(line for line in lines if line.startswith("running:"))
    assert "running.jsonl" in running
    queued = lines[lines.index("queued: 1") + 1]
    assert "fake/waiting.jsonl" in queued
    recent = lines[lines.index("recent:") + 1]
    assert "other/done.jsonl" in recent and "completed" in recent


def test_the_benchmark_record_names_its_input(busy: Harness) -> None:
    record = read_json(busy.outbox / "other" / "done" / "benchmark.json")
    assert record["input"] == "other/done.jsonl"


def test_status_of_a_record_without_an_input_name_shows_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Records written before they named their input are still listed, by their job id."""
    config = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    record = {"job_id": "batch_1", "model": "fake", "status": "completed", "finished_at": "x"}
    (state / "benchmarks.jsonl").write_text(json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(["status", "-c", str(config)]) == 0
    assert "batch_1" in capsys.readouterr().out


def test_batchbox_serve_with_the_config_after_the_command_serves(tmp_path: Path) -> None:
    config = write_config(tmp_path, stop_timeout_seconds=5)
    process = subprocess.Popen(
        [BATCHBOX, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if b"service_ready" in line:
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, b"".join(seen)
