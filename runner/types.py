"""What crosses the line between the runner and an engine: plain values, errors, and the
`Engine` protocol every engine (vLLM, the fake one, a Ray cluster) speaks.

The values are dataclasses of builtins so that they pickle cheaply to the engine process and
so that a test can build them by hand. An `Engine` lives in one process and is driven one
step at a time, the way vLLM's own `LLMEngine` is: requests go in one by one with `add`,
and `step` returns those that finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class CodedError(Exception):
    """An error a user reads: a short code, a sentence, and the input line at fault if any."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.line = line


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)


@dataclass(slots=True)  # not frozen: a frozen init costs twice as much, on every line
class EngineRequest:
    """One request line, ready for an engine.

    `key` is the runner's handle for the line (its custom_id); `prompt` is a list of chat
    messages for chat, a string or token ids for completions, and a list of strings or token
    id lists for embeddings (one embedding each). `sampling` holds vLLM `SamplingParams`
    keywords, with `max_tokens` None when the line did not set it (the engine then allows
    what the context has left); `response_format` is kept apart because it becomes
    structured-output settings.
    """

    key: str
    endpoint: str
    prompt: Any
    sampling: dict[str, Any] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    # How the answer is shaped (embedding encoding_format); never sent to the engine.
    reply_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None
    token_count: int
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class EngineOutput:
    """What the engine returns for one request: choices for generation, or embeddings."""

    key: str
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list)
    embeddings: list[list[float]] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(choice.token_count for choice in self.choices)

    @property
    def failed(self) -> bool:
        return self.error_code is not None


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine says about itself, for results and benchmark records."""

    model: str
    source: str
    runner: str  # "generate" or "pooling"
    max_model_len: int
    engine_version: str
    hardware: str
    load_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    # its steps timed on a short probe right after the load (runner.pace), when asked for
    pace: dict[str, Any] | None = None


class RequestRejected(Exception):
    """The engine cannot take this request (a prompt too long, a template that fails...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineLoadError(Exception):
    """The model could not be loaded; the message says why in one sentence."""


class EngineLoadDied(EngineLoadError):
    """The load was cut short from outside (the engine process or a process it started was
    killed, by the OOM killer or a signal), not refused by the model: worth another try,
    where a model that reports it cannot load fails at once."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything an engine needs to load one configured model, as plain values."""

    alias: str
    source: str
    backend: str = "vllm"  # "vllm", "fake", or "ray" (replicas of one of the others)
    runner: str = "generate"  # "generate" or "pooling"
    engine: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)  # backend "ray": runner.ray_cluster

    @property
    def engine_kind(self) -> str:
        """What runs the model, as the benchmark history keys its records: "vllm", "fake",
        or the Ray replicas and what each holds, so that ETAs learn per backend."""
        if self.backend != "ray":
            return self.backend
        ray = self.ray
        return (
            f"ray {ray.get('address', 'local')} x{ray.get('concurrency', 1)} "
            f"({ray.get('num_gpus', 0):g} GPU, {ray.get('num_cpus', 1):g} CPU, "
            f"{ray.get('backend', 'vllm')})"
        )

    @property
    def engine_backend(self) -> str:
        """The engine that takes `engine`: the model's own, or its Ray replicas' engine."""
        return str(self.ray.get("backend", "vllm")) if self.backend == "ray" else self.backend


class Engine(Protocol):
    info: EngineInfo

    def add(self, request: EngineRequest) -> None:
        """Start a request; raise RequestRejected when it cannot run."""

    def step(self) -> list[EngineOutput]:
        """Advance every running request once; return the ones that finished."""

    def has_unfinished(self) -> bool: ...

    def abort(self, keys: list[str]) -> None: ...

    def counters(self) -> tuple[int, int]:
        """Prompt and completion tokens processed since load, finished requests or not."""

    def close(self) -> None: ...
