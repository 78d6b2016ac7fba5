"""The whole flow of `batchbox serve` with the fake engine: drop a file, read the sidecars,
find the outbox folder. In-process (the loop turned tick by tick) where that is enough, and
as a real `batchbox serve` process with real uploads and real signals where it is not."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from crashkit import journal_lines
from helpers import requires_tool
from servicekit import (
    FINAL,
    Harness,
    Server,
    SidecarWatch,
    batchbox,
    chat_file,
    chat_line,
    delivered,
    drop,
    embedding_line,
    finished,
    jsonl,
    outbox_folder,
    read_json,
    read_jsonl,
    start_service,
    status_of,
    stop_service,
    wait_for,
    write_config,
)
from structlog.testing import capture_logs

from watcher import deliver
from watcher import etas as eta_module

SLOW = {"fake_seconds_per_step": 0.05, "fake_batch": 2}  # 40 requests a second


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = start_service(tmp_path)
    yield harness
    stop_service(harness)


@pytest.fixture
def slow_harness(tmp_path: Path) -> Iterator[Harness]:
    harness = start_service(tmp_path, engine=SLOW)
    yield harness
    stop_service(harness)


def ids_of(data: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]


def all_finished(harness: Harness, *statuses: Path) -> bool:
    outbox = harness.outbox
    return all(finished(path, outbox) for path in statuses)


def run_order(harness: Harness) -> list[str]:
    """The inputs in the order their jobs finished, from the benchmark history."""
    inputs = {}
    for status in harness.outbox.rglob("status.json"):
        document = read_json(status)
        inputs[document["id"]] = document["input"]
    history = read_jsonl(harness.config.folder("state") / "benchmarks.jsonl")
    return [inputs[record["job_id"]] for record in history]


# -- the full flow -------------------------------------------------------------------------


def test_a_dropped_file_goes_through_every_state_to_the_outbox(tmp_path: Path) -> None:
    slow_harness = start_service(tmp_path, engine={**SLOW, "fake_load_seconds": 0.3})
    try:
        # A job ahead keeps it queued long enough for the watcher to see that state.
        drop(slow_harness.inbox, "ahead.jsonl", chat_file(40))
        slow_harness.run_until(
            lambda: status_of(slow_harness.inbox / "ahead.status") == "in_progress", 10
        )
        check_the_full_flow(slow_harness)
    finally:
        stop_service(slow_harness)


def check_the_full_flow(slow_harness: Harness) -> None:
    inbox = slow_harness.inbox
    data = chat_file(40)
    status_watch = SidecarWatch(inbox / "questions.status").start()
    eta_watch = SidecarWatch(inbox / "questions.eta").start()
    try:
        result = slow_harness.drop_and_finish("questions.jsonl", data)
        slow_harness.run_until(lambda: not (inbox / "questions.eta").exists(), 5)
    finally:
        status_watch.finish()
        eta_watch.finish()

    seen = [state for state in status_watch.states if state != "finalizing"]
    assert seen == ["validating", "queued", "in_progress", "completed"]
    assert status_watch.reads > 50 and not status_watch.torn
    assert eta_watch.reads > 50 and not eta_watch.torn
    bases = [document["basis"] for document in eta_watch.documents]
    assert any("ahead in the queue" in basis for basis in bases), bases  # written while queued
    assert any("running" in basis for basis in bases), bases  # and refreshed while it ran
    for document in eta_watch.documents:
        assert set(document) >= {"eta", "seconds_remaining", "written_at", "basis"}
        assert document["eta"].endswith("+00:00") and document["seconds_remaining"] >= 0
    assert not (inbox / "questions.eta").exists()
    assert not (inbox / "questions.jsonl").exists()

    final = read_json(inbox / "questions.status")
    assert final["status"] == "completed" and final["outbox"] == "questions"
    assert final["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert final["eta"] is None and final["queue_position"] is None
    assert result.folder == slow_harness.outbox / "questions"
    assert sorted(path.name for path in result.folder.iterdir()) == [
        "benchmark.json",
        "errors.jsonl",
        "input.jsonl",
        "results.jsonl",
        "status.json",
    ]
    assert (result.folder / "input.jsonl").read_bytes() == data
    assert result.status["status"] == "completed" and result.status["outbox"] == "questions"
    assert result.errors == []
    assert sorted(record["custom_id"] for record in result.results) == sorted(ids_of(data))
    for record in result.results:
        assert record["error"] is None and record["response"]["status_code"] == 200
        assert record["response"]["body"]["object"] == "chat.completion"
        assert record["response"]["body"]["model"] == "fake"
    benchmark = read_json(result.folder / "benchmark.json")
    assert benchmark["job_id"] == final["id"] and benchmark["model"] == "fake"


def test_the_final_status_appears_only_once_the_outbox_folder_is_there(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Look at the sidecar just before the outbox folder appears, the way a script polling it
    # might: a script that reads "completed" must find the outbox folder the status names.
    seen_before_delivery: list[str | None] = []
    deliver_folder = deliver.deliver_folder

    def watched_deliver(source: Path, target: Path) -> None:
        seen_before_delivery.append(status_of(harness.inbox / "early.status"))
        deliver_folder(source, target)

    monkeypatch.setattr(deliver, "deliver_folder", watched_deliver)
    harness.drop_and_finish("early.jsonl", chat_file(3))
    [state] = seen_before_delivery
    assert state not in FINAL


class Crash(BaseException):
    """Ends the job's thread the way a power cut ends the process: nothing after it runs."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_job_delivered_just_before_a_crash_gets_its_final_sidecars_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = start_service(tmp_path)
    inbox, outbox = harness.inbox, harness.outbox

    def power_cut(job, status) -> None:
        raise Crash

    monkeypatch.setattr(deliver, "mark_finished", power_cut)  # right after the delivery
    try:
        drop(inbox, "cut.jsonl", chat_file(3))
        harness.run_until(lambda: (outbox / "cut" / "status.json").is_file(), 5)
        harness.tick_for(0.3)
    finally:
        stop_service(harness)
    monkeypatch.undo()
    assert (inbox / "cut.eta").exists()  # what the crash left behind

    harness = start_service(tmp_path)
    stop_service(harness)
    assert not (inbox / "cut.eta").exists()
    final = read_json(inbox / "cut.status")
    assert final["status"] == "completed" and final["outbox"] == "cut"
    assert [path.name for path in outbox.iterdir()] == ["cut"]
    assert not list(harness.config.folder("state").joinpath("jobs").iterdir())


