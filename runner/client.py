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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from runner.engines import load_engine
from runner.feeding import COUNTERS_SECONDS, add_all
from runner.pace import with_pace
from runner.types import (
    Engine,
    EngineInfo,
    EngineLoadDied,
    EngineLoadError,
    EngineOutput,
    EngineRequest,
    ModelSpec,
)

LOAD_TIMEOUT_SECONDS = 1800.0
LOAD_POLL_SECONDS = 0.5  # how often a load is asked whether to go on, and reported on


class EngineDied(Exception):
    """The engine process ended while requests were in it."""

    in_engine: list[str] = []  # filled in by the runner: the requests the engine held


class LoadStopped(Exception):
    """The caller stopped a load (the service stops, the job was cancelled); the engine
    process and everything it started are ended."""


@dataclass
class LoadWatch:
    """How the one waiting for a load follows it: `on_start` gets the engine process's pid,
    `on_wait` is called at once and then about every LOAD_POLL_SECONDS while the model
    loads, and `should_stop` is asked as often."""

    should_stop: Callable[[], bool] = lambda: False
    on_wait: Callable[[], None] = lambda: None
    on_start: Callable[[int], None] = lambda pid: None


class EngineClient(Protocol):
    info: EngineInfo

    def submit(self, requests: list[EngineRequest]) -> None: ...

    def poll(self, timeout: float) -> list[EngineOutput]:
        """Finished outputs, waiting up to `timeout` seconds for the first one."""

    def abort(self, keys: list[str]) -> None: ...

    def counters(self) -> tuple[int, int]:
        """Prompt and completion tokens the engine has processed since it loaded."""

    def close(self) -> None: ...


class LocalClient:
    """Drives an engine in this process; for tests and for the fake engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.ready: list[EngineOutput] = []

    def submit(self, requests: list[EngineRequest]) -> None:
        add_all(self.engine, requests, self.ready)

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
    except EngineLoadDied as error:  # a process it started was killed: worth another try
        connection.send(("died", str(error), None))
        return
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
                add_all(engine, payload, ready)
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

    def __init__(
        self,
        spec: ModelSpec,
        load_timeout: float = LOAD_TIMEOUT_SECONDS,
        watch: LoadWatch | None = None,
        pace: bool = False,
    ) -> None:
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
        self.info = self._wait_ready(load_timeout, watch or LoadWatch())

    def _wait_ready(self, timeout: float, watch: LoadWatch) -> EngineInfo:
        """The loaded engine's info. Raises LoadStopped when the watch says stop,
        EngineLoadDied when the process ended without a word (a signal, the OOM killer),
        and EngineLoadError when the model reported it cannot load."""
        alias = self.spec.alias
        deadline = time.monotonic() + timeout
        self._follow(watch.on_start, self.process.pid)
        while True:
            if self._follow(watch.should_stop):
                self.close(0)
                raise LoadStopped(f"the load of model {alias!r} was stopped")
            self._follow(watch.on_wait)
            message = self._receive(LOAD_POLL_SECONDS)
            if message is not None:
                break
            if time.monotonic() >= deadline:
                self.close(0)
                raise EngineLoadError(f"model {alias!r} did not load within {timeout:.0f} s")
        kind, payload, counters = message
        if kind == "ready":
            # Counted from here: a job's progress must not include the pace probe's tokens.
            self.latest_counters = counters
            return payload
        if kind == "ended":
            self.process.join(5)
            payload = _how_it_ended(self.process.exitcode)
        self.close(0)
        if kind == "failed":
            raise EngineLoadError(f"model {alias!r} failed to load: {payload}")
        raise EngineLoadDied(f"the engine for model {alias!r} died while loading ({payload})")

    def _follow(self, call: Callable, *args: object) -> object:
        """Call one of the watch's hooks; whatever it raises (a full disk under a sidecar),
        the load does not linger."""
        try:
            return call(*args)
        except BaseException:
            self.close(0)
            raise

    def _receive(self, timeout: float) -> tuple[str, Any, Any] | None:
        """The engine's word during its load (kind, payload, counters), ("ended", None,
        None) once it is gone without one, or None while it goes on loading."""
        try:
            if self.connection.poll(timeout):
                return self.connection.recv()
        except (EOFError, OSError):
            return "ended", None, None  # it closed its end: it is gone, or going
        if self.process.is_alive():
            return None
        try:  # it may have said why just before it ended
            if self.connection.poll(0):
                return self.connection.recv()
        except (EOFError, OSError):
            pass
        return "ended", None, None

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

    def _descendants(self) -> list[psutil.Process]:
        """What the engine process started and still holds, found while it runs: a process
        that left its group (a session of its own) is found only this way."""
        if self.process.exitcode is not None:
            return []  # reaped: its pid may already be someone else's
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _reap(self, descendants: list[psutil.Process] = ()) -> None:
        """End what the engine process left behind. vLLM's engine core, in a process of its
        own unless VLLM_ENABLE_V1_MULTIPROCESSING is 0, outlives a killed parent and keeps
        its GPU memory, so the next engine could not load; it is in this group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group
        for process in descendants:
            try:
                process.kill()  # psutil checks it is still the same process first
            except psutil.Error:
                pass  # ended meanwhile

    def kill(self) -> None:
        """End the engine process, its group and whatever it started, at once, from any
        thread (the one that owns this client reaps it and closes the pipe)."""
        descendants = self._descendants()
        if self.process.exitcode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(descendants)

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
        """Ask the engine to end, wait up to `timeout` seconds, then kill what is left."""
        descendants = self._descendants()
        if self.process.is_alive() and timeout > 0:
            try:
                self.connection.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._reap(descendants)
        self.connection.close()


def _how_it_ended(exit_code: int | None) -> str:
    if exit_code is None:
        return "it did not end in time"
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"
