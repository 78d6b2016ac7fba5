"""SIGTERM at any moment stops `batchbox serve` (and SIGTERM or SIGINT `batchbox run`) within
the config's stop_timeout_seconds plus a second, keeping what is done, and leaves nothing of
the engine behind: not its process, not its process group, not what it started.

Each moment is reached by an event (a log line, a sidecar's state), never by a sleep, and a
real signal is sent to a real process. The bound is the contract, so it is what is checked.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from crashkit import Dropped, check_site, drop_file, request_file
from helpers import assert_every_line_once, fill
from servicekit import BATCHBOX, Server, read_json, status_of, wait_for, write_config
from stopkit import Owned, gone, owning


@pytest.fixture
def owned() -> Iterator[Owned]:
    yield from owning()

SLACK_SECONDS = 1.0  # the contract: stop_timeout_seconds plus a second


class Site:
    """A config for the fake engine whose load waits for a gate file, with the pids of what
    each engine process starts (one helper in its process group, one in a session of its
    own) written where the test finds them."""

    def __init__(self, root: Path, owned: Owned, files: Path | None = None, **overrides) -> None:
        self.root = root
        self.owned = owned
        files = files or root  # the gate and the pid files
        self.gate = files / "gate"
        self.helper = files / "helper.pid"
        self.detached = files / "detached.pid"
        engine = {
            "fake_load_gate": str(self.gate),
            "fake_helper_pidfile": str(self.helper),
            "fake_detached_pidfile": str(self.detached),
            **overrides.pop("engine", {}),
        }
        settings = {"settle_seconds": 0.2, "rescan_seconds": 0.5, "stop_timeout_seconds": 4}
        self.config_path = write_config(root, engine=engine, **{**settings, **overrides})
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"

    @property
    def timeout(self) -> float:
        return float(yaml.safe_load(self.config_path.read_text())["stop_timeout_seconds"])

    def server(self, ready_seconds: float = 30) -> Server:
        """`batchbox serve`, owned from the moment it starts; a start that recovers a large
        job first takes a while before it is ready."""
        server = Server(self.config_path)
        server.log_path.unlink(missing_ok=True)
        with open(server.log_path, "ab") as log:
            server.process = subprocess.Popen(
                [BATCHBOX, "-c", str(self.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        self.owned.add(server.process.pid)
        wait_for(server.ready, ready_seconds, "batchbox serve to be ready")
        return server

    def engine_tree(self, earlier: int | None = None) -> list[int]:
        """The loading engine process and the two helpers it started (not those of the
        engine whose helper was `earlier`), once both are there: the engine is their parent."""

        def helpers() -> list[int] | None:
            try:
                pids = [int(self.helper.read_text()), int(self.detached.read_text())]
            except (FileNotFoundError, ValueError):
                return None  # not there yet, or being written
            return None if pids[0] == earlier else pids

        pids = wait_for(helpers, 30, "the engine's helpers")
        try:
            engine = psutil.Process(pids[0]).ppid()
        except psutil.NoSuchProcess:
            raise AssertionError("the engine's helper ended before it was seen") from None
        tree = [engine, *pids]
        for pid in tree:
            self.owned.add(pid)
        return tree


def signal_and_time(process: subprocess.Popen, number: int, timeout: float) -> tuple[int, float]:
    """Send the signal; the exit status and the seconds until the process was gone."""
    started = time.monotonic()
    process.send_signal(number)
    try:
        code = process.wait(timeout + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout + 30} s after the signal") from None
    return code, time.monotonic() - started


def assert_stopped_in_time(code: int, seconds: float, timeout: float, log: str) -> None:
    assert code == 0, log
    assert seconds <= timeout + SLACK_SECONDS, f"{seconds:.2f} s for a {timeout} s timeout\n{log}"


def finish_after_restart(site: Site, dropped: list[Dropped]) -> None:
    """The next start carries on: every line of every file delivered, once."""
    site.gate.touch()
    server = site.server(ready_seconds=120)
    try:
        outbox = site.outbox
        wait_for(
            lambda: all(
                (outbox / item.stem / "status.json").is_file() for item in dropped
            ),
            120,
            "every job to be delivered after the restart",
        )
    finally:
        code, _ = signal_and_time(server.process, signal.SIGTERM, site.timeout)
    assert code == 0, server.log()
    count = check_site(site.root, dropped)
    assert count.problems == [] and (count.lost, count.duplicated) == (0, 0), count


# -- batchbox serve --------------------------------------------------------------------------


def test_sigterm_while_the_model_loads_stops_in_time_and_ends_the_engine_tree(
    tmp_path: Path, owned: Owned
) -> None:
    """The reported case: the loading engine, a non-daemon child nobody ended, kept the
    service alive long after it said it had stopped."""
    site = Site(tmp_path, owned)
    server = site.server()
    dropped = Dropped("", "loading", request_file("l", 20))
    drop_file(site.inbox, dropped)
    tree = site.engine_tree()
    assert status_of(site.inbox / "loading.status") == "in_progress"

    code, seconds = signal_and_time(server.process, signal.SIGTERM, site.timeout)

    assert_stopped_in_time(code, seconds, site.timeout, server.log())
    assert [pid for pid in tree if not gone(pid)] == []
    assert status_of(site.inbox / "loading.status") == "in_progress"  # it resumes
    assert read_json(site.inbox / "loading.status")["engine"] is None
    finish_after_restart(site, [dropped])


def test_sigterm_while_a_job_runs_stops_in_time_and_ends_the_engine_tree(
    tmp_path: Path, owned: Owned
) -> None:
    site = Site(tmp_path, owned, engine={"fake_seconds_per_step": 0.05, "fake_batch": 2})
    site.gate.touch()
    server = site.server()
    dropped = Dropped("", "running", request_file("r", 400))
    drop_file(site.inbox, dropped)
    tree = site.engine_tree()
    wait_for(
        lambda: read_json(site.inbox / "running.status")["request_counts"]["completed"] > 0,
        30,
        "requests to be done",
    )

    code, seconds = signal_and_time(server.process, signal.SIGTERM, site.timeout)

    assert_stopped_in_time(code, seconds, site.timeout, server.log())
    assert [pid for pid in tree if not gone(pid)] == []
    assert not (site.outbox / "running").exists()
    finish_after_restart(site, [dropped])


def test_sigterm_while_a_job_is_delivered_stops_in_time(tmp_path: Path, owned: Owned) -> None:
    """A cancelled job of many lines is delivered with an error line for each: SIGTERM comes
    while that is being written. What was cut short is finished at the next start."""
    site = Site(tmp_path, owned, stop_timeout_seconds=2)
    server = site.server()
    dropped = Dropped("", "big", request_file("b", 100_000))
    drop_file(site.inbox, dropped)
    tree = site.engine_tree()
    (site.inbox / "big.cancel").touch()  # the load is abandoned, the job delivered
    wait_for(lambda: status_of(site.inbox / "big.status") == "finalizing", 60, "finalizing")

    code, seconds = signal_and_time(server.process, signal.SIGTERM, site.timeout)

    assert_stopped_in_time(code, seconds, site.timeout, server.log())
    assert [pid for pid in tree if not gone(pid)] == []
    finish_after_restart(site, [dropped])
    assert read_json(site.outbox / "big" / "status.json")["status"] == "cancelled"


def test_sigterm_while_a_large_file_is_claimed_stops_in_time(tmp_path: Path, owned: Owned) -> None:
    """Checking a large file holds the main loop; the stop does not wait for it."""
    site = Site(tmp_path, owned, stop_timeout_seconds=1)
    site.gate.touch()
    server = site.server()
    dropped = Dropped("", "large", request_file("c", 200_000))
    drop_file(site.inbox, dropped)
    wait_for(lambda: status_of(site.inbox / "large.status") == "validating", 60, "validating")

    code, seconds = signal_and_time(server.process, signal.SIGTERM, site.timeout)

    assert_stopped_in_time(code, seconds, site.timeout, server.log())
    # Taken: the spool holds it, and the next start picks it up from there.
    assert not (site.inbox / "large.jsonl").exists()
    [work] = list((site.root / "state" / "jobs").iterdir())
    assert (work / "out" / "input.jsonl").read_bytes() == dropped.data


# -- waiting for the disk ----------------------------------------------------------------------


def test_sigterm_while_waiting_for_the_disk_stops_in_time(
    small_disk: Path, tmp_path: Path, owned: Owned
) -> None:
    # The gate and the pid files stay off the small disk: filling it must not stop them.
    site = Site(
        small_disk,
        owned,
        files=tmp_path,
        min_free_bytes=512 * 1024,
        engine={"fake_seconds_per_step": 0.02, "fake_batch": 8},
    )
    site.gate.touch()
    server = site.server()
    dropped = Dropped("", "waits", request_file("w", 2000))
    drop_file(site.inbox, dropped)
    tree = site.engine_tree()
    wait_for(
        lambda: read_json(site.inbox / "waits.status")["request_counts"]["completed"] > 100,
        30,
        "requests to be done",
    )
    filler = fill(small_disk / "filler")
    wait_for(lambda: server.events("disk_trouble"), 30, "the service to wait for the disk")

    code, seconds = signal_and_time(server.process, signal.SIGTERM, site.timeout)

    assert_stopped_in_time(code, seconds, site.timeout, server.log())
    assert [pid for pid in tree if not gone(pid)] == []
    for path in filler:
        path.unlink()
    finish_after_restart(site, [dropped])


# -- batchbox run ------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_batchbox_run_stopped_while_the_model_loads_exits_in_time_and_resumes(
    tmp_path: Path, owned: Owned, number: int
) -> None:
    site = Site(tmp_path, owned)
    path = tmp_path / "one.jsonl"
    path.write_bytes(request_file("o", 30))
    stderr = tmp_path / "run.err"
    with open(stderr, "wb") as handle:
        process = subprocess.Popen(
            [BATCHBOX, "-c", str(site.config_path), "run", str(path)],
            stdout=subprocess.PIPE,
            stderr=handle,
            cwd=tmp_path,
        )
    owned.add(process.pid)

    tree = site.engine_tree()

    code, seconds = signal_and_time(process, number, site.timeout)

    said = stderr.read_text(errors="replace")
    assert seconds <= site.timeout + SLACK_SECONDS, said
    assert code == 1, said
    sentences = [line for line in said.splitlines() if line.startswith("batchbox: ")]
    assert len(sentences) == 1 and "run the same file again to resume" in sentences[0], said
    assert [pid for pid in tree if not gone(pid)] == []

    site.gate.touch()
    again = subprocess.run(
        [BATCHBOX, "-c", str(site.config_path), "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "job_resumed" in again.stderr
    assert_every_line_once(path, Path(again.stdout.strip()))
