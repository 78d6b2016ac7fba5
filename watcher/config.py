"""`config.yaml`: loaded with safe YAML, checked at load, every error reported with its path.

The rest of the service gets plain values from here (a model's spec, a folder, the limits),
so `runner` and `benchmarks` never see the config file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.lines import Limits
from runner.types import CHAT, COMPLETIONS, EMBEDDINGS, ModelSpec
from watcher.ray_config import RayConfig, ray_settings_problem, ray_spec

ENV_VARIABLE = "BATCHBOX_CONFIG"
Alias = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class ConfigError(Exception):
    """The config cannot be used; the message lists every problem, one per line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    path: str | None = None
    hub: str | None = None
    backend: Literal["vllm", "fake", "ray"] = "vllm"
    runner: Literal["generate", "pooling"] = "generate"
    needs_gpu: bool = False
    allow_download: bool = False
    trust_remote_code: bool = False
    engine: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    ray: RayConfig | None = None  # with backend: ray

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local folder) or 'hub' (a model id)")
        if "trust_remote_code" in self.engine:
            raise ValueError("set trust_remote_code on the model, not in its engine options")
        problem = ray_settings_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (EMBEDDINGS,) if self.runner == "pooling" else (CHAT, COMPLETIONS)


class LimitsConfig(Strict):
    max_file_bytes: Annotated[int, Field(ge=1)] = 2 << 30
    max_line_bytes: Annotated[int, Field(ge=1024)] = 4 << 20
    max_lines: Annotated[int, Field(ge=1)] = 1_000_000
    max_tokens: Annotated[int, Field(ge=1)] = 32_768
    max_n: Annotated[int, Field(ge=1)] = 16


class ApiConfig(Strict):
    """`batchbox api`: where it listens, and what one client may ask of it."""

    listen: Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")] = (
        "127.0.0.1:8080"
    )
    requests_per_second: Annotated[float, Field(gt=0)] = 10.0  # per key, sustained
    burst: Annotated[int, Field(ge=1)] = 100  # per key, at once
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0  # a body, sent or taken, stalls
    keep_alive_seconds: Annotated[int, Field(ge=1)] = 5
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1 << 20  # bodies other than uploads

    @field_validator("listen")
    @classmethod
    def _port_in_range(cls, listen: str) -> str:
        if int(listen.rpartition(":")[2]) > 65535:
            raise ValueError(f"the port of {listen!r} is over 65535")
        return listen

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Config(Strict):
    inbox: str = "inbox"
    outbox: str = "outbox"
    state: str = "state"
    models_dir: str = "models"
    default_model: Alias | None = None
    settle_seconds: Annotated[float, Field(ge=0)] = 5.0
    rescan_seconds: Annotated[float, Field(gt=0)] = 30.0
    observer: Literal["native", "polling"] = "native"
    keep_status_hours: Annotated[float, Field(ge=0)] = 24.0
    # how often a running job's `.status` and `.eta` are rewritten; SPEC asks for every 10 s
    status_seconds: Annotated[float, Field(gt=0, le=10)] = 5.0
    stop_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    idle_unload_seconds: Annotated[float, Field(ge=0)] = 600.0
    min_free_bytes: Annotated[int, Field(ge=0)] = 1 << 30
    max_in_flight: Annotated[int, Field(ge=1)] = 256
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    models: Annotated[dict[Alias, ModelConfig], Field(min_length=1)]

    # Set by load_config: the folder that holds config.yaml, which paths are relative to.
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _default_is_configured(self) -> Config:
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the configured models "
                f"({', '.join(self.models)})"
            )
        return self

    def folder(self, name: str) -> Path:
        return (self.root / getattr(self, name)).resolve()

    @property
    def limits_value(self) -> Limits:
        return Limits(**self.limits.model_dump())

    def model_spec(self, alias: str) -> ModelSpec:
        """The plain values an engine needs for one configured model."""
        model = self.models[alias]
        environment = {"HF_HUB_OFFLINE": "0" if model.allow_download else "1"}
        environment.update(model.environment)
        engine = {"trust_remote_code": model.trust_remote_code, **model.engine}
        if model.path is not None:
            source = str((self.root / model.path).resolve())
        else:
            source = str(model.hub)
        return ModelSpec(
            alias=alias,
            source=source,
            backend=model.backend,
            runner=model.runner,
            engine=engine,
            environment=environment,
            ray=ray_spec(model),
        )


def find_config(explicit: str | None) -> Path:
    """`-c` first, then $BATCHBOX_CONFIG, then ./config.yaml."""
    return Path(explicit or os.environ.get(ENV_VARIABLE) or "config.yaml")


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that also refuses a key given twice, which YAML would silently merge."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


class _NoAliasLoader(_UniqueKeyLoader):
    """For files anyone may drop: an alias could expand a few bytes into gigabytes."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's own signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed here", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(path: Path, aliases: bool = True) -> Any:
    """Safe-load a YAML file; no tag can construct an object. Errors name the file and line."""
    loader = _UniqueKeyLoader if aliases else _NoAliasLoader
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None


def describe_errors(error: ValidationError) -> list[str]:
    """One line per error, each with the path of the key at fault."""
    lines = []
    for detail in error.errors(include_url=False):
        where = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        lines.append(f"At '{where}': {message}" if where else message)
    return lines


def load_config(path: Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError("\n".join([f"{path} has errors:", *describe_errors(error)])) from None
    config.root = path.resolve().parent
    return config