# -- the queue -----------------------------------------------------------------------------


def test_queue_positions_priority_and_first_come_first_served(tmp_path: Path) -> None:
    # Ten requests a second: the long job runs for 20 s, all the while the queue forms (and
    # is cancelled then), and its estimate stays short enough for ETAs to be rewritten when
    # they move by more than ETA_SLACK_SECONDS.
    slow_harness = start_service(tmp_path, engine={"fake_seconds_per_step": 0.1, "fake_batch": 1})
    try:
        check_the_queue(slow_harness)
    finally:
        stop_service(slow_harness)


def check_the_queue(slow_harness: Harness) -> None:
    inbox = slow_harness.inbox
    # Ten seconds of work, so that it still runs after three drops on a busy machine.
    drop(inbox, "long.jsonl", chat_file(400))
    slow_harness.run_until(lambda: status_of(inbox / "long.status") == "in_progress", 5)
    drop(inbox, "early.jsonl", chat_file(2))
    slow_harness.run_until(lambda: status_of(inbox / "early.status") == "queued", 5)
    (inbox / "urgent.yaml").write_text("priority: 5\n")
    drop(inbox, "urgent.jsonl", chat_file(2))
    slow_harness.run_until(lambda: status_of(inbox / "urgent.status") == "queued", 5)
    drop(inbox, "late.jsonl", chat_file(2))
    slow_harness.run_until(lambda: status_of(inbox / "late.status") == "queued", 5)

    def positions() -> dict[str, int | None]:
        return {
            stem: read_json(inbox / f"{stem}.status")["queue_position"]
            for stem in ("long", "urgent", "early", "late")
        }

    expected = {"long": None, "urgent": 1, "early": 2, "late": 3}
    slack = eta_module.ETA_SLACK_SECONDS + 1

    def etas() -> list[dict]:
        return [read_json(inbox / f"{stem}.eta") for stem in ("urgent", "early", "late")]

    def in_order() -> bool:
        # Later in the queue, later expected: up to the slack within which an eta is not
        # rewritten. (The engine's pace, timed at its load, may re-estimate the queue just
        # after it formed: the next queue update puts every eta in order again.)
        finishes = [datetime.fromisoformat(eta["eta"]).timestamp() for eta in etas()]
        return all(later >= earlier - slack for earlier, later in zip(finishes, finishes[1:]))

    slow_harness.run_until(lambda: positions() == expected and in_order(), 5)
    assert status_of(inbox / "long.status") == "in_progress"
    assert "3 jobs ahead in the queue" in etas()[2]["basis"]

    (inbox / "long.cancel").touch()  # then the queue runs
    statuses = [inbox / f"{stem}.status" for stem in ("long", "urgent", "early", "late")]
    slow_harness.run_until(lambda: all_finished(slow_harness, *statuses), 30)
    assert run_order(slow_harness) == ["long.jsonl", "urgent.jsonl", "early.jsonl", "late.jsonl"]
    assert status_of(inbox / "long.status") == "cancelled"
    assert read_json(inbox / "urgent.status")["priority"] == 5


