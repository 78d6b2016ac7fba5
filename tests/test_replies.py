"""Result and error lines are in OpenAI's batch output format (SPEC §5): every body validates
against the official `openai` types, and every line against vLLM's own BatchRequestOutput."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import orjson
import pytest
from helpers import (
    assert_every_line_once,
    chat_line,
    completion_line,
    embedding_line,
    write_jsonl,
)
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from runner.client import LocalClient
from runner.fake_engine import FakeEngine
from runner.journal import Journal
from runner.lines import Limits
from runner.replies import error_record, result_body, result_line
from runner.run import RunOptions, run_lines, scan_file
from runner.types import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Choice,
    EngineOutput,
    EngineRequest,
    ModelSpec,
)


def token(text: str, logprob: float, top: list[tuple[str, float]] | None = None) -> dict:
    """One token's log probabilities, in the format runner.types.Choice.logprobs holds."""
    entry = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    entry["top_logprobs"] = [
        {"token": other, "logprob": value, "bytes": list(other.encode())}
        for other, value in (top or [])
    ]
    return entry


LOGPROBS = [
    token("Hello", -0.25, [("Hello", -0.25), ("Hi", -1.5)]),
    token(",", -0.5, [(",", -0.5), ("!", -2.0)]),
    token(" wörld", -1.0, [(" wörld", -1.0), (" there", -1.25)]),
]


def generation_output(logprobs: list[dict] | None = None, n: int = 1) -> EngineOutput:
    choices = [
        Choice(index, "Hello, wörld", "stop" if index == 0 else "length", 3, logprobs)
        for index in range(n)
    ]
    return EngineOutput(key="q1", prompt_tokens=11, choices=choices)


def body_of(record: dict) -> dict:
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["error"] is None
    assert set(record["response"]) == {"status_code", "request_id", "body"}
    assert record["response"]["status_code"] == 200
    return record["response"]["body"]


# ------------------------------------------------------------------------------ result lines


def result_record(request: EngineRequest, output: EngineOutput, model: str) -> dict:
    """A result line as it is written to `results.jsonl`, read back."""
    return orjson.loads(result_line(request, output, model))


def reference_record(request: EngineRequest, output: EngineOutput, model: str) -> dict:
    """What a result line must hold, built the plain way, as nested dicts."""
    body = result_body(request, output, model)
    response = {"status_code": 200, "request_id": "req_reference", "body": body}
    return {
        "id": "batch_req_reference",
        "custom_id": request.key,
        "response": response,
        "error": None,
    }


def without_ids(record: dict) -> dict:
    body = record["response"]["body"]
    body.pop("created", None)
    for where, key in ((record, "id"), (record["response"], "request_id"), (body, "id")):
        assert isinstance(where.pop(key, ""), str)
    return record


@pytest.mark.parametrize(
    ("endpoint", "output"),
    [
        (CHAT, generation_output(n=2)),
        (CHAT, EngineOutput("q1", 4, [Choice(0, 'a "quoted"\n\u2028 t\x00xt é', None, 5)])),
        (CHAT, generation_output(LOGPROBS)),
        (COMPLETIONS, generation_output(n=2)),
        (EMBEDDINGS, EngineOutput("q1", 4, embeddings=[[0.5, -0.25]])),
    ],
)
def test_a_result_line_is_the_record_as_orjson_writes_it(endpoint, output):
    request = EngineRequest('q"1 é', endpoint, [], {})
    line = result_line(request, output, 'model "x"')
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.dumps(orjson.loads(line)) + b"\n" == line  # the bytes orjson would write
    record = reference_record(request, output, 'model "x"')
    assert without_ids(orjson.loads(line)) == without_ids(record)
    ids = orjson.loads(line)
    assert ids["id"].startswith("batch_req_") and ids["response"]["request_id"].startswith("req_")


# -------------------------------------------------------------------------- chat completions


@pytest.mark.parametrize("n", [1, 3])
def test_chat_body_is_an_openai_chat_completion(n):
    request = EngineRequest("q1", CHAT, [{"role": "user", "content": "hi"}], {"n": n})
    record = result_record(request, generation_output(n=n), "smollm2-135m")
    assert record["custom_id"] == "q1" and record["id"].startswith("batch_req_")
    completion = ChatCompletion.model_validate(body_of(record))
    assert completion.object == "chat.completion"
    assert completion.model == "smollm2-135m"
    assert [choice.index for choice in completion.choices] == list(range(n))
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello, wörld"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is None
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.completion_tokens == 3 * n
    assert completion.usage.total_tokens == 11 + 3 * n


