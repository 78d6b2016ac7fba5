"""What the runner needs from an engine, where engines come from, and the fake one for tests.

An `Engine` lives in one process and is driven one step at a time, the way vLLM's own
`LLMEngine` is: requests go in one by one with `add`, and `step` returns those that finished.
The real one is `runner.vllm_engine.VllmEngine`; `FakeEngine` answers instantly and
deterministically so that the plumbing around it can be tested thousands of times a second.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.types import CHAT, EMBEDDINGS, Choice, EngineInfo, EngineOutput, EngineRequest


class RequestRejected(Exception):
    """The engine cannot take this request (a prompt too long, a template that fails...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineLoadError(Exception):
    """The model could not be loaded; the message says why in one sentence."""


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


def load_engine(spec: ModelSpec) -> Engine:
    """Load the engine a model spec names. vLLM is imported only when it is asked for."""
    if spec.backend == "fake":
        return FakeEngine(spec)
    if spec.backend == "vllm":
        from runner.vllm_engine import VllmEngine

        return VllmEngine(spec)
    if spec.backend == "ray":
        from runner.ray_engine import RayEngine

        return RayEngine(spec)
    raise EngineLoadError(f"model {spec.alias!r} names an unknown backend {spec.backend!r}")


def _words(text: str) -> list[str]:
    return text.split()


def render_chat_plainly(messages: list[dict[str, Any]]) -> str:
    """The fake engine's chat template: one `role: content` line per message."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines) + "\nassistant:"


class FakeEngine:
    """A deterministic engine that needs no model.

    Tokens are whitespace-separated words. Each request yields `fake_output_tokens` words
    (bounded by `max_tokens`). Options in `spec.engine`:

    - `max_model_len` (default 2048)
    - `fake_output_tokens` (default 8)
    - `fake_seconds_per_step` sleeps in every `step`, to make runs take time
    - `fake_batch` finishes at most this many requests per step (default 64)
    - `fake_load_seconds` sleeps at load
    - `fake_crash_on`: a prompt containing this text kills the process (for crash tests)
    - `fake_log_requests`: a file to which the key of every request added is appended, so
      crash tests can count the requests that ran more than once
    - `fake_helper_pidfile`: start a helper process at load, as vLLM starts its engine core,
      and write its pid to this file
    """

    def __init__(self, spec: ModelSpec) -> None:
        started = time.monotonic()
        options = spec.engine
        self.max_model_len = int(options.get("max_model_len", 2048))
        self.output_tokens = int(options.get("fake_output_tokens", 8))
        self.seconds_per_step = float(options.get("fake_seconds_per_step", 0.0))
        self.batch = int(options.get("fake_batch", 64))
        self.crash_on = options.get("fake_crash_on")
        self.request_log = options.get("fake_log_requests")
        time.sleep(float(options.get("fake_load_seconds", 0.0)))
        if options.get("fake_helper_pidfile"):
            import subprocess
            from pathlib import Path

            helper = subprocess.Popen(["sleep", "600"])
            Path(options["fake_helper_pidfile"]).write_text(str(helper.pid))
        self.spec = spec
        self.waiting: deque[tuple[EngineRequest, int]] = deque()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.info = EngineInfo(
            model=spec.alias,
            source=spec.source,
            runner=spec.runner,
            max_model_len=self.max_model_len,
            engine_version="fake",
            hardware="fake",
            load_seconds=time.monotonic() - started,
            settings={key: value for key, value in options.items() if key.startswith("max")},
        )

    def _prompt_words(self, request: EngineRequest) -> list[list[str]]:
        if request.endpoint == CHAT:
            return [_words(render_chat_plainly(request.prompt))]
        if request.endpoint == EMBEDDINGS:
            return [
                [str(token) for token in item] if isinstance(item, list) else _words(item)
                for item in request.prompt
            ]
        if isinstance(request.prompt, list):
            return [[str(token) for token in request.prompt]]
        return [_words(request.prompt)]

    def add(self, request: EngineRequest) -> None:
        prompts = self._prompt_words(request)
        if self.crash_on and any(self.crash_on in word for words in prompts for word in words):
            import os

            os._exit(137)
        longest = max((len(words) for words in prompts), default=0)
        if request.endpoint == EMBEDDINGS:
            if longest > self.max_model_len:
                raise RequestRejected(
                    "context_length_exceeded",
                    f"This model's maximum context length is {self.max_model_len} tokens, "
                    f"but the input has {longest} tokens.",
                )
        else:
            max_tokens = request.sampling.get("max_tokens")
            if max_tokens is None:
                max_tokens = self.max_model_len - longest
            if longest + max_tokens > self.max_model_len or max_tokens < 1:
                raise RequestRejected(
                    "context_length_exceeded",
                    f"This model's maximum context length is {self.max_model_len} tokens; "
                    f"the prompt has {longest} tokens and max_tokens asks for {max_tokens} "
                    "more.",
                )
        self.waiting.append((request, sum(len(words) for words in prompts)))
        if self.request_log:
            _log_request(self.request_log, request.key)
        self.prompt_tokens += sum(len(words) for words in prompts)

    def _finish(self, request: EngineRequest, prompt_tokens: int) -> EngineOutput:
        if request.endpoint == EMBEDDINGS:
            vectors = [_fake_vector(str(item)) for item in request.prompt]
            return EngineOutput(key=request.key, prompt_tokens=prompt_tokens, embeddings=vectors)
        max_tokens = request.sampling.get("max_tokens") or self.max_model_len
        count = min(self.output_tokens, max_tokens)
        finish_reason = "length" if count == max_tokens and count < self.output_tokens else "stop"
        seed = hashlib.sha256(request.key.encode()).hexdigest()
        choices = [
            Choice(
                index=index,
                text=" ".join(f"w{seed[(index + n) % 64]}" for n in range(count)),
                finish_reason=finish_reason,
                token_count=count,
            )
            for index in range(int(request.sampling.get("n", 1)))
        ]
        return EngineOutput(key=request.key, prompt_tokens=prompt_tokens, choices=choices)

    def step(self) -> list[EngineOutput]:
        if self.seconds_per_step:
            time.sleep(self.seconds_per_step)
        finished = []
        for _ in range(min(self.batch, len(self.waiting))):
            request, prompt_tokens = self.waiting.popleft()
            output = self._finish(request, prompt_tokens)
            self.completion_tokens += output.completion_tokens
            finished.append(output)
        return finished

    def counters(self) -> tuple[int, int]:
        return self.prompt_tokens, self.completion_tokens

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def abort(self, keys: list[str]) -> None:
        dropped = set(keys)
        self.waiting = deque(item for item in self.waiting if item[0].key not in dropped)

    def close(self) -> None:
        self.waiting.clear()


def _log_request(path: str, key: str) -> None:
    # One unbuffered append per request: a kill of this process loses none of them.
    import os

    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{key}\n".encode())
    finally:
        os.close(descriptor)


def _fake_vector(text: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    values = [byte - 127.5 for byte in digest[:dimensions]]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]
