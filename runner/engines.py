"""Where engines come from: the one place that picks an engine for a model spec."""

from __future__ import annotations

from runner.types import Engine, EngineLoadError, ModelSpec


def load_engine(spec: ModelSpec) -> Engine:
    """Load the engine a model spec names. vLLM is imported only when it is asked for."""
    if spec.backend == "fake":
        from runner.fake_engine import FakeEngine

        return FakeEngine(spec)
    if spec.backend == "vllm":
        from runner.vllm_engine import VllmEngine

        return VllmEngine(spec)
    if spec.backend == "ray":
        from runner.ray_engine import RayEngine

        return RayEngine(spec)
    raise EngineLoadError(f"model {spec.alias!r} names an unknown backend {spec.backend!r}")
