"""Engine outputs and line errors as lines of OpenAI's batch output format."""

from __future__ import annotations

import base64
import itertools
import secrets
import struct
import time
from typing import Any

import orjson

from runner.types import CHAT, EMBEDDINGS, Choice, EngineOutput, EngineRequest

# Ids need only be unique, not secret: a random stem per process and a counter are as
# unique as uuid4 here and cost a fraction of it on every line of a 200,000-line file.
_STEM = secrets.token_hex(8)
_COUNTER = itertools.count()


def _new_id(prefix: str) -> str:
    return f"{prefix}{_STEM}{next(_COUNTER):016x}"


def error_record(custom_id: str | None, line: int | None, code: str, message: str) -> dict:
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line},
    }


def result_line(request: EngineRequest, output: EngineOutput, model: str) -> bytes:
    """A successful request as its line of `results.jsonl`: `{"id", "custom_id", "response":
    {"status_code": 200, "request_id", "body"}, "error": null}`, the same bytes orjson writes
    for that record, with the envelope (and a plain chat body) filled into templates instead
    of built as nested dicts. The three ids of one line share one counter value."""
    suffix = f"{_STEM}{next(_COUNTER):016x}".encode()
    if request.endpoint == CHAT and all(choice.logprobs is None for choice in output.choices):
        body = _chat_body_bytes(suffix, output, model)
    else:
        body = orjson.dumps(result_body(request, output, model))
    return b"".join(
        (
            b'{"id":"batch_req_',
            suffix,
            b'","custom_id":',
            orjson.dumps(request.key),
            b',"response":{"status_code":200,"request_id":"req_',
            suffix,
            b'","body":',
            body,
            b'},"error":null}\n',
        )
    )


def result_body(request: EngineRequest, output: EngineOutput, model: str) -> dict[str, Any]:
    if request.endpoint == EMBEDDINGS:
        return embedding_body(request, output, model)
    if request.endpoint == CHAT:
        return chat_body(request, output, model)
    return completion_body(request, output, model)


def _chat_body_bytes(suffix: bytes, output: EngineOutput, model: str) -> bytes:
    """`chat_body` as orjson writes it, for choices without logprobs."""
    dumps = orjson.dumps
    choices = b",".join(
        b'{"index":%d,"message":{"role":"assistant","content":%b},"finish_reason":%b,'
        b'"logprobs":null}'
        % (choice.index, dumps(choice.text), dumps(choice.finish_reason or "stop"))
        for choice in output.choices
    )
    prompt, completion = output.prompt_tokens, output.completion_tokens
    return (
        b'{"id":"chatcmpl-%b","object":"chat.completion","created":%d,"model":%b,'
        b'"choices":[%b],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
        b'"total_tokens":%d}}'
        % (suffix, int(time.time()), dumps(model), choices, prompt, completion, prompt + completion)
    )


def _usage(output: EngineOutput) -> dict[str, int]:
    completion = output.completion_tokens
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": output.prompt_tokens + completion,
    }


def chat_body(request: EngineRequest, output: EngineOutput, model: str) -> dict[str, Any]:
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason or "stop",
                "logprobs": _chat_logprobs(choice),
            }
            for choice in output.choices
        ],
        "usage": _usage(output),
    }


def _chat_logprobs(choice: Choice) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    return {"content": choice.logprobs, "refusal": None}


def completion_body(request: EngineRequest, output: EngineOutput, model: str) -> dict[str, Any]:
    return {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "finish_reason": choice.finish_reason or "stop",
                "logprobs": _completion_logprobs(choice),
            }
            for choice in output.choices
        ],
        "usage": _usage(output),
    }


def _completion_logprobs(choice: Choice) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    offsets, position = [], 0
    for token in choice.logprobs:
        offsets.append(position)
        position += len(token["token"])
    return {
        "tokens": [token["token"] for token in choice.logprobs],
        "token_logprobs": [token["logprob"] for token in choice.logprobs],
        "top_logprobs": [
            {top["token"]: top["logprob"] for top in token.get("top_logprobs", [])}
            for token in choice.logprobs
        ],
        "text_offset": offsets,
    }


def embedding_body(request: EngineRequest, output: EngineOutput, model: str) -> dict[str, Any]:
    as_base64 = request.reply_options.get("encoding_format") == "base64"
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": _base64_floats(vector) if as_base64 else vector,
            }
            for index, vector in enumerate(output.embeddings or [])
        ],
        "model": model,
        "usage": {"prompt_tokens": output.prompt_tokens, "total_tokens": output.prompt_tokens},
    }


def _base64_floats(vector: list[float]) -> str:
    # OpenAI's base64 embeddings are little-endian float32, as numpy's frombuffer reads them
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
