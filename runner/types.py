"""Plain values that cross the line between the runner and an engine.

They are dataclasses of builtins so that they pickle cheaply to the engine process and so
that a test can build them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
