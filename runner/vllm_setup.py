"""Loading vLLM's `LLM` for a model spec, and describing what it runs with and on: the parts
of the vLLM adapter that run once per engine, not once per request."""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

from runner.types import EngineLoadDied, EngineLoadError, ModelSpec

log = logging.getLogger(__name__)

# vLLM's engine core runs in a process of its own (unless VLLM_ENABLE_V1_MULTIPROCESSING is
# 0). When that process is killed while the model loads, as the OOM killer does on a host
# short of memory, vLLM says so with the core's exit code, negative for a signal:
# "Engine core initialization failed. ... Failed core proc(s): {'EngineCore_DP0': -9}".
# vLLM may look before the dead core's exit code is known, and then names none ("{}"). That
# is taken for a death too: a core that fails on its own is usually named with its exit
# code (1), and a wrong guess costs only the bounded number of tries of a load.
CORE_KILLED = re.compile(r"Failed core proc\(s\): (\{[^}]*:\s*-\d+|\{\})")


def load_llm(spec: ModelSpec) -> Any:
    """Build vLLM's `LLM` for a spec; every failure becomes one EngineLoadError sentence."""
    source = spec.source
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise EngineLoadError(f"model {spec.alias!r} has no folder at {source}")
    options: dict[str, Any] = {
        "runner": spec.runner,
        "trust_remote_code": False,
        "load_format": "safetensors",
        # The token counters feed the running estimate (see counters()).
        "disable_log_stats": False,
        **spec.engine,
    }
    try:
        import vllm

        return vllm.LLM(
            str(Path(source).expanduser()) if _looks_like_path(source) else source, **options
        )
    except Exception as error:  # noqa: BLE001 - vLLM fails in many ways; all mean "no model"
        # The job's status keeps one sentence; the engine's log (the service's) keeps it all.
        log.warning("vLLM could not load model %r: %r", spec.alias, error)
        raise load_failure(spec, error) from error


def load_failure(spec: ModelSpec, error: BaseException) -> EngineLoadError:
    """What a failed load means: EngineLoadDied when vLLM's engine core was killed by a
    signal (worth another try), else EngineLoadError (the model cannot load here)."""
    cause: BaseException | None = error
    while cause is not None:
        killed = CORE_KILLED.search(str(cause))
        if killed:
            return EngineLoadDied(
                f"vLLM's engine core for model {spec.alias!r} was killed while it loaded "
                f"({killed.group(0).rstrip('}')}}})"
            )
        cause = cause.__cause__ or cause.__context__
    return EngineLoadError(
        f"model {spec.alias!r} could not be loaded from {spec.source}: {first_sentence(error)}"
    )


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).exists()


def first_sentence(error: BaseException) -> str:
    """The first sentence of an error (of its first item, for pydantic's), without a period."""
    text = str(error)
    items = getattr(error, "errors", None)
    if callable(items):
        try:
            text = str(items()[0]["msg"]).removeprefix("Value error, ")
        except (IndexError, KeyError, TypeError):
            pass
    lines = text.strip().splitlines()
    first = SENTENCE_END.split(lines[0], maxsplit=1)[0] if lines else type(error).__name__
    return first.rstrip(".")


SENTENCE_END = re.compile(r"(?<=[\w)\]'\"`])\.\s+(?=[A-Z])")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value).removeprefix("torch.")


def engine_settings(config: Any) -> dict[str, Any]:
    """The speed-relevant settings vLLM actually runs with, as JSON values."""
    model, scheduler, cache = config.model_config, config.scheduler_config, config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    settings = {
        "dtype": model.dtype,
        "max_model_len": model.max_model_len,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "kv_cache_dtype": cache.cache_dtype,
        "kv_cache_tokens": blocks * cache.block_size if blocks else None,
        "kv_block_size": cache.block_size,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "enforce_eager": model.enforce_eager,
        "quantization": model.quantization,
        "load_format": config.load_config.load_format,
    }
    return {name: _plain(value) for name, value in settings.items()}


def describe_hardware() -> str:
    """The GPU's name, or the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        return name if count == 1 else f"{count} x {name}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {_cpu_model()} ({cores} cores)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
