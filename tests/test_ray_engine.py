"""A model on Ray replicas, with the fake engine in each, through one local Ray started once
for this module: the same lines as the local engine, bad lines, resume, cancel, a replica
killed mid-run, and a request that kills its replica failing alone (SPEC §3, §5, §7, §8)."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import CHAT, assert_every_line_once, chat_line, read_jsonl, write_jsonl
from servicekit import (
    Harness,
    chat_file,
    delivered,
    drop,
    finished,
    start_service,
    stop_service,
    wait_for,
)

from runner.client import LocalClient
from runner.fake_engine import FakeEngine
from runner.journal import Journal
from runner.lines import Limits
from runner.run import RunOptions, run_lines, scan_file
from runner.types import EngineLoadError, ModelSpec

ray = pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")

from runner.ray_cluster import RaySettings, connect  # noqa: E402
from runner.ray_engine import RayEngine  # noqa: E402

FAKE = {"fake_seconds_per_step": 0.02, "fake_batch": 4, "fake_crash_on": "poison"}


def ray_spec(concurrency: int = 2, **engine: Any) -> ModelSpec:
    return ModelSpec(
        alias="fake",
        source="none",
        backend="ray",
        engine={**FAKE, **engine},
        ray={
            "address": "local",
            "concurrency": concurrency,
            "num_cpus": 0.5,
            "num_gpus": 0.0,
            "backend": "fake",
        },
    )


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module, started the way the engine process starts its own; the
    engines below find it connected, use it, and leave it running when they close."""
    assert connect(RaySettings())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def requests_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray") / "requests.log"


@pytest.fixture(scope="module")
def engine(local_ray: None, requests_log: Path) -> Iterator[RayEngine]:
    """Two replicas, kept for the module as the service keeps an engine between jobs."""
    engine = RayEngine(ray_spec(fake_log_requests=str(requests_log)))
    yield engine
    engine.close()


