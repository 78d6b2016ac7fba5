"""A model load as users and scripts meet it: the job's sidecars say it loads and count the
rest of the load; a load killed from outside (the OOM killer, a signal) is tried again, a
bounded number of times; a model that cannot load fails its job at once, saying why; and a
cancel or a stop does not wait for the load to end.

The fake engine's load waits for a gate file the test creates, so a load lasts exactly as
long as the test needs, whatever the machine's speed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import assert_every_line_once, shipped_config
from servicekit import (
    Server,
    chat_file,
    drop,
    finished,
    read_json,
    read_jsonl,
    run_until,
    status_of,
    wait_for,
    write_config,
)
from stopkit import Owned, gone, owning

from benchmarks.record import append_history, build_record
from watcher.config import load_config
from watcher.engines import EngineKeeper
from watcher.execute import LOAD_TRIES
from watcher.service import Service


@pytest.fixture
def owned() -> Iterator[Owned]:
    yield from owning()


def history_of_loads(state: Path, model: str, seconds: list[float]) -> None:
    """Earlier jobs of the model on this machine, whose loads took `seconds`."""
    state.mkdir(parents=True, exist_ok=True)
    for index, load in enumerate(seconds):
        append_history(
            state,
            build_record(
                job_id=f"earlier{index}",
                status="completed",
                model=model,
                source="fake",
                endpoint="/v1/chat/completions",
                engine={"hardware": "fake", "engine_version": "fake"},
                counts={"total": 10, "completed": 10, "failed": 0},
                prompt_tokens=100,
                completion_tokens=80,
                prompt_chars=400,
                requested_max_tokens=16,
                load_seconds=load,
                run_seconds=2.0,
                estimate=None,
                finished_at="2026-11-30T10:00:00+00:00",
            ),
        )


class Loading:
    """A service in this process whose engine runs in a real engine process, with a load
    that waits for `gate`; its helper's pid file shows which engine is loading."""

    def __init__(self, root: Path, owned: Owned) -> None:
        self.gate = root / "gate"
        self.helper = root / "helper.pid"
        engine = {"fake_load_gate": str(self.gate), "fake_helper_pidfile": str(self.helper)}
        # The running job's sidecars are refreshed every status_seconds (5): quicker here.
        self.config = load_config(
            write_config(root, settle_seconds=0.1, status_seconds=0.2, engine=engine)
        )
        self.owned = owned
        self.inbox = self.config.folder("inbox")
        self.outbox = self.config.folder("outbox")
        self.service = Service(self.config, engines=EngineKeeper())

    def engine_pid(self) -> int:
        """The engine process that loads now, once it has started its helper."""
        helper = run_until(
            self.service, lambda: self.helper.exists() and self.helper.read_text(), 30
        )
        engine = psutil.Process(int(helper)).ppid()
        self.owned.add(engine)
        return engine


@pytest.fixture
def loading(tmp_path: Path, owned: Owned) -> Iterator[Loading]:
    site = Loading(tmp_path, owned)
    history_of_loads(site.config.folder("state"), "fake", [600.0, 600.0])
    site.service.start()
    yield site
    site.service.stop()
    site.service.shutdown()


def test_while_the_model_loads_the_sidecars_say_so_and_count_the_rest_of_the_load(
    loading: Loading,
) -> None:
    service, inbox = loading.service, loading.inbox
    status, eta = inbox / "wait.status", inbox / "wait.eta"
    data = chat_file(5)
    drop(inbox, "wait.jsonl", data)

    def loading_status() -> dict | None:
        document = read_json(status) if status.exists() else {}
        return document if document.get("engine") == "loading" else None

    first = run_until(service, loading_status, 30)
    assert first["status"] == "in_progress" and first["queue_position"] is None
    assert first["loading_since"] is not None
    first_eta = read_json(eta)
    # The load is counted from the model's earlier loads here, and the basis says so.
    assert "loading fake" in first_eta["basis"], first_eta
    assert "its loads here take 600 s" in first_eta["basis"], first_eta
    assert first_eta["seconds_remaining"] >= 500, first_eta

    # Refreshed while the load goes on, not only when it ends.
    def refreshed() -> dict | None:
        document = loading_status()
        return document if document and document["updated_at"] != first["updated_at"] else None

    later = run_until(service, refreshed, 10)
    assert later["loading_since"] == first["loading_since"]
    later_eta = read_json(eta)
    assert later_eta["written_at"] != first_eta["written_at"]
    assert later_eta["seconds_remaining"] <= first_eta["seconds_remaining"]

    loading.gate.touch()
    run_until(service, lambda: finished(status, loading.outbox), 30)
    final = read_json(status)
    assert final["status"] == "completed"
    assert final["engine"] is None and final["loading_since"] is None
    assert_every_line_once(loading.outbox / "wait" / "input.jsonl", loading.outbox / "wait")


