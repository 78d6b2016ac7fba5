"""The real engine: vLLM's `LLM`, driven one step at a time through its `LLMEngine`.

Requests go in as token ids that this module renders itself (the chat template, the
completion prompt), so that it can count prompt tokens and turn an over-long prompt into a
`RequestRejected` before vLLM sees it. Every sampling request asks vLLM for its final
output only, so `step` returns finished requests and nothing else.

An embeddings request holds several inputs; each becomes one vLLM pooling request with the
id `f"{key}\\x00{index}"`, and the request is returned once all of them have finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from runner.types import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Choice,
    EngineInfo,
    EngineOutput,
    EngineRequest,
    ModelSpec,
    RequestRejected,
)
from runner.vllm_setup import describe_hardware, engine_settings, first_sentence, load_llm

# OpenAI reports -inf log probabilities as a large negative number; JSON has no -inf.
MIN_LOGPROB = -9999.0


@dataclass
class _Gathering:
    """The embeddings of one request, filled in as its inputs finish."""

    vectors: list[list[float] | None]
    prompt_tokens: int
    pending: int
    errors: list[str] = field(default_factory=list)


class VllmEngine:
    """An `Engine` (see runner.types) backed by vLLM, in this process."""

    def __init__(self, spec: ModelSpec) -> None:
        started = time.monotonic()
        os.environ.update(spec.environment)  # before vLLM is imported: some are read then
        self.spec = spec
        self._llm = load_llm(spec)
        self._engine = self._llm.llm_engine
        self._tokenizer = self._llm.get_tokenizer()
        config = self._engine.vllm_config
        self.max_model_len = int(config.model_config.max_model_len)
        self._lower_case = bool((config.model_config.encoder_config or {}).get("do_lower_case"))
        self._running: dict[str, list[str]] = {}  # key -> vLLM request ids
        self._gatherings: dict[str, _Gathering] = {}
        self._sub_requests: dict[str, tuple[str, int]] = {}  # vLLM id -> (key, input index)
        self._top_logprobs: dict[str, int] = {}  # key -> how many top logprobs it asked for
        import vllm

        self.info = EngineInfo(
            model=spec.alias,
            source=spec.source,
            runner=config.model_config.runner_type,
            max_model_len=self.max_model_len,
            engine_version=vllm.__version__,
            hardware=describe_hardware(),
            load_seconds=round(time.monotonic() - started, 3),
            settings=engine_settings(config),
        )

    def add(self, request: EngineRequest) -> None:
        if request.key in self._running:
            raise RequestRejected("invalid_request", f"request {request.key!r} is already running")
        if request.endpoint == EMBEDDINGS:
            self._add_embeddings(request)
            return
        if request.endpoint not in (CHAT, COMPLETIONS):
            raise RequestRejected("invalid_request", f"unknown endpoint {request.endpoint!r}")
        if self.info.runner != "generate":
            raise RequestRejected(
                "invalid_request", f"model {self.spec.alias!r} serves embeddings only"
            )
        if request.endpoint == CHAT:
            prompt_ids = self._chat_ids(request.prompt)
        else:
            prompt_ids = self._completion_ids(request.prompt)
        params = self._sampling_params(request, len(prompt_ids))
        self._submit(request.key, [(request.key, prompt_ids, params)])
        if params.logprobs is not None:
            self._top_logprobs[request.key] = params.logprobs

    def _submit(self, key: str, parts: list[tuple[str, list[int], Any]]) -> None:
        from vllm.exceptions import VLLMError
        from vllm.inputs import tokens_input

        added: list[str] = []
        try:
            for request_id, prompt_ids, params in parts:
                self._engine.add_request(request_id, tokens_input(prompt_ids), params)
                added.append(request_id)
        except (VLLMError, ValueError, TypeError) as error:
            if added:
                self._engine.abort_request(added)
            raise RequestRejected("invalid_request", first_sentence(error)) from error
        self._running[key] = added

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestRejected("invalid_request", "messages must be a non-empty list")
        plain = [_plain_message(message) for message in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                plain, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # noqa: BLE001 - templates raise anything (jinja, ValueError)
            raise RequestRejected(
                "invalid_request",
                f"the chat template could not render the messages: {first_sentence(error)}",
            ) from error
        # The template writes its own special tokens (BOS and the like).
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _completion_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt))
        if _is_token_list(prompt):
            return list(prompt)
        raise RequestRejected("invalid_request", "prompt must be a string or a list of token ids")

    def _sampling_params(self, request: EngineRequest, prompt_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMError
        from vllm.sampling_params import RequestOutputKind

        # Like the fake engine, an absent max_tokens means "up to the context length",
        # not SamplingParams' default of 16.
        options = {"max_tokens": None, **request.sampling}
        options["output_kind"] = RequestOutputKind.FINAL_ONLY
        structured = self._structured_outputs(request.response_format)
        if structured is not None:
            options["structured_outputs"] = structured
        try:
            params = SamplingParams(**options)
        except (VLLMError, ValueError, TypeError) as error:
            raise RequestRejected("invalid_request", first_sentence(error)) from error
        # vLLM itself fills an unset max_tokens with the room the prompt leaves.
        wanted = params.max_tokens
        if wanted is None:
            wanted = self.max_model_len - prompt_tokens
        self._check_length(prompt_tokens, wanted)
        return params

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.max_model_len
        if prompt_tokens >= limit:
            raise RequestRejected(
                "context_length_exceeded",
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_tokens} tokens, which leaves no room for output.",
            )
        if prompt_tokens + max_tokens > limit:
            raise RequestRejected(
                "context_length_exceeded",
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_tokens} tokens and max_tokens asks for {max_tokens} more.",
            )

    def _structured_outputs(self, response_format: dict[str, Any] | None) -> Any:
        from vllm.exceptions import VLLMError
        from vllm.sampling_params import StructuredOutputsParams

        kind = (response_format or {}).get("type", "text")
        try:
            if kind == "text":
                return None
            if kind == "json_object":
                return StructuredOutputsParams(json_object=True)
            if kind == "json_schema":
                schema = (response_format.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise RequestRejected(
                        "invalid_request", "response_format.json_schema.schema must be an object"
                    )
                return StructuredOutputsParams(json=schema)
        except VLLMError as error:
            raise RequestRejected("invalid_request", first_sentence(error)) from error
        raise RequestRejected("invalid_request", f"response_format type {kind!r} is not supported")

    def _add_embeddings(self, request: EngineRequest) -> None:
        from vllm import PoolingParams

        if self.info.runner != "pooling":
            raise RequestRejected(
                "invalid_request", f"model {self.spec.alias!r} does not serve embeddings"
            )
        inputs = request.prompt
        if not isinstance(inputs, list) or not inputs:
            raise RequestRejected("invalid_request", "input must be a non-empty list")
        token_lists = [self._embedding_ids(item) for item in inputs]
        parts = [
            (f"{request.key}\x00{index}", ids, PoolingParams(task="embed"))
            for index, ids in enumerate(token_lists)
        ]
        self._submit(request.key, parts)
        self._gatherings[request.key] = _Gathering(
            vectors=[None] * len(parts),
            prompt_tokens=sum(len(ids) for ids in token_lists),
            pending=len(parts),
        )
        for index, (request_id, _, _) in enumerate(parts):
            self._sub_requests[request_id] = (request.key, index)

    def _embedding_ids(self, item: Any) -> list[int]:
        if isinstance(item, str):
            ids = list(self._tokenizer.encode(item.lower() if self._lower_case else item))
        elif _is_token_list(item):
            ids = list(item)
        else:
            raise RequestRejected(
                "invalid_request", "each input must be a string or a list of token ids"
            )
        if len(ids) > self.max_model_len:
            raise RequestRejected(
                "context_length_exceeded",
                f"This model's maximum context length is {self.max_model_len} tokens, "
                f"but the input has {len(ids)} tokens.",
            )
        return ids

    def step(self) -> list[EngineOutput]:
        finished = []
        for output in self._engine.step():
            if not output.finished:
                continue
            if output.request_id in self._sub_requests:
                result = self._gather(output)
            else:
                result = self._completion(output)
            if result is not None:
                finished.append(result)
        return finished

    def _completion(self, output: Any) -> EngineOutput | None:
        key = output.request_id
        if key not in self._running:
            return None  # aborted meanwhile
        top = self._top_logprobs.get(key, 0)
        self._forget(key)
        prompt_tokens = len(output.prompt_token_ids or [])
        failed = [c for c in output.outputs if c.finish_reason in ("error", "abort")]
        if failed:
            return EngineOutput(
                key=key,
                prompt_tokens=prompt_tokens,
                error_code="engine_error",
                error_message=f"the engine ended this request with {failed[0].finish_reason!r}",
            )
        choices = [self._choice(c, top) for c in sorted(output.outputs, key=lambda c: c.index)]
        return EngineOutput(key=key, prompt_tokens=prompt_tokens, choices=choices)

    def _choice(self, completion: Any, top: int) -> Choice:
        logprobs = None
        if completion.logprobs is not None:
            pairs = zip(completion.token_ids, completion.logprobs, strict=False)
            logprobs = [
                self._token_logprobs(token_id, position, top) for token_id, position in pairs
            ]
        return Choice(
            index=completion.index,
            text=completion.text,
            finish_reason=completion.finish_reason,
            token_count=len(completion.token_ids),
            logprobs=logprobs,
        )

    def _token_logprobs(
        self, token_id: int, position: dict[int, Any] | None, top: int
    ) -> dict[str, Any]:
        position = position or {}
        entry = self._logprob_entry(token_id, position.get(token_id))
        # A position holds the top-k tokens plus the sampled one when it ranks below them.
        ranked = sorted(
            (item for item in position.items() if item[1].rank is not None),
            key=lambda item: item[1].rank,
        )
        if top >= 0:
            ranked = [item for item in ranked if item[1].rank <= top]
        entry["top_logprobs"] = [self._logprob_entry(tid, logprob) for tid, logprob in ranked]
        return entry

    def _logprob_entry(self, token_id: int, logprob: Any) -> dict[str, Any]:
        token = logprob.decoded_token if logprob is not None else None
        if token is None:
            token = self._tokenizer.decode([token_id])
        value = logprob.logprob if logprob is not None else float("-inf")
        return {
            "token": token,
            "logprob": max(float(value), MIN_LOGPROB),
            "bytes": list(token.encode("utf-8", errors="replace")),
        }

    def _gather(self, output: Any) -> EngineOutput | None:
        key, index = self._sub_requests.pop(output.request_id)
        gathering = self._gatherings.get(key)
        if gathering is None:
            return None  # aborted meanwhile
        gathering.pending -= 1
        if getattr(output, "error", None) is not None:
            gathering.errors.append(output.error.message)
        else:
            gathering.vectors[index] = [float(x) for x in output.outputs.data.tolist()]
        if gathering.pending:
            return None
        self._forget(key)
        if gathering.errors:
            return EngineOutput(
                key=key,
                prompt_tokens=gathering.prompt_tokens,
                error_code="engine_error",
                error_message=gathering.errors[0],
            )
        vectors = [vector for vector in gathering.vectors if vector is not None]
        return EngineOutput(key=key, prompt_tokens=gathering.prompt_tokens, embeddings=vectors)

    def _forget(self, key: str) -> list[str]:
        request_ids = self._running.pop(key, [])
        self._gatherings.pop(key, None)
        self._top_logprobs.pop(key, None)
        for request_id in request_ids:
            self._sub_requests.pop(request_id, None)
        return request_ids

    def counters(self) -> tuple[int, int]:
        """Prompt and generated tokens vLLM has processed, from its own metrics, so that
        requests still running count too."""
        totals = {"vllm:prompt_tokens": 0, "vllm:generation_tokens": 0}
        if not self._engine.log_stats:
            return 0, 0
        for metric in self._llm.get_metrics():
            if metric.name in totals:
                totals[metric.name] += int(getattr(metric, "value", 0))
        return totals["vllm:prompt_tokens"], totals["vllm:generation_tokens"]

    def has_unfinished(self) -> bool:
        return bool(self._running) or self._engine.has_unfinished_requests()

    def abort(self, keys: list[str]) -> None:
        request_ids = [request_id for key in keys for request_id in self._forget(key)]
        if request_ids:
            self._engine.abort_request(request_ids)

    def close(self) -> None:
        """Stop the engine core; vLLM 0.32 has no public shutdown for `LLM` itself."""
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        self.abort(list(self._running))
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self._engine = None
        self._llm = None


def _plain_message(message: Any) -> dict[str, Any]:
    """A message whose content is a string, as chat templates of text models expect."""
    if not isinstance(message, dict) or "role" not in message:
        raise RequestRejected("invalid_request", "each message must be an object with a role")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestRejected(
                    "invalid_request", "only text content parts are supported by this model"
                )
            texts.append(str(part.get("text", "")))
        content = "\n".join(texts)
    return {**message, "content": "" if content is None else content}


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(token, int) and not isinstance(token, bool) for token in value)
    )


