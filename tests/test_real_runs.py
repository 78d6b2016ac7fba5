"""What users see, with the real vLLM engine and the shipped small models on this machine.

`batchbox run` and `batchbox serve` run as real commands on a copy of the shipped config
whose folders point into tmp_path; the models come from the repository's `models/`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    assert_every_line_once,
    chat_line,
    completion_line,
    embedding_line,
    read_jsonl,
    shipped_config,
    write_jsonl,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
BATCHBOX = [sys.executable, "-m", "watcher.cli"]
NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}},
    "required": ["name"],
    "additionalProperties": False,
}
COLORS = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return shipped_config(tmp_path, settle_seconds=1, rescan_seconds=2)


def run(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BATCHBOX, "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def validate_lines(folder: Path, body_type: type) -> None:
    """Every line in vLLM's own batch output model; every body in the openai package's type."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    for record in read_jsonl(folder / "results.jsonl"):
        body_type.model_validate(record["response"]["body"])
        if body_type.__name__ != "Completion":  # vLLM's union has no completion response
            BatchRequestOutput.model_validate(record)
    for record in read_jsonl(folder / "errors.jsonl"):
        if record["custom_id"] is not None:
            BatchRequestOutput.model_validate(record)


def test_a_chat_file_with_bad_lines_gets_real_answers_for_the_good_ones(
    tmp_path: Path, config: Path
) -> None:
    from openai.types.chat import ChatCompletion

    long_prompt = "word " * 3000  # over SmolLM2's 2048-token context in the shipped config
    source = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            chat_line("colors", "Name three colors.", max_tokens=48, temperature=0),
            chat_line("capital", "What is the capital of France?", max_tokens=32, temperature=0),
            b"{not json",
            chat_line("colors", "A duplicate custom_id.", max_tokens=8),
            chat_line("stream", "Hi", stream=True),
            chat_line("unknown", "Hi", temperatur=0.5),
            chat_line("too-long", long_prompt, max_tokens=16),
            chat_line("two", "Say hello.", max_tokens=16, n=2, seed=1, temperature=0.7),
            chat_line(
                "json",
                "Give a JSON object with a key name.",
                max_tokens=60,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": NAME_SCHEMA},
                },
            ),
        ],
    )
    result = run(config, "run", str(source))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in folder.iterdir()) == [
        "benchmark.json",
        "errors.jsonl",
        "input.jsonl",
        "results.jsonl",
        "status.json",
    ]
    assert (folder / "input.jsonl").read_bytes() == source.read_bytes()
    assert_every_line_once(source, folder)
    answers = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(folder / "results.jsonl")}
    assert set(answers) == {"colors", "capital", "two", "json"}
    colors = answers["colors"]["choices"][0]["message"]["content"].lower()
    assert sum(color in colors for color in COLORS) >= 2, colors
    assert "paris" in answers["capital"]["choices"][0]["message"]["content"].lower()
    assert len(answers["two"]["choices"]) == 2
    assert set(json.loads(answers["json"]["choices"][0]["message"]["content"])) == {"name"}
    errors = {r["error"]["line"]: r["error"]["code"] for r in read_jsonl(folder / "errors.jsonl")}
    assert errors == {
        3: "invalid_json",
        4: "duplicate_custom_id",
        5: "unsupported_parameter",
        6: "unsupported_parameter",
        7: "context_length_exceeded",
    }
    validate_lines(folder, ChatCompletion)
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "completed"
    assert status["request_counts"] == {"total": 9, "completed": 4, "failed": 5}
    record = json.loads((folder / "benchmark.json").read_text())
    assert record["hardware"].startswith(("CPU", "NVIDIA")) or "GPU" in record["hardware"]
    assert record["engine_version"][0].isdigit()
    assert record["load_seconds"] > 0 and record["run_seconds"] > 0
    assert record["completion_tokens"] > 20
    assert record["throughput"]["completion_tokens_per_second"] > 0


def test_seeded_requests_with_long_prompts_run_without_crashing_the_engine(
    tmp_path: Path, config: Path
) -> None:
    """Ten 700-token prompts overflow one step's prompt budget, so a chunked prefill would
    split one; vLLM's CPU sampler cannot rewind a seeded generator after such a split and
    its engine dies. The shipped CPU model turns chunked prefill off for that reason."""
    passage = "The river runs past the mill and on to the sea. " * 60
    lines = [
        # distinct from the first token on, so no prompt shares another's cached prefix
        chat_line(
            f"s{index}", f"{index}. Summarize in one line: {passage}", max_tokens=6, seed=index
        )
        for index in range(10)
    ]
    source = write_jsonl(tmp_path / "seeded.jsonl", lines)
    result = run(config, "run", str(source))
    assert result.returncode == 0, result.stderr
    assert "engine_died" not in result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert_every_line_once(source, folder)
    answers = read_jsonl(folder / "results.jsonl")
    assert len(answers) == 10
    assert all(a["response"]["body"]["usage"]["prompt_tokens"] > 600 for a in answers)