def test_a_cancel_during_the_load_delivers_the_job_at_once_and_ends_the_load(
    loading: Loading,
) -> None:
    service, inbox = loading.service, loading.inbox
    drop(inbox, "drop.jsonl", chat_file(3))
    engine = loading.engine_pid()
    run_until(service, lambda: status_of(inbox / "drop.status") == "in_progress", 10)
    (inbox / "drop.cancel").touch()
    run_until(service, lambda: finished(inbox / "drop.status", loading.outbox), 10)
    assert read_json(inbox / "drop.status")["status"] == "cancelled"
    wait_for(lambda: gone(engine), 10, "the loading engine to end")
    helper = int(loading.helper.read_text())
    wait_for(lambda: gone(helper), 10, "what the loading engine started to end")
    errors = read_jsonl(loading.outbox / "drop" / "errors.jsonl")
    assert [record["error"]["code"] for record in errors] == ["batch_cancelled"] * 3


# -- a load that dies, and a model that cannot load, with a real `batchbox serve` ------------


class LoadSite:
    def __init__(self, root: Path, owned: Owned, **engine) -> None:
        self.root = root
        self.gate = root / "gate"
        self.helper = root / "helper.pid"
        engine = {
            "fake_load_gate": str(self.gate),
            "fake_helper_pidfile": str(self.helper),
            **engine,
        }
        self.config_path = write_config(
            root, settle_seconds=0.2, stop_timeout_seconds=5, engine=engine
        )
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.owned = owned
        self.server = Server(self.config_path)

    def start(self) -> LoadSite:
        try:
            self.server.start()
        finally:
            if self.server.process is not None:
                self.owned.add(self.server.process.pid)
        return self

    def kill_the_loading_engine(self, earlier: int | None) -> int:
        """SIGKILL the engine process that loads now (not the one whose helper was
        `earlier`), as the OOM killer would; its helper's pid."""

        def helper() -> int | None:
            try:
                pid = int(self.helper.read_text())
            except (FileNotFoundError, ValueError):
                return None
            return None if pid == earlier else pid

        pid = wait_for(helper, 30, "a load")
        engine = psutil.Process(pid).ppid()
        self.owned.add(engine)
        os.kill(engine, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            code, _ = self.server.terminate()
            assert code == 0, self.server.log()


@pytest.fixture
def load_site(tmp_path: Path, owned: Owned) -> Iterator[LoadSite]:
    site = LoadSite(tmp_path, owned)
    yield site
    site.stop()


@pytest.mark.parametrize("kills", [LOAD_TRIES - 1, LOAD_TRIES])
def test_a_load_killed_from_outside_is_tried_again_a_bounded_number_of_times(
    load_site: LoadSite, kills: int
) -> None:
    site = load_site.start()
    data = chat_file(6)
    drop(site.inbox, "oom.jsonl", data)
    helper = None
    for _ in range(kills):
        helper = site.kill_the_loading_engine(helper)
    site.gate.touch()
    wait_for(lambda: finished(site.inbox / "oom.status", site.outbox), 30, "the job to end")

    died = site.server.events("engine_load_died")
    assert [event["attempt"] for event in died] == list(range(1, kills + 1)), died
    assert all("killed by SIGKILL" in event["reason"] for event in died), died
    status = read_json(site.outbox / "oom" / "status.json")
    if kills < LOAD_TRIES:
        assert status["status"] == "completed", status
        assert len(site.server.events("engine_loading")) == kills + 1
    else:
        assert status["status"] == "failed", status
        [error] = status["errors"]
        assert error["code"] == "model_load_failed"
        assert "killed by SIGKILL" in error["message"]
        assert f"tried {LOAD_TRIES} times" in error["message"]
        assert len(site.server.events("engine_loading")) == LOAD_TRIES
    assert_every_line_once(site.outbox / "oom" / "input.jsonl", site.outbox / "oom")


def test_a_model_that_cannot_load_fails_its_job_at_once_with_the_reason(
    tmp_path: Path, owned: Owned
) -> None:
    site = LoadSite(tmp_path, owned, fake_load_error="the weights are not a model")
    site.gate.touch()
    site.start()
    try:
        drop(site.inbox, "bad.jsonl", chat_file(4))
        wait_for(lambda: finished(site.inbox / "bad.status", site.outbox), 30, "the job to end")
        status = read_json(site.outbox / "bad" / "status.json")
        assert status["status"] == "failed"
        [error] = status["errors"]
        assert error["code"] == "model_load_failed"
        assert "the weights are not a model" in error["message"], error
        assert len(site.server.events("engine_loading")) == 1
        assert site.server.events("engine_load_died") == []
    finally:
        site.stop()


# -- vLLM's engine core killed while it loads ------------------------------------------------


@pytest.mark.parametrize(
    ("failed", "died"),
    [("{'EngineCore_DP0': -9}", True), ("{'EngineCore_DP0': 1}", False), ("{}", True)],
)
def test_a_vllm_engine_core_killed_at_load_is_a_death_and_one_that_failed_is_not(
    failed: str, died: bool
) -> None:
    """vLLM's own words when its engine core process ends during the load (the format of
    `vllm/v1/engine/utils.py`): a signal (the OOM killer) is worth another try, an exit
    code (the core raised: bad weights, bad settings) is not. vLLM may look before the dead
    core's exit code is known and name none: a core gone without a word, tried again."""
    from runner.types import EngineLoadDied, EngineLoadError, ModelSpec
    from runner.vllm_setup import load_failure

    cause = RuntimeError(
        f"Engine core initialization failed. See root cause above. Failed core proc(s): {failed}"
    )
    try:
        raise ValueError("the LLM could not be built") from cause
    except ValueError as error:
        failure = load_failure(ModelSpec("gemma", "/models/gemma"), error)
    assert isinstance(failure, EngineLoadError)
    assert isinstance(failure, EngineLoadDied) is died
    if died:
        assert "engine core" in str(failure) and failed in str(failure)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_a_real_engine_core_killed_while_it_loads_is_loaded_again(
    tmp_path: Path, owned: Owned
) -> None:
    """On a GPU, vLLM's engine core runs in a process of its own and is what the OOM killer
    picks; killed during the load, the job goes on with a second load."""
    config_path = shipped_config(tmp_path, settle_seconds=0.3, stop_timeout_seconds=20)
    data = yaml.safe_load(config_path.read_text())
    data["models"]["smollm2-135m"]["environment"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    config_path.write_text(yaml.safe_dump(data))
    server = Server(config_path)
    try:
        server.start()
    finally:
        if server.process is not None:
            owned.add(server.process.pid)
    try:
        inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
        drop(inbox, "core.jsonl", chat_file(2, max_tokens=4))
        wait_for(lambda: server.events("engine_loading"), 60, "the load to begin")
        engine = psutil.Process(server.events("engine_loading")[0]["pid"])
        owned.add(engine.pid)

        def engine_core() -> psutil.Process | None:
            for child in engine.children(recursive=True):
                try:
                    command = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "spawn_main" in command and "resource_tracker" not in command:
                    return child
            return None

        core = wait_for(engine_core, 600, "vLLM's engine core to start")
        core.kill()
        wait_for(lambda: finished(inbox / "core.status", outbox), 900, "the job to end")
        [died] = server.events("engine_load_died")
        assert "engine core" in died["reason"] and "-9" in died["reason"], died
        status = read_json(outbox / "core" / "status.json")
        assert status["status"] == "completed", status
        assert_every_line_once(outbox / "core" / "input.jsonl", outbox / "core")
    finally:
        if server.process.poll() is None:
            server.terminate()
