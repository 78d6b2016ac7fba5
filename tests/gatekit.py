"""A service in this process whose engine opens only when the test says so: a job that has
been taken and handed to the worker stays unfinished for exactly as long as a test needs,
whatever the speed of the machine."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from servicekit import Harness, write_config

from runner.client import EngineClient, LoadWatch
from runner.types import EngineLoadError, ModelSpec
from watcher.config import load_config
from watcher.engines import EngineKeeper
from watcher.service import Service

GATE_SECONDS = 120.0  # a gate the test forgot to open fails the job rather than hang


class GatedEngines(EngineKeeper):
    """The in-process fake engine, handed out only once the gate is open."""

    def __init__(self) -> None:
        super().__init__(in_process=True)
        self.gate = threading.Event()
        self.asked = threading.Event()  # a job is waiting at the gate

    def client_for(
        self, spec: ModelSpec, watch: LoadWatch | None = None
    ) -> tuple[EngineClient, float]:
        self.asked.set()
        if not self.gate.wait(GATE_SECONDS):
            raise EngineLoadError("the test never opened the gate")
        return super().client_for(spec, watch)


def start_gated(root: Path, **overrides: Any) -> tuple[Harness, GatedEngines]:
    root.mkdir(parents=True, exist_ok=True)
    config = load_config(write_config(root, **overrides))
    engines = GatedEngines()
    service = Service(config, engines=engines)
    service.start()
    return Harness(config=config, service=service, engines=engines), engines


def stop_gated(harness: Harness, engines: GatedEngines) -> None:
    engines.gate.set()
    harness.service.stop()
    harness.service.shutdown()
