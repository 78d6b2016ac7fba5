"""What the `.eta` sidecar rests on (SPEC §4, §6): answer lengths past any max_tokens seen,
the engine's pace timed at its first load, the running ETA before the engine's first
counters, the whole run time of a resumed job, and `batchbox estimate` counting the queue,
the running job and the model load. Fast: the fake engine, in this process or a child."""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from servicekit import (
    chat_file,
    drop,
    finished,
    outbox_folder,
    read_json,
    start_service,
    stop_service,
)

import watcher.commands.run
from benchmarks.estimator import (
    COLD,
    JobShape,
    estimate_run,
    expected_length,
    model_seconds,
    pace_coefficients,
    survival_curve,
)
from benchmarks.record import append_history, read_history, read_paces
from benchmarks.refine import refine
from runner.client import EngineProcess
from runner.fake_engine import FakeEngine
from runner.journal import Journal, Tally
from runner.pace import measure_pace
from runner.run import Progress, RunOptions, run_lines
from runner.types import ModelSpec
from watcher.cli import main
from watcher.config import ConfigError, load_config
from watcher.engines import EngineKeeper
from watcher.execute import RunHooks, execute_job
from watcher.jobs import Job, JobStatus, load_job, mark_finalizing, write_eta, write_status
from watcher.service import Service
from watcher.sidecars import iso, now
from watcher.spool import INPUT
from watcher.validate import validate_job
from watcher.worker import Running

CHAT = "/v1/chat/completions"
MODEL = "tiny"


# -- answer lengths past any max_tokens seen ----------------------------------------------


def exponential_answers(cap: int, count: int, mean: float) -> list[list]:
    """`count` answers whose natural lengths are evenly spread quantiles of an exponential
    of this mean, cut off at `cap` as the engine would."""
    samples = []
    for index in range(count):
        natural = max(1, round(-mean * math.log(1 - (index + 0.5) / count)))
        samples.append([cap, min(natural, cap), natural < cap])
    return samples


def length_record(job: int, cap: int, samples: list[list]) -> dict:
    requests = len(samples)
    completion = sum(tokens for _, tokens, _ in samples)
    return {
        "job_id": f"job{job}",
        "model": MODEL,
        "endpoint": CHAT,
        "hardware": "CPU",
        "engine_settings": {"max_num_seqs": 256},
        "request_counts": {"total": requests, "completed": requests, "failed": 0},
        "prompt_tokens": 50 * requests,
        "completion_tokens": completion,
        "prompt_chars": 200 * requests,
        "run_seconds": 10.0,
        "completion_samples": samples,
    }


def test_a_max_tokens_larger_than_any_seen_is_predicted_from_how_answers_stop() -> None:
    # A new user's first jobs asked for 32 and 24 tokens; most answers were cut off. The
    # model's answers run 50 tokens on average (exponentially), so under a cap of 64 they
    # average 50 * (1 - e^-1.28) = 36.1 tokens, not the 40.5 that letting every answer
    # still running at 32 go on to 64 would say.
    history = [
        length_record(1, 32, exponential_answers(32, 300, 50.0)),
        length_record(2, 24, exponential_answers(24, 600, 50.0)),
    ]
    job = JobShape(MODEL, CHAT, 100, 100 * 200, {64: 100})
    predicted = estimate_run(job, history).completion_tokens / 100
    truth = 50.0 * (1 - math.exp(-64 / 50))
    assert predicted == pytest.approx(truth, rel=0.04)
    # What the data alone says, past the longest answer seen: every survivor runs to 64.
    curve = survival_curve(history[0]["completion_samples"])
    assert expected_length(curve, 64) > 1.1 * truth
    # Within the caps seen, the data speaks for itself.
    seen = estimate_run(JobShape(MODEL, CHAT, 100, 100 * 200, {24: 100}), history)
    under_24 = 50.0 * (1 - math.exp(-24 / 50))
    assert seen.completion_tokens / 100 == pytest.approx(under_24, rel=0.03)