def test_two_hundred_files_dropped_at_once_are_each_delivered_once(memory_path: Path) -> None:
    harness = start_service(memory_path)
    try:
        drop_two_hundred_files(harness)
    finally:
        stop_service(harness)


def drop_two_hundred_files(harness: Harness) -> None:
    inbox = harness.inbox
    inputs = {}
    for index in range(200):
        lines = [chat_line(f"a{index}"), chat_line(f"b{index}"), chat_line(f"c{index}")]
        lines[2]["method"] = "GET"  # a bad line fails alone and lands in errors.jsonl
        inputs[f"drop{index:03}"] = jsonl(lines)
    for stem, data in inputs.items():
        (inbox / f"{stem}.jsonl").write_bytes(data)

    statuses = [inbox / f"{stem}.status" for stem in inputs]
    outbox = harness.outbox

    overlapped = []  # a job was delivered while later drops were still waiting to be taken

    def all_delivered() -> bool:
        count = len(list(outbox.iterdir()))
        if count and any(inbox.glob("*.jsonl")):
            overlapped.append(count)
        return count == len(inputs) and all_finished(harness, *statuses)

    harness.run_until(all_delivered, 600)  # a safety net: a busy machine is slow, not wrong
    assert overlapped, "the first job waited for the whole burst to be claimed"

    folders = sorted(path.name for path in harness.outbox.iterdir())
    assert folders == sorted(inputs)
    for index, (stem, data) in enumerate(inputs.items()):
        result = delivered(harness.outbox / stem)
        assert (result.folder / "input.jsonl").read_bytes() == data
        assert sorted(result.custom_ids) == sorted(ids_of(data))
        assert [record["custom_id"] for record in result.errors] == [f"c{index}"]
    assert not list(harness.config.folder("state").joinpath("jobs").iterdir())


def test_the_same_name_dropped_twice_gets_a_numbered_folder(harness: Harness) -> None:
    first = harness.drop_and_finish("again.jsonl", chat_file(2, prefix="first"))
    assert read_json(harness.inbox / "again.status")["outbox"] == "again"
    second = harness.drop_and_finish("again.jsonl", chat_file(3, prefix="second"))
    assert read_json(harness.inbox / "again.status")["outbox"] == "again-2"
    assert first.folder.name == "again" and second.folder.name == "again-2"
    assert sorted(first.custom_ids) == ["first0", "first1"]
    assert sorted(second.custom_ids) == ["second0", "second1", "second2"]


