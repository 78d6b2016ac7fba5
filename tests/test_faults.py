"""A disk that fails: fsync, rename and write made to fail (EIO, ENOSPC) from their Nth call
on, for every N a job's life reaches, in a real service run in this process; and a small
filesystem that fills up while a job runs.

Whatever fails, the service keeps running (`batchbox run` exits 1 with one sentence), no
outbox folder is ever half there and no sidecar torn, and once the disk is well again every
line of every file is delivered once, by the same service and after a restart alike.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from crashkit import (
    Dropped,
    all_finished,
    check_site,
    delivered_folders_are_whole,
    drop_file,
    request_file,
    sidecars_are_whole,
)
from helpers import assert_every_line_once, fill
from servicekit import read_json, run_until, write_config

import watcher.commands.run
from runner.journal import RESULTS, Journal
from watcher import diskwait
from watcher.cli import main
from watcher.config import load_config
from watcher.engines import EngineKeeper
from watcher.service import Service

CALLS = ("fsync", "replace", "rename", "write")
BROKEN_SECONDS = 0.1  # how long the service works on with a broken disk
OUR_CODE = ("runner.", "watcher.", "benchmarks.")


class Disk:
    """Makes os.fsync, os.replace, os.rename and os.write fail from their Nth call on when
    the service's own code calls them, until lifted: a disk that breaks and stays broken."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = dict.fromkeys(CALLS, 0)
        self.failing: tuple[str, int, int] | None = None  # call, from which N, errno
        self.failed = 0
        self.lock = threading.Lock()
        for name in CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(OUR_CODE):
                with self.lock:
                    self.calls[name] += 1
                    failing = self.failing
                    if failing and failing[0] == name and self.calls[name] >= failing[1]:
                        self.failed += 1
                        raise OSError(failing[2], os.strerror(failing[2]))
            return real(*args, **kwargs)

        return call

    def fail(self, name: str, from_call: int, code: int) -> None:
        with self.lock:
            self.calls = dict.fromkeys(CALLS, 0)
            self.failing = (name, from_call, code)
            self.failed = 0

    def lift(self) -> None:
        with self.lock:
            self.failing = None


@pytest.fixture
def memory_root() -> Iterator[Path]:
    """A folder in RAM where there is one, so hundreds of service runs stay quick."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="batchbox-faults-", dir=parent))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def files() -> list[Dropped]:
    return [
        Dropped("", "first", request_file("f", 12, bad_every=5)),
        Dropped("fake", "second", request_file("s", 8)),
    ]


def new_service(root: Path) -> Service:
    config = load_config(root / "config.yaml")
    service = Service(config, engines=EngineKeeper(in_process=True))
    service.start()
    return service


def close(service: Service) -> None:
    service.stop()
    service.shutdown()


def site(root: Path) -> list[Dropped]:
    write_config(root, settle_seconds=0.05, rescan_seconds=0.2, engine={"fake_batch": 4})
    dropped = files()
    for item in dropped:
        drop_file(root / "inbox", item)
    (root / "inbox" / "first.yaml").write_text("priority: 1\nmetadata: {team: faults}\n")
    return dropped


@pytest.fixture(scope="module")
def clean_calls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    monkeypatch = pytest.MonkeyPatch()
    disk = Disk(monkeypatch)
    root = tmp_path_factory.mktemp("clean")
    try:
        dropped = site(root)
        service = new_service(root)
        run_until(service, lambda: all_finished(root, dropped), 15)
        close(service)
    finally:
        monkeypatch.undo()
    assert all(disk.calls[name] for name in CALLS), disk.calls
    return dict(disk.calls)


def run_with_a_failing_disk(root: Path, disk: Disk, name: str, from_call: int, code: int) -> None:
    """Fail `name` from its `from_call`th call on while the service works, then lift the
    fault; the same service must finish everything, and a restart must find nothing to do."""
    dropped = site(root)
    disk.fail(name, from_call, code)
    service = new_service(root)
    try:
        deadline = time.monotonic() + 3.0
        broke_at = None
        while time.monotonic() < deadline and not all_finished(root, dropped):
            service.tick()  # never raises: the disk's errors are the service's to handle
            problems = delivered_folders_are_whole(root / "outbox")
            problems += sidecars_are_whole(root / "inbox")
            assert problems == [], (name, from_call, problems)
            if disk.failed and broke_at is None:
                broke_at = time.monotonic()
            if broke_at is not None and time.monotonic() - broke_at > BROKEN_SECONDS:
                break
            time.sleep(0.005)
        disk.lift()
        run_until(service, lambda: all_finished(root, dropped), 15)
    finally:
        disk.lift()
        close(service)
    service = new_service(root)
    try:
        for _ in range(5):
            service.tick()
    finally:
        close(service)
    count = check_site(root, dropped, statuses=("completed",))
    assert count.problems == [], (name, from_call, count.problems)
    assert (count.lost, count.duplicated) == (0, 0), (name, from_call)
    first = read_json(root / "outbox" / "first" / "status.json")
    assert first["priority"] == 1 and first["metadata"] == {"team": "faults"}
    assert (root / "outbox" / "first" / "first.yaml").is_file()
    history = (root / "state" / "benchmarks.jsonl").read_bytes().splitlines()
    assert len({line for line in history if line.strip()}) == len(history)


# Each call with the error it most often meets, from every N on; the other error from every
# fourth N, which reaches the same code paths.
PAIRS = [
    ("fsync", errno.EIO, 1),
    ("write", errno.ENOSPC, 1),
    ("replace", errno.ENOSPC, 1),
    ("rename", errno.EIO, 1),
    ("fsync", errno.ENOSPC, 4),
    ("write", errno.EIO, 4),
]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskwait, "DISK_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(diskwait, "DISK_RETRY_MAX_SECONDS", 0.2)


@pytest.mark.parametrize(
    ("name", "code", "stride"), PAIRS, ids=[f"{n}-{errno.errorcode[c]}" for n, c, _ in PAIRS]
)
def test_a_disk_that_fails_from_any_call_on_loses_nothing(
    name: str,
    code: int,
    stride: int,
    clean_calls: dict[str, int],
    memory_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = Disk(monkeypatch)
    for from_call in range(1, clean_calls[name] + 1, stride):
        root = memory_root / f"{name}-{from_call}"
        root.mkdir()
        run_with_a_failing_disk(root, disk, name, from_call, code)


# -- `batchbox run` ------------------------------------------------------------------------

RUN_CONFIG = """\
default_model: fake
min_free_bytes: 0
models:
  fake: {path: nowhere, backend: fake, engine: {fake_batch: 4}}
