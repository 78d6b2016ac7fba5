"""Request lines: read them from a file in bounded memory, check them, and map each onto an
engine request, or onto the error that line gets.

Reading streams the file in blocks, so a 200,000-line file or a single 50 MB line costs
no more memory than the longest line allowed by the limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from runner.bodies import BODY_TYPES, DECODERS, ChatBody, CompletionBody, EmbeddingBody
from runner.types import ENDPOINTS, CodedError, EngineRequest

BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 2 << 30
    max_line_bytes: int = 4 << 20
    max_lines: int = 1_000_000
    max_tokens: int = 32_768
    max_n: int = 16


class RawLine(NamedTuple):
    """One line as read; a tuple, as it is made for every line of every file, twice."""

    number: int  # 1-based, counting every physical line, so users can find it
    data: bytes | None  # None when the line was longer than the limit
    length: int
    offset: int = 0  # where the line starts in the file


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str


@dataclass(slots=True)
class ParsedLine:
    """A valid line. Its engine request is built each time it is asked for, so the check
    before queueing, which needs just the figures below, never builds one."""

    line: int
    custom_id: str
    url: str
    body: Any

    @property
    def model(self) -> str | None:
        return self.body.model

    @property
    def request(self) -> EngineRequest:
        return to_engine_request(self.custom_id, self.url, self.body)

    @property
    def prompt_chars(self) -> int:
        return prompt_chars(self.body)

    @property
    def max_tokens(self) -> int | None:
        if isinstance(self.body, EmbeddingBody):
            return None
        return getattr(self.body, "max_completion_tokens", None) or self.body.max_tokens

    @property
    def choices(self) -> int:
        return 1 if isinstance(self.body, EmbeddingBody) else self.body.n


class FileRejected(CodedError):
    """The file as a whole cannot run (empty, not UTF-8, over a limit, no valid line)."""


def read_raw_lines(path: Path, max_line_bytes: int) -> Iterator[RawLine]:
    """Yield the file's non-blank lines; a line over `max_line_bytes` comes without data."""
    number = 0
    offset = 0
    with open(path, "rb") as handle:
        # readline with a limit never holds more than one allowed line in memory
        while chunk := handle.readline(max_line_bytes + 1):
            number += 1
            start = offset
            offset += len(chunk)
            if chunk.endswith(b"\n"):
                data = chunk[:-1]
            elif len(chunk) <= max_line_bytes:
                data = chunk  # the last line, without a newline
            else:
                length = len(chunk)
                while not chunk.endswith(b"\n") and (chunk := handle.readline(BLOCK_BYTES)):
                    length += len(chunk)
                    offset += len(chunk)
                yield RawLine(number, None, length - chunk.endswith(b"\n"), start)
                continue
            if data.strip():
                yield RawLine(number, data, len(data), start)


def read_line_at(path: Path, offset: int, max_line_bytes: int) -> RawLine:
    """The line that starts at `offset`, read again (to confirm a custom_id exactly)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        chunk = handle.readline(max_line_bytes + 1)
    data = chunk.removesuffix(b"\n")
    # only the file's first line may carry a byte order mark
    return RawLine(1 if offset == 0 else 2, data, len(data), offset)


def decode_line(raw: RawLine) -> bytes:
    """The line's bytes, checked to be UTF-8 text; a file that is not UTF-8 fails as a whole."""
    assert raw.data is not None
    data = raw.data[3:] if raw.number == 1 and raw.data.startswith(b"\xef\xbb\xbf") else raw.data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileRejected(
            "invalid_encoding",
            f"the file is not UTF-8 text (line {raw.number}, byte {error.start + 1})",
            raw.number,
        ) from None
    return data


ENVELOPE = msgspec.json.Decoder(dict[str, msgspec.Raw])
ENVELOPE_KEYS = {"custom_id", "method", "url", "body"}


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


# The usual line decodes in one pass; anything unusual takes the slow path, which words
# its errors.
FAST_ENVELOPE = msgspec.json.Decoder(_Envelope)


def _field(item: dict[str, msgspec.Raw], key: str) -> Any:
    raw = item.get(key)
    return None if raw is None else msgspec.json.decode(raw)


def _fast_envelope(data: bytes) -> _Envelope | None:
    try:
        envelope = FAST_ENVELOPE.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if (
        envelope.custom_id
        and envelope.method == "POST"
        and envelope.url in ENDPOINTS
        and bytes(envelope.body).startswith(b"{")
    ):
        return envelope
    return None


def parse_line(
    raw: RawLine, limits: Limits, defaults: dict[str, Any] | None = None
) -> ParsedLine | LineError:
    """Check one line and map it onto an engine request, or say what is wrong with it."""
    if raw.data is None:
        return LineError(
            raw.number,
            None,
            "line_too_long",
            f"the line has {raw.length} bytes, over the limit of {limits.max_line_bytes}",
        )
    data = decode_line(raw)
    envelope = _fast_envelope(data)
    if envelope is not None:
        custom_id, url, body_raw = envelope.custom_id, envelope.url, envelope.body
    else:
        checked = _slow_envelope(raw.number, data)
        if isinstance(checked, LineError):
            return checked
        custom_id, url, body_raw = checked
    try:
        body = _decode_body(url, body_raw, defaults)
    except msgspec.ValidationError as error:
        return LineError(raw.number, custom_id, *_describe(str(error)))
    except RecursionError:
        return LineError(
            raw.number, custom_id, "invalid_request", "the body's JSON is nested too deeply"
        )
    limit_problem = _limit_problem(body, limits)
    if limit_problem:
        return LineError(raw.number, custom_id, "limit_exceeded", limit_problem)
    return ParsedLine(raw.number, custom_id, url, body)


