"""Helpers for the API tests: a config with the fake engine and an `api:` section, keys made
with `batchbox key add`, and `batchbox api` and `batchbox serve` as child processes whose
whole process trees the fixtures kill at the end, passed or failed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from openai import OpenAI
from servicekit import BATCHBOX, batchbox, chat_line, jsonl, wait_for, write_config

from watcher.config import Config, load_config

SLOW = {"fake_seconds_per_step": 0.2, "fake_batch": 1}  # five requests a second


def api_config(root: Path, api: dict[str, Any] | None = None, **overrides: Any) -> Path:
    """servicekit's fake-engine config with an API listening on a free port."""
    settings = {"listen": "127.0.0.1:0", "header_timeout_seconds": 5, "body_timeout_seconds": 5}
    settings.update(api or {})
    return write_config(root, api=settings, **overrides)


def make_key(config_path: Path, name: str) -> str:
    result = batchbox(config_path, "key", "add", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def kill_tree(process: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process and every process below it, and wait until all have ended."""
    if process is None or process.poll() is not None:
        return
    try:
        family = [psutil.Process(process.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(family, timeout=30)
    process.wait(30)


class Child:
    """`batchbox -c CONFIG <command>` in the background, its log in a file of its own."""

    def __init__(self, config_path: Path, command: str) -> None:
        self.config_path = config_path
        self.command = command
        self.log_path = config_path.parent / f"{command}.log"
        self.process: subprocess.Popen | None = None

    def start(self, ready: str, timeout: float = 60.0) -> Child:
        before = self.log().count(f'"{ready}"')
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [BATCHBOX, "-c", str(self.config_path), self.command],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
            )

        def started() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"batchbox {self.command} exited early:\n{self.log()[-3000:]}")
            return self.log().count(f'"{ready}"') > before

        wait_for(started, timeout, f"batchbox {self.command} to be ready")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_tree(self.process, sig)


@dataclass
class Appliance:
    """A site: config, keys, and the API (and the service, when a test needs it) running."""

    root: Path
    config_path: Path
    keys: dict[str, str] = field(default_factory=dict)
    api: Child | None = None
    serve: Child | None = None

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def inbox(self) -> Path:
        return self.config.folder("inbox")

    @property
    def outbox(self) -> Path:
        return self.config.folder("outbox")

    @property
    def state(self) -> Path:
        return self.config.folder("state") / "api"

    @property
    def base_url(self) -> str:
        assert self.api is not None
        return self.api.events("api_ready")[-1]["url"]

    @property
    def origin(self) -> str:
        return self.base_url.removesuffix("/v1")

    def key(self, name: str = "alice") -> str:
        if name not in self.keys:
            self.keys[name] = make_key(self.config_path, name)
        return self.keys[name]

    def client(self, name: str = "alice", **options: Any) -> OpenAI:
        options.setdefault("max_retries", 0)
        return OpenAI(
            base_url=self.base_url,
            api_key=self.key(name),
            _strict_response_validation=True,
            **options,
        )

    def start_api(self) -> Appliance:
        self.api = Child(self.config_path, "api").start("api_ready")
        return self

    def start_serve(self) -> Appliance:
        self.serve = Child(self.config_path, "serve").start("service_ready")
        return self

    def stop(self) -> None:
        for child in (self.api, self.serve):
            if child is not None:
                child.kill()


@contextmanager
def appliance(
    root: Path, serve: bool = False, api: dict[str, Any] | None = None, **overrides: Any
) -> Iterator[Appliance]:
    site = Appliance(root=root, config_path=api_config(root, api, **overrides))
    try:
        site.key("alice")
        site.start_api()
        if serve:
            site.start_serve()
        yield site
    finally:
        site.stop()


def chat_requests(count: int, prefix: str = "q", **body: Any) -> bytes:
    return jsonl(
        [chat_line(f"{prefix}{index}", f"question {index}", **body) for index in range(count)]
    )


def poll(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 120.0, what: str = ""
) -> Any:
    """Call `fetch` until `done` holds for its value; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'a condition'}: last {value!r}")
        time.sleep(0.1)


FINISHED = ("completed", "failed", "cancelled", "expired")


def finish(client: OpenAI, batch_id: str, timeout: float = 120.0) -> Any:
    return poll(
        lambda: client.batches.retrieve(batch_id),
        lambda batch: batch.status in FINISHED,
        timeout,
        f"batch {batch_id} to finish",
    )


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def outputs(client: OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The batch's output and error files, read through the API."""
    results = (
        lines_of(client.files.content(batch.output_file_id).text) if batch.output_file_id else []
    )
    errors = lines_of(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return results, errors


def leftovers(site: Appliance) -> list[str]:
    """What an interrupted upload or creation may have left: anything in state/api/tmp and
    any temporary in the inbox."""
    found = [str(path) for path in (site.state / "tmp").iterdir()]
    found += [path.name for path in site.inbox.iterdir() if path.name.startswith(".api-")]
    return found
