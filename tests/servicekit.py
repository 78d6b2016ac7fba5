"""Shared helpers for the service tests: a config with the fake engine, request lines, a way
to drive the service in-process tick by tick or as a real `batchbox serve` process, and
readers for what lands in the inbox and the outbox."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from processes import kill_popen_tree

from watcher.config import Config, load_config
from watcher.engines import EngineKeeper
from watcher.service import Service

BATCHBOX = str(Path(sys.executable).parent / "batchbox")
OUTBOX_FILES = {"results.jsonl", "errors.jsonl", "input.jsonl", "status.json", "benchmark.json"}
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def write_config(root: Path, **overrides: Any) -> Path:
    """A config for the fake engine in `root`; `engine=` sets the fake engine's options for
    both models, any other keyword overrides a top-level key."""
    engine = overrides.pop("engine", {})
    settings: dict[str, Any] = {
        "settle_seconds": 0.3,
        "rescan_seconds": 1,
        "stop_timeout_seconds": 10,
        "idle_unload_seconds": 600,
        "min_free_bytes": 0,
        "default_model": "fake",
        "models": {
            "fake": {"path": "models/fake", "backend": "fake", "engine": dict(engine)},
            "other": {"path": "models/other", "backend": "fake", "engine": dict(engine)},
            "embedder": {"path": "models/embedder", "backend": "fake", "runner": "pooling"},
        },
    }
    settings.update(overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def chat_line(custom_id: str, text: str = "Hello there", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 16, **body},
    }


def embedding_line(custom_id: str, text: str = "Hello there") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS, "body": {"input": text}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_file(count: int, prefix: str = "q", **body: Any) -> bytes:
    return jsonl(
        [chat_line(f"{prefix}{index}", f"question {index}", **body) for index in range(count)]
    )


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Drop a file the way a careful uploader does: write a `.part`, then rename it in."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{name}.part"
    part.write_bytes(data)
    final = folder / name
    os.rename(part, final)
    return final


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def status_of(path: Path) -> str | None:
    """The state in a `.status` sidecar, or None when there is none (yet)."""
    try:
        return read_json(path)["status"]
    except FileNotFoundError:
        return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


FINAL = ("completed", "failed", "cancelled")


def finished(path: Path, outbox: Path) -> bool:
    """The `.status` sidecar is final and names an outbox folder that is there."""
    try:
        document = read_json(path)
    except FileNotFoundError:
        return False
    if document.get("status") not in FINAL or not document.get("outbox"):
        return False
    return (outbox / document["outbox"] / "status.json").is_file()


@dataclass
class Delivered:
    """One outbox folder, read back."""

    folder: Path
    status: dict[str, Any]
    results: list[dict[str, Any]]
    errors: list[dict[str, Any]]

    @property
    def custom_ids(self) -> list[str | None]:
        return [record["custom_id"] for record in self.results + self.errors]


def delivered(folder: Path) -> Delivered:
    names = {path.name for path in folder.iterdir()}
    missing = OUTBOX_FILES - names
    assert not missing, f"{folder} lacks {sorted(missing)}"
    return Delivered(
        folder=folder,
        status=read_json(folder / "status.json"),
        results=read_jsonl(folder / "results.jsonl"),
        errors=read_jsonl(folder / "errors.jsonl"),
    )


def assert_each_line_once(result: Delivered, input_ids: list[str]) -> None:
    """Every request line is in exactly one of results.jsonl and errors.jsonl, once."""
    assert sorted(result.custom_ids) == sorted(input_ids)


def outbox_folder(config: Config, status_path: Path) -> Path:
    """The outbox folder a finished job's `.status` sidecar points at."""
    return config.folder("outbox") / read_json(status_path)["outbox"]


# -- in-process --------------------------------------------------------------------------