def test_answers_that_never_stopped_by_themselves_are_expected_to_run_to_the_cap() -> None:
    history = [length_record(1, 16, [[16, 16, False]] * 50)]
    job = JobShape(MODEL, CHAT, 10, 10 * 200, {64: 10})
    assert estimate_run(job, history).completion_tokens == pytest.approx(10 * 64)


# -- the engine's pace, timed at its first load --------------------------------------------

TRUE = (0.004, 0.03, 0.0008)  # per token, per step, per prompt token


def pace_steps() -> list[list[float]]:
    """Timed steps as a probe reports them ([prompt, completion, seconds]), made exactly by
    the time model: a batch shrinking from 16 to 1, then two prefills."""
    steps = [[16 * 20, 16, 0.0]] + [[0, 16 - index // 2, 0.0] for index in range(1, 32)]
    steps += [[600, 2, 0.0], [1200, 4, 0.0]]
    for step in steps:
        step[2] = model_seconds(TRUE, (step[1], 1, step[0]))
    return steps


def pace_of(steps: list[list[float]]) -> dict:
    return {"kind": "pace", "model": MODEL, "hardware": "CPU", "pace": {"steps": steps}}


def test_the_probe_times_steps_whose_batch_shrinks_and_steps_that_prefill() -> None:
    spec = ModelSpec("fake", "nowhere", "fake", engine={"fake_batch": 4})
    pace = measure_pace(FakeEngine(spec))
    completions = [completion for _, completion, _ in pace["steps"]]
    # The fake engine finishes four requests a step, each with up to 8 words: answers of
    # 2, 3, 4... 8, then 8 each; then the two groups of long prompts, one token each.
    assert completions == [2 + 3 + 4 + 5, 6 + 7 + 8 + 8, 32, 32, 2, 4]
    assert all(seconds >= 0 for _, _, seconds in pace["steps"])


def test_the_first_estimate_rests_on_the_pace_the_engine_timed() -> None:
    steps = pace_steps()
    assert pace_coefficients(pace_of(steps)) == pytest.approx(TRUE, rel=1e-3)
    job = JobShape(MODEL, CHAT, 40, 40 * 200, {64: 40})
    cold = estimate_run(job, [])
    paced = estimate_run(job, [pace_of(steps)])
    assert paced.coefficients == pytest.approx(TRUE, rel=1e-3)
    assert "pace, measured at its load" in paced.basis and paced.jobs == 0
    assert paced.run_seconds == pytest.approx(
        model_seconds(TRUE, (paced.completion_tokens, paced.steps, paced.prompt_tokens))
    )
    assert cold.run_seconds > 2 * paced.run_seconds
    # One job of its own later, the pace keeps its shape and the job sets the scale.
    record = length_record(1, 64, exponential_answers(64, 40, 30.0))
    fitted = estimate_run(job, [pace_of(steps), record]).coefficients
    ratios = [value / true for value, true in zip(fitted, TRUE)]
    assert ratios == pytest.approx([ratios[0]] * 3)


def test_a_pace_too_scattered_to_tell_the_terms_apart_scales_the_cautious_defaults() -> None:
    # Decode steps of one batch size only, timed on a busy machine: nothing tells the cost
    # of a token from that of a step, and a fit would give one of them none.
    steps = [[0, 16, 0.1], [0, 16, 0.3], [0, 16, 0.1], [0, 16, 0.2]]
    fitted = pace_coefficients(pace_of(steps))
    ratios = [value / cold for value, cold in zip(fitted, COLD)]
    assert ratios == pytest.approx([ratios[0]] * 3)
    assert sum(model_seconds(fitted, (c, 1, p)) for p, c, _ in steps) == pytest.approx(0.7)


def config_text(engine: dict | None = None) -> str:
    options = json.dumps({"fake_seconds_per_step": 0.02, "fake_batch": 4, **(engine or {})})
    return (
        "default_model: fake\n"
        "min_free_bytes: 0\n"
        "settle_seconds: 0.2\n"
        "idle_unload_seconds: 300\n"
        "models:\n"
        f"  fake: {{path: nowhere, backend: fake, engine: {options}}}\n"
        f"  other: {{path: nowhere, backend: fake, engine: {options}}}\n"
    )


def test_a_model_new_here_has_its_pace_timed_and_the_waiting_jobs_estimated_again(
    tmp_path: Path,
) -> None:
    harness = start_service(tmp_path, engine={"fake_seconds_per_step": 0.02, "fake_batch": 4})
    try:
        inbox, outbox = harness.inbox, harness.outbox
        drop(inbox, "first.jsonl", chat_file(40))
        drop(inbox, "second.jsonl", chat_file(40))
        harness.run_until(
            lambda: (
                finished(inbox / "first.status", outbox)
                and finished(inbox / "second.status", outbox)
            ),
            30,
        )
        state = harness.config.folder("state")
        paces, history = list(read_paces(state)), list(read_history(state))
        first = read_json(outbox_folder(harness.config, inbox / "first.status") / "benchmark.json")
        second = read_json(
            outbox_folder(harness.config, inbox / "second.status") / "benchmark.json"
        )
    finally:
        stop_service(harness)
    # Timed once, at the first load; the job history holds jobs only.
    assert [(pace["kind"], pace["model"]) for pace in paces] == [("pace", "fake")]
    assert paces[0]["pace"]["steps"]
    assert [record["job_id"] for record in history] == [first["job_id"], second["job_id"]]
    # The running job and the one waiting behind it were both estimated from the pace.
    assert "measured at its load" in first["estimate"]["basis"]
    assert "measured at its load" in second["estimate"]["basis"]


def test_an_engine_process_counts_none_of_its_probe_in_a_job(tmp_path: Path) -> None:
    spec = ModelSpec("fake", "nowhere", "fake", engine={"fake_batch": 8})
    engine = EngineProcess(spec, pace=True)
    try:
        assert engine.info.pace and engine.info.pace["steps"]
        assert engine.counters() != (0, 0)  # the probe's tokens, counted before the job
        path = tmp_path / "input.jsonl"
        path.write_bytes(chat_file(12))
        progress = run_lines(path, Journal(tmp_path), engine, RunOptions(CHAT, "fake"), 12)
    finally:
        engine.close()
    assert progress.tally.completion_tokens == 12 * 8
    # The counters reach the runner every half second at most, so they may lag the job's
    # last requests; they never include the probe's 128 tokens.
    assert 0 <= progress.engine_completion_tokens <= 12 * 8
    assert 0 <= progress.engine_prompt_tokens <= progress.tally.prompt_tokens


# -- the running ETA before the engine's first counters -------------------------------------


def running_job(tmp_path: Path, service: Service) -> Running:
    inbox = service.inbox / "fake"
    inbox.mkdir(parents=True)
    work = service.state / "jobs" / "j1"
    (work / "out").mkdir(parents=True)
    job = Job(id="j1", stem="big", subdir="fake", work=work, sidecar_dir=inbox, model="fake")
    job.total, job.status = 400, JobStatus.IN_PROGRESS
    job.estimate = estimate_run(JobShape("fake", CHAT, 400, 400 * 100, {64: 400}), []).as_dict()
    running = Running(job=job)
    running.started = running.run_started = time.monotonic() - 10.0  # ten seconds into its run
    return running


def test_until_the_engine_counts_anything_the_eta_is_the_estimate_less_the_time_run(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text())
    service = Service(load_config(config_path), engines=EngineKeeper(in_process=True))
    running = running_job(tmp_path, service)
    sidecar = running.job.sidecar_dir / "big.eta"
    estimated = running.job.estimate["run_seconds"]

    service.progress(running, Progress(total=400, tally=Tally()))
    before = read_json(sidecar)
    assert "no engine counters yet" in before["basis"]
    assert estimated - 12 <= before["seconds_remaining"] <= estimated - 9

    # The first counters come seconds after the last write; the refined ETA follows at once.
    counted = Progress(total=400, tally=Tally(), engine_prompt_tokens=4000)
    counted.engine_completion_tokens = 400
    service.progress(running, counted)
    after = read_json(sidecar)
    assert "refined from the tokens processed so far" in after["basis"]
    assert "no engine counters yet" not in after["basis"]


# -- what a running job's sidecars show, and how often -------------------------------------


def test_a_running_jobs_status_shows_the_tokens_its_engine_has_processed(tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text())
    service = Service(load_config(config_path), engines=EngineKeeper(in_process=True))
    running = running_job(tmp_path, service)
    status = running.job.sidecar_dir / "big.status"
    finished = Tally(completed=3, prompt_tokens=300, completion_tokens=150)
    service.progress(running, Progress(total=400, tally=finished))  # before this run: 3 done
    progress = Progress(total=400, tally=finished, in_flight=37, engine_prompt_tokens=4000)
    progress.engine_completion_tokens = 900
    running.job.run_seconds = 12.5
    service.progress(running, progress)

    # Every token the engine has processed, the requests still running included (the usage
    # counts finished requests only), on top of those finished before this run.
    assert read_json(status)["progress"] == {
        "prompt_tokens": 4300,
        "completion_tokens": 1050,
        "in_flight": 37,
        "run_seconds": 12.5,
    }
    mark_finalizing(running.job, JobStatus.COMPLETED)
    assert read_json(status)["progress"] is None  # no engine works on it any more


@pytest.mark.parametrize(("status_seconds", "rewritten"), [(10, False), (0.5, True)])
def test_status_seconds_sets_how_often_a_running_jobs_sidecars_are_rewritten(
    tmp_path: Path, status_seconds: float, rewritten: bool
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text() + f"status_seconds: {status_seconds}\n")
    service = Service(load_config(config_path), engines=EngineKeeper(in_process=True))
    running = running_job(tmp_path, service)
    status = running.job.sidecar_dir / "big.status"
    counted = Progress(total=400, tally=Tally(), engine_prompt_tokens=4000)
    service.progress(running, counted)  # the first counters: written at once
    assert read_json(status)["progress"]["prompt_tokens"] == 4000

    running.last_status = time.monotonic() - 1.0  # a second ago
    later = Progress(total=400, tally=Tally(), engine_prompt_tokens=5000)
    service.progress(running, later)
    shown = read_json(status)["progress"]["prompt_tokens"]
    assert shown == (5000 if rewritten else 4000)


@pytest.mark.parametrize("status_seconds", [0, 11])
def test_status_seconds_outside_what_the_format_promises_is_a_config_error(
    tmp_path: Path, status_seconds: float
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text() + f"status_seconds: {status_seconds}\n")
    with pytest.raises(ConfigError, match="At 'status_seconds': Input should be .* than"):
        load_config(config_path)


# -- a resumed job's whole run time -----------------------------------------------------------


def test_a_job_resumed_after_a_stop_is_recorded_with_the_time_of_both_runs(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text({"fake_batch": 1, "fake_seconds_per_step": 0.05}))
    config = load_config(config_path)
    work = config.folder("state") / "jobs" / "j1"
    (work / "out").mkdir(parents=True)
    job = Job(id="j1", stem="big", subdir="", work=work, sidecar_dir=None)
    (job.out / INPUT).write_bytes(chat_file(40))
    validate_job(job, config, "fake")
    write_status(job)
    pool = EngineKeeper(in_process=True)
    try:
        # Progress reaches the job every half second: the first run stops at its first
        # report with a few requests done, long before the 40 steps of 0.05 s are over.
        stop = RunHooks(stop_requested=lambda: job.completed >= 4)
        stopped = execute_job(job, config, pool, config.folder("outbox"), stop)
        assert stopped is None
        first = load_job(work)  # what the spool keeps across a stop
        assert first.runs == 1 and 4 <= first.completed < 40
        assert first.run_seconds >= first.completed * 0.05
        first_seconds, left = first.run_seconds, 40 - first.completed
        target = execute_job(first, config, pool, config.folder("outbox"), RunHooks())
    finally:
        pool.close()
    record = read_json(target / "benchmark.json")
    assert record["runs"] == 2
    # The second run took a step of 0.05 s at least for each request left.
    assert record["run_seconds"] >= first_seconds + left * 0.05 - 0.001
    (history,) = read_history(config.folder("state"))
    assert history["run_seconds"] == record["run_seconds"]


# -- `batchbox estimate`: what the service would write ----------------------------------------


@pytest.fixture
def batchbox(tmp_path: Path, capsys, monkeypatch):
    """`batchbox -c site ...` in this process."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text())
    monkeypatch.setattr(
        watcher.commands.run, "EngineKeeper", functools.partial(EngineKeeper, True)
    )
    monkeypatch.delenv("BATCHBOX_CONFIG", raising=False)
    interrupt, terminate = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["-c", str(config_path), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield call
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)
    structlog.reset_defaults()


def spool_job(site: Path, job_id: str, status: JobStatus, model: str, run_seconds: float) -> Job:
    inbox = site / "inbox"
    inbox.mkdir(exist_ok=True)
    work = site / "state" / "jobs" / job_id
    (work / "out").mkdir(parents=True)
    job = Job(id=job_id, stem=job_id, subdir="", work=work, sidecar_dir=inbox, model=model)
    job.status, job.sequence = status, int(job_id[-1])
    job.estimate = {"run_seconds": run_seconds, "basis": "earlier jobs"}
    write_status(job)
    return job


def seconds_in(out: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith("finished by:"))
    return int(line.rsplit("(", 1)[1].split()[0])


def test_estimate_counts_the_running_job_the_queue_ahead_and_each_model_load(
    tmp_path: Path, batchbox
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    long_ago = iso(now() - timedelta(hours=2))
    for model, load in (("fake", 20.0), ("other", 40.0)):
        append_history(state, {"model": model, "load_seconds": load, "finished_at": long_ago})
    running = spool_job(tmp_path, "job1", JobStatus.IN_PROGRESS, "fake", 999.0)
    write_eta(running, 100.0, "refined")  # the running job's remainder, as last refined
    spool_job(tmp_path, "job2", JobStatus.QUEUED, "other", 50.0)
    path = tmp_path / "questions.jsonl"
    path.write_bytes(chat_file(12))

    code, out, err = batchbox("estimate", str(path), "-m", "fake")
    assert code == 0, err
    own = float(next(line for line in out.splitlines() if line.startswith("run time")).split()[3])
    # 100 s left of the running job, a switch to `other` (40 s) for its 50 s, and a switch
    # back to `fake` (20 s) for this file's own run.
    assert seconds_in(out) == pytest.approx(100 + 40 + 50 + 20 + own, abs=2)
    assert "queue: 2 job(s) ahead, the running one included" in out
    assert "model load: about 20 s" in out
    assert "2 jobs ahead in the queue; includes loading fake" in out


def test_estimate_adds_no_load_for_an_engine_the_service_still_holds(
    tmp_path: Path, batchbox
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    recently = iso(now() - timedelta(seconds=30))
    append_history(state, {"model": "fake", "load_seconds": 20.0, "finished_at": recently})
    path = tmp_path / "questions.jsonl"
    path.write_bytes(chat_file(12))
    code, out, err = batchbox("estimate", str(path))
    assert code == 0, err
    assert "model load" not in out and "queue:" not in out
    code, out, err = batchbox("estimate", str(path), "-m", "other")
    assert code == 0, err
    assert "model load: about" in out and "includes loading other" in out


# -- while a job runs: answers longer than predicted ------------------------------------------


def test_answers_running_longer_than_predicted_are_weighed_against_the_longer_predictions() -> None:
    # Earlier answers: 60 % stopped at 50 tokens, 40 % ran to the cap of 192. This job's
    # answers run longer: a third stop at 50, two thirds run to 192. At step 170 its
    # tokens are past the prediction, 16 requests are done and 32 run, 22 tokens from
    # their end.
    samples = [[192, 50, True]] * 60 + [[192, 192, False]] * 40
    history = [length_record(1, 192, samples) | {"run_seconds": 2000.0}]  # a slow machine
    estimate = estimate_run(JobShape(MODEL, CHAT, 48, 48 * 200, {192: 48}), history).as_dict()
    coefficients = estimate["coefficients"]
    finished, age = 16 * 50, 170
    done = finished + 32 * age
    assert done > estimate["completion_tokens"]
    prompt = estimate["prompt_tokens"]
    elapsed = model_seconds(coefficients, (done, age, prompt))  # at the model's own pace
    truth = model_seconds(coefficients, (32 * (192 - age), 192 - age, 0))
    assert truth > 10

    left = refine(
        estimate, elapsed, prompt, done, 16, 48, finished_completion=finished, in_flight=32
    )
    assert left.seconds_left == pytest.approx(truth, rel=0.1)
    assert not left.overrun  # some predicted answers are longer than 170: no guessing
    # Counting only tokens, the job looks overrun and its 32 answers half done: 195
    # tokens each, with 16 more to come, four times the truth.
    by_share = refine(estimate, elapsed, prompt, done, 16, 48)
    assert by_share.overrun and by_share.seconds_left > 3 * truth


def test_while_a_long_step_runs_the_time_it_takes_comes_off_what_is_left() -> None:
    # The counters moved at 60 s; at 100 s they have not moved again (a step prefilling
    # thousands of prompt tokens). The end expected stays where it was at 60 s.
    samples = [[192, 50, True]] * 60 + [[192, 192, False]] * 40
    history = [length_record(1, 192, samples) | {"run_seconds": 2000.0}]
    estimate = estimate_run(JobShape(MODEL, CHAT, 48, 48 * 200, {192: 48}), history).as_dict()
    counts = {"finished_completion": 0.0, "in_flight": 48}
    at_60 = refine(estimate, 60.0, 4000.0, 480.0, 0, 48, counted=60.0, **counts)
    at_100 = refine(estimate, 100.0, 4000.0, 480.0, 0, 48, counted=60.0, **counts)
    assert at_60.seconds_left > 50
    assert 100 + at_100.seconds_left == pytest.approx(60 + at_60.seconds_left)
    # Counted as if measured at 100 s, the same work would have seemed slower: later still.
    creeping = refine(estimate, 100.0, 4000.0, 480.0, 0, 48, **counts)
    assert 100 + creeping.seconds_left > 60 + at_60.seconds_left + 10


@functools.cache
def long_answers_estimate() -> dict:
    samples = [[192, 50, True]] * 60 + [[192, 192, False]] * 40
    shape = JobShape(MODEL, CHAT, 300, 300 * 200, {192: 300})
    return estimate_run(shape, [length_record(1, 192, samples)]).as_dict()


@settings(deadline=None)  # a replay of up to 2,048 requests per example, on a loaded machine
@given(
    elapsed=st.floats(0, 1e6),
    completion_done=st.floats(0, 1e7),
    finished=st.floats(0, 1e7),
    requests_done=st.integers(0, 10000),
    requests_left=st.integers(1, 10000),
    in_flight=st.integers(0, 10000),
)
def test_with_requests_left_the_refined_end_is_never_now_or_past(
    elapsed, completion_done, finished, requests_done, requests_left, in_flight
) -> None:
    estimate = long_answers_estimate()
    total = requests_done + requests_left
    left = refine(
        estimate,
        elapsed,
        100.0,
        completion_done,
        requests_done,
        total,
        finished_completion=finished,
        in_flight=in_flight,
    )
    assert 1.0 <= left.seconds_left < float("inf")