def test_chat_logprobs_validate_and_keep_every_token():
    request = EngineRequest("q1", CHAT, [{"role": "user", "content": "hi"}], {"logprobs": 2})
    record = result_record(request, generation_output(LOGPROBS), "m")
    completion = ChatCompletion.model_validate(body_of(record))
    content = completion.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["Hello", ",", " wörld"]
    assert [entry.logprob for entry in content] == [-0.25, -0.5, -1.0]
    assert content[2].bytes == list(" wörld".encode())
    assert [top.token for top in content[0].top_logprobs] == ["Hello", "Hi"]
    assert content[1].top_logprobs[1].logprob == -2.0


# --------------------------------------------------------------------------- text completions


def test_completion_body_is_an_openai_completion():
    request = EngineRequest("q1", COMPLETIONS, "once", {"n": 2})
    completion = Completion.model_validate(
        body_of(result_record(request, generation_output(n=2), "m"))
    )
    assert completion.object == "text_completion"
    assert [choice.text for choice in completion.choices] == ["Hello, wörld"] * 2
    assert [choice.finish_reason for choice in completion.choices] == ["stop", "length"]
    assert completion.usage.completion_tokens == 6


def test_completion_logprobs_in_the_legacy_format():
    request = EngineRequest("q1", COMPLETIONS, "once", {"logprobs": 2})
    body = body_of(result_record(request, generation_output(LOGPROBS), "m"))
    logprobs = Completion.model_validate(body).choices[0].logprobs
    assert logprobs.tokens == ["Hello", ",", " wörld"]
    assert logprobs.token_logprobs == [-0.25, -0.5, -1.0]
    assert logprobs.top_logprobs == [
        {"Hello": -0.25, "Hi": -1.5},
        {",": -0.5, "!": -2.0},
        {" wörld": -1.0, " there": -1.25},
    ]
    assert logprobs.text_offset == [0, 5, 6]  # offsets into the text, in characters


# -------------------------------------------------------------------------------- embeddings

VECTORS = [[0.5, -0.25, 0.125, 1.0], [0.1, 0.2, -0.3, 0.4]]


def embedding_record(encoding: str) -> dict:
    request = EngineRequest(
        "e1", EMBEDDINGS, ["a", "b"], reply_options={"encoding_format": encoding}
    )
    return result_record(request, EngineOutput("e1", 7, embeddings=VECTORS), "minilm")


def test_embedding_body_is_an_openai_embedding_response():
    response = CreateEmbeddingResponse.model_validate(body_of(embedding_record("float")))
    assert response.object == "list"
    assert [item.index for item in response.data] == [0, 1]
    assert [item.embedding for item in response.data] == VECTORS
    assert response.usage.prompt_tokens == response.usage.total_tokens == 7


def test_base64_embeddings_are_little_endian_float32():
    body = body_of(embedding_record("base64"))
    decoded = []
    for item in body["data"]:
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 4 * len(VECTORS[0])
        decoded.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    for got, want in zip(decoded, VECTORS):
        assert got == pytest.approx(want, rel=1e-6)
    # openai's type holds the decoded floats (the SDK decodes base64 itself)
    body["data"] = [{**item, "embedding": vector} for item, vector in zip(body["data"], decoded)]
    CreateEmbeddingResponse.model_validate(body)


# --------------------------------------------------------------------------------- errors


def test_error_line_shape():
    record = error_record("q9", 12, "invalid_request", "body.temperature: too hot")
    assert record == {
        "id": record["id"],
        "custom_id": "q9",
        "response": None,
        "error": {"code": "invalid_request", "message": "body.temperature: too hot", "line": 12},
    }
    assert record["id"].startswith("batch_req_")
    assert error_record(None, 3, "invalid_json", "x")["custom_id"] is None


def test_ids_are_unique():
    request = EngineRequest("q1", CHAT, [{"role": "user", "content": "hi"}])
    records = [result_record(request, generation_output(), "m") for _ in range(50)]
    records += [error_record("q", 1, "c", "m") for _ in range(50)]
    assert len({record["id"] for record in records}) == 100
    assert len({record["response"]["request_id"] for record in records[:50]}) == 50


# ------------------------------------------------- whole runs, checked against both libraries