def run_file(path: Path, out: Path, client: Any, max_in_flight: int = 16, **hooks: Any) -> Journal:
    summary = scan_file(path, Limits())
    # Progress after every line, so that the tests below act on exact counts.
    options = RunOptions(
        endpoint=CHAT, model="fake", max_in_flight=max_in_flight, progress_seconds=0
    )
    journal = Journal(out)
    try:
        run_lines(path, journal, client, options, summary.lines, **hooks)
    finally:
        journal.close()
    return journal


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A result without what differs between any two runs: its ids and creation time."""
    body = dict(record["response"]["body"])
    body.pop("id"), body.pop("created")
    return {"custom_id": record["custom_id"], "body": body}


def error_of(record: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    return record["custom_id"], record["error"]


def mixed_file(path: Path, count: int = 40) -> Path:
    lines: list[Any] = [chat_line(f"q{index}", f"question {index}") for index in range(count)]
    lines.insert(5, b'{"custom_id": "torn", "method": "POS')
    lines.insert(9, chat_line("q3", "a duplicate id"))
    lines.insert(12, {**chat_line("get"), "method": "GET"})
    return write_jsonl(path, lines)


def test_replicas_give_the_local_engines_lines_and_errors_every_line_once(
    engine: RayEngine, tmp_path: Path
) -> None:
    path = mixed_file(tmp_path / "in.jsonl")
    run_file(path, tmp_path / "ray", LocalClient(engine))
    local = FakeEngine(ModelSpec("fake", "none", backend="fake", engine=FAKE))
    run_file(path, tmp_path / "local", LocalClient(local))

    results, errors = assert_every_line_once(path, tmp_path / "ray")
    local_results, local_errors = assert_every_line_once(path, tmp_path / "local")
    assert len(results) == 40
    assert sorted(map(comparable, results), key=str) == sorted(
        map(comparable, local_results), key=str
    )
    assert sorted(map(error_of, errors), key=str) == sorted(map(error_of, local_errors), key=str)
    # Both replicas took a share of the work.
    assert all(slot.counters[1] > 0 for slot in engine.slots)
    assert engine.info.hardware == "Ray local: 2 replicas, fake"


def test_a_stopped_run_resumes_without_running_what_is_done(
    engine: RayEngine, tmp_path: Path, requests_log: Path
) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl", [chat_line(f"r{index}", f"resume {index}") for index in range(120)]
    )
    before = _logged(requests_log)
    journal_folder = tmp_path / "out"
    stop = {"now": False}

    def progress(update: Any) -> None:
        stop["now"] = stop["now"] or update.tally.completed >= 20

    run_file(
        path,
        journal_folder,
        LocalClient(engine),
        on_progress=progress,
        should_stop=lambda: stop["now"],
    )
    done = len(read_jsonl(journal_folder / "results.jsonl"))
    assert 20 <= done < 120
    assert not engine.has_unfinished(), "a stop aborts what was in flight"

    run_file(path, journal_folder, LocalClient(engine))
    results, errors = assert_every_line_once(path, journal_folder)
    assert len(results) == 120 and errors == []
    ran = _logged(requests_log) - before
    assert sum(1 for key, times in ran.items() if key.startswith("r") and times > 1) <= 16


def test_a_replica_killed_mid_run_is_replaced_and_nothing_is_lost(
    engine: RayEngine, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl", [chat_line(f"k{index}", f"kill {index}") for index in range(200)]
    )
    victim = engine.slots[0]
    pid = ray.get(victim.handle.__ray_call__.remote(lambda replica: os.getpid()))
    generation = victim.generation
    killed = []

    def progress(update: Any) -> None:
        if not killed and update.tally.completed > 0 and victim.assigned:
            os.kill(pid, signal.SIGKILL)
            killed.append(len(victim.assigned))

    run_file(path, tmp_path / "out", LocalClient(engine), on_progress=progress)
    assert killed, "the replica was never seen holding requests"
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert len(results) == 200 and errors == []
    assert victim.generation == generation + 1
    replicas_live(engine)


def test_a_replica_that_died_idle_is_replaced_before_work_resumes(
    engine: RayEngine, tmp_path: Path, requests_log: Path
) -> None:
    replicas_live(engine)
    victim = engine.slots[1]
    pid = ray.get(victim.handle.__ray_call__.remote(lambda replica: os.getpid()))
    generation = victim.generation
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=30)
    path = write_jsonl(
        tmp_path / "in.jsonl", [chat_line(f"i{index}", f"idle {index}") for index in range(40)]
    )
    before = _logged(requests_log)
    suspected = []

    def progress(update: Any) -> None:
        suspected.extend(request.key for request in engine.suspects)
        suspected.extend(slot.solo for slot in engine.slots if slot.solo)

    run_file(path, tmp_path / "out", LocalClient(engine), on_progress=progress)
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert len(results) == 40 and errors == []
    assert victim.generation == generation + 1
    # Nothing was sent to the dead replica, so nothing was suspected and run alone.
    assert suspected == []
    assert set((_logged(requests_log) - before).values()) == {1}


def test_a_request_that_kills_its_replica_fails_alone(
    engine: RayEngine, tmp_path: Path, requests_log: Path
) -> None:
    lines: list[Any] = [chat_line(f"p{index}", f"fine {index}") for index in range(30)]
    lines.insert(11, chat_line("poisoned", "a poison pill"))
    lines.append(b"not json at all")
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    generations = sum(slot.generation for slot in engine.slots)
    before = _logged(requests_log)

    run_file(path, tmp_path / "out", LocalClient(engine))
    results, errors = assert_every_line_once(path, tmp_path / "out")
    assert len(results) == 30
    by_id = {record["custom_id"]: record["error"] for record in errors}
    assert by_id["poisoned"]["code"] == "engine_crashed"
    assert "ran alone" in by_id["poisoned"]["message"]
    assert by_id[None]["code"] == "invalid_json"
    # Once among others, then twice alone: three replicas died, and each was replaced.
    assert sum(slot.generation for slot in engine.slots) == generations + 3
    replicas_live(engine)
    # Those beside it at the first death ran again, alone, once each; no others ran twice.
    ran = _logged(requests_log) - before
    assert max(ran.values()) <= 2


def test_a_replica_that_cannot_load_fails_the_load_in_words(local_ray: None) -> None:
    with pytest.raises(EngineLoadError, match="could not run on Ray: ValueError: invalid literal"):
        RayEngine(ray_spec(concurrency=1, max_model_len="many"))


def test_replicas_the_cluster_cannot_hold_fail_at_once(local_ray: None) -> None:
    spec = ray_spec(concurrency=1)
    spec.ray["num_gpus"] = 1.0
    with pytest.raises(EngineLoadError, match="0 GPUs"):
        RayEngine(spec)


def replicas_live(engine: RayEngine) -> None:
    """Until every replica is loaded: a replacement may still be loading when a run ends."""
    wait_for(lambda: engine.step() == [] and all(slot.live for slot in engine.slots), 120)


def _logged(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(line for line in log.read_text().splitlines() if line)


# -- through the service ---------------------------------------------------------------------


@pytest.fixture
def ray_harness(local_ray: None, tmp_path: Path) -> Iterator[Harness]:
    models = {
        "clustered": {
            "path": "models/clustered",
            "backend": "ray",
            "engine": {"fake_seconds_per_step": 0.05, "fake_batch": 2},
            "ray": {"address": "local", "concurrency": 1, "num_cpus": 0.5, "backend": "fake"},
        }
    }
    harness = start_service(tmp_path, models=models, default_model="clustered")
    yield harness
    stop_service(harness)


def test_a_ray_job_is_cancelled_and_its_record_names_the_cluster(ray_harness: Harness) -> None:
    inbox = ray_harness.inbox
    data = chat_file(300)
    drop(inbox, "long.jsonl", data)

    def some_done() -> bool:
        try:
            status = json.loads((inbox / "long.status").read_bytes())
        except (FileNotFoundError, ValueError):
            return False
        return status["request_counts"]["completed"] > 0

    ray_harness.run_until(some_done, 120)
    (inbox / "long.cancel").touch()
    ray_harness.run_until(lambda: finished(inbox / "long.status", ray_harness.outbox), 30)
    cancelled = delivered(ray_harness.outbox / "long")
    assert cancelled.status["status"] == "cancelled"
    assert 0 < len(cancelled.results) < 300
    assert {record["error"]["code"] for record in cancelled.errors} == {"batch_cancelled"}
    assert_every_line_once(cancelled.folder / "input.jsonl", cancelled.folder)

    result = ray_harness.drop_and_finish("short.jsonl", chat_file(10, prefix="s"))
    assert result.status["status"] == "completed" and len(result.results) == 10
    record = json.loads((result.folder / "benchmark.json").read_bytes())
    assert record["hardware"] == "Ray local: 1 replica, fake"
    assert record["engine_settings"]["ray_replicas"] == 1