def test_a_completions_file_continues_the_prompts(tmp_path: Path, config: Path) -> None:
    from openai.types import Completion

    source = write_jsonl(
        tmp_path / "complete.jsonl",
        [
            completion_line("c1", "The capital of France is", max_tokens=8, temperature=0),
            completion_line("c2", "One, two, three,", max_tokens=8, temperature=0, logprobs=2),
            completion_line("c3", [504, 3458, 282], max_tokens=4),
        ],
    )
    result = run(config, "run", str(source))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert_every_line_once(source, folder)
    answers = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(folder / "results.jsonl")}
    assert "paris" in answers["c1"]["choices"][0]["text"].lower()
    assert (
        "four" in answers["c2"]["choices"][0]["text"].lower()
        or "4" in (answers["c2"]["choices"][0]["text"])
    )
    logprobs = answers["c2"]["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == answers["c2"]["usage"]["completion_tokens"]
    assert answers["c3"]["usage"]["prompt_tokens"] == 3
    validate_lines(folder, Completion)


def test_an_embeddings_file_puts_similar_sentences_closer(tmp_path: Path, config: Path) -> None:
    from openai.types import CreateEmbeddingResponse

    sentences = {
        "cat": "A cat sits on the mat.",
        "kitten": "A kitten is sitting on a rug.",
        "stocks": "Stock markets fell sharply today.",
    }
    source = write_jsonl(
        tmp_path / "sentences.jsonl",
        [embedding_line(key, text) for key, text in sentences.items()]
        + [embedding_line("pair", ["first text", "second text"])],
    )
    result = run(config, "run", str(source), "-m", "minilm")
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert_every_line_once(source, folder)
    bodies = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(folder / "results.jsonl")}
    vectors = {key: bodies[key]["data"][0]["embedding"] for key in sentences}
    assert all(len(vector) == 384 for vector in vectors.values())
    assert cosine(vectors["cat"], vectors["kitten"]) > cosine(vectors["cat"], vectors["stocks"])
    assert [item["index"] for item in bodies["pair"]["data"]] == [0, 1]
    validate_lines(folder, CreateEmbeddingResponse)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_service_runs_chat_and_embeddings_from_their_subfolders(
    tmp_path: Path, config: Path
) -> None:
    log = open(tmp_path / "serve.log", "w")
    service = subprocess.Popen(
        [*BATCHBOX, "-c", str(config), "serve"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:
        inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
        wait_for(lambda: (inbox / "minilm").is_dir(), 60, "the model subfolders")
        write_jsonl(
            inbox / "smollm2-135m" / "first.jsonl",
            [
                chat_line("a", "Name three colors.", max_tokens=24, temperature=0),
            ],
        )
        wait_for(lambda: (inbox / "smollm2-135m" / "first.status").exists(), 30, "the claim")
        write_jsonl(inbox / "minilm" / "vectors.jsonl", [embedding_line("v", "hello world")])
        # The embeddings job is taken (and queued behind the chat job) before the next one.
        wait_for(lambda: (inbox / "minilm" / "vectors.status").exists(), 30, "the claim")
        write_jsonl(
            inbox / "smollm2-135m" / "second.jsonl",
            [
                chat_line("b", "What is 2 + 2?", max_tokens=16, temperature=0),
            ],
        )
        for name in ("smollm2-135m/first", "minilm/vectors", "smollm2-135m/second"):
            wait_for(lambda name=name: (outbox / name / "status.json").exists(), 400, name)
        for name in ("smollm2-135m/first", "minilm/vectors", "smollm2-135m/second"):
            status = json.loads((outbox / name / "status.json").read_text())
            assert status["status"] == "completed", status
            assert status["request_counts"]["completed"] == 1
        answer = read_jsonl(outbox / "smollm2-135m/first/results.jsonl")[0]
        text = answer["response"]["body"]["choices"][0]["message"]["content"].lower()
        assert any(color in text for color in COLORS), text
        final = json.loads((inbox / "smollm2-135m" / "first.status").read_text())
        assert final["outbox"] == "smollm2-135m/first"
        assert not (inbox / "smollm2-135m" / "first.eta").exists()
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=90)
        log.close()
    events = [
        json.loads(line)
        for line in (tmp_path / "serve.log").read_text().splitlines()
        if line.startswith("{")
    ]
    loads = [event["model"] for event in events if event.get("event") == "engine_loading"]
    assert loads == ["smollm2-135m", "minilm", "smollm2-135m"]
    assert service.returncode == 0
