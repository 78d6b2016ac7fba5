"""SPEC sections 2, 7 and 8 as a state machine: any sequence of drops, partial uploads,
cancels, kills and restarts ends with every dropped file delivered once, each of its lines
in exactly one of results.jsonl and errors.jsonl, once.

The service runs in this process with the fake engine, its loop turned by the rules. A kill
cuts the power under the job's thread: its next write or fsync raises an exception nothing
catches, so the thread ends where it is, and the service object is dropped without a
shutdown, the way `kill -9` leaves a real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from crashkit import Dropped, all_finished, check_site, drop_file, request_file
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from servicekit import FINAL, write_config

from watcher.config import load_config
from watcher.engines import EngineKeeper
from watcher.service import Service


class PowerCut(BaseException):
    """Raised in the job's thread at its next write or fsync once the power is cut."""


class Power:
    """Wraps os.write and os.fsync: while `cut`, a job thread that calls them dies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cut = False
        for name in ("write", "fsync"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            if self.cut and threading.current_thread().name.startswith("job-"):
                raise PowerCut
            return real(*args, **kwargs)

        return call


def memory_folder() -> Path:
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="batchbox-stateful-", dir=parent))


class Appliance(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.monkeypatch = pytest.MonkeyPatch()
        self.power = Power(self.monkeypatch)
        self.root = memory_folder()
        write_config(
            self.root,
            settle_seconds=0.05,
            rescan_seconds=0.2,
            stop_timeout_seconds=5,
            engine={"fake_seconds_per_step": 0.02, "fake_batch": 2},  # 100 requests a second
        )
        self.inbox = self.root / "inbox"
        self.service: Service | None = None
        self.dropped: list[Dropped] = []
        self.uploads: list[Dropped] = []  # written as .part, not yet renamed
        self.names = 0
        self.kills = 0

    # -- the service ----------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.restart()

    @precondition(lambda self: self.service is None)
    @rule()
    def restart(self) -> None:
        config = load_config(self.root / "config.yaml")
        self.service = Service(config, engines=EngineKeeper(in_process=True))
        self.service.start()

    @precondition(lambda self: self.service is not None)
    @rule()
    def kill(self) -> None:
        service = self.service
        assert service is not None
        self.power.cut = True
        running = service.running
        if running is not None:
            running.thread.join(10)
            assert not running.thread.is_alive(), "the job's thread outlived the power cut"
        if service.observer is not None:
            service.observer.stop()
            service.observer.join(5)
        service.engines.close()
        self.power.cut = False
        self.service = None
        self.kills += 1

    @precondition(lambda self: self.service is not None)
    @rule(seconds=st.sampled_from([0.02, 0.1, 0.3]))
    def turn(self, seconds: float) -> None:
        assert self.service is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.service.tick()
            time.sleep(0.005)

    # -- what users do --------------------------------------------------------------------

    def new_file(self, lines: int, subdir: str) -> Dropped:
        self.names += 1
        name = f"job{self.names}"
        return Dropped(subdir, name, request_file(f"{name}-", lines, bad_every=7))

    @rule(lines=st.integers(1, 60), subdir=st.sampled_from(["", "fake"]))
    def drop(self, lines: int, subdir: str) -> None:
        item = self.new_file(lines, subdir)
        drop_file(self.inbox, item)
        self.dropped.append(item)

    @rule(lines=st.integers(1, 60))
    def start_upload(self, lines: int) -> None:
        item = self.new_file(lines, "")
        (self.inbox / f"{item.stem}.jsonl.part").write_bytes(item.data)
        self.uploads.append(item)

    @precondition(lambda self: self.uploads)
    @rule()
    def finish_upload(self) -> None:
        item = self.uploads.pop(0)
        os.rename(self.inbox / f"{item.stem}.jsonl.part", self.inbox / f"{item.stem}.jsonl")
        self.dropped.append(item)

    @precondition(lambda self: self.dropped)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.dropped))
        folder = self.inbox / item.subdir if item.subdir else self.inbox
        (folder / f"{item.stem}.cancel").touch()

    # -- the end ----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            while self.uploads:
                self.finish_upload()
            if self.service is None:
                self.restart()
            service = self.service
            assert service is not None
            deadline = time.monotonic() + 30
            while not all_finished(self.root, self.dropped):
                assert time.monotonic() < deadline, "not everything was delivered"
                service.tick()
                time.sleep(0.005)
            # A rescan finds the cancels of jobs that were finished before them.
            deadline = time.monotonic() + 30
            while any(self.inbox.rglob("*.cancel")):
                assert time.monotonic() < deadline, "a cancel for a finished job stayed"
                service.tick()
                time.sleep(0.01)
            service.stop()
            service.shutdown()
            self.service = None
            count = check_site(self.root, self.dropped, statuses=FINAL)
            assert count.problems == []
            assert (count.lost, count.duplicated) == (0, 0)
        finally:
            if self.service is not None:
                self.service.stop()
                self.service.shutdown()
            self.monkeypatch.undo()
            shutil.rmtree(self.root, ignore_errors=True)


Appliance.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAppliance = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")(
    Appliance.TestCase
)