def test_a_file_dropped_while_the_service_was_stopped_is_picked_up_at_start(
    tmp_path: Path,
) -> None:
    data = chat_file(3)
    drop(tmp_path / "inbox", "waiting.jsonl", data)
    drop(tmp_path / "inbox" / "other", "routed.jsonl", data)
    harness = start_service(tmp_path)
    try:
        statuses = [harness.inbox / "waiting.status", harness.inbox / "other" / "routed.status"]
        harness.run_until(lambda: all_finished(harness, *statuses), 10)
    finally:
        stop_service(harness)
    assert (harness.outbox / "waiting" / "input.jsonl").read_bytes() == data
    assert read_json(harness.outbox / "other" / "routed" / "status.json")["model"] == "other"


# -- which model runs it -------------------------------------------------------------------


def test_routing_precedence_and_the_ways_a_file_fails_to_route(harness: Harness) -> None:
    inbox = harness.inbox
    both = [chat_line("x", model="fake"), chat_line("y", model="other")]
    cases = {
        # stem: (folder, ticket, lines, expected model or the error code and a word in it)
        "ticket_wins": ("fake", "model: other\n", [chat_line("x", model="fake")], "other"),
        "folder_wins": ("other", None, [chat_line("x", model="fake")], "other"),
        "lines_name_it": ("", None, [chat_line("x", model="other")] * 1, "other"),
        "mixed_lines": ("", None, both, "fake"),
        "unknown_in_lines": ("", None, [chat_line("x", model="gpt-4o")], "fake"),
        "unknown_in_ticket": (
            "",
            "model: gpt-9\n",
            [chat_line("x")],
            ("unknown_model", "gpt-9", "fake", "other", "embedder"),
        ),
        "bad_key": (
            "",
            "engine: {tensor_parallel_size: 8}\n",
            [chat_line("x")],
            (
                "invalid_ticket",
                "engine",
            ),
        ),
        "python_tag": (
            "",
            "model: !!python/object/apply:os.system ['touch pwned']\n",
            [chat_line("x")],
            ("invalid_ticket", "python/object/apply:os.system"),
        ),
        "wrong_endpoint": ("", None, [embedding_line("x")], ("wrong_endpoint", "embeddings")),
        "embedder_folder": ("embedder", None, [embedding_line("x")], "embedder"),
    }
    statuses = []
    for stem, (folder, ticket, lines, _) in cases.items():
        where = inbox / folder if folder else inbox
        if ticket is not None:
            (where / f"{stem}.yaml").write_text(ticket)
        drop(where, f"{stem}.jsonl", jsonl(lines))
        statuses.append(where / f"{stem}.status")
    harness.run_until(lambda: all_finished(harness, *statuses), 10)

    for (stem, (_, ticket, lines, expected)), status in zip(cases.items(), statuses):
        result = delivered(outbox_folder(harness.config, status))
        assert sorted(result.custom_ids) == sorted(line["custom_id"] for line in lines), stem
        if isinstance(expected, str):
            assert result.status["status"] == "completed", (stem, result.status["errors"])
            assert result.status["model"] == expected, stem
            assert {record["response"]["body"]["model"] for record in result.results} == {expected}
        else:
            code, *words = expected
            assert result.status["status"] == "failed", stem
            assert result.results == []
            [error] = result.status["errors"]
            assert error["code"] == code, (stem, error)
            for word in words:
                assert word in error["message"], (stem, error)
            assert read_json(status)["errors"] == result.status["errors"]
        if ticket is not None:
            assert (result.folder / f"{stem}.yaml").read_text() == ticket
    assert not Path("pwned").exists() and not harness.config.root.joinpath("pwned").exists()


# -- cancelling ----------------------------------------------------------------------------