def _slow_envelope(number: int, data: bytes) -> tuple[str, str, msgspec.Raw] | LineError:
    try:
        item = ENVELOPE.decode(data)
        custom_id = _field(item, "custom_id")
    except msgspec.ValidationError:
        return LineError(number, None, "invalid_json", "the line is not a JSON object")
    except msgspec.DecodeError as error:
        return LineError(number, None, "invalid_json", f"the line is not valid JSON: {error}")
    except RecursionError:
        return LineError(number, None, "invalid_json", "the line's JSON is nested too deeply")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, None, "missing_custom_id", "the line has no custom_id string")
    problem = _envelope_problem(item)
    if problem:
        return LineError(number, custom_id, *problem)
    return custom_id, _field(item, "url"), item["body"]


def _decode_body(url: str, raw: msgspec.Raw, defaults: dict[str, Any] | None) -> Any:
    if not defaults:
        return DECODERS[url].decode(raw)
    merged = apply_defaults(msgspec.json.decode(raw), defaults)
    return msgspec.convert(merged, BODY_TYPES[url])


# Keys that say the same thing: a line that sets one is not given the ticket's other.
SYNONYMS = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}


def apply_defaults(body: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """The ticket's defaults for what the line does not set; the line's own values win."""
    merged = dict(body)
    for key, value in (defaults or {}).items():
        if key not in merged and SYNONYMS.get(key) not in merged:
            merged[key] = value
    return merged


def _envelope_problem(item: dict[str, msgspec.Raw]) -> tuple[str, str] | None:
    unknown = sorted(set(item) - ENVELOPE_KEYS)
    if unknown:
        return "invalid_request", f"unknown key(s) in the line: {', '.join(unknown)}"
    method = _field(item, "method")
    if method != "POST":
        return "invalid_method", f"method must be POST, not {method!r}"
    url = _field(item, "url")
    if url not in ENDPOINTS:
        return "invalid_url", f"url {url!r} is not supported; use one of {', '.join(ENDPOINTS)}"
    body = item.get("body")
    if body is None or not bytes(body).lstrip().startswith(b"{"):
        return "invalid_request", "body must be a JSON object"
    return None


def _describe(message: str) -> tuple[str, str]:
    """The error code and a message naming the problem's place in the body."""
    text, _, where = message.partition(" - at `$")
    where = where.rstrip("`")
    if text.startswith("Object contains unknown field `"):
        name = text.removeprefix("Object contains unknown field `").rstrip("`")
        return "unsupported_parameter", f"body{where}.{name}: unsupported parameter"
    code = (
        "unsupported_parameter"
        if "cannot be honoured" in text or "is not supported" in text
        else "invalid_request"
    )
    return code, f"body{where}: {text}" if where else f"body: {text}"


def _limit_problem(body: Any, limits: Limits) -> str | None:
    max_tokens = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        return f"max_tokens {max_tokens} is over this appliance's limit of {limits.max_tokens}"
    n = getattr(body, "n", 1)
    if n > limits.max_n:
        return f"n {n} is over this appliance's limit of {limits.max_n}"
    return None


SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
)


def to_engine_request(custom_id: str, url: str, body: Any) -> EngineRequest:
    """Map a validated body onto an engine request."""
    if isinstance(body, EmbeddingBody):
        reply = {"encoding_format": body.encoding_format}
        return EngineRequest(custom_id, url, list(body.inputs()), reply_options=reply)
    sampling: dict[str, Any] = {
        key: value for key in SAMPLING_KEYS if (value := getattr(body, key)) is not None
    }
    sampling["max_tokens"] = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if body.stop is not None:
        sampling["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    response_format = body.response_format.for_engine() if body.response_format else None
    if isinstance(body, ChatBody):
        if body.logprobs:
            sampling["logprobs"] = body.top_logprobs or 0
        prompt: Any = msgspec.to_builtins(body.messages)
    else:
        assert isinstance(body, CompletionBody)
        if body.logprobs is not None:
            sampling["logprobs"] = body.logprobs
        prompt = body.prompt
    return EngineRequest(custom_id, url, prompt, sampling, response_format)


def prompt_chars(body: Any) -> int:
    """The size of a validated body's prompt in characters (token ids count 4 each)."""
    if isinstance(body, EmbeddingBody):
        return sum(len(item) if isinstance(item, str) else 4 * len(item) for item in body.inputs())
    if isinstance(body, ChatBody):
        total = 0
        for message in body.messages:
            content = message.content
            if isinstance(content, str):
                total += len(content)
            elif content:
                total += sum(len(part.text) for part in content)
        return total
    prompt = body.prompt
    return len(prompt) if isinstance(prompt, str) else 4 * len(prompt)
