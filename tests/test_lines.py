"""Request lines: reading them in bounded memory, mapping bodies onto engine requests, and
giving every kind of bad line its own error (SPEC §3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CHAT, COMPLETIONS, EMBEDDINGS, chat_line, completion_line, embedding_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runner.lines
from runner.lines import FileRejected, Limits, LineError, ParsedLine, RawLine, parse_line
from runner.run import LineChecker

LIMITS = Limits()


def raw(item: dict | bytes, number: int = 1) -> RawLine:
    data = item if isinstance(item, bytes) else json.dumps(item).encode()
    return RawLine(number, data, len(data))


def parsed(item: dict | bytes, defaults: dict | None = None) -> ParsedLine:
    result = parse_line(raw(item), LIMITS, defaults)
    assert isinstance(result, ParsedLine), result
    return result


def failed(item: dict | bytes, limits: Limits = LIMITS) -> LineError:
    result = parse_line(raw(item), limits)
    assert isinstance(result, LineError), result
    return result


def read(path: Path, max_line_bytes: int = 1 << 20) -> list[tuple[int, bytes | None, int]]:
    return [
        (line.number, line.data, line.length)
        for line in runner.lines.read_raw_lines(path, max_line_bytes)
    ]


# ---------------------------------------------------------------- mapping of parameters

BASE = {"n": 1, "max_tokens": None}

GENERATION_PARAMETERS = [
    ({"max_tokens": 64}, {"max_tokens": 64}),
    ({"temperature": 0.2}, {"temperature": 0.2}),
    ({"temperature": 0}, {"temperature": 0}),
    ({"top_p": 0.9}, {"top_p": 0.9}),
    ({"n": 3}, {"n": 3}),
    ({"seed": 1234}, {"seed": 1234}),
    ({"presence_penalty": 0.5}, {"presence_penalty": 0.5}),
    ({"frequency_penalty": -1.5}, {"frequency_penalty": -1.5}),
    ({"top_k": 40}, {"top_k": 40}),
    ({"min_p": 0.05}, {"min_p": 0.05}),
    ({"repetition_penalty": 1.1}, {"repetition_penalty": 1.1}),
    ({"min_tokens": 4}, {"min_tokens": 4}),
    ({"ignore_eos": True}, {"ignore_eos": True}),
    ({"stop": "END"}, {"stop": ["END"]}),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({"user": "someone", "stream": False}, {}),
]


@pytest.mark.parametrize(("body", "sampling"), GENERATION_PARAMETERS, ids=lambda v: str(v))
@pytest.mark.parametrize("make", [chat_line, completion_line], ids=["chat", "completions"])
def test_generation_parameter_maps_onto_sampling(make, body, sampling):
    request = parsed(make("q1", **body)).request
    assert request.sampling == {**BASE, **sampling}
    assert request.response_format is None


@pytest.mark.parametrize(
    ("body", "max_tokens"),
    [
        ({"max_completion_tokens": 50}, 50),
        ({"max_tokens": 30}, 30),
        ({"max_tokens": 40, "max_completion_tokens": 40}, 40),
        ({}, None),
    ],
)
def test_chat_max_completion_tokens_and_max_tokens(body, max_tokens):
    assert parsed(chat_line("q1", **body)).request.sampling["max_tokens"] == max_tokens


def test_chat_max_tokens_and_max_completion_tokens_that_disagree_fail():
    error = failed(chat_line("q1", max_tokens=40, max_completion_tokens=50))
    assert error.code == "invalid_request"
    assert "max_completion_tokens" in error.message


@pytest.mark.parametrize(
    ("body", "logprobs"),
    [
        ({"logprobs": True, "top_logprobs": 5}, 5),
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True}, 0),
    ],
)
def test_chat_logprobs_and_top_logprobs_map_to_sampling_logprobs(body, logprobs):
    assert parsed(chat_line("q1", **body)).request.sampling["logprobs"] == logprobs


def test_chat_logprobs_false_asks_for_none():
    assert "logprobs" not in parsed(chat_line("q1", logprobs=False)).request.sampling


@pytest.mark.parametrize("logprobs", [0, 3, 20])
def test_completions_logprobs_is_an_int(logprobs):
    sampling = parsed(completion_line("q1", logprobs=logprobs)).request.sampling
    assert sampling["logprobs"] == logprobs


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": {"type": "object"}, "strict": True},
}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (SCHEMA_FORMAT, SCHEMA_FORMAT),
    ],
)
@pytest.mark.parametrize("make", [chat_line, completion_line], ids=["chat", "completions"])
def test_response_format_is_kept_apart_from_sampling(make, response_format, expected):
    request = parsed(make("q1", response_format=response_format)).request
    assert request.response_format == expected
    assert "response_format" not in request.sampling


def test_chat_messages_become_the_prompt():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    line = {"custom_id": "q1", "method": "POST", "url": CHAT, "body": {"messages": messages}}
    result = parsed(line)
    assert result.request.prompt == messages
    assert result.request.endpoint == CHAT
    assert result.request.key == result.custom_id == "q1"
    assert result.url == CHAT


def test_the_model_named_by_a_line_is_reported():
    assert parsed(chat_line("q1", model="smollm2-135m")).model == "smollm2-135m"
    assert parsed(chat_line("q1")).model is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("tell me", "tell me"), ([5, 6, 7], [5, 6, 7]), (["a single prompt"], "a single prompt")],
)
def test_completions_prompt(prompt, expected):
    request = parsed(completion_line("q1", prompt=prompt)).request
    assert request.prompt == expected
    assert request.endpoint == COMPLETIONS


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        ("one text", ["one text"]),
        (["first", "second"], ["first", "second"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["str", "list-of-str", "token-ids", "list-of-token-ids"],
)
def test_embeddings_input_becomes_one_prompt_per_embedding(text, prompt):
    request = parsed(embedding_line("e1", text)).request
    assert request.prompt == prompt
    assert request.endpoint == EMBEDDINGS
    assert request.sampling == {}
    assert request.reply_options == {"encoding_format": "float"}


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_encoding_format(encoding):
    request = parsed(embedding_line("e1", encoding_format=encoding)).request
    assert request.reply_options == {"encoding_format": encoding}


def test_defaults_fill_in_what_a_line_does_not_set():
    defaults = {"temperature": 0.2, "max_tokens": 256}
    assert parsed(chat_line("q1"), defaults).request.sampling["max_tokens"] == 256
    request = parsed(chat_line("q1", temperature=0.9, max_tokens=8), defaults).request
    assert request.sampling["temperature"] == 0.9
    assert request.sampling["max_tokens"] == 8


def test_default_max_tokens_yields_to_a_lines_max_completion_tokens():
    request = parsed(chat_line("q1", max_completion_tokens=64), {"max_tokens": 256}).request
    assert request.sampling["max_tokens"] == 64


# ------------------------------------------------------------------------------ bad lines

NAN_LINE = (
    b'{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}}'
)
BAD_LINES = [
    ("not-json", b"this is not json", "invalid_json", "not valid JSON"),
    ("truncated-json", b'{"custom_id": "q1", "method": "PO', "invalid_json", "not valid JSON"),
    ("array", b"[1, 2, 3]", "invalid_json", "not a JSON object"),
    ("number", b"42", "invalid_json", "not a JSON object"),
    ("string", b'"a string"', "invalid_json", "not a JSON object"),
    ("null", b"null", "invalid_json", "not a JSON object"),
    ("nan", NAN_LINE, "invalid_json", "JSON"),
    ("infinity", NAN_LINE.replace(b"NaN", b"Infinity"), "invalid_json", "JSON"),
    # 1e999 is valid JSON that reads as infinity, which no parameter accepts.
    ("overflow-to-infinity", NAN_LINE.replace(b"NaN", b"1e999"), "invalid_request", "temperature"),
    ("no-custom-id", {"method": "POST", "url": CHAT, "body": {}}, "missing_custom_id", "custom_id"),
    ("custom-id-number", chat_line(17), "missing_custom_id", "custom_id"),
    ("custom-id-null", chat_line(None), "missing_custom_id", "custom_id"),
    ("custom-id-empty", chat_line(""), "missing_custom_id", "custom_id"),
    ("wrong-method", {**chat_line("q1"), "method": "GET"}, "invalid_method", "GET"),
    ("no-method", {"custom_id": "q1", "url": CHAT, "body": {}}, "invalid_method", "POST"),
    ("unknown-url", {**chat_line("q1"), "url": "/v1/responses"}, "invalid_url", "/v1/responses"),
    ("unknown-envelope-key", {**chat_line("q1"), "extra": 1}, "invalid_request", "extra"),
    ("body-not-object", {**chat_line("q1"), "body": [1]}, "invalid_request", "body"),
    ("stream-true", chat_line("q1", stream=True), "unsupported_parameter", "stream"),
    ("unknown-parameter", chat_line("q1", frobnicate=3), "unsupported_parameter", "frobnicate"),
    (
        "unknown-parameter-completions",
        completion_line("q1", tools=[]),
        "unsupported_parameter",
        "tools",
    ),
    (
        "unknown-parameter-embeddings",
        embedding_line("e1", temperature=0.5),
        "unsupported_parameter",
        "temperature",
    ),
    ("echo-true", completion_line("q1", echo=True), "unsupported_parameter", "echo"),
    ("temperature-hot", chat_line("q1", temperature="hot"), "invalid_request", "temperature"),
    ("temperature-too-high", chat_line("q1", temperature=2.5), "invalid_request", "temperature"),
    ("temperature-negative", chat_line("q1", temperature=-0.1), "invalid_request", "temperature"),
    ("top-p-zero", chat_line("q1", top_p=0), "invalid_request", "top_p"),
    (
        "presence-penalty",
        chat_line("q1", presence_penalty=3),
        "invalid_request",
        "presence_penalty",
    ),
    (
        "frequency-penalty",
        chat_line("q1", frequency_penalty=-3),
        "invalid_request",
        "frequency_penalty",
    ),
    ("max-tokens-zero", chat_line("q1", max_tokens=0), "invalid_request", "max_tokens"),
    ("max-tokens-float", chat_line("q1", max_tokens=10.5), "invalid_request", "max_tokens"),
    ("n-zero", chat_line("q1", n=0), "invalid_request", "n"),
    ("seed-bool", chat_line("q1", seed=True), "invalid_request", "seed"),
    (
        "top-logprobs-over-20",
        chat_line("q1", logprobs=True, top_logprobs=21),
        "invalid_request",
        "top_logprobs",
    ),
    (
        "top-logprobs-without-logprobs",
        chat_line("q1", top_logprobs=3),
        "invalid_request",
        "top_logprobs",
    ),
    (
        "completions-logprobs-bool",
        completion_line("q1", logprobs=True),
        "invalid_request",
        "logprobs",
    ),
    ("stop-too-many", chat_line("q1", stop=[str(i) for i in range(17)]), "invalid_request", "stop"),
    ("no-messages", {**chat_line("q1"), "body": {"max_tokens": 5}}, "invalid_request", "messages"),
    (
        "empty-messages",
        {**chat_line("q1"), "body": {"messages": []}},
        "invalid_request",
        "messages",
    ),
    (
        "image-part",
        {
            **chat_line("q1"),
            "body": {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/cat.png"},
                            }
                        ],
                    }
                ]
            },
        },
        "invalid_request",
        "image_url",
    ),
    (
        "json-schema-missing",
        chat_line("q1", response_format={"type": "json_schema"}),
        "invalid_request",
        "json_schema",
    ),
    ("several-prompts", completion_line("q1", prompt=["a", "b"]), "invalid_request", "prompt"),
    ("embedding-empty-input", embedding_line("e1", ""), "invalid_request", "input"),
    (
        "embedding-dimensions",
        embedding_line("e1", dimensions=64),
        "unsupported_parameter",
        "dimensions",
    ),
    (
        "max-tokens-over-limit",
        chat_line("q1", max_tokens=40_000),
        "limit_exceeded",
        "max_tokens 40000",
    ),
    (
        "max-completion-tokens-over-limit",
        chat_line("q1", max_completion_tokens=40_000),
        "limit_exceeded",
        "max_tokens 40000",
    ),
    ("n-over-limit", chat_line("q1", n=17), "limit_exceeded", "n 17"),
]


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_bad_line_gets_its_error_code_and_a_message_naming_the_problem(line, code, fragment):
    error = failed(line)
    assert error.code == code
    assert fragment in error.message
    assert error.line == 1


def test_an_unknown_role_fails_naming_the_role():
    # Classed as unsupported_parameter today (any pydantic literal error is); either code
    # tells the user the line cannot run, and the message names the field.
    line = {**chat_line("q1"), "body": {"messages": [{"role": "robot", "content": "x"}]}}
    error = failed(line)
    assert error.code in ("invalid_request", "unsupported_parameter")
    assert "body.messages[0].role" in error.message


def test_bad_line_keeps_its_custom_id_when_it_has_one():
    assert failed(chat_line("q7", temperature="hot")).custom_id == "q7"
    assert failed(b"[1]").custom_id is None


def test_limits_come_from_the_config():
    limits = Limits(max_tokens=100, max_n=2)
    assert failed(chat_line("q1", max_tokens=101), limits).code == "limit_exceeded"
    assert failed(chat_line("q1", n=3), limits).code == "limit_exceeded"
    assert isinstance(parse_line(raw(chat_line("q1", max_tokens=100, n=2)), limits), ParsedLine)


def test_a_line_over_max_line_bytes_fails_with_its_length():
    error = parse_line(RawLine(4, None, 5_000_000), LIMITS)
    assert isinstance(error, LineError)
    assert (error.code, error.line, error.custom_id) == ("line_too_long", 4, None)
    assert "5000000" in error.message and str(LIMITS.max_line_bytes) in error.message


def test_a_line_that_is_not_utf8_rejects_the_file():
    data = json.dumps(chat_line("q1", "café"), ensure_ascii=False).encode("latin-1")
    with pytest.raises(FileRejected) as caught:
        parse_line(RawLine(3, data, len(data)), LIMITS)
    assert caught.value.code == "invalid_encoding"
    assert caught.value.line == 3
    assert "UTF-8" in caught.value.message


def test_a_utf8_bom_on_the_first_line_is_allowed():
    assert parsed(b"\xef\xbb\xbf" + json.dumps(chat_line("q1")).encode()).custom_id == "q1"


def check_all(folder: Path, lines: list[dict | bytes], endpoint: str | None = None) -> list:
    """Each line of a file made of `lines`, checked with the rules that span lines."""
    path = folder / "lines.jsonl"
    path.write_bytes(b"".join(raw(line).data + b"\n" for line in lines))
    checker = LineChecker(LIMITS, None, endpoint, path)
    return [checker.check(line) for line in runner.lines.read_raw_lines(path, 1 << 20)]


def test_duplicate_custom_id_fails_the_second_line_only(tmp_path: Path):
    first, second, other = check_all(tmp_path, [chat_line("a"), chat_line("a"), chat_line("b")])
    assert isinstance(first, ParsedLine) and isinstance(other, ParsedLine)
    assert isinstance(second, LineError)
    assert (second.code, second.line, second.custom_id) == ("duplicate_custom_id", 2, "a")
    assert "'a'" in second.message


def test_duplicate_of_an_invalid_line_is_a_duplicate_too(tmp_path: Path):
    first, second = check_all(tmp_path, [chat_line("a", temperature="hot"), chat_line("a")])
    assert isinstance(first, LineError)
    assert isinstance(second, LineError) and second.code == "duplicate_custom_id"


def test_mixed_endpoints_fail_the_lines_that_differ_from_the_first(tmp_path: Path):
    results = check_all(tmp_path, [chat_line("a"), completion_line("b"), chat_line("c")])
    assert isinstance(results[0], ParsedLine) and isinstance(results[2], ParsedLine)
    error = results[1]
    assert isinstance(error, LineError)
    assert (error.code, error.line, error.custom_id) == ("mixed_endpoints", 2, "b")
    assert COMPLETIONS in error.message and CHAT in error.message


def test_the_files_endpoint_is_that_of_its_first_valid_line(tmp_path: Path):
    results = check_all(tmp_path, [b"junk", embedding_line("a"), chat_line("b")])
    assert [getattr(result, "code", "ok") for result in results] == [
        "invalid_json",
        "ok",
        "mixed_endpoints",
    ]


def test_a_known_endpoint_is_enforced_from_the_first_line(tmp_path: Path):
    results = check_all(tmp_path, [completion_line("a"), chat_line("b")], endpoint=CHAT)
    assert results[0].code == "mixed_endpoints"
    assert isinstance(results[1], ParsedLine)


# --------------------------------------------------------------------------- reading lines


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"b": 2}\r\n')
    assert [(n, data) for n, data, _ in read(path)] == [(1, b'{"a": 1}\r'), (2, b'{"b": 2}\r')]
    line = chat_line("q1")
    path.write_bytes(json.dumps(line).encode() + b"\r\n")
    first = next(runner.lines.read_raw_lines(path, 1 << 20))
    assert parsed(first.data).custom_id == "q1"


def test_no_final_newline(tmp_path):
    path = tmp_path / "open.jsonl"
    path.write_bytes(b"first\nsecond")
    assert read(path) == [(1, b"first", 5), (2, b"second", 6)]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "blanks.jsonl"
    path.write_bytes(b"\n\none\n   \n\t\r\ntwo\n\n")
    assert [(n, data) for n, data, _ in read(path)] == [(3, b"one"), (6, b"two")]


def test_an_empty_file_has_no_lines(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert read(path) == []


def test_a_bom_stays_on_the_first_line_for_parse_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    line = json.dumps(chat_line("q1")).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\n" + line.replace(b"q1", b"q2") + b"\n")
    lines = list(runner.lines.read_raw_lines(path, 1 << 20))
    assert [item.number for item in lines] == [1, 2]
    assert [parsed(item.data).custom_id for item in lines] == ["q1", "q2"]


def test_a_line_ending_exactly_at_the_block_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.lines, "BLOCK_BYTES", 8)
    path = tmp_path / "boundary.jsonl"
    # newline at the last byte of block 1, then the first byte of block 3 is a newline
    path.write_bytes(b"1234567\n" + b"abcdefgh" + b"\nxyz\n")
    assert read(path) == [(1, b"1234567", 7), (2, b"abcdefgh", 8), (3, b"xyz", 3)]


def test_a_line_of_exactly_max_line_bytes_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.lines, "BLOCK_BYTES", 4)
    path = tmp_path / "exact.jsonl"
    path.write_bytes(b"0123456789\n01234567890\nok")
    assert read(path, max_line_bytes=10) == [
        (1, b"0123456789", 10),
        (2, None, 11),
        (3, b"ok", 2),
    ]


@pytest.mark.parametrize("block_bytes", [3, 7, 16, 1 << 20])
def test_an_over_long_line_spanning_blocks_then_a_good_line(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(runner.lines, "BLOCK_BYTES", block_bytes)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"short\n" + b"x" * 50 + b"\ngood line\n" + b"y" * 31)
    assert read(path, max_line_bytes=20) == [
        (1, b"short", 5),
        (2, None, 50),
        (3, b"good line", 9),
        (4, None, 31),
    ]


lines_strategy = st.lists(
    st.one_of(
        st.binary(max_size=30).filter(lambda data: b"\n" not in data),
        st.sampled_from([b"", b" ", b"\r", b"\t \r", b"{}", b"x"]),
    ),
    max_size=30,
)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(lines=lines_strategy, block_bytes=st.integers(min_value=1, max_value=40))
def test_read_raw_lines_yields_every_non_blank_line_with_its_number(
    tmp_path, monkeypatch, lines, block_bytes
):
    monkeypatch.setattr(runner.lines, "BLOCK_BYTES", block_bytes)
    path = tmp_path / "property.jsonl"
    path.write_bytes(b"\n".join(lines))
    expected = [
        (number, data, len(data)) for number, data in enumerate(lines, start=1) if data.strip()
    ]
    assert read(path, max_line_bytes=1000) == expected