@dataclass
class Harness:
    """A service driven tick by tick in this process, with the fake engine in-process too."""

    config: Config
    service: Service
    engines: EngineKeeper

    @property
    def inbox(self) -> Path:
        return self.config.folder("inbox")

    @property
    def outbox(self) -> Path:
        return self.config.folder("outbox")

    def run_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        return run_until(self.service, predicate, timeout)

    def tick_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self.run_until(lambda: time.monotonic() >= deadline, seconds + 1)

    def drop_and_finish(self, name: str, data: bytes, folder: Path | None = None) -> Delivered:
        """Drop a file and turn the loop until its job is delivered; the outbox folder."""
        folder = folder or self.inbox
        status = folder / f"{Path(name).stem}.status"
        earlier = read_json(status).get("id") if status.exists() else None  # a finished one
        drop(folder, name, data)
        outbox = self.outbox

        def delivered_now() -> Path | None:
            # One read of the sidecar: two could see the earlier job's final status, then
            # the new job's first.
            try:
                document = read_json(status)
            except (FileNotFoundError, ValueError):
                return None
            if document.get("id") == earlier or document.get("status") not in FINAL:
                return None
            place = document.get("outbox")
            if not place or not (outbox / place / "status.json").is_file():
                return None
            return outbox / place

        return delivered(self.run_until(delivered_now, 15))


def start_service(root: Path, **overrides: Any) -> Harness:
    config = load_config(write_config(root, **overrides))
    engines = EngineKeeper(in_process=True)
    service = Service(config, engines=engines)
    service.start()
    return Harness(config=config, service=service, engines=engines)


def stop_service(harness: Harness) -> None:
    harness.service.stop()
    harness.service.shutdown()


def run_until(service: Service, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Turn the service's loop until `predicate` holds; its value, or an AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        service.tick()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the service did not get there within {timeout} s")
        time.sleep(0.005)


# -- watching a sidecar -----------------------------------------------------------------


@dataclass
class SidecarWatch:
    """Reads a sidecar in a tight loop on a thread: the states seen, and any torn read."""

    path: Path
    states: list[str] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)
    torn: list[bytes] = field(default_factory=list)
    reads: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> SidecarWatch:
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.stop.is_set():
            self._read_once()

    def _read_once(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        self.reads += 1
        try:
            document = json.loads(data)
        except ValueError:
            self.torn.append(data)
            return
        state = document.get("status") if "status" in document else "eta"
        if not self.documents or document != self.documents[-1]:
            self.documents.append(document)
        if not self.states or self.states[-1] != state:
            self.states.append(state)

    def finish(self) -> SidecarWatch:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self._read_once()  # the last state, which the thread may not have reached in time
        return self


# -- a real `batchbox serve` -------------------------------------------------------------


class Server:
    """`batchbox -c CONFIG serve` as a child process, with its log in a file (appended to
    across restarts), optionally started through a `prefix` command such as setpriv."""

    def __init__(
        self, config_path: Path, log_name: str = "serve.log", prefix: tuple[str, ...] = ()
    ) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.log_path = config_path.parent / log_name
        self.prefix = prefix
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Server:
        """Start it and wait for this start's `service_ready`."""
        before = self.log().count("service_ready")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, BATCHBOX, "-c", str(self.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
            )
        wait_for(lambda: self.ready(before), timeout, "batchbox serve to be ready")
        return self

    def ready(self, before: int = 0) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"batchbox serve exited early:\n{self.log()[-4000:]}")
        return self.log().count("service_ready") > before

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit status and how long the stop took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(self.config.stop_timeout_seconds + 5)
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL it with its whole tree: the engine and whatever the engine started."""
        if self.process is not None:
            kill_popen_tree(self.process)


def batchbox(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BATCHBOX, "-c", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Listener:
    """An AF_UNIX datagram socket where systemd's would be: every message, with when it
    came. At READY=1 it looks whether the inbox's model folders exist yet."""

    def __init__(self, address: str, model_folders: list[Path] | None = None) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(0.1)
        self.model_folders = model_folders or []
        self.messages: list[tuple[float, str]] = []
        self.folders_at_ready: bool | None = None
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.closing.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            arrived = time.monotonic()
            for message in data.decode().splitlines():
                if message == "READY=1":
                    self.folders_at_ready = all(path.is_dir() for path in self.model_folders)
                self.messages.append((arrived, message))

    def close(self) -> None:
        self.closing.set()
        self.thread.join(2)
        self.socket.close()

    def times(self, message: str) -> list[float]:
        return [moment for moment, text in self.messages if text == message]

    def pings_since(self, moment: float) -> int:
        return sum(1 for at in self.times("WATCHDOG=1") if at > moment)

    def texts(self, prefix: str) -> list[tuple[float, str]]:
        return [(moment, text) for moment, text in self.messages if text.startswith(prefix)]
