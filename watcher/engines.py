"""The one engine the appliance keeps: loaded for a model, kept while its jobs follow,
replaced on a switch, and unloaded when idle so the GPU is free for other work."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import structlog

from runner.client import EngineClient, EngineProcess, LoadStopped, LoadWatch, LocalClient
from runner.engines import load_engine
from runner.pace import with_pace
from runner.types import EngineLoadError, ModelSpec

log = structlog.get_logger()


class EngineKeeper:
    def __init__(self, in_process: bool = False) -> None:
        # In-process engines are for tests with the fake backend: no child process to start.
        self.in_process = in_process
        self.spec: ModelSpec | None = None
        self.client: EngineClient | None = None
        self.last_used = time.monotonic()
        # Whether a model's engine should time its pace at load (runner.pace): set by the
        # owner of the benchmark history, for models it has nothing on.
        self.wants_pace: Callable[[ModelSpec], bool] = lambda spec: False

    def client_for(
        self, spec: ModelSpec, watch: LoadWatch | None = None
    ) -> tuple[EngineClient, float]:
        """The engine for `spec` and the seconds spent loading it (0 when it was kept). A
        load follows `watch` and raises what `EngineProcess` raises: LoadStopped,
        EngineLoadDied, EngineLoadError."""
        self.last_used = time.monotonic()
        if self.client is not None and self.spec == spec and self._alive():
            return self.client, 0.0
        self.close()
        watch = watch or LoadWatch()
        if watch.should_stop():
            raise LoadStopped(f"the load of model {spec.alias!r} was stopped before it began")
        started = time.monotonic()

        def loading(pid: int | None) -> None:
            log.info("engine_loading", model=spec.alias, source=spec.source, pid=pid)
            watch.on_start(pid)

        pace = self.wants_pace(spec)
        if self.in_process:
            loading(None)
            watch.on_wait()
            try:
                engine = load_engine(spec)
                self.client = LocalClient(with_pace(engine) if pace else engine)
            except EngineLoadError:
                raise
            except Exception as error:  # as the engine process reports it
                raise EngineLoadError(
                    f"model {spec.alias!r} failed to load: {type(error).__name__}: {error}"
                ) from error
        else:
            self.client = EngineProcess(
                spec, watch=dataclasses.replace(watch, on_start=loading), pace=pace
            )
        self.spec = spec
        seconds = time.monotonic() - started
        log.info("engine_loaded", model=spec.alias, seconds=round(seconds, 2))
        return self.client, seconds

    def _alive(self) -> bool:
        return not isinstance(self.client, EngineProcess) or self.client.alive()

    @property
    def model(self) -> str | None:
        return self.spec.alias if self.client is not None and self.spec else None

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def unload_if_idle(self, idle_seconds: float) -> bool:
        if self.client is None or time.monotonic() - self.last_used < idle_seconds:
            return False
        log.info("engine_unloaded", model=self.model, reason="idle")
        self.close()
        return True

    def close(self, timeout: float = 10.0) -> None:
        if isinstance(self.client, EngineProcess):
            if not self.client.alive() and self.client.death is None:
                # Killed or crashed between jobs, with nothing in it: said, and replaced.
                reason = self.client.ended()
                log.warning("engine_died", model=self.model, reason=reason, in_engine=0)
            self.client.close(timeout)
        elif self.client is not None:
            self.client.close()
        self.client = None
        self.spec = None
