"""The estimator behind the `.eta` sidecar (SPEC §4, §6): completion lengths by Kaplan-Meier,
the fitted time model, the refinement while a job runs, the queue plan, and the `estimate`
and `bench` commands on the fake engine. Fast: no vLLM."""

from __future__ import annotations

import functools
import json
import signal
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

import watcher.commands.bench
from benchmarks.estimator import (
    COLD,
    JobShape,
    concurrency_of,
    estimate_run,
    expected_length,
    fit_coefficients,
    model_seconds,
    record_features,
    replay,
    survival_curve,
)
from benchmarks.record import read_history
from benchmarks.refine import refine, steps_done
from runner.types import ModelSpec
from watcher.cli import main
from watcher.engines import EngineKeeper
from watcher.jobqueue import plan_queue
from watcher.jobs import Job

CHAT = "/v1/chat/completions"
MODEL = "tiny"
CONFIG = """\
default_model: fake
models:
  fake: {path: nowhere, backend: fake, engine: {fake_load_seconds: 0.3}}
  emb: {path: nowhere, backend: fake, runner: pooling}
"""


def record(
    job: int,
    run_seconds: float,
    completion: int,
    prompt: int,
    requests: int,
    *,
    batch: int = 256,
    prompt_chars: int | None = None,
    samples: list[list] | None = None,
) -> dict:
    """A benchmark record of the kind finish_job writes, with only what the estimator reads."""
    return {
        "job_id": f"job{job}",
        "model": MODEL,
        "endpoint": CHAT,
        "hardware": "CPU",
        "engine_settings": {"max_num_seqs": batch, "max_in_flight": 256},
        "request_counts": {"total": requests, "completed": requests, "failed": 0},
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_chars": prompt * 4 if prompt_chars is None else prompt_chars,
        "run_seconds": run_seconds,
        "load_seconds": 0.0,
        "completion_samples": samples or [],
    }


def shape(requests: int, prompt_chars: int, max_tokens: int | None = 64) -> JobShape:
    return JobShape(MODEL, CHAT, requests, prompt_chars, {max_tokens: requests})


# -- cold start --------------------------------------------------------------------------


def test_without_history_the_basis_says_so_and_the_estimate_is_cautious() -> None:
    job = shape(48, 48 * 120, 128)
    cold = estimate_run(job, [])
    assert "no earlier jobs" in cold.basis and cold.jobs == 0
    # What this machine really did with such a job: 48 answers of ~60 tokens in 40 s.
    history = [
        record(index, 40.0 + index, 48 * 60, 48 * 60, 48, samples=[[128, 60, True]] * 48)
        for index in range(3)
    ]
    realistic = estimate_run(job, history)
    assert "3 earlier jobs" in realistic.basis
    assert cold.run_seconds > realistic.run_seconds > 0


# -- completion lengths ------------------------------------------------------------------

# Five answers: three stopped by themselves (3, 5 and 8 tokens), two cut off at their
# max_tokens (4 of 4, 10 of 10), which only says that they would have run longer.
SAMPLES = [[10, 3, True], [10, 5, True], [4, 4, False], [10, 8, True], [10, 10, False]]


def test_kaplan_meier_counts_a_cut_off_answer_as_censored_not_short() -> None:
    # t=3: 1 of 5 at risk stops -> 4/5; the cut-off at 4 leaves the risk set (3 remain);
    # t=5: 1 of 3 -> 4/5 * 2/3; t=8: 1 of 2 -> 4/5 * 2/3 * 1/2; the cut-off at 10 ends it.
    curve = survival_curve(SAMPLES)
    assert [t for t, _ in curve] == [3, 5, 8]
    assert [s for _, s in curve] == pytest.approx([0.8, 8 / 15, 4 / 15])


