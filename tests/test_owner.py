"""One owner of the state folder (SPEC §11): a second `batchbox serve` exits 1 at once naming
the first; `batchbox run` and `bench` refuse while the service runs; a service started while
a `run` works waits for it (telling systemd), and never adopts a run's job. Real processes,
real signals, the fake engine at a slow step (1,500 lines, 0.3 s a step)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import assert_every_line_once
from servicekit import BATCHBOX, Server, chat_file, drop, finished, wait_for, write_config

from watcher.errors import CommandFailed, StartError
from watcher.owner import (
    LOCK_NAME,
    StateBusy,
    hold_for_command,
    take_state,
    wait_for_state,
)

SLOW = {"fake_seconds_per_step": 0.3}
LINES = 1500


@pytest.fixture
def site(tmp_path: Path) -> Path:
    config = write_config(tmp_path, engine=SLOW)
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "big.jsonl").write_bytes(chat_file(LINES))
    return config


class Processes:
    """Every process a test starts here, killed at its end whatever happened."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def run(self, config: Path, *args: str, log: str | None = None, **extra) -> subprocess.Popen:
        output = open(config.parent / log, "ab") if log else subprocess.PIPE
        process = subprocess.Popen(
            [BATCHBOX, "-c", str(config), *args],
            stdout=output,
            stderr=subprocess.STDOUT if log else subprocess.PIPE,
            cwd=config.parent,
            **extra,
        )
        if log:
            output.close()
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.wait(10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    owned = Processes()
    try:
        yield owned
    finally:
        owned.close()


def events(log_path: Path, name: str) -> list[dict]:
    found = []
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def run_results(site: Path) -> int:
    """Result lines the journal of a `batchbox run` holds so far (wherever it keeps it)."""
    journals = (site.parent / "state").glob("*/*/out/results.jsonl")
    return sum(path.read_bytes().count(b"\n") for path in journals)


def assert_once(site: Path, folder: str = "big") -> None:
    results, errors = assert_every_line_once(
        site.parent / "drop" / "big.jsonl", site.parent / "outbox" / folder
    )
    assert (len(results), len(errors)) == (LINES, 0)


# -- the lock in this process -----------------------------------------------------------


def test_the_lock_says_who_holds_it_and_is_free_once_released(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = take_state(state, "serve")
    with pytest.raises(StateBusy) as busy:
        take_state(state, "run")
    assert (busy.value.holder.pid, busy.value.holder.command) == (os.getpid(), "serve")
    assert json.loads((state / LOCK_NAME).read_bytes())["pid"] == os.getpid()
    with pytest.raises(CommandFailed, match=rf"the service is running \(pid {os.getpid()}\)"):
        hold_for_command(state, tmp_path / "inbox", "run")
    with pytest.raises(StartError, match=f"another batchbox serve \\(pid {os.getpid()}\\)"):
        wait_for_state(state, threading.Event())
    lock.release()
    assert (state / LOCK_NAME).read_bytes() == b""  # no note names a process that let go
    take_state(state, "run").release()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A child forked while the lock is held (a library's worker, say) must not hold it on
    after this process lets go or dies."""
    state = tmp_path / "state"
    lock = take_state(state, "serve")
    started_reader, started_writer = os.pipe()
    end_reader, end_writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child says it runs, then waits, holding whatever it inherited
        os.write(started_writer, b"x")
        os.read(end_reader, 1)
        os._exit(0)
    try:
        assert os.read(started_reader, 1) == b"x"
        lock.release()
        take_state(state, "serve").release()
    finally:
        os.write(end_writer, b"x")
        os.waitpid(child, 0)
        for descriptor in (started_reader, started_writer, end_reader, end_writer):
            os.close(descriptor)


# -- real processes -----------------------------------------------------------------------


def test_a_second_service_on_one_state_exits_1_naming_the_first(
    site: Path, processes: Processes
) -> None:
    first = Server(site).start()
    try:
        second = processes.run(site, "serve")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1, err
        sentences = [line for line in err.decode().splitlines() if not line.startswith("{")]
        assert len(sentences) == 1 and f"(pid {first.process.pid})" in sentences[0], err
        assert first.process.poll() is None
        code, _ = first.terminate()
        assert code == 0
    finally:
        first.kill()


def test_serve_then_run_the_run_refuses_and_the_inbox_takes_the_file(
    site: Path, processes: Processes
) -> None:
    server = Server(site).start()
    try:
        source = site.parent / "drop" / "big.jsonl"
        before = source.read_bytes()
        for command in (["run", str(source)], ["bench", "fake"]):
            refused = processes.run(site, *command)
            _, err = refused.communicate(timeout=60)
            assert refused.returncode == 1, err
            sentences = [line for line in err.decode().splitlines() if not line.startswith("{")]
            expected = f"batchbox: the service is running (pid {server.process.pid}): drop"
            assert len(sentences) == 1 and sentences[0].startswith(expected), err
        assert source.read_bytes() == before
        runs = site.parent / "state" / "runs"
        assert not runs.exists() or not any(runs.iterdir())

        inbox, outbox = server.config.folder("inbox"), server.config.folder("outbox")
        drop(inbox, "big.jsonl", before)
        wait_for(lambda: finished(inbox / "big.status", outbox), 120, "the dropped file")
        code, _ = server.terminate()
        assert code == 0
    finally:
        server.kill()
    assert_once(site)


def test_run_then_serve_the_service_waits_then_starts_and_adopts_nothing(
    site: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = processes.run(site, "run", str(site.parent / "drop" / "big.jsonl"), log="run.log")
    wait_for(lambda: run_results(site) > 0 or run.poll() is not None, 60, "the run to work")
    assert run.poll() is None, (site.parent / "run.log").read_text()
    os.kill(run.pid, signal.SIGSTOP)  # the run holds the lock for as long as the test needs

    # A service started now waits, and SIGTERM ends the wait at once.
    waiting = processes.run(site, "serve", log="serve1.log")
    log1 = site.parent / "serve1.log"
    wait_for(lambda: events(log1, "service_waiting"), 60, "the first service to wait")
    assert events(log1, "service_waiting")[0]["pid"] == run.pid
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(Server(site).config.stop_timeout_seconds + 1) == 0
    assert not events(log1, "service_ready")

    # Under systemd the wait is said in STATUS= and the start timeout is extended.
    with tempfile.TemporaryDirectory(prefix="owner-") as short:
        address = str(Path(short) / "notify.sock")
        messages: list[str] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            listener.settimeout(60)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            serve = processes.run(site, "serve", log="serve2.log")
            while not any(text.startswith("EXTEND_TIMEOUT_USEC=") for text in messages):
                messages.append(listener.recv(4096).decode())
            os.kill(run.pid, signal.SIGCONT)
            assert run.wait(120) == 0, (site.parent / "run.log").read_text()
            while "READY=1" not in messages:
                messages.append(listener.recv(4096).decode())
    assert f"STATUS=waiting for batchbox run (pid {run.pid}) to finish before starting" in (
        messages
    )
    assert messages.index("READY=1") > messages.index("EXTEND_TIMEOUT_USEC=60000000")

    log2 = site.parent / "serve2.log"
    for event in ("job_recovered", "job_claimed", "job_started", "run_job_handed_back"):
        assert not events(log2, event), event
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    assert_once(site)


def test_a_stopped_run_is_resumed_by_run_and_never_by_the_service(
    site: Path, processes: Processes
) -> None:
    source = str(site.parent / "drop" / "big.jsonl")
    run = processes.run(site, "run", source, log="run.log")
    wait_for(lambda: run_results(site) > 0 or run.poll() is not None, 60, "the run to work")
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 1
    assert "run the same file again to resume" in (site.parent / "run.log").read_text()
    done = run_results(site)
    assert 0 < done < LINES

    def serve_once(log: str) -> Server:
        server = Server(site)
        server.log_path = site.parent / log
        try:
            server.start()
            code, _ = server.terminate()
        finally:
            server.kill()
        assert code == 0
        return server

    server = serve_once("serve1.log")
    assert not server.events("job_recovered") and not server.events("job_started")
    runs = site.parent / "state" / "runs"
    [work] = list(runs.iterdir())

    # Where an older batchbox kept a run's job: in the service's spool. Handed back.
    (site.parent / "state" / "jobs" / work.name).parent.mkdir(exist_ok=True)
    os.rename(work, site.parent / "state" / "jobs" / work.name)
    server = serve_once("serve2.log")
    assert [event["job"] for event in server.events("run_job_handed_back")] == [work.name]
    assert not server.events("job_recovered") and not server.events("job_started")
    assert [path.name for path in runs.iterdir()] == [work.name]
    assert run_results(site) == done  # nothing ran meanwhile
    assert not (site.parent / "outbox" / "big").exists()

    again = processes.run(site, "run", source, log="run2.log")
    assert again.wait(180) == 0, (site.parent / "run2.log").read_text()
    assert events(site.parent / "run2.log", "job_resumed")
    assert_once(site)
