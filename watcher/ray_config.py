"""The `ray:` mapping of a model with `backend: ray`, checked at config load.

```yaml
models:
  gemma-3-4b:
    backend: ray
    ray:
      address: auto        # local | auto | host:port of the cluster's head
      concurrency: 2       # replicas, each a whole engine
      num_gpus: 1          # per replica
      num_cpus: 1          # per replica
```
"""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from watcher.config import ModelConfig

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})$")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = "local"
    concurrency: Annotated[int, Field(ge=1, le=256)] = 1
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    backend: Literal["vllm", "fake"] = "vllm"  # what each replica runs; fake for tests

    @field_validator("address")
    @classmethod
    def _known_address(cls, address: str) -> str:
        if address in ("local", "auto"):
            return address
        if address.startswith("ray://"):
            raise ValueError(
                "Ray Client addresses (ray://) are not supported: batchbox runs the Ray driver "
                "itself; give the head's host:port (its GCS port, 6379 unless changed)"
            )
        match = _HOST_PORT.match(address)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"{address!r} is not 'local', 'auto' or a cluster address host:port")
        return address


def ray_spec(model: ModelConfig) -> dict[str, Any]:
    """The plain values a `ModelSpec` carries to the engine; empty unless `backend: ray`."""
    if model.backend != "ray":
        return {}
    return (model.ray or RayConfig()).model_dump()


def ray_settings_problem(model: ModelConfig) -> str | None:
    """A `ray:` mapping on a model that does not run on Ray is a mistake worth naming."""
    if model.ray is not None and model.backend != "ray":
        return "the 'ray' settings are used only with backend: ray"
    return None


def replicas_view(model: ModelConfig) -> tuple[str | None, ModelConfig]:
    """For `batchbox check`: why a Ray model cannot run here, and the model as each of its
    replicas runs it (its engine, and a GPU needed here only when Ray is local)."""
    settings = model.ray or RayConfig()
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (install batchbox with the cluster extra)", model
    needs_gpu = model.needs_gpu and settings.address == "local"
    return None, model.model_copy(update={"backend": settings.backend, "needs_gpu": needs_gpu})