def test_expected_length_is_the_area_under_the_survival_curve_up_to_the_cap() -> None:
    curve = survival_curve(SAMPLES)
    # 3 * 1 + 2 * 4/5 + 3 * 8/15 + 2 * 4/15
    assert expected_length(curve, 10) == pytest.approx(3 + 1.6 + 1.6 + 8 / 15)
    assert expected_length(curve, 4) == pytest.approx(3 + 0.8)
    assert expected_length(curve, 2) == pytest.approx(2)  # every answer runs past 2 tokens
    # Treating the cut-off answers as finished would have said (3 + 5 + 4 + 8 + 10) / 5.
    assert expected_length(curve, 10) > 6.0
    # Past the last stop the curve stays where it was: longer caps give longer answers.
    assert expected_length(curve, 20) == pytest.approx(expected_length(curve, 10) + 10 * 4 / 15)


def test_predicted_completion_tokens_follow_the_samples_and_each_cap() -> None:
    # Five answers each of 3 and 5 and 8 tokens, and five cut off at 10: 3 + 2 * 3/4 +
    # 3 * 1/2 + 2 * 1/4 under a cap of 10, and 3 + 1 * 3/4 under a cap of 4.
    samples = [[10, 3, True], [10, 5, True], [10, 8, True], [10, 10, False]] * 5
    history = [record(1, 10.0, 500, 400, 20, samples=samples, prompt_chars=20 * 40)]
    job = JobShape(MODEL, CHAT, 30, 30 * 40, {10: 10, 4: 20})
    estimate = estimate_run(job, history)
    assert estimate.completion_tokens == pytest.approx(10 * 6.5 + 20 * 3.75)


def test_answers_are_predicted_from_the_earlier_jobs_most_like_this_one() -> None:
    labels = record(
        1, 10.0, 2000, 40000, 1000, prompt_chars=1000 * 100, samples=[[4, 2, True]] * 500
    )
    essays = record(
        2, 10.0, 20000, 4000, 100, prompt_chars=100 * 50, samples=[[400, 200, True]] * 100
    )
    essay_job = estimate_run(JobShape(MODEL, CHAT, 10, 10 * 60, {400: 10}), [labels, essays])
    assert essay_job.completion_tokens == pytest.approx(10 * 200, rel=0.05)
    label_job = estimate_run(JobShape(MODEL, CHAT, 10, 10 * 90, {4: 10}), [labels, essays])
    assert label_job.completion_tokens == pytest.approx(10 * 2, rel=0.05)


# -- the time model ----------------------------------------------------------------------

TRUE = (0.004, 0.03, 0.0008)  # per token, per step, per prompt token


def synthetic(job: int, requests: int, length: int, prompt: int, batch: int = 64) -> dict:
    """A job whose time is exactly the model's: its answers run 1..2*length tokens."""
    samples = [[2 * length, 1 + index % (2 * length), True] for index in range(requests)]
    completion = sum(tokens for _, tokens, _ in samples)
    made = record(job, 1.0, completion, prompt, requests, batch=batch, samples=samples)
    made["run_seconds"] = model_seconds(TRUE, record_features(made))
    return made


def test_replaying_the_batch_counts_the_steps_and_where_the_tokens_come() -> None:
    # All in one batch: as many steps as the longest answer.
    assert replay([10, 20, 30], concurrency=3, requests=3)[0] == 30
    # Two slots for four answers of 10: two rounds.
    assert replay([10, 10, 10, 10], concurrency=2, requests=4)[0] == 20
    # Answers of 10 and 30 side by side: the first 20 tokens take 10 steps, the last 20
    # take 20, so half the tokens are done a third of the way through the steps.
    steps, progress = replay([10, 30], concurrency=2, requests=2)
    assert steps == 30
    assert progress[5] == pytest.approx([0.5, 1 / 3])
    assert progress[0] == [0.0, 0.0] and progress[-1] == pytest.approx([1.0, 1.0])
    # A large job is replayed at scale: its steps stay what its shape makes them.
    lengths = [8.0] * 2048
    assert replay(lengths, concurrency=100, requests=20000)[0] == pytest.approx(8 * 200, rel=0.05)


