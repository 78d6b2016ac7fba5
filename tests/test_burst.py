"""A burst of files: what one job costs does not grow with the queue, the loop is never held
up by one file, and the benchmark history is read once and kept bounded.

Costs are counted, never timed: sidecar files rewritten (each atomic write gives the file a
new inode), whole readings of the history, bytes the process read.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import orjson
import pytest
from servicekit import (
    Harness,
    Listener,
    chat_file,
    drop,
    finished,
    read_json,
    start_service,
    status_of,
    stop_service,
    wait_for,
)

import watcher.validate
from benchmarks.estimator import JobShape, estimate_run
from benchmarks.record import HISTORY, KEEP, History, append_history, build_record, compact
from watcher import etas as eta_module
from watcher.etas import BUDGET, HEAD, QueueEtas
from watcher.jobqueue import JobQueue
from watcher.jobs import Job, mark_queued
from watcher.spool import new_spool_job

SLOW = {"fake_seconds_per_step": 0.05, "fake_batch": 2}  # 40 requests a second
CHAT = "/v1/chat/completions"


# -- the queue's sidecars ------------------------------------------------------------------


class Queued:
    """A queue of `count` validated jobs in real spool and inbox folders, placed one after
    the other as the service places them, without a service around them."""

    def __init__(self, root: Path, count: int) -> None:
        self.state, self.inbox = root / "state", root / "inbox"
        self.inbox.mkdir(parents=True)
        self.history = History(self.state)
        self.etas = QueueEtas(self.history)
        self.queue = JobQueue()
        for index in range(count):
            self.add(f"doc{index:05}", sequence=index)

    def add(self, stem: str, sequence: int, priority: int = 0) -> Job:
        job = new_spool_job(self.state, stem, "", self.inbox)
        job.sequence, job.priority, job.model, job.endpoint, job.total = (
            sequence,
            priority,
            "fake",
            CHAT,
            1,
        )
        job.estimate = {"run_seconds": 2.0, "basis": "a test's guess"}
        self.queue.push(job)
        self.etas.place_new(job, self.queue, None, "fake")
        mark_queued(job)
        return job

    def pass_over(self) -> None:
        self.etas.update(self.queue, None, "fake")

    def start_head(self) -> Job:
        """The head of the queue leaves it, as when it starts: every other place moves."""
        job = self.queue.pop()
        assert job is not None
        self.etas.forget(job)
        return job

    def sidecar_inodes(self) -> dict[str, int]:
        return {path.name: path.stat().st_ino for path in self.inbox.iterdir()}

    def rewritten_by(self, step) -> int:
        """How many sidecar files `step` rewrote."""
        before = self.sidecar_inodes()
        step()
        after = self.sidecar_inodes()
        return sum(1 for name, inode in after.items() if before.get(name) != inode)

    def shown_positions(self) -> dict[str, int]:
        return {
            job.stem: read_json(self.inbox / f"{job.stem}.status")["queue_position"]
            for job in self.queue
        }

    def true_positions(self) -> dict[str, int]:
        return {job.stem: place for place, job in enumerate(self.queue, start=1)}


@pytest.fixture
def no_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pass also stops after SLICE_SECONDS on a slow disk; counting writes must not depend
    # on the speed of this machine's disk.
    monkeypatch.setattr(eta_module, "SLICE_SECONDS", math.inf)


def test_a_pass_over_the_queue_rewrites_as_many_jobs_for_a_thousand_as_for_twenty(
    memory_path: Path, no_slices: None
) -> None:
    for count in (10, 20, 1000):
        queued = Queued(memory_path / str(count), count)
        for _ in range(3):
            queued.start_head()
            written = queued.rewritten_by(queued.pass_over)
            # Every place moved: the first HEAD jobs are brought up to date, and BUDGET more;
            # each gets its .status and its .eta.
            assert written == 2 * min(len(queued.queue), HEAD + BUDGET), count
        assert queued.history.full_reads <= 1


def test_placing_a_job_plans_nothing_again_and_rewrites_only_its_own_sidecars(
    memory_path: Path,
) -> None:
    began = time.monotonic()
    queued = Queued(memory_path, 1000)
    assert queued.etas.plans == 0  # a thousand placements, each after the job ahead of it
    written = queued.rewritten_by(lambda: queued.add("last", sequence=5000))
    assert written == 2  # its .eta and its .status
    assert read_json(queued.inbox / "last.status")["queue_position"] == 1001
    eta = read_json(queued.inbox / "last.eta")
    assert "1000 jobs ahead in the queue" in eta["basis"]
    # After 1,000 jobs of two seconds each and its own two, counted from the first placing.
    spent = time.monotonic() - began
    assert 2002 - spent - 1 <= eta["seconds_remaining"] <= 2002


def test_every_queued_job_shows_its_true_place_within_the_passes_promised(
    memory_path: Path, no_slices: None
) -> None:
    queued = Queued(memory_path, 60)
    queued.add("urgent", sequence=100, priority=5)  # goes to the front
    assert read_json(queued.inbox / "urgent.status")["queue_position"] == 1
    queued.start_head()  # `urgent` starts: the others are back where they were, less one
    queued.start_head()  # and the one after it: every place moved by one
    waiting = len(queued.queue)
    passes = math.ceil((waiting - HEAD) / BUDGET)
    for done in range(1, passes + 1):
        queued.pass_over()
        shown, true = queued.shown_positions(), queued.true_positions()
        head = [job.stem for job in list(queued.queue)[:HEAD]]
        assert {stem: shown[stem] for stem in head} == {stem: true[stem] for stem in head}
        if done < passes:
            assert shown != true, "all caught up sooner than promised: the budget is unused"
    assert queued.shown_positions() == queued.true_positions()


# -- a finished job --------------------------------------------------------------------------


def test_a_job_is_collected_when_it_says_it_ended_not_when_its_thread_is_gone(
    tmp_path: Path,
) -> None:
    harness = start_service(tmp_path, engine=SLOW)
    try:
        inbox = harness.inbox
        drop(inbox, "long.jsonl", chat_file(80))
        running = harness.run_until(lambda: harness.service.running, 5)
        # A thread still winding down when its job's end wakes the loop.
        running.thread.is_alive = lambda: True
        harness.run_until(lambda: finished(inbox / "long.status", harness.outbox), 10)
        harness.run_until(lambda: harness.service.running is None, 5)
    finally:
        stop_service(harness)


# -- the loop while a large file is taken -------------------------------------------------


class Loop:
    """The service's loop on a thread of its own, as `serve_forever` turns it."""

    def __init__(self, harness: Harness) -> None:
        self.service = harness.service
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._turn, daemon=True)
        self.thread.start()

    def _turn(self) -> None:
        while not self.stop.is_set():
            self.service.tick()
            self.service.wait()

    def end(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_the_loop_serves_cancels_and_the_watchdog_while_a_large_file_is_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How long a 2 GiB file takes to check depends on the machine; here its check is held
    # until the test has seen what it wants, so the test waits for events, not for time.
    checking, release = threading.Event(), threading.Event()
    scan_file = watcher.validate.scan_file

    def held_scan(path: Path, *args, **kwargs):
        if path.stat().st_size > 1 << 20:
            checking.set()
            release.wait(60)
        return scan_file(path, *args, **kwargs)

    monkeypatch.setattr(watcher.validate, "scan_file", held_scan)
    folder = Path(tempfile.mkdtemp(prefix="notify-"))  # a socket path must be short
    listener = Listener(str(folder / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    harness = start_service(tmp_path, engine=SLOW)
    inbox, outbox = harness.inbox, harness.outbox
    loop = Loop(harness)
    try:
        drop(inbox, "long.jsonl", chat_file(400))  # ten seconds of work
        wait_for(lambda: status_of(inbox / "long.status") == "in_progress", 10, "long to run")
        drop(inbox, "waiting.jsonl", chat_file(3))
        wait_for(lambda: status_of(inbox / "waiting.status") == "queued", 10, "waiting queued")

        drop(inbox, "large.jsonl", chat_file(12_000))  # about 1.5 MB
        assert checking.wait(30), "the large file was never checked"
        began = time.monotonic()
        (inbox / "waiting.cancel").touch()
        wait_for(lambda: finished(inbox / "waiting.status", outbox), 10, "the cancel")
        wait_for(lambda: listener.pings_since(began) >= 2, 10, "watchdog pings")
        assert not release.is_set() and status_of(inbox / "large.status") == "validating"
        assert read_json(outbox / "waiting" / "status.json")["status"] == "cancelled"
        assert status_of(inbox / "long.status") == "in_progress"
    finally:
        release.set()
        loop.end()
        stop_service(harness)
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert not loop.thread.is_alive()


# -- the benchmark history -----------------------------------------------------------------


def history_record(index: int, model: str = "fake", load_seconds: float = 0.0) -> dict:
    """A record of the size delivery writes: with a sample of 200 answers, about 7 KB."""
    return build_record(
        job_id=f"batch_{index:06}",
        status="completed",
        model=model,
        source="models/fake",
        endpoint=CHAT,
        engine={"hardware": "CPU", "engine_version": "fake", "settings": {"max_num_seqs": 64}},
        counts={"total": 200, "completed": 200, "failed": 0},
        prompt_tokens=4000 + index,
        completion_tokens=6000 + 7 * index,
        prompt_chars=16000,
        requested_max_tokens=64,
        load_seconds=load_seconds,
        run_seconds=20.0 + index % 7,
        estimate={"run_seconds": 21.0, "basis": "earlier jobs"},
        finished_at="2026-11-26T18:30:00+00:00",
        completion_samples=[[64, 10 + (index + line) % 54, True] for line in range(200)],
    )


def write_history(state: Path, records: list[dict], torn: bool = False) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / HISTORY
    data = b"".join(orjson.dumps(record) + b"\n" for record in records)
    path.write_bytes(data + (b'{"job_id": "torn' if torn else b""))
    return path


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read on Linux")
def test_a_burst_reads_the_history_once_whatever_its_size(memory_path: Path) -> None:
    state = memory_path / "state"
    models = ("fake", "other", "third", "fourth", "fifth", "sixth")
    records = [history_record(index, models[index % 6]) for index in range(6 * KEEP)]
    size = write_history(state, records).stat().st_size
    assert size > 1_500_000
    harness = start_service(memory_path)
    try:
        history = harness.service.history
        assert history.full_reads == 1
        before = bytes_read()
        inbox, outbox = harness.inbox, harness.outbox
        for index in range(30):
            drop(inbox, f"doc{index}.jsonl", chat_file(1, prefix=f"d{index}-"))
        # Listing the outbox reads nothing; reading thirty sidecars at every turn would.
        harness.run_until(lambda: len(os.listdir(outbox)) == 30, 60)
        read = bytes_read() - before
        statuses = [inbox / f"doc{index}.status" for index in range(30)]
        harness.run_until(lambda: all(finished(path, outbox) for path in statuses), 10)
    finally:
        stop_service(harness)
    # Thirty estimates, placements, starts and passes over the queue read the file once
    # at the start and then only the thirty records appended since.
    assert history.full_reads == 1
    assert history.parsed_lines == 6 * KEEP + 30
    assert read < size / 2, f"{read} bytes read while running, for a history of {size}"


def test_the_history_is_compacted_at_the_start_to_what_estimates_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    loads = [history_record(index, "other", load_seconds=12.0) for index in range(2 * KEEP)]
    mine = [history_record(10_000 + index) for index in range(3 * KEEP)]
    duplicate = history_record(10_000 + 3 * KEEP - 1)  # a delivery done twice
    path = write_history(state, loads + mine + [duplicate], torn=True)
    shape = JobShape("fake", CHAT, 50, 50 * 80, {64: 50})
    before = estimate_run(shape, History(state).records())

    harness = start_service(tmp_path)
    stop_service(harness)

    kept = History(state).records()
    assert [record["job_id"] for record in kept] == [
        record["job_id"] for record in loads[-KEEP:] + mine[-KEEP:]
    ]
    assert estimate_run(shape, kept) == before  # the estimate rests on what is kept
    assert not [name for name in os.listdir(state) if name.endswith(".tmp")]
    assert path.read_bytes().endswith(b"\n")  # the torn line went too
    inode = path.stat().st_ino
    harness = start_service(tmp_path)  # nothing to drop: the file is left as it is
    stop_service(harness)
    assert path.stat().st_ino == inode


def test_compaction_keeps_each_models_load_times_and_every_kind_of_job() -> None:
    records = [history_record(index, "fake", load_seconds=3.0) for index in range(5)]
    records += [history_record(100 + index, "fake") for index in range(KEEP)]
    records += [{**history_record(900), "endpoint": "/v1/completions"}]
    kept = {record["job_id"] for record in compact(records)}
    # The five loads are older than the newest KEEP of their kind, and kept for their load
    # times; the one completions job is a kind of its own.
    assert {f"batch_{index:06}" for index in range(5)} <= kept
    assert "batch_000900" in kept
    assert len(kept) == KEEP + 6


def test_the_history_follows_what_other_processes_append_and_replace(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_history(state, [history_record(index) for index in range(3)])
    history = History(state)
    assert len(history.records()) == 3 and history.full_reads == 1
    append_history(state, history_record(3))  # `batchbox run` or `bench` finishing a job
    assert [record["job_id"] for record in history.records()][-1] == "batch_000003"
    assert (history.full_reads, history.parsed_lines) == (1, 4)
    # Rewritten whole by someone else (another compaction): read again, whole.
    write_history(state, [history_record(7)])
    assert [record["job_id"] for record in history.records()] == ["batch_000007"]
    assert history.full_reads == 2
