"""The Ray side of a model with `backend: ray`: its settings, the connection, what it runs on.

The engine process is the Ray driver. With `address: local` it starts a Ray of its own,
which lives and dies with that process; otherwise it joins a running cluster (`auto`: the
one this machine is a node of; `host:port`: the head's address) and leaves it running.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.types import EngineInfo, EngineLoadError, ModelSpec

LOCAL = "local"
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # results are small; Ray would take 30 % of the memory
REACH_SECONDS = 10.0


@dataclass(frozen=True)
class RaySettings:
    """The `ray:` mapping of a model, as the engine reads it (checked at config load)."""

    address: str = LOCAL
    concurrency: int = 1  # replicas
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    backend: str = "vllm"  # the engine each replica hosts: "vllm", or "fake" for tests

    @classmethod
    def of(cls, spec: ModelSpec) -> RaySettings:
        return cls(**spec.ray)


def connect(settings: RaySettings) -> bool:
    """Make this process a Ray driver; True when it started or joined Ray itself (and so
    must shut it down), False when Ray was already connected here."""
    import ray

    if ray.is_initialized():
        return False
    # Usage statistics would be sent over the network; an appliance sends nothing.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.address == LOCAL:
        # By default each Ray worker leads a process group of its own. Kept in this
        # process's group instead, every process of a local Ray (its daemons, the replicas
        # and whatever they start, such as vLLM's engine core) ends when the group is
        # killed, which is how the engine process is always ended (runner.client).
        os.environ["RAY_process_group_cleanup_enabled"] = "0"
        ray.init(
            address=LOCAL,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            runtime_env=_shipped_code(),
        )
    else:
        if settings.address != "auto":
            _check_reachable(settings.address)
        try:
            ray.init(address=settings.address, runtime_env=_shipped_code())
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise EngineLoadError(
                f"could not join the Ray cluster at {settings.address}: {error}"
            ) from error
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing answers at the head's address: Ray itself would go on
    trying for many minutes, and the job would wait that long for its engine."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_SECONDS).close()
    except OSError as error:
        raise EngineLoadError(
            f"nothing answers at the Ray cluster address {address} ({error.strerror or error}); "
            "is `ray start --head` running there, and is the port open to this machine?"
        ) from None


def _shipped_code() -> dict[str, Any]:
    """This `runner` package, shipped to every node by Ray (for the whole job, the only
    level at which Ray uploads a local folder), so that a GPU box needs Python, Ray and
    vLLM but not batchbox itself, and always runs the driver's own code."""
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


def runtime_env(environment: dict[str, str]) -> dict[str, Any]:
    """The model's environment, for every replica."""
    return {"env_vars": dict(environment)}


def check_resources(settings: RaySettings, alias: str) -> None:
    """Fail at once, in words, when the cluster could never place all the replicas (Ray
    would wait for them forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpus = settings.concurrency * settings.num_cpus
    need_gpus = settings.concurrency * settings.num_gpus
    if need_cpus > cpus or need_gpus > gpus:
        raise EngineLoadError(
            f"model {alias!r} asks for {settings.concurrency} Ray replicas of "
            f"{settings.num_gpus:g} GPUs and {settings.num_cpus:g} CPUs each "
            f"({need_gpus:g} GPUs, {need_cpus:g} CPUs), and the Ray cluster at "
            f"{settings.address} has {gpus:g} GPUs and {cpus:g} CPUs"
        )


def describe_hardware(settings: RaySettings, infos: list[EngineInfo]) -> str:
    """The cluster as the benchmark record names it, so that estimates learn per cluster:
    where, how many replicas, and what each runs on."""
    where = "Ray local" if settings.address == LOCAL else "Ray cluster"
    kinds = Counter(info.hardware for info in infos)
    count = len(infos)
    replicas = f"{count} replica" + ("" if count == 1 else "s")
    if len(kinds) == 1:
        return f"{where}: {replicas}, {next(iter(kinds))}"
    parts = " + ".join(f"{number} x {hardware}" for hardware, number in kinds.most_common())
    return f"{where}: {replicas}, {parts}"


def cluster_settings(settings: RaySettings, infos: list[EngineInfo]) -> dict[str, Any]:
    """The speed settings of the cluster as one engine: the replicas' batches and caches add
    up; the rest are each replica's."""
    combined = dict(infos[0].settings)
    for name in ("max_num_seqs", "kv_cache_tokens"):
        values = [info.settings.get(name) for info in infos]
        if all(isinstance(value, int) for value in values):
            combined[name] = sum(values)
    combined.update(
        ray_replicas=len(infos),
        ray_replica_cpus=settings.num_cpus,
        ray_replica_gpus=settings.num_gpus,
    )
    return combined