def test_the_kv_cache_limits_the_batch_in_whole_blocks() -> None:
    on_cpu = {
        "hardware": "CPU: 2 cores",
        "engine_settings": {"max_num_seqs": 256, "kv_cache_tokens": 23296},
    }
    # 83 tokens a request take one block of 128 on a CPU: 182 of them fit.
    assert concurrency_of(1000, on_cpu, 83) == 182
    assert concurrency_of(1000, on_cpu, 200) == 91
    assert concurrency_of(50, on_cpu, 83) == 50
    on_gpu = {"hardware": "NVIDIA GeForce RTX 4080", "engine_settings": on_cpu["engine_settings"]}
    assert concurrency_of(1000, on_gpu, 83) == 242  # blocks of 16: 96 tokens a request


# requests, mean answer length, prompt tokens
SHAPES = [(20, 40, 900), (400, 30, 4000), (100, 8, 60000), (8, 300, 12000)]
SHAPES += [(3, 200, 1000), (1000, 20, 80000), (2000, 2, 30000)]


def test_the_fit_recovers_known_coefficients_from_noise_free_records() -> None:
    records = [synthetic(index, *numbers) for index, numbers in enumerate(SHAPES)]
    fitted = fit_coefficients(records)
    assert fitted == pytest.approx(TRUE, rel=0.01)


def test_with_fewer_than_three_jobs_the_cold_shape_is_only_scaled() -> None:
    only = synthetic(1, 50, 60, 3000)
    fitted = fit_coefficients([only])
    ratios = [value / cold for value, cold in zip(fitted, COLD)]
    assert len(ratios) == len(COLD) and ratios == pytest.approx([ratios[0]] * len(COLD))
    # ...to the one job it has: the same job again is estimated at its own time.
    again = model_seconds(fitted, record_features(only))
    assert again == pytest.approx(only["run_seconds"], rel=1e-6)
    two = fit_coefficients([only, synthetic(2, 10, 20, 400)])
    scales = [value / cold for value, cold in zip(two, COLD)]
    assert scales == pytest.approx([scales[0]] * len(COLD))


def test_the_estimate_rests_on_the_history_it_names() -> None:
    records = [synthetic(index, 40 + index, 30 + index, 2000) for index in range(5)]
    estimate = estimate_run(shape(40, 8000), records)
    assert estimate.basis.startswith("5 earlier jobs of tiny")
    assert estimate.jobs == 5
    other = JobShape("other", CHAT, 40, 8000, {64: 40})
    assert estimate_run(other, records).jobs == 0


def test_records_of_the_model_on_another_backend_do_not_count() -> None:
    # The same alias moved from a local engine to a Ray cluster of two replicas: its local
    # jobs say nothing of the cluster's speed, and the cluster's jobs nothing of the local's.
    local = [synthetic(index, 40 + index, 30 + index, 2000) for index in range(3)]
    cluster = [
        {**synthetic(10 + index, 20 + index, 30 + index, 2000), "engine_kind": "ray auto x2"}
        for index in range(2)
    ]
    for record in local:
        record["engine_kind"] = "vllm"
    on_ray = JobShape(MODEL, CHAT, 40, 8000, {64: 40}, engine_kind="ray auto x2")
    on_local = JobShape(MODEL, CHAT, 40, 8000, {64: 40}, engine_kind="vllm")
    assert estimate_run(on_ray, local + cluster).jobs == 2
    assert estimate_run(on_local, local + cluster).jobs == 3
    # Records from before records named their engine count for any.
    older = [{key: value for key, value in record.items() if key != "engine_kind"}]
    assert estimate_run(on_ray, older + cluster).jobs == 3


def test_a_models_engine_kind_names_its_ray_replicas() -> None:
    assert ModelSpec("m", "/x", backend="vllm").engine_kind == "vllm"
    ray = {"address": "auto", "concurrency": 2, "num_gpus": 1, "num_cpus": 4, "backend": "vllm"}
    kind = ModelSpec("m", "/x", backend="ray", ray=ray).engine_kind
    assert kind == "ray auto x2 (1 GPU, 4 CPU, vllm)"


