"""`batchbox run FILE` end to end on the fake backend: the outbox folder it writes (SPEC §5,
§6), tickets (§2), exit codes and one-sentence errors (§9)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from helpers import (
    assert_every_line_once,
    chat_line,
    embedding_line,
    write_jsonl,
)
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

import watcher.commands.run
from watcher.cli import main
from watcher.engines import EngineKeeper

CONFIG = """\
default_model: fake
models:
  fake: {path: nowhere, backend: fake}
  emb: {path: nowhere, backend: fake, runner: pooling}
"""
OUTBOX_FILES = {"results.jsonl", "errors.jsonl", "input.jsonl", "status.json", "benchmark.json"}


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def sentences(self) -> list[str]:
        """What stderr says in words: everything but the JSON log lines."""
        return [line for line in self.err.splitlines() if line and not line.startswith("{")]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with a fake-backend config.yaml; returns the config's path."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    (tmp_path / "drop").mkdir()
    return config


@pytest.fixture
def cli(site: Path, capsys, monkeypatch):
    """`batchbox -c site run ...` in this process, with the fake engine in this process too."""
    monkeypatch.setattr(
        watcher.commands.run, "EngineKeeper", functools.partial(EngineKeeper, True)
    )
    monkeypatch.delenv("BATCHBOX_CONFIG", raising=False)
    interrupt = signal.getsignal(signal.SIGINT)

    def call(*args: str, config: Path | None = None) -> Outcome:
        capsys.readouterr()
        code = main(["-c", str(config or site), *args])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    yield call
    signal.signal(signal.SIGINT, interrupt)  # `run` installs its own handler
    structlog.reset_defaults()  # `run` points logging at the captured stderr


def drop(site: Path, name: str, items: list) -> Path:
    return write_jsonl(site.parent / "drop" / name, items)


def outbox(site: Path) -> Path:
    return site.parent / "outbox"


def assert_one_sentence(outcome: Outcome) -> str:
    assert "Traceback" not in outcome.err
    assert len(outcome.sentences) == 1, outcome.err
    sentence = outcome.sentences[0]
    assert sentence.startswith("batchbox: ")
    return sentence


def assert_no_spool_left(site: Path) -> None:
    for spool in ("jobs", "runs"):
        jobs = site.parent / "state" / spool
        assert not jobs.exists() or list(jobs.iterdir()) == []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


GOOD_AND_BAD = [
    chat_line("q1", max_tokens=4),
    chat_line("q2", "a longer question for the model", n=2),
    b"",
    b"this line is not JSON",
    chat_line("q3", temperature="hot"),
    chat_line("q4"),
    chat_line("q1"),
]


# ------------------------------------------------------------------------------ success


def test_run_delivers_a_complete_outbox_folder(site, cli):
    source = drop(site, "questions.jsonl", GOOD_AND_BAD)
    before = source.read_bytes()
    outcome = cli("run", str(source))
    assert outcome.code == 0, outcome.err
    folder = outbox(site) / "questions"
    assert outcome.out.strip() == str(folder)
    assert {path.name for path in folder.iterdir()} == OUTBOX_FILES
    assert (folder / "input.jsonl").read_bytes() == before
    assert source.read_bytes() == before  # `run` leaves the file where it is

    results, errors = assert_every_line_once(source, folder)
    assert sorted(record["custom_id"] for record in results) == ["q1", "q2", "q4"]
    assert sorted(record["error"]["line"] for record in errors) == [4, 5, 7]
    for record in results:
        ChatCompletion.model_validate(record["response"]["body"])

    status = read_json(folder / "status.json")
    assert status["status"] == "completed"
    assert status["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert status["outbox"] == "questions"
    assert status["model"] == "fake" and status["endpoint"] == "/v1/chat/completions"
    assert status["input"] == "questions.jsonl"
    assert status["completed_at"] and status["errors"] == []
    usage = [record["response"]["body"]["usage"] for record in results]
    assert status["usage"] == {
        "prompt_tokens": sum(item["prompt_tokens"] for item in usage),
        "completion_tokens": sum(item["completion_tokens"] for item in usage),
    }
    assert_no_spool_left(site)


def test_benchmark_record_has_the_fields_of_spec_section_6(site, cli):
    source = drop(site, "bench.jsonl", GOOD_AND_BAD)
    assert cli("run", str(source)).code == 0
    folder = outbox(site) / "bench"
    record = read_json(folder / "benchmark.json")
    status = read_json(folder / "status.json")
    assert record["job_id"] == status["id"]
    assert record["model"] == "fake"
    assert record["source"] == str(site.parent / "nowhere")
    assert record["endpoint"] == "/v1/chat/completions"
    assert isinstance(record["engine_settings"], dict)
    assert record["engine_kind"] == "fake"  # ETAs are learnt per backend
    assert record["hardware"] and record["engine_version"]
    assert record["request_counts"] == status["request_counts"]
    assert record["prompt_tokens"] == status["usage"]["prompt_tokens"]
    assert record["completion_tokens"] == status["usage"]["completion_tokens"]
    assert record["load_seconds"] >= 0 and record["run_seconds"] >= 0
    assert set(record["throughput"]) >= {
        "requests_per_second",
        "prompt_tokens_per_second",
        "completion_tokens_per_second",
        "total_tokens_per_second",
    }
    assert record["estimate"]["run_seconds"] >= 0 and record["estimate"]["basis"]
    history = (site.parent / "state" / "benchmarks.jsonl").read_bytes().splitlines()
    assert json.loads(history[-1])["job_id"] == record["job_id"]


def test_a_ticket_is_copied_and_its_defaults_apply(site, cli):
    source = drop(site, "ticketed.jsonl", [chat_line("a"), chat_line("b", max_tokens=5)])
    ticket = site.parent / "drop" / "ticketed.yaml"
    ticket.write_text("defaults:\n  max_tokens: 2\npriority: 3\nmetadata: {project: demo}\n")
    assert cli("run", str(source)).code == 0
    folder = outbox(site) / "ticketed"
    assert {path.name for path in folder.iterdir()} == OUTBOX_FILES | {"ticketed.yaml"}
    assert (folder / "ticketed.yaml").read_bytes() == ticket.read_bytes()
    results, _ = assert_every_line_once(source, folder)
    tokens = {r["custom_id"]: r["response"]["body"]["usage"]["completion_tokens"] for r in results}
    assert tokens == {"a": 2, "b": 5}  # the line's own value wins over the default
    assert read_json(folder / "status.json")["metadata"] == {"project": "demo"}
    assert read_json(folder / "benchmark.json")["metadata"] == {"project": "demo"}
    assert ticket.exists()


def test_the_same_file_twice_gets_a_numbered_second_folder(site, cli):
    source = drop(site, "again.jsonl", [chat_line("a")])
    assert cli("run", str(source)).code == 0
    outcome = cli("run", str(source))
    assert outcome.code == 0
    assert outcome.out.strip() == str(outbox(site) / "again-2")
    for name in ("again", "again-2"):
        assert {path.name for path in (outbox(site) / name).iterdir()} == OUTBOX_FILES
        assert read_json(outbox(site) / name / "status.json")["outbox"] == name
    ids = {read_json(outbox(site) / name / "status.json")["id"] for name in ("again", "again-2")}
    assert len(ids) == 2
    assert_no_spool_left(site)


def test_output_option_writes_into_that_folder(site, cli, tmp_path):
    source = drop(site, "elsewhere.jsonl", [chat_line("a")])
    target = tmp_path / "chosen" / "place"
    outcome = cli("run", str(source), "-o", str(target))
    assert outcome.code == 0
    assert {path.name for path in (target / "elsewhere").iterdir()} == OUTBOX_FILES
    assert not (outbox(site) / "elsewhere").exists()
    assert_every_line_once(source, target / "elsewhere")


def test_model_option_picks_the_model(site, cli):
    source = drop(
        site,
        "sentences.jsonl",
        [embedding_line("e1"), embedding_line("e2", encoding_format="base64")],
    )
    assert cli("run", str(source), "-m", "emb").code == 0
    folder = outbox(site) / "sentences"
    results, errors = assert_every_line_once(source, folder)
    assert len(results) == 2 and errors == []
    float_result = next(record for record in results if record["custom_id"] == "e1")
    CreateEmbeddingResponse.model_validate(float_result["response"]["body"])
    assert read_json(folder / "status.json")["model"] == "emb"


def test_the_model_named_by_every_line_is_used(site, cli):
    source = drop(site, "named.jsonl", [embedding_line("e1", model="emb")])
    assert cli("run", str(source)).code == 0
    assert read_json(outbox(site) / "named" / "status.json")["model"] == "emb"


# ------------------------------------------------------------------------------ failures


def assert_failed_folder(
    site: Path, source: Path, stem: str, ticket: str | None = None
) -> tuple[dict, list, list]:
    folder = outbox(site) / stem
    expected = OUTBOX_FILES | ({ticket} if ticket else set())
    assert {path.name for path in folder.iterdir()} == expected
    assert (folder / "input.jsonl").read_bytes() == source.read_bytes()
    status = read_json(folder / "status.json")
    assert status["status"] == "failed"
    assert status["outbox"] == stem
    assert status["errors"], "a failed job says why"
    results, errors = assert_every_line_once(source, folder)
    assert_no_spool_left(site)
    return status, results, errors


def test_an_empty_file_fails_with_one_sentence_and_a_failed_folder(site, cli):
    source = drop(site, "empty.jsonl", [])
    outcome = cli("run", str(source))
    assert outcome.code == 1
    assert "no request lines" in assert_one_sentence(outcome)
    status, results, errors = assert_failed_folder(site, source, "empty")
    assert status["errors"][0]["code"] == "empty_file"
    assert results == errors == []
    assert source.exists()


def test_a_file_that_is_not_utf8_fails_and_every_line_is_in_errors(site, cli):
    latin = json.dumps(chat_line("q2", "crème"), ensure_ascii=False).encode("latin-1")
    source = drop(site, "latin.jsonl", [chat_line("q1"), latin, b"junk", b"", chat_line("q4")])
    outcome = cli("run", str(source))
    assert outcome.code == 1
    assert "UTF-8" in assert_one_sentence(outcome)
    status, results, errors = assert_failed_folder(site, source, "latin")
    assert status["errors"][0]["code"] == "invalid_encoding"
    assert results == []
    assert sorted(record["error"]["line"] for record in errors) == [1, 2, 3, 5]
    codes = {record["error"]["line"]: record["error"]["code"] for record in errors}
    assert codes == {1: "batch_failed", 2: "batch_failed", 3: "invalid_json", 5: "batch_failed"}
    assert {record["custom_id"] for record in errors} == {"q1", None, "q4"}
    assert source.exists()


def test_a_failed_job_counts_its_lines(site, cli):
    latin = json.dumps(chat_line("q2", "crème"), ensure_ascii=False).encode("latin-1")
    source = drop(site, "counted.jsonl", [chat_line("q1"), latin, b"junk"])
    assert cli("run", str(source)).code == 1
    status = read_json(outbox(site) / "counted" / "status.json")
    assert status["request_counts"] == {"total": 3, "completed": 0, "failed": 3}


def test_a_file_without_a_valid_line_fails_naming_the_first_bad_line(site, cli):
    source = drop(site, "hopeless.jsonl", [b"", b"[1]", chat_line("a", stream=True)])
    outcome = cli("run", str(source))
    assert outcome.code == 1
    assert "line 2" in assert_one_sentence(outcome)
    status, _, errors = assert_failed_folder(site, source, "hopeless")
    assert status["errors"][0]["code"] == "no_valid_lines"
    assert len(errors) == 2


def test_a_ticket_naming_an_unknown_model_fails_listing_the_models(site, cli):
    source = drop(site, "lost.jsonl", [chat_line("a")])
    (site.parent / "drop" / "lost.yaml").write_text("model: gpt-17\n")
    outcome = cli("run", str(source))
    assert outcome.code == 1
    sentence = assert_one_sentence(outcome)
    assert "gpt-17" in sentence and "fake" in sentence and "emb" in sentence
    assert_failed_folder(site, source, "lost", "lost.yaml")


def test_a_ticket_with_an_unknown_key_fails_naming_the_key(site, cli):
    source = drop(site, "sneaky.jsonl", [chat_line("a")])
    (site.parent / "drop" / "sneaky.yaml").write_text("engine: {enforce_eager: false}\n")
    outcome = cli("run", str(source))
    assert outcome.code == 1
    assert "engine" in assert_one_sentence(outcome)
    status, _, errors = assert_failed_folder(site, source, "sneaky", "sneaky.yaml")
    assert status["errors"][0]["code"] == "invalid_ticket"
    assert len(errors) == 1


def test_a_file_for_a_model_that_serves_another_endpoint_fails(site, cli):
    source = drop(site, "mismatch.jsonl", [chat_line("a")])
    outcome = cli("run", str(source), "-m", "emb")
    assert outcome.code == 1
    assert "/v1/chat/completions" in assert_one_sentence(outcome)
    assert_failed_folder(site, source, "mismatch")


def test_an_unknown_model_option_is_a_usage_error(site, cli):
    source = drop(site, "unknown.jsonl", [chat_line("a")])
    outcome = cli("run", str(source), "-m", "nope")
    assert outcome.code == 2
    sentence = assert_one_sentence(outcome)
    assert "nope" in sentence and "fake" in sentence
    assert not (outbox(site) / "unknown").exists()
    assert_no_spool_left(site)


def test_a_missing_file_is_a_usage_error(site, cli):
    outcome = cli("run", str(site.parent / "drop" / "absent.jsonl"))
    assert outcome.code == 2
    assert "absent.jsonl" in assert_one_sentence(outcome)
    assert_no_spool_left(site)


BROKEN_CONFIGS = [
    ("bad-yaml", "models: [\n", "line"),
    ("unknown-key", CONFIG + "bogus: 1\n", "At 'bogus'"),
    (
        "engine-wrong-type",
        "models:\n  fake: {path: nowhere, backend: fake, engine: [1, 2]}\n",
        "At 'models.fake.engine'",
    ),
    (
        "nested-unknown-key",
        "models:\n  fake: {path: nowhere, backend: fake, colour: blue}\n",
        "At 'models.fake.colour'",
    ),
    ("limits-wrong-type", CONFIG + "limits: {max_lines: many}\n", "At 'limits.max_lines'"),
    ("key-twice", CONFIG + "default_model: emb\n", "twice"),
    ("default-not-configured", CONFIG.replace("default_model: fake", "default_model: x"), "'x'"),
    ("not-a-mapping", "- a\n- b\n", "mapping"),
]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [case[1:] for case in BROKEN_CONFIGS],
    ids=[case[0] for case in BROKEN_CONFIGS],
)
def test_a_broken_config_is_a_usage_error_naming_the_key(site, cli, text, fragment):
    source = drop(site, "fine.jsonl", [chat_line("a")])
    site.write_text(text)
    outcome = cli("run", str(source))
    assert outcome.code == 2
    assert "Traceback" not in outcome.err
    assert fragment in outcome.err
    assert str(site) in outcome.err or "config.yaml" in outcome.err
    assert not outbox(site).exists()


def test_every_config_error_is_reported_at_once(site, cli):
    source = drop(site, "fine.jsonl", [chat_line("a")])
    site.write_text(
        "bogus: 1\nlimits: {max_lines: many}\n"
        "models:\n  fake: {path: nowhere, backend: fake, engine: 5}\n"
    )
    outcome = cli("run", str(source))
    assert outcome.code == 2
    for fragment in ("At 'bogus'", "At 'limits.max_lines'", "At 'models.fake.engine'"):
        assert fragment in outcome.err


def test_a_missing_config_is_a_usage_error(site, cli, tmp_path):
    source = drop(site, "fine.jsonl", [chat_line("a")])
    outcome = cli("run", str(source), config=tmp_path / "nowhere.yaml")
    assert outcome.code == 2
    assert "nowhere.yaml" in assert_one_sentence(outcome)


# ------------------------------------------------------------------ as a real command line


def batchbox(site: Path, *args: str) -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("batchbox")
    environment = {key: value for key, value in os.environ.items() if key != "BATCHBOX_CONFIG"}
    return subprocess.run(
        [str(command), "-c", str(site), *args],
        capture_output=True,
        text=True,
        cwd=site.parent,
        env=environment,
        timeout=120,
        check=False,
    )


def test_batchbox_run_as_a_subprocess(site):
    source = drop(site, "subprocess.jsonl", GOOD_AND_BAD)
    before = source.read_bytes()
    finished = batchbox(site, "run", str(source))
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    folder = outbox(site) / "subprocess"
    assert finished.stdout.strip() == str(folder)
    assert {path.name for path in folder.iterdir()} == OUTBOX_FILES
    assert (folder / "input.jsonl").read_bytes() == before == source.read_bytes()
    results, errors = assert_every_line_once(source, folder)
    assert (len(results), len(errors)) == (3, 3)
    assert read_json(folder / "status.json")["status"] == "completed"
    # the log is JSON lines when not on a terminal, ending with one summary line
    logs = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
    assert logs[-1]["event"] == "job_finished" and logs[-1]["completed"] == 3
    assert_no_spool_left(site)


def test_batchbox_run_failures_as_a_subprocess(site):
    source = drop(site, "binary.jsonl", [bytes(range(128, 256))])
    finished = batchbox(site, "run", str(source))
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    assert [line for line in finished.stderr.splitlines() if not line.startswith("{")] == [
        line for line in finished.stderr.splitlines() if line.startswith("batchbox: ")
    ]
    assert "UTF-8" in finished.stderr
    assert read_json(outbox(site) / "binary" / "status.json")["status"] == "failed"

    site.write_text("models:\n  fake: {path: nowhere, backend: fake, engine: 5}\n")
    finished = batchbox(site, "run", str(source))
    assert finished.returncode == 2
    assert "At 'models.fake.engine'" in finished.stderr
    assert "Traceback" not in finished.stderr
