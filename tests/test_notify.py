"""systemd's notify protocol: `batchbox serve` tells a socket of the test's own, standing in
for systemd, that it is ready, that its loop is alive (the watchdog), what it is doing, and
that it is stopping. And watcher/notify.py on its own, in this process."""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servicekit import (
    Listener,
    Server,
    chat_file,
    drop,
    finished,
    status_of,
    wait_for,
    write_config,
)

from watcher.notify import notify, watchdog_interval

# 40 requests a second: 240 requests run for about six seconds.
SLOW = {"fake_seconds_per_step": 0.05, "fake_batch": 2}
LONG_JOB = 240
WATCHDOG_USEC = "2000000"  # pings every second


@pytest.fixture
def short_folder() -> Iterator[Path]:
    # A socket's path may not be longer than 107 bytes; pytest's folders can be.
    with tempfile.TemporaryDirectory(prefix="notify-") as folder:
        yield Path(folder)


def start_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str, **config
) -> tuple[Server, Listener]:
    config_path = write_config(tmp_path, settle_seconds=0.3, stop_timeout_seconds=5, **config)
    server = Server(config_path)
    inbox = server.config.folder("inbox")
    listener = Listener(address, [inbox / alias for alias in server.config.models])
    # The child inherits these; WATCHDOG_PID cannot name a child not yet started.
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        server.start()
    except BaseException:
        listener.close()
        server.kill()
        raise
    return server, listener


def test_serve_tells_systemd_ready_watchdog_status_and_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_folder: Path
) -> None:
    address = str(short_folder / "notify.sock")
    server, listener = start_under_systemd(tmp_path, monkeypatch, address, engine=SLOW)
    inbox, outbox = server.config.folder("inbox"), server.config.folder("outbox")
    try:
        drop(inbox, "long.jsonl", chat_file(LONG_JOB))
        wait_for(lambda: status_of(inbox / "long.status") == "in_progress", 10, "the job to run")
        run_started = time.monotonic()
        wait_for(lambda: finished(inbox / "long.status", outbox), 30, "the job to finish")
        run_ended = time.monotonic()
        code, _ = server.terminate()
        wait_for(lambda: listener.times("STOPPING=1"), 2, "STOPPING=1")
    finally:
        server.kill()
        listener.close()
    assert code == 0, server.log()

    ready = listener.times("READY=1")
    assert len(ready) == 1 and listener.folders_at_ready, listener.messages[:5]
    assert listener.messages[0][1] == "READY=1", "READY=1 comes before anything else"

    # The watchdog is fed from the main loop while the engine works on the long job.
    assert run_ended - run_started >= 4, "the job ran too briefly to watch the watchdog"
    pings = [moment for moment in listener.times("WATCHDOG=1") if moment >= ready[0]]
    during = [moment for moment in pings if run_started <= moment <= run_ended]
    assert len(during) >= 3, (len(during), run_ended - run_started)
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert max(gaps) < 1.8, gaps  # half of WATCHDOG_USEC, plus a turn of the loop
    assert min(gaps) > 0.8, gaps  # not more often than asked
    assert pings[-1] <= listener.times("STOPPING=1")[0]

    # STATUS= names the running job and how far it got, and the counts grow.
    running = [text for moment, text in listener.texts("STATUS=") if "long.jsonl" in text]
    done = [int(match.group(1)) for text in running if (match := re.search(r"(\d+)/240", text))]
    assert len(done) >= 3, running
    assert done == sorted(done) and done[-1] > done[0], done
    assert any(0 < count < LONG_JOB for count in done), done


def test_serve_speaks_to_an_abstract_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"@batchbox-test-{secrets.token_hex(6)}"
    server, listener = start_under_systemd(tmp_path, monkeypatch, address)
    try:
        wait_for(lambda: len(listener.times("WATCHDOG=1")) >= 2, 5, "two watchdog pings")
        code, _ = server.terminate()
        wait_for(lambda: listener.times("STOPPING=1"), 2, "STOPPING=1")
    finally:
        server.kill()
        listener.close()
    assert code == 0
    assert listener.times("READY=1") and listener.folders_at_ready


# -- watcher/notify.py in this process -------------------------------------------------------


def test_notify_without_a_socket_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(
    monkeypatch: pytest.MonkeyPatch, short_folder: Path
) -> None:
    for address in (str(short_folder / "notify.sock"), f"@batchbox-{secrets.token_hex(6)}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind("\0" + address[1:] if address.startswith("@") else address)
            receiver.settimeout(2)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert notify("STATUS=idle; 0 queued") is True
            assert receiver.recv(4096) == b"STATUS=idle; 0 queued"


def test_notify_to_a_socket_that_is_gone_fails_quietly(
    monkeypatch: pytest.MonkeyPatch, short_folder: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_folder / "nobody-listens.sock"))
    assert notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_the_timeout_for_this_process_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # another process
    assert watchdog_interval() is None