def test_prompt_tokens_are_characters_per_token_plus_what_the_template_adds() -> None:
    # 30 tokens of template on every request; 3 characters a token in the text itself.
    records = [
        record(1, 10.0, 100, 10 * (30 + 10), 10, prompt_chars=10 * 30),
        record(2, 10.0, 100, 10 * (30 + 200), 10, prompt_chars=10 * 600),
    ]
    estimate = estimate_run(shape(100, 100 * 90), records)
    assert estimate.prompt_tokens == pytest.approx(100 * (30 + 30), rel=0.01)
    cold = estimate_run(shape(100, 100 * 90), [])
    assert cold.prompt_tokens == pytest.approx(100 * (90 / 4 + 32))


# -- the queue ---------------------------------------------------------------------------


def queued(job_id: str, model: str) -> Job:
    return Job(
        id=job_id, stem=job_id, subdir="", work=Path("/nowhere"), sidecar_dir=None, model=model
    )


def test_a_model_switch_adds_its_load_time() -> None:
    jobs = [queued("a", "small"), queued("b", "large"), queued("c", "large")]
    plans = plan_queue(jobs, {"a": 10, "b": 20, "c": 30}, {"small": 5, "large": 60}, "small", None)
    assert plans["a"].start == 0 and not plans["a"].load  # its engine is loaded already
    assert plans["b"].load and plans["b"].start == 10 + 60
    assert not plans["c"].load and plans["c"].finish == 10 + 60 + 20 + 30


def test_jobs_ahead_shift_the_eta() -> None:
    alone = plan_queue([queued("b", "m")], {"b": 20}, {"m": 60}, "m", None)["b"]
    behind = plan_queue(
        [queued("a", "m"), queued("b", "m")], {"a": 100, "b": 20}, {"m": 60}, "m", 30
    )["b"]
    assert alone.finish == 20 and alone.ahead == 0
    assert behind.finish == 30 + 100 + 20 and behind.ahead == 2


# -- while a job runs --------------------------------------------------------------------


@functools.cache
def running_estimate(completion: int = 64) -> dict:
    """What estimate_run hands the service for 200 requests after jobs of all sizes."""
    history = [synthetic(index, *numbers) for index, numbers in enumerate(SHAPES)]
    estimate = estimate_run(shape(200, 200 * 150, completion), history).as_dict()
    assert estimate["coefficients"] == pytest.approx(TRUE, rel=0.01)
    return estimate


def work_done(estimate: dict, share: float) -> tuple[float, float, float]:
    """The model's work in the first `share` of the tokens: the prompts first, as vLLM does."""
    completion = share * estimate["completion_tokens"]
    return (completion, steps_done(estimate, completion), estimate["prompt_tokens"])


def test_halfway_at_the_predicted_speed_the_other_half_is_left() -> None:
    estimate = running_estimate()
    done = work_done(estimate, 0.5)
    half = model_seconds(TRUE, done)
    left = refine(estimate, half, done[2], done[0], 60, 200)
    assert not left.overrun
    assert half + left.seconds_left == pytest.approx(estimate["run_seconds"], rel=0.01)
    # The tail, where the batch empties and each step makes few tokens, is in what is left.
    tokens_left = estimate["completion_tokens"] - done[0]
    assert left.seconds_left > model_seconds(TRUE, (tokens_left, tokens_left / 64, 0))


def test_slower_than_predicted_the_rest_takes_longer() -> None:
    estimate = running_estimate()
    done = work_done(estimate, 0.5)
    half = model_seconds(TRUE, done)
    on_time = refine(estimate, half, done[2], done[0], 60, 200).seconds_left
    slow = refine(estimate, 2 * half, done[2], done[0], 60, 200).seconds_left
    assert 1.3 * on_time < slow <= 2 * on_time


def test_a_job_past_its_predicted_tokens_expects_more_per_request_left() -> None:
    estimate = running_estimate()
    past = 1.3 * estimate["completion_tokens"]
    lefts = []
    for requests_left in (1, 10, 100):
        done = 200 - requests_left
        left = refine(estimate, 300.0, estimate["prompt_tokens"], past, done, 200)
        assert left.overrun
        assert left.seconds_left >= 1
        lefts.append(left.seconds_left)
    assert lefts[0] < lefts[1] < lefts[2]


