"""How the runner talks to an engine: in this process (tests), or in a child process.

The GPU lives in a child process because vLLM does not reliably give GPU memory back when
its engine is deleted; ending the process is the one release that always works. Both
clients offer the same four calls, so the runner cannot tell them apart.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Protocol

from runner.engines import load_engine
from runner.pace import with_pace
from runner.types import (
    Engine,
    EngineInfo,
    EngineLoadError,
    EngineOutput,
    EngineRequest,
    ModelSpec,
    RequestRejected,
)

COUNTERS_SECONDS = 0.5  # how often an engine that finishes nothing still reports progress


class EngineDied(Exception):
    """The engine process ended while requests were in it."""

    in_engine: list[str] = []  # filled in by the runner: the requests the engine held


class EngineClient(Protocol):
    info: EngineInfo

    def submit(self, requests: list[EngineRequest]) -> None: ...

    def poll(self, timeout: float) -> list[EngineOutput]:
        """Finished outputs, waiting up to `timeout` seconds for the first one."""

    def abort(self, keys: list[str]) -> None: ...

    def counters(self) -> tuple[int, int]:
        """Prompt and completion tokens the engine has processed since it loaded."""

    def close(self) -> None: ...


def _rejected(request: EngineRequest, error: RequestRejected) -> EngineOutput:
    return EngineOutput(request.key, 0, error_code=error.code, error_message=error.message)


def _add_all(engine: Engine, requests: list[EngineRequest], ready: list[EngineOutput]) -> None:
    for request in requests:
        try:
            engine.add(request)
        except RequestRejected as error:
            ready.append(_rejected(request, error))


class LocalClient:
    """Drives an engine in this process; for tests and for the fake engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.ready: list[EngineOutput] = []

    def submit(self, requests: list[EngineRequest]) -> None:
        _add_all(self.engine, requests, self.ready)

    def poll(self, timeout: float) -> list[EngineOutput]:
        outputs, self.ready = self.ready, []
        if self.engine.has_unfinished():
            outputs += self.engine.step()
        elif not outputs and timeout:
            time.sleep(min(timeout, 0.01))
        return outputs

    def abort(self, keys: list[str]) -> None:
        self.engine.abort(keys)

    def counters(self) -> tuple[int, int]:
        return self.engine.counters()

    def close(self) -> None:
        self.engine.close()


def _child_main(spec: ModelSpec, connection, pace: bool = False) -> None:
    # A process group of its own: vLLM's engine core and workers, started from here, join
    # it, and the parent ends the whole group once this process is gone (see _reap).
    os.setpgid(0, 0)
    # vLLM logs to standard output; the parent's standard output is for its own answers
    # (`batchbox run` prints the outbox folder, `serve` prints JSON log lines).
    os.dup2(2, 1)
    os.environ.update(spec.environment)
    try:
        engine = load_engine(spec)
        if pace:  # the engine's pace, timed before it takes work (runner.pace)
            engine = with_pace(engine)
    except Exception as error:  # anything at load is reported to the parent in words
        connection.send(("failed", f"{type(error).__name__}: {error}", None))
        return
    counters = engine.counters()
    connection.send(("ready", engine.info, counters))
    inbox: queue.Queue = queue.Queue()

    def receive() -> None:
        # A thread drains the pipe so that the parent never blocks on a send while this
        # process is busy stepping or blocked sending outputs back.
        while True:
            try:
                inbox.put(connection.recv())
            except (EOFError, OSError):
                inbox.put(("close", None))
                return

    threading.Thread(target=receive, daemon=True).start()
    ready: list[EngineOutput] = []
    last_counters = 0.0
    while True:
        busy = engine.has_unfinished() or ready
        try:
            message = inbox.get_nowait() if busy else inbox.get()
        except queue.Empty:
            message = None
        while message is not None:
            kind, payload = message
            if kind == "close":
                engine.close()
                return
            if kind == "submit":
                _add_all(engine, payload, ready)
            elif kind == "abort":
                engine.abort(payload)
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                message = None
        if engine.has_unfinished():
            ready += engine.step()
        # Outputs go back after every step, the token counters at most every
        # COUNTERS_SECONDS: reading vLLM's metrics takes about 2.4 ms (measured here), a
        # tenth of a decode step on a GPU.
        if time.monotonic() - last_counters >= COUNTERS_SECONDS:
            counters = engine.counters()
            last_counters = time.monotonic()
        elif not ready:
            continue
        connection.send(("outputs", ready, counters))
        ready = []


class EngineProcess:
    """An engine in a child process, kept while jobs for its model follow."""

    def __init__(self, spec: ModelSpec, load_timeout: float = 1800.0, pace: bool = False) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        # Not a daemon: vLLM starts processes of its own, which a daemon may not. The child
        # still ends with this process: it reads end-of-file on the pipe and exits.
        self.process = context.Process(
            target=_child_main, args=(spec, child_end, pace), name=f"engine-{spec.alias}"
        )
        self.process.start()
        child_end.close()
        self.spec = spec
        self.death: str | None = None  # why it ended, once that is known
        self.latest_counters = (0, 0)
        self.info = self._wait_ready(load_timeout)

    def _wait_ready(self, timeout: float) -> EngineInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connection.poll(0.5):
                try:
                    kind, payload, counters = self.connection.recv()
                except EOFError:
                    break
                if kind == "ready":
                    # Counted from here: a job's progress must not include the probe's tokens.
                    self.latest_counters = counters
                    return payload
                self.close()
                raise EngineLoadError(f"model {self.spec.alias!r} failed to load: {payload}")
            if not self.process.is_alive():
                break
        self.close()
        raise EngineLoadError(
            f"the engine for model {self.spec.alias!r} ended while loading "
            f"(exit code {self.process.exitcode})"
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def submit(self, requests: list[EngineRequest]) -> None:
        try:
            self.connection.send(("submit", requests))
        except (BrokenPipeError, OSError) as error:
            raise EngineDied(self.ended()) from error

    def poll(self, timeout: float) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        try:
            wait = timeout
            while self.connection.poll(wait):
                kind, payload, counters = self.connection.recv()
                if kind == "outputs":
                    outputs += payload
                    self.latest_counters = counters
                wait = 0
        except (EOFError, OSError) as error:
            raise EngineDied(self.ended()) from error
        if not outputs and not self.process.is_alive():
            raise EngineDied(self.ended())
        return outputs

    def _reap(self) -> None:
        """End what the engine process left behind. vLLM's engine core, in a process of its
        own unless VLLM_ENABLE_V1_MULTIPROCESSING is 0, outlives a killed parent and keeps
        its GPU memory, so the next engine could not load; it is in this group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    def ended(self) -> str:
        """Why the engine process is gone, once it is; what it left behind is ended too."""
        self.process.join(timeout=5)
        self._reap()
        self.death = (
            f"the engine process for {self.spec.alias!r} ended (exit code {self.process.exitcode})"
        )
        return self.death

    def counters(self) -> tuple[int, int]:
        return self.latest_counters

    def abort(self, keys: list[str]) -> None:
        try:
            self.connection.send(("abort", keys))
        except (BrokenPipeError, OSError):
            pass  # a dead engine has nothing left to abort

    def close(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._reap()
        self.connection.close()
