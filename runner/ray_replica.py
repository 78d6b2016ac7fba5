"""One replica of a model on a Ray cluster: the runner's own engine adapter, in a Ray actor.

The driver (runner.ray_engine) makes this class a Ray actor with the replica's resources and
the model's environment. Inside, it is the same `Engine` the local path runs (`VllmEngine`,
or `FakeEngine` for tests), so its `EngineOutput`s, and the result lines built from them,
are the local path's. It is plain Python: the driver makes it an actor, and Ray ships it to
the nodes with the rest of `runner`.
"""

from __future__ import annotations

import os
import time

from runner.feeding import COUNTERS_SECONDS, add_all
from runner.types import (
    Engine,
    EngineInfo,
    EngineLoadError,
    EngineOutput,
    EngineRequest,
    ModelSpec,
)


class Replica:
    """Hosts one engine. Ray runs its calls one at a time, in the order the driver sent them,
    so `add`, `abort` and `advance` never overlap and never need a lock."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.ready: list[EngineOutput] = []  # rejections, returned by the next advance
        self.latest_counters = (0, 0)
        self.counted_at = 0.0

    def load(self, spec: ModelSpec) -> tuple[str, EngineInfo | str]:
        """Load the engine: ("ready", its info), or ("failed", why in one sentence).

        Loading here rather than in the constructor lets a failed load come back as a value
        with its reason, where a failed actor constructor comes back as a long traceback."""
        os.environ.update(spec.environment)
        try:
            self.engine = load_inner_engine(spec)
        except Exception as error:  # noqa: BLE001 - every load failure is reported in words
            return "failed", f"{type(error).__name__}: {error}"
        self.latest_counters = self.engine.counters()
        self.counted_at = time.monotonic()
        return "ready", self.engine.info

    def add(self, requests: list[EngineRequest]) -> None:
        assert self.engine is not None
        add_all(self.engine, requests, self.ready)

    def advance(self, seconds: float) -> tuple[list[EngineOutput], tuple[int, int], bool]:
        """Step until a request finishes or `seconds` pass: the finished outputs, the token
        counters, and whether requests are still running."""
        assert self.engine is not None
        outputs, self.ready = self.ready, []
        deadline = time.monotonic() + seconds
        while not outputs and self.engine.has_unfinished():
            outputs += self.engine.step()
            if time.monotonic() >= deadline:
                break
        # vLLM's metrics cost a few milliseconds to read: at most every COUNTERS_SECONDS,
        # and once more when the replica runs dry, after which it is not asked again.
        unfinished = self.engine.has_unfinished()
        if not unfinished or time.monotonic() - self.counted_at >= COUNTERS_SECONDS:
            self.latest_counters = self.engine.counters()
            self.counted_at = time.monotonic()
        return outputs, self.latest_counters, unfinished

    def abort(self, keys: list[str]) -> None:
        if self.engine is not None:
            self.engine.abort(keys)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def load_inner_engine(spec: ModelSpec) -> Engine:
    """The engine a replica hosts: the runner's own vLLM adapter, or the fake engine in
    tests (never another Ray engine; `runner.engines` picks the Ray one itself)."""
    if spec.backend == "fake":
        from runner.fake_engine import FakeEngine

        return FakeEngine(spec)
    if spec.backend == "vllm":
        from runner.vllm_engine import VllmEngine

        return VllmEngine(spec)
    raise EngineLoadError(f"a Ray replica cannot host the backend {spec.backend!r}")