def test_a_queued_job_is_cancelled_without_running(slow_harness: Harness) -> None:
    inbox = slow_harness.inbox
    drop(inbox, "long.jsonl", chat_file(2000))  # 50 s of work: it runs all along
    slow_harness.run_until(lambda: status_of(inbox / "long.status") == "in_progress", 5)
    data = chat_file(5, prefix="w")
    drop(inbox, "waiting.jsonl", data)
    slow_harness.run_until(lambda: status_of(inbox / "waiting.status") == "queued", 5)

    (inbox / "waiting.cancel").touch()
    slow_harness.run_until(lambda: finished(inbox / "waiting.status", slow_harness.outbox), 3)

    assert status_of(inbox / "long.status") == "in_progress"  # the running job carries on
    assert not (inbox / "waiting.cancel").exists()
    assert not (inbox / "waiting.eta").exists()
    result = delivered(slow_harness.outbox / "waiting")
    assert result.status["status"] == "cancelled" and result.status["in_progress_at"] is None
    assert result.results == []
    assert sorted(result.custom_ids) == sorted(ids_of(data))
    assert {record["error"]["code"] for record in result.errors} == {"batch_cancelled"}


def test_a_running_job_stops_within_seconds_and_keeps_its_results(
    slow_harness: Harness,
) -> None:
    inbox = slow_harness.inbox
    data = chat_file(400)  # ten seconds of work
    drop(inbox, "long.jsonl", data)
    slow_harness.run_until(lambda: status_of(inbox / "long.status") == "in_progress", 5)
    slow_harness.run_until(lambda: journal_lines(slow_harness.config.root), 10)  # some done

    (inbox / "long.cancel").touch()
    asked = time.monotonic()
    slow_harness.run_until(lambda: finished(inbox / "long.status", slow_harness.outbox), 5)
    assert time.monotonic() - asked < 3

    assert not (inbox / "long.cancel").exists()
    result = delivered(slow_harness.outbox / "long")
    assert result.status["status"] == "cancelled"
    assert result.results, "the results done before the cancel are kept"
    assert len(result.results) < 400
    assert sorted(result.custom_ids) == sorted(ids_of(data))
    assert {record["error"]["code"] for record in result.errors} == {"batch_cancelled"}
    counts = result.status["request_counts"]
    assert counts == {"total": 400, "completed": len(result.results), "failed": len(result.errors)}


def test_a_cancel_dropped_with_its_file_cancels_the_job_once_it_is_taken(
    harness: Harness,
) -> None:
    inbox = harness.inbox / "other"
    data = chat_file(4)
    (inbox / "early.cancel").touch()
    drop(inbox, "early.jsonl", data)
    harness.run_until(lambda: finished(inbox / "early.status", harness.outbox), 5)
    result = delivered(harness.outbox / "other" / "early")
    assert result.status["status"] == "cancelled" and result.results == []
    assert sorted(result.custom_ids) == sorted(ids_of(data))
    assert not (inbox / "early.cancel").exists()


def test_a_cancel_for_no_job_is_removed_and_nothing_else_happens(harness: Harness) -> None:
    inbox = harness.inbox
    (inbox / "ghost.cancel").touch()
    (inbox / "other" / "ghost.cancel").touch()
    harness.run_until(
        lambda: (
            not (inbox / "ghost.cancel").exists()
            and not (inbox / "other" / "ghost.cancel").exists()
        ),
        5,
    )
    harness.drop_and_finish("real.jsonl", chat_file(2))  # the loop is still serving
    assert sorted(path.name for path in harness.outbox.iterdir()) == ["real"]
    assert not (inbox / "ghost.status").exists() and not (inbox / "other" / "ghost.status").exists()


# -- the engine ----------------------------------------------------------------------------


def engine_loads(logs: list[dict]) -> int:
    return sum(1 for entry in logs if entry["event"] == "engine_loaded")