FILES = {
    CHAT: [
        chat_line("c1", max_tokens=4),
        chat_line("c2", n=2),
        b"not json",
        chat_line("c3", temperature="hot"),
        chat_line("c4", "word " * 80),
        chat_line("c1"),
    ],
    COMPLETIONS: [
        completion_line("p1", max_tokens=3),
        completion_line("p2", prompt=[1, 2, 3], n=2),
        completion_line("p3", echo=True),
        b"[1]",
    ],
    EMBEDDINGS: [
        embedding_line("e1"),
        embedding_line("e2", ["x", "y"], encoding_format="base64"),
        embedding_line("e3", [[1, 2], [3, 4, 5]]),
        embedding_line("e4", ""),
        b"{",
    ],
}
OPENAI_TYPES = {CHAT: ChatCompletion, COMPLETIONS: Completion, EMBEDDINGS: CreateEmbeddingResponse}


def run_file(tmp_path: Path, endpoint: str) -> tuple[list[dict], list[dict]]:
    path = write_jsonl(tmp_path / "in.jsonl", FILES[endpoint])
    runner = "pooling" if endpoint == EMBEDDINGS else "generate"
    spec = ModelSpec("fake", "x", "fake", runner, {"max_model_len": 64})
    summary = scan_file(path, Limits())
    journal = Journal(tmp_path / "out")
    options = RunOptions(endpoint=endpoint, model="fake")
    run_lines(path, journal, LocalClient(FakeEngine(spec)), options, summary.lines)
    journal.close()
    return assert_every_line_once(path, tmp_path / "out")


def decoded(body: dict) -> dict:
    """An embeddings body with base64 vectors decoded, as the openai SDK would."""
    data = []
    for item in body.get("data", []):
        vector = item["embedding"]
        if isinstance(vector, str):
            raw = base64.b64decode(vector)
            vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        data.append({**item, "embedding": vector})
    return {**body, "data": data} if "data" in body else body


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_every_result_body_of_a_run_validates_against_openai(tmp_path, endpoint):
    results, errors = run_file(tmp_path, endpoint)
    assert results and errors
    for record in results:
        OPENAI_TYPES[endpoint].model_validate(decoded(body_of(record)))
    for record in errors:
        assert set(record) == {"id", "custom_id", "response", "error"}
        assert record["response"] is None
        assert set(record["error"]) == {"code", "message", "line"}
        assert isinstance(record["error"]["line"], int) and record["error"]["message"]


@pytest.fixture(scope="module")
def vllm_batch():
    """vLLM's run_batch module (importing it imports vLLM: seconds, so once per module)."""
    return pytest.importorskip("vllm.entrypoints.launchers.run_batch")


@pytest.mark.parametrize(
    "endpoint",
    [
        CHAT,
        pytest.param(
            COMPLETIONS,
            marks=pytest.mark.xfail(
                reason="vLLM's BatchResponseData.body is a union (AllResponse) of chat, "
                "embedding, score, rerank, transcription and translation responses, without "
                "CompletionResponse: a text_completion body fails it with 'Input should be "
                "chat.completion' and missing 'message'/'data'/'text' fields",
                strict=True,
            ),
        ),
        EMBEDDINGS,
    ],
)
def test_every_result_line_validates_as_vllm_batch_request_output(tmp_path, vllm_batch, endpoint):
    results, _ = run_file(tmp_path, endpoint)
    for record in results:
        output = vllm_batch.BatchRequestOutput.model_validate(record)
        assert output.custom_id == record["custom_id"]
        assert output.response.status_code == 200
        assert output.response.body is not None


def test_completion_bodies_validate_as_vllm_completion_response(tmp_path, vllm_batch):
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    results, _ = run_file(tmp_path, COMPLETIONS)
    for record in results:
        CompletionResponse.model_validate(body_of(record))
    request = EngineRequest("q1", COMPLETIONS, "once", {"logprobs": 2})
    CompletionResponse.model_validate(
        body_of(result_record(request, generation_output(LOGPROBS), "m"))
    )


def test_logprob_bodies_validate_as_vllm_batch_request_output(vllm_batch):
    request = EngineRequest("q1", CHAT, [{"role": "user", "content": "hi"}], {"logprobs": 2})
    record = result_record(request, generation_output(LOGPROBS), "m")
    output = vllm_batch.BatchRequestOutput.model_validate(record)
    assert output.response.body.choices[0].logprobs.content[2].token == " wörld"
    vllm_batch.BatchRequestOutput.model_validate(embedding_record("base64"))


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_every_error_line_with_a_custom_id_validates_as_vllm_batch_request_output(
    tmp_path, vllm_batch, endpoint
):
    _, errors = run_file(tmp_path, endpoint)
    named = [record for record in errors if record["custom_id"] is not None]
    assert named and len(named) < len(errors)  # some lines had no readable custom_id
    for record in named:
        output = vllm_batch.BatchRequestOutput.model_validate(record)
        assert output.response is None
        assert output.error == record["error"]