"""


def run_command(config: Path, path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["-c", str(config), "run", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("name", "code"), [("fsync", errno.EIO), ("write", errno.ENOSPC)])
def test_batchbox_run_on_a_failing_disk_exits_1_with_a_sentence_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    name: str,
    code: int,
) -> None:
    monkeypatch.setattr(
        watcher.commands.run, "EngineKeeper", functools.partial(EngineKeeper, True)
    )
    monkeypatch.delenv("BATCHBOX_CONFIG", raising=False)
    interrupt = signal.getsignal(signal.SIGINT)
    disk = Disk(monkeypatch)
    try:
        config = tmp_path / "config.yaml"
        config.write_text(RUN_CONFIG)
        data = request_file("r", 600, bad_every=50)
        drop = tmp_path / "drop"
        drop.mkdir()
        # A clean run counts the calls a run makes.
        (drop / "clean.jsonl").write_bytes(data)
        assert run_command(config, drop / "clean.jsonl", capsys)[0] == 0
        calls = disk.calls[name]
        stems = ["clean"]
        # Calls while the job is taken and while it runs. (A fault while `run` finishes a
        # job leaves it finalizing in the spool, which `run` does not resume: see
        # watcher.commands._unfinished_run.)
        for from_call in sorted({1, 4, 7, 10, 13} if name == "fsync" else {1, calls // 2}):
            path = drop / f"batch{from_call}.jsonl"
            path.write_bytes(data)
            stems.append(path.stem)
            disk.fail(name, from_call, code)
            status, err = run_command(config, path, capsys)
            disk.lift()
            sentences = [line for line in err.splitlines() if line and not line.startswith("{")]
            assert status == 1 and "Traceback" not in err, (from_call, err)
            assert len(sentences) == 1 and sentences[0].startswith("batchbox: "), err
            # The same command, once the disk is well, finishes it.
            status, err = run_command(config, path, capsys)
            assert status == 0, (from_call, err)
    finally:
        signal.signal(signal.SIGINT, interrupt)
        structlog.reset_defaults()
    outbox = tmp_path / "outbox"
    assert sorted(path.name for path in outbox.iterdir()) == sorted(stems)
    for stem in stems:
        assert (outbox / stem / "input.jsonl").read_bytes() == data
        assert_every_line_once(drop / f"{stem}.jsonl", outbox / stem)


# -- a small filesystem that fills up ------------------------------------------------------


def test_a_disk_that_fills_up_mid_job_makes_it_wait_and_it_completes_once_space_is_back(
    small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diskwait, "DISK_RETRY_SECONDS", 0.2)
    log = tmp_path / "requests.log"  # outside the small disk
    write_config(
        small_disk,
        settle_seconds=0.1,
        rescan_seconds=0.3,
        min_free_bytes=512 * 1024,
        engine={"fake_seconds_per_step": 0.02, "fake_batch": 8, "fake_log_requests": str(log)},
    )
    big = Dropped("", "big", request_file("b", 2000))
    late = Dropped("", "late", request_file("l", 5))
    inbox = small_disk / "inbox"
    service = new_service(small_disk)
    try:
        drop_file(inbox, big)
        run_until(service, lambda: service.running is not None and service.running.done > 0.1, 20)
        filler = fill(small_disk / "filler")
        # The journal's next write fails: the job stops, keeps what is durable, and waits.
        run_until(service, lambda: service.running is None and service.disk.waiting_jobs, 20)
        assert sidecars_are_whole(inbox) == []
        assert read_json(inbox / "big.status")["status"] == "in_progress"
        assert not (small_disk / "outbox" / "big").exists()

        # Some space, but less than min_free_bytes: nothing new is claimed, nothing resumes.
        for path in filler[-4:]:
            path.unlink()
        filler = filler[:-4]
        drop_file(inbox, late)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            service.tick()
            time.sleep(0.01)
        assert (inbox / "late.jsonl").exists() and not (inbox / "late.status").exists()
        assert service.running is None and service.disk.waiting_jobs
        assert sidecars_are_whole(inbox) == []
        note = read_json(inbox / "big.status")
        assert note["status"] == "in_progress"
        assert [error["code"] for error in note["errors"]] == ["disk_full"], note

        for path in filler:
            path.unlink()
        run_until(service, lambda: all_finished(small_disk, [big, late]), 60)
    finally:
        close(service)
    shutil.rmtree(small_disk / "filler", ignore_errors=True)
    count = check_site(small_disk, [big, late], statuses=("completed",))
    assert count.problems == [] and (count.lost, count.duplicated) == (0, 0)
    final = read_json(inbox / "big.status")
    assert not [error for error in final["errors"] if error["code"] == "disk_full"]
    # The job's requests only (b0..b1999, l0..l4): the engine also times its pace at its
    # first load, with requests of its own.
    job_ids = re.compile(rb"^[bl][0-9]+$")
    run = sum(1 for line in log.read_bytes().splitlines() if job_ids.match(line.strip()))
    # It resumed from its journal: at most the unsynced group and what was in flight ran again.
    assert run <= 2005 + 256 + 256, run


# -- the journal after a failed fsync ------------------------------------------------------


def test_a_failed_fsync_cuts_the_journal_back_and_is_never_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(monkeypatch)
    journal = Journal(tmp_path, sync_every=1000)
    journal.load()
    for index in range(10):
        journal.write(RESULTS, fake_result(f"kept{index}"))
    journal.sync()
    durable = (tmp_path / RESULTS).read_bytes()
    for index in range(5):
        journal.write(RESULTS, fake_result(f"lost{index}"))
    disk.fail("fsync", 1, errno.EIO)
    with pytest.raises(OSError):
        journal.sync()
    disk.lift()
    fsyncs = disk.calls["fsync"]
    # What the failed fsync may have lost is not trusted: the file is cut back to the last
    # good fsync, and nothing more is written or fsynced through this journal.
    assert (tmp_path / RESULTS).read_bytes() == durable
    with pytest.raises(OSError):
        journal.write(RESULTS, fake_result("after"))
    with pytest.raises(OSError):
        journal.sync()
    journal.close()
    assert disk.calls["fsync"] == fsyncs
    assert (tmp_path / RESULTS).read_bytes() == durable
    done = Journal(tmp_path).load()
    assert done.ids == {f"kept{index}" for index in range(10)}


def test_garbage_after_the_last_whole_record_is_cut_on_load(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.load()
    for index in range(3):
        journal.write(RESULTS, fake_result(f"q{index}"))
    journal.close()
    good = (tmp_path / RESULTS).read_bytes()
    # What a failed write-back or a power cut can leave: zeros, then a line that was fine.
    with open(tmp_path / RESULTS, "ab") as handle:
        handle.write(b"\0" * 300 + b"\n" + good.splitlines(keepends=True)[0])
    done = Journal(tmp_path).load()
    assert done.ids == {"q0", "q1", "q2"}
    assert (tmp_path / RESULTS).read_bytes() == good


def fake_result(custom_id: str) -> dict:
    body = {"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": custom_id, "body": body},
        "error": None,
    }