def test_the_engine_is_loaded_once_per_run_of_jobs_for_one_model(harness: Harness) -> None:
    with capture_logs() as logs:
        for index, model in enumerate(["fake", "other", "fake", "fake"]):
            folder = harness.inbox / model
            result = harness.drop_and_finish(f"job{index}.jsonl", chat_file(2), folder)
            assert result.status["model"] == model
    assert engine_loads(logs) == 3


def test_the_engine_is_unloaded_after_idle_unload_seconds(tmp_path: Path) -> None:
    harness = start_service(tmp_path, idle_unload_seconds=0.5)
    try:
        with capture_logs() as logs:
            harness.drop_and_finish("job.jsonl", chat_file(2))
            done = time.monotonic()
            assert harness.engines.model == "fake"
            harness.run_until(lambda: harness.engines.model is None, 3)
            assert time.monotonic() - done >= 0.3
            harness.drop_and_finish("next.jsonl", chat_file(2))
        assert engine_loads(logs) == 2
    finally:
        stop_service(harness)


# -- what is not a regular file ------------------------------------------------------------


def test_links_pipes_and_folders_named_jsonl_are_refused_with_a_reason(
    harness: Harness, tmp_path: Path
) -> None:
    inbox = harness.inbox
    target = tmp_path / "secret.jsonl"
    target.write_bytes(chat_file(2))
    (inbox / "link.jsonl").symlink_to(target)
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "folder.jsonl").mkdir()
    statuses = {stem: inbox / f"{stem}.status" for stem in ("link", "pipe", "folder")}
    harness.run_until(lambda: all(path.exists() for path in statuses.values()), 5)

    for stem, what in (("link", "symbolic link"), ("pipe", "pipe"), ("folder", "folder")):
        document = read_json(statuses[stem])
        assert document["status"] == "failed"
        assert what in document["errors"][0]["message"], document
    assert (inbox / "link.jsonl").is_symlink() and target.read_bytes() == chat_file(2)
    result = harness.drop_and_finish("normal.jsonl", chat_file(2))
    assert result.status["status"] == "completed"
    assert sorted(path.name for path in harness.outbox.iterdir()) == ["normal"]


# -- a real `batchbox serve` ---------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(write_config(tmp_path, settle_seconds=0.5, stop_timeout_seconds=5))
    server.start()
    yield server
    server.kill()


