"""The request bodies batchbox accepts, one msgspec Struct per endpoint.

Every Struct forbids unknown fields, so a parameter that cannot be honoured fails its line
instead of being dropped. The README's parameter table lists exactly these fields.

msgspec rather than pydantic here: it decodes and checks a line in one pass from bytes,
several times faster, and this runs for every line of files of 200,000 lines, twice.
Messages that say a parameter "cannot be honoured" or "is not supported" are reported
as `unsupported_parameter`; every other problem as `invalid_request`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(min_length=1)]
TokenIds = Annotated[list[NonNegativeInt], msgspec.Meta(min_length=1)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class JsonSchema(Strict, rename={"schema_": "schema"}):
    schema_: dict[str, Any]
    name: str = "response"
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def __post_init__(self) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")

    def for_engine(self) -> dict[str, Any] | None:
        return None if self.type == "text" else msgspec.to_builtins(self)


class Sampling(Strict):
    """Parameters shared by chat and text completions."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    n: PositiveInt = 1
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool | None = None
    user: str | None = None
    # vLLM's own extensions, as its OpenAI server accepts them.
    top_k: int | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None

    def __post_init__(self) -> None:
        if self.stream:
            raise ValueError(
                "stream: true cannot be honoured in a batch; leave it out or set it to false"
            )


class ChatBody(Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; set only one")


class CompletionBody(Sampling, kw_only=True):
    # One prompt: a string, a list holding one string, or token ids.
    prompt: str | Annotated[list[str | NonNegativeInt], msgspec.Meta(min_length=1)]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: PositiveInt | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.echo:
            raise ValueError("echo: true is not supported; leave it out or set it to false")
        if self.suffix is not None:
            raise ValueError("suffix is not supported; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        if isinstance(self.prompt, list):
            kinds = {type(item) for item in self.prompt}
            if kinds == {str}:
                if len(self.prompt) != 1:
                    raise ValueError("prompt: give one prompt per line, not a list of prompts")
                self.prompt = self.prompt[0]
            elif kinds != {int}:
                raise ValueError("prompt: a list must hold one string or only token ids")


class EmbeddingBody(Strict):
    # A string, a list of strings, token ids, or a list of token id lists.
    input: Text | Annotated[list[Text | NonNegativeInt | TokenIds], msgspec.Meta(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported; the model returns its own size")
        if isinstance(self.input, list):
            kinds = {type(item) for item in self.input}
            if len(kinds) != 1:
                raise ValueError("input: a list must hold only strings, token ids, or lists")

    def inputs(self) -> list[Any]:
        """One item per embedding asked for."""
        if isinstance(self.input, str) or isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


BODY_TYPES: dict[str, type[msgspec.Struct]] = {
    "/v1/chat/completions": ChatBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingBody,
}
DECODERS = {url: msgspec.json.Decoder(body_type) for url, body_type in BODY_TYPES.items()}
