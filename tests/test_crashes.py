"""SPEC section 8, black-box: `batchbox serve` killed with SIGKILL at random moments, and its
engine process killed alone, must lose no request and deliver none twice.

Each trial drops several files (so that jobs are claimed, queued, running and delivered at
the moment of a kill), kills the service a few times at moments drawn from a seeded random
generator, restarts it, and at the end checks every outbox folder line by line. The fake
engine logs every request it takes in, so the tests also count how many requests a crash
made run again. The figures are printed at the end and written to `crash_figures.json` in
pytest's temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
from crashkit import (
    Dropped,
    Figures,
    all_finished,
    check_site,
    drop_file,
    journal_lines,
    request_file,
    requests_run,
    start_server,
)
from helpers import chat_line, shipped_config, write_jsonl
from servicekit import Server, status_of, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
ENGINE = {"fake_seconds_per_step": 0.01, "fake_batch": 8}  # 800 requests a second at most
MAX_IN_FLIGHT = 64
SERVICE_TRIALS = 10
KILLS_PER_TRIAL = 5
ENGINE_TRIALS = 3
ENGINE_KILLS_PER_TRIAL = 3


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    figures = Figures()
    yield figures
    summary = figures.summary()
    path = tmp_path_factory.getbasetemp() / "crash_figures.json"
    path.write_text(json.dumps(summary, indent=2))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ncrash figures ({path}):\n{json.dumps(summary, indent=2)}")


def make_site(root: Path) -> tuple[Path, Path]:
    """A config for the fake engine that logs every request it takes in."""
    log = root / "requests.log"
    config = write_config(
        root,
        settle_seconds=0.2,
        rescan_seconds=0.5,
        stop_timeout_seconds=5,
        max_in_flight=MAX_IN_FLIGHT,
        engine={**ENGINE, "fake_log_requests": str(log)},
    )
    return config, log


def files_for(seed: int) -> tuple[list[Dropped], list[Dropped]]:
    """The files dropped before the first start, and one dropped while the service runs.

    Every other trial has a file for a second model, so that kills also fall on a switch
    of engines; the others stay on one engine, which is quicker."""
    first = [
        Dropped("", "alpha", request_file(f"a{seed}-", 200)),
        Dropped("fake", "beta", request_file(f"b{seed}-", 200, bad_every=25)),
    ]
    if seed % 2:
        first.append(Dropped("other", "gamma", request_file(f"c{seed}-", 100)))
    later = [Dropped("", "delta", request_file(f"d{seed}-", 200))]
    return first, later


def wait_for_engine(server: Server, timeout: float = 30) -> None:
    """Until this start of the service has loaded an engine (or has nothing left to run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        since_start = server.log().rsplit("service_ready", 1)[-1]
        if '"engine_loaded"' in since_start or "job_started" not in since_start:
            return
        assert server.process is not None and server.process.poll() is None, server.log()
        time.sleep(0.02)


def kill_moment(rng: random.Random, server: Server) -> None:
    """Wait for a random moment to kill at: a third of them right after the start (claims,
    recovery, the engine loading), the rest while requests run."""
    if rng.random() < 1 / 3:
        time.sleep(rng.uniform(0.0, 0.5))
        return
    wait_for_engine(server)
    time.sleep(rng.uniform(0.0, 0.6))


def valid_lines(dropped: list[Dropped]) -> int:
    return sum(
        1 for item in dropped for line in item.data.splitlines() if b'"POST"' in line.strip()
    )


def kill(server: Server, engine_too: bool = False) -> None:
    """SIGKILL the service. Its engine sees its pipe close and ends by itself, which is
    waited for, so that two engines never share the CPU; or, with `engine_too`, it is
    killed along with it, as systemd kills the whole unit."""
    assert server.process is not None
    children = psutil.Process(server.process.pid).children(recursive=True)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    for child in children if engine_too else []:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(children, timeout=60)


def finish_and_check(root: Path, config: Path, dropped: list[Dropped]) -> Server:
    server = start_server(config)
    deadline = time.monotonic() + 90
    while not all_finished(root, dropped):
        assert server.process is not None and server.process.poll() is None, server.log()[-3000:]
        assert time.monotonic() < deadline, f"not finished in time:\n{server.log()[-3000:]}"
        time.sleep(0.1)
    code, _ = server.terminate()
    assert code == 0, server.log()[-3000:]
    return server


@pytest.mark.parametrize("seed", range(SERVICE_TRIALS))
def test_kill_9_of_the_service_loses_and_repeats_nothing(
    tmp_path: Path, seed: int, figures: Figures
) -> None:
    rng = random.Random(seed)
    config, log = make_site(tmp_path)
    first, later = files_for(seed)
    for item in first:
        drop_file(tmp_path / "inbox", item)
    for number in range(KILLS_PER_TRIAL):
        server = start_server(config)
        if number == 1:
            for item in later:
                drop_file(tmp_path / "inbox", item)
        kill_moment(rng, server)
        kill(server)
    dropped = first + later
    finish_and_check(tmp_path, config, dropped)

    count = check_site(tmp_path, dropped, statuses=("completed",))
    run = requests_run(log)
    figures.record("service", KILLS_PER_TRIAL, count, valid_lines(dropped), run)
    assert count.problems == []
    assert (count.lost, count.duplicated) == (0, 0)
    # A kill costs at most the requests that were in the engine.
    assert run - valid_lines(dropped) <= KILLS_PER_TRIAL * MAX_IN_FLIGHT


def engine_of(server: Server) -> psutil.Process | None:
    """The engine child of `batchbox serve`, once it has loaded (a kill while it loads is a
    failed load, which fails the job: another promise, tested elsewhere)."""
    assert server.process is not None
    loading = server.log().count('"engine_loading"')
    if not loading or server.log().count('"engine_loaded"') < loading:
        return None
    for child in psutil.Process(server.process.pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing" in command and "resource_tracker" not in command:
            return child
    return None


@pytest.mark.parametrize("seed", range(ENGINE_TRIALS))
def test_kill_9_of_the_engine_alone_loses_and_repeats_nothing(
    tmp_path: Path, seed: int, figures: Figures
) -> None:
    rng = random.Random(1000 + seed)
    config, log = make_site(tmp_path)
    first, later = files_for(seed)
    dropped = first + later
    for item in dropped:
        drop_file(tmp_path / "inbox", item)
    server = start_server(config)
    kills = 0
    try:
        deadline = time.monotonic() + 60
        while kills < ENGINE_KILLS_PER_TRIAL and not all_finished(tmp_path, dropped):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(rng.uniform(0.1, 0.8))
            engine = engine_of(server)
            if engine is None:
                continue
            try:
                engine.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            kills += 1
        deadline = time.monotonic() + 90
        while not all_finished(tmp_path, dropped):
            assert server.process.poll() is None, server.log()[-3000:]
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)
        assert server.terminate()[0] == 0
    finally:
        server.kill()
    assert kills >= 1, "the jobs finished before the engine could be killed"

    count = check_site(tmp_path, dropped, statuses=("completed",))
    run = requests_run(log)
    figures.record("engine", kills, count, valid_lines(dropped), run)
    assert count.problems == []
    assert (count.lost, count.duplicated) == (0, 0)
    assert len(server.events("engine_died")) == kills
    assert run - valid_lines(dropped) <= kills * MAX_IN_FLIGHT


def test_after_a_kill_9_the_jobs_carry_on_in_their_original_order(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        settle_seconds=0.2,
        rescan_seconds=0.5,
        stop_timeout_seconds=5,
        engine={"fake_seconds_per_step": 0.02, "fake_batch": 2},  # 100 requests a second
    )
    inbox = tmp_path / "inbox"
    (inbox / "urgent.yaml").parent.mkdir(parents=True, exist_ok=True)
    (inbox / "urgent.yaml").write_text("priority: 5\n")
    order = ["first", "second", "third", "urgent"]
    # The first job cannot finish in less than 30 s, so it is still running at the kill
    # however slowly the others are taken; after the kill the engine runs at full speed.
    sizes = {"first": 3000, "second": 40, "third": 40, "urgent": 40}
    dropped = [Dropped("", stem, request_file(f"{stem}-", sizes[stem])) for stem in order]
    server = start_server(config)
    try:
        for item in dropped:  # one at a time, so that they are taken in this order
            drop_file(inbox, item)
            wait_for(lambda item=item: (inbox / f"{item.stem}.status").exists(), 30)
        wait_for(lambda: status_of(inbox / "first.status") == "in_progress", 30)
        wait_for(lambda: all(status_of(inbox / f"{s}.status") == "queued" for s in order[1:]), 30)
        wait_for(lambda: journal_lines(tmp_path), 30, "the first results")
        kill(server)
    finally:
        server.kill()
    assert status_of(inbox / "first.status") == "in_progress"
    write_config(tmp_path, settle_seconds=0.2, rescan_seconds=0.5, stop_timeout_seconds=5)
    finish_and_check(tmp_path, config, dropped)
    count = check_site(tmp_path, dropped, statuses=("completed",))
    assert count.problems == [] and (count.lost, count.duplicated) == (0, 0)
    history = [json.loads(line) for line in (tmp_path / "state" / "benchmarks.jsonl").open()]
    inputs = {
        json.loads((tmp_path / "outbox" / stem / "status.json").read_bytes())["id"]: stem
        for stem in order
    }
    # The running job resumes first; then priority; then first come, first served.
    assert [inputs[record["job_id"]] for record in history] == [
        "first",
        "urgent",
        "second",
        "third",
    ]


# -- the real vLLM engine ------------------------------------------------------------------


@pytest.fixture
def vllm_config(tmp_path: Path) -> Path:
    return shipped_config(
        tmp_path,
        settle_seconds=0.5,
        rescan_seconds=1,
        stop_timeout_seconds=20,
        min_free_bytes=0,
        max_in_flight=8,  # requests go in a few at a time, so a kill falls between results
    )


# Two requests at the head of the file that each run this many engine steps (ignore_eos),
# resubmitted at every start: the job cannot end sooner after a start, however fast the
# machine, while the short ones behind them keep adding results to the journal.
LONG_TOKENS = 200
SHORT = 60
KILL_AFTER = 4  # new results in the journal since the start, then the kill


def real_engine_lines() -> list[dict]:
    long = [
        chat_line(f"long{index}", "Count upwards from one.", max_tokens=LONG_TOKENS,
                  ignore_eos=True)
        for index in range(2)
    ]  # fmt: skip
    short = [
        chat_line(f"r{index}", f"Name a colour. ({index})", max_tokens=6) for index in range(SHORT)
    ]
    return long + short


def wait_for_results(server: Server, root: Path, at_least: int, timeout: float) -> None:
    """Until the journal holds `at_least` results; the model load comes first."""
    deadline = time.monotonic() + timeout
    while len(journal_lines(root)) < at_least:
        assert server.process is not None and server.process.poll() is None, server.tail(40)
        assert time.monotonic() < deadline, server.tail(40)
        time.sleep(0.05)


@pytest.mark.vllm
@pytest.mark.timeout(1800)  # three loads of the model on a busy machine
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_kill_9_with_the_real_engine_loses_and_repeats_nothing(
    vllm_config: Path, figures: Figures
) -> None:
    """Killed twice, each time once a few more results are in the journal; both kills fall
    in the middle of the job, whatever the machine's speed, and nothing waits for an event
    that a finished job would never bring."""
    root = vllm_config.parent
    lines = real_engine_lines()
    total = len(lines)
    data = write_jsonl(root / "source.jsonl", lines).read_bytes()
    dropped = [Dropped("", "colours", data)]
    drop_file(root / "inbox", dropped[0])
    journals = []
    for _ in range(2):
        server = start_server(vllm_config, timeout=240)
        try:
            wait_for_results(server, root, len(journal_lines(root)) + KILL_AFTER, 900)
            kill(server, engine_too=True)
        finally:
            server.kill()
        journals.append(journal_lines(root))
    assert not all_finished(root, dropped)
    sizes = [len(lines) for lines in journals]
    assert 0 < sizes[0] < sizes[1] < total, sizes  # each kill fell in the middle of the job
    finish_server = start_server(vllm_config, timeout=240)
    try:
        deadline = time.monotonic() + 900
        while not all_finished(root, dropped):
            assert finish_server.process.poll() is None, finish_server.tail(40)
            assert time.monotonic() < deadline, finish_server.tail(40)
            time.sleep(0.5)
        assert finish_server.terminate()[0] == 0
    finally:
        finish_server.kill()
    count = check_site(root, dropped, statuses=("completed",))
    figures.record("vllm", len(journals), count, total, None)  # vLLM does not log requests
    assert count.problems == []
    assert (count.lost, count.duplicated) == (0, 0)
    delivered = root / "outbox" / "colours" / "results.jsonl"
    results = {record["custom_id"]: record for record in map(json.loads, delivered.open())}
    assert len(results) == total
    assert all(record["response"]["body"]["choices"][0]["message"] for record in results.values())
    for index in range(2):
        usage = results[f"long{index}"]["response"]["body"]["usage"]
        assert usage["completion_tokens"] == LONG_TOKENS, usage
    # What was finished before each kill is delivered as it was: it did not run again.
    final = set(delivered.read_bytes().splitlines())
    assert all(lines <= final for lines in journals)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["killed", "closed"])
def test_what_the_engine_process_started_ends_with_it(tmp_path: Path, how: str) -> None:
    """vLLM's engine core runs in a process the engine process starts; killed with its
    parent it would live on and keep the GPU's memory from the next engine."""
    from runner.client import EngineDied, EngineProcess
    from runner.types import ModelSpec

    pidfile = tmp_path / "helper.pid"
    spec = ModelSpec("fake", "none", backend="fake", engine={"fake_helper_pidfile": str(pidfile)})
    engine = EngineProcess(spec)
    helper = int(pidfile.read_text())
    assert not _gone(helper)
    if how == "killed":
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDied):
            for _ in range(20):
                engine.poll(0.5)
    engine.close()
    deadline = time.monotonic() + 10
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(helper)