def slow_write(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Write into the final name in chunks, closing and reopening between them (scp, SMB)."""
    size = -(-len(data) // chunks)
    for start in range(0, len(data), size):
        with open(path, "ab") as handle:
            handle.write(data[start : start + size])
        time.sleep(pause)


@pytest.fixture
def patient_server(tmp_path: Path) -> Iterator[Server]:
    """Settling takes 3 s: a busy machine that holds a writer up between its chunks for a
    while still does not make a pause of 0.3 s look like the end of the upload."""
    server = Server(write_config(tmp_path, settle_seconds=3, stop_timeout_seconds=5)).start()
    yield server
    server.kill()


def test_a_slow_writer_is_not_claimed_before_its_file_is_complete(patient_server: Server) -> None:
    server = patient_server
    inbox = server.config.folder("inbox")
    data = chat_file(60)
    writer = threading.Thread(target=slow_write, args=(inbox / "slow.jsonl", data, 8, 0.3))
    writer.start()
    while writer.is_alive():
        assert not (inbox / "slow.status").exists(), "claimed while still being written"
        time.sleep(0.02)
    wait_for(lambda: finished(inbox / "slow.status", server.config.folder("outbox")), 20)
    outbox = server.config.folder("outbox")
    assert (outbox / "slow" / "input.jsonl").read_bytes() == data
    assert [path.name for path in outbox.iterdir()] == ["slow"]
    assert len(server.events("job_claimed")) == 1


@pytest.mark.parametrize(
    "upload", [pytest.param("rsync", marks=requires_tool("rsync")), "part-then-rename", "cp"]
)
def test_an_upload_is_claimed_once(server: Server, tmp_path: Path, upload: str) -> None:
    inbox = server.config.folder("inbox")
    outbox = server.config.folder("outbox")
    data = chat_file(30)
    source = tmp_path / "upload.jsonl"
    source.write_bytes(data)
    if upload == "rsync":
        subprocess.run(["rsync", str(source), f"{inbox}/"], check=True, timeout=10)
    elif upload == "cp":
        subprocess.run(["cp", str(source), f"{inbox}/"], check=True, timeout=10)
    else:
        with open(inbox / "upload.jsonl.part", "wb") as handle:
            for line in data.splitlines(keepends=True):
                handle.write(line)
                handle.flush()
                time.sleep(0.01)
        os.rename(inbox / "upload.jsonl.part", inbox / "upload.jsonl")
    wait_for(lambda: finished(inbox / "upload.status", outbox), 30)
    time.sleep(1.2)  # a rescan after delivery must not find anything more to take
    assert [path.name for path in outbox.iterdir()] == ["upload"]
    assert (outbox / "upload" / "input.jsonl").read_bytes() == data
    assert len(server.events("job_claimed")) == 1
    assert sorted(delivered(outbox / "upload").custom_ids) == sorted(ids_of(data))
    code, seconds = server.terminate()
    assert code == 0 and seconds < server.config.stop_timeout_seconds


def test_sigterm_stops_a_running_job_in_time_and_the_next_start_finishes_it(
    tmp_path: Path,
) -> None:
    config_path = write_config(tmp_path, settle_seconds=0.3, stop_timeout_seconds=5, engine=SLOW)
    server = Server(config_path).start()
    inbox = server.config.folder("inbox")
    outbox = server.config.folder("outbox")
    data = chat_file(600)  # fifteen seconds of work
    try:
        drop(inbox, "long.jsonl", data)
        wait_for(lambda: status_of(inbox / "long.status") == "in_progress", 10)
        wait_for(lambda: journal_lines(tmp_path), 10, "the first results")
        code, seconds = server.terminate()
    finally:
        server.kill()
    assert code == 0, server.log()
    assert seconds < server.config.stop_timeout_seconds
    assert not outbox.joinpath("long").exists()
    assert status_of(inbox / "long.status") == "in_progress"  # kept, to resume

    # The rest runs at twice the speed after the restart, without running a request twice.
    write_config(tmp_path, settle_seconds=0.3, engine={"fake_batch": 64})
    server = Server(config_path).start()
    try:
        wait_for(lambda: finished(inbox / "long.status", outbox), 15)
        result = delivered(outbox / "long")
        assert result.status["status"] == "completed"
        assert sorted(record["custom_id"] for record in result.results) == sorted(ids_of(data))
        assert result.errors == []
    finally:
        code, _ = server.terminate()
    assert code == 0


def test_status_json_shows_the_running_job_and_the_queue(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, settle_seconds=0.3, stop_timeout_seconds=5, engine=SLOW)
    server = Server(config_path).start()
    inbox = server.config.folder("inbox")
    try:
        drop(inbox, "running.jsonl", chat_file(4000))  # 100 s of work: running all along
        wait_for(lambda: status_of(inbox / "running.status") == "in_progress", 10)
        drop(inbox, "first.jsonl", chat_file(2))
        (inbox / "second.yml").write_text("priority: 1\n")
        drop(inbox, "second.jsonl", chat_file(2))
        wait_for(
            lambda: (
                status_of(inbox / "first.status") == "queued"
                and status_of(inbox / "second.status") == "queued"
            ),
            5,
        )
        shown = batchbox(config_path, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert [job["input"] for job in report["running"]] == ["running.jsonl"]
        assert report["running"][0]["status"] == "in_progress"
        assert report["running"][0]["request_counts"]["total"] == 4000
        assert [job["input"] for job in report["queued"]] == ["second.jsonl", "first.jsonl"]
        assert all(job["status"] == "queued" for job in report["queued"])
    finally:
        code, seconds = server.terminate()
    assert code == 0 and seconds < 5