@given(
    elapsed=st.floats(0, 1e6),
    prompt_done=st.floats(0, 1e7),
    completion_done=st.floats(0, 1e7),
    requests_done=st.integers(0, 10000),
    requests_left=st.integers(1, 10000),
    completion=st.floats(0, 1e7),
)
def test_with_requests_left_the_end_is_never_now_or_past(
    elapsed, prompt_done, completion_done, requests_done, requests_left, completion
) -> None:
    estimate = {**running_estimate(), "completion_tokens": completion}
    total = requests_done + requests_left
    left = refine(estimate, elapsed, prompt_done, completion_done, requests_done, total)
    assert 1.0 <= left.seconds_left < float("inf")
    done = refine(estimate, elapsed, prompt_done, completion_done, total, total)
    assert done.seconds_left == 0


# -- the commands ------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    return config


@pytest.fixture
def batchbox(site: Path, capsys, monkeypatch):
    """`batchbox -c site ...` in this process, with the fake engine in this process too."""
    monkeypatch.setattr(
        watcher.commands.bench, "EngineKeeper", functools.partial(EngineKeeper, True)
    )
    monkeypatch.delenv("BATCHBOX_CONFIG", raising=False)
    interrupt, terminate = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["-c", str(site), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield call
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)
    structlog.reset_defaults()


def questions(path: Path, count: int) -> Path:
    lines = [
        {
            "custom_id": f"q{index}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "messages": [{"role": "user", "content": f"question {index}"}],
                "max_tokens": 32,
            },
        }
        for index in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_estimate_prints_the_run_time_and_its_basis(site: Path, batchbox) -> None:
    path = questions(site.parent / "questions.jsonl", 12)
    code, out, err = batchbox("estimate", str(path))
    assert code == 0, err
    assert "12 requests on fake" in out
    assert "run time: about" in out and "finished by:" in out
    assert "basis: no earlier jobs of fake on this machine" in out


def test_bench_records_a_calibration_that_the_next_estimate_uses(site: Path, batchbox) -> None:
    code, out, err = batchbox("bench", "fake")
    assert code == 0, err
    assert "Calibrated fake" in out and "tokens/s" in out and "load" in out
    history = list(read_history(site.parent / "state"))
    assert len(history) == 1
    calibration = history[0]
    assert calibration["metadata"] == {"calibration": True}
    assert calibration["status"] == "completed" and calibration["request_counts"]["total"] >= 40
    assert calibration["completion_samples"] and calibration["run_seconds"] > 0
    # What SPEC section 6 names; the fake engine's 0.3 s load is not in the run time.
    assert calibration["load_seconds"] >= 0.3 > calibration["run_seconds"]
    assert calibration["estimate"]["run_seconds"] > 0
    assert {"job_id", "source", "hardware", "engine_version", "engine_settings"} <= set(calibration)
    assert set(calibration["throughput"]) == {
        "requests_per_second",
        "prompt_tokens_per_second",
        "completion_tokens_per_second",
        "total_tokens_per_second",
    }
    assert not any((site.parent / "state" / "bench").iterdir())  # the throwaway outbox
    assert not any((site.parent / "state" / "runs").iterdir())
    assert not (site.parent / "outbox").exists() or not any((site.parent / "outbox").iterdir())

    path = questions(site.parent / "questions.jsonl", 12)
    code, out, err = batchbox("estimate", str(path))
    assert code == 0, err
    assert "basis: 1 earlier job of fake on this machine" in out


def test_bench_of_an_embedding_model_records_embeddings(site: Path, batchbox) -> None:
    code, out, err = batchbox("bench", "emb")
    assert code == 0, err
    (calibration,) = read_history(site.parent / "state")
    assert calibration["endpoint"] == "/v1/embeddings"
    assert calibration["request_counts"]["completed"] >= 60
    lines = [
        {
            "custom_id": f"e{index}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": "some text to embed"},
        }
        for index in range(20)
    ]
    path = site.parent / "texts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = batchbox("estimate", str(path), "-m", "emb")
    assert code == 0, err
    assert "basis: 1 earlier job of emb on this machine" in out


def test_bench_of_an_unknown_model_is_a_usage_error(batchbox) -> None:
    code, _, err = batchbox("bench", "nonesuch")
    assert code == 2 and "not configured" in err
