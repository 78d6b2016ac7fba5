"""The real vLLM engine with the shipped SmolLM2 on replicas of a local Ray, as users meet it:
the same results and errors as the local engine for a file with bad lines mixed in, and a
Ray job that survives kill -9 of `batchbox serve` with nothing lost or repeated (SPEC §5, §8).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from crashkit import Dropped, all_finished, check_site, drop_file, start_server
from helpers import assert_every_line_once, chat_line, read_jsonl, shipped_config, write_jsonl

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
# The replica gets the machine's cores: Ray sets its OMP_NUM_THREADS to its num_cpus, and
# the local engine's torch uses every core, so both sum in the same order.
ON_RAY = {"address": "local", "concurrency": 1, "num_cpus": os.cpu_count() or 1}
COLORS = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink"}


def on_ray(config: Path) -> Path:
    """The shipped config with the chat model on a local Ray of one replica."""
    data = yaml.safe_load(config.read_text())
    data["models"][MODEL].update(backend="ray", ray=ON_RAY)
    config.write_text(yaml.safe_dump(data))
    return config


def run(config: Path, source: Path) -> Path:
    finished = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "-c", str(config), "run", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return Path(finished.stdout.strip().splitlines()[-1])


def answers(folder: Path) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r["response"]["body"] for r in read_jsonl(folder / "results.jsonl")}


def errors(folder: Path) -> dict[int, tuple[str | None, str, str]]:
    return {
        r["error"]["line"]: (r["custom_id"], r["error"]["code"], r["error"]["message"])
        for r in read_jsonl(folder / "errors.jsonl")
    }


def test_a_chat_file_with_bad_lines_gives_the_local_results_through_ray(tmp_path: Path) -> None:
    from openai.types.chat import ChatCompletion

    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local_config = shipped_config(tmp_path / "local")
    ray_config = on_ray(shipped_config(tmp_path / "ray"))
    source = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            chat_line("colors", "Name three colors.", max_tokens=48, temperature=0),
            chat_line("capital", "What is the capital of France?", max_tokens=32, temperature=0),
            b"{not json",
            chat_line("colors", "A duplicate custom_id.", max_tokens=8),
            chat_line("stream", "Hi", stream=True),
            chat_line("too-long", "word " * 3000, max_tokens=16),
            chat_line("two", "Say hello.", max_tokens=16, n=2, seed=1, temperature=0.7),
            chat_line("sum", "What is 2 + 2? Answer with a number.", max_tokens=16, temperature=0),
        ],
    )
    local = run(local_config, source)
    clustered = run(ray_config, source)

    assert_every_line_once(source, clustered)
    assert errors(clustered) == errors(local)
    assert {code for _, code, _ in errors(clustered).values()} == {
        "invalid_json",
        "duplicate_custom_id",
        "unsupported_parameter",
        "context_length_exceeded",
    }
    got, expected = answers(clustered), answers(local)
    assert set(got) == set(expected) == {"colors", "capital", "two", "sum"}
    for custom_id, body in got.items():
        ChatCompletion.model_validate(body)
        assert body["model"] == MODEL
        assert body["usage"] == expected[custom_id]["usage"]
    for custom_id in ("colors", "capital", "sum"):  # greedy: the same words on either path
        assert got[custom_id]["choices"] == expected[custom_id]["choices"]
    assert "paris" in got["capital"]["choices"][0]["message"]["content"].lower()
    colors = got["colors"]["choices"][0]["message"]["content"].lower()
    assert sum(color in colors for color in COLORS) >= 2, colors
    assert len(got["two"]["choices"]) == 2
    record = json.loads((clustered / "benchmark.json").read_text())
    assert record["hardware"].startswith("Ray local: 1 replica, CPU")
    assert record["engine_version"].endswith("on Ray 2.60.0")
    assert record["engine_settings"]["ray_replicas"] == 1


def journal_results(root: Path) -> set[bytes]:
    lines: set[bytes] = set()
    for path in (root / "state" / "jobs").glob("*/out/results.jsonl"):
        data = path.read_bytes()
        lines.update(data[: data.rfind(b"\n") + 1].splitlines())
    return lines


def test_kill_9_of_serve_during_a_ray_job_loses_and_repeats_nothing(tmp_path: Path) -> None:
    config = on_ray(
        shipped_config(
            tmp_path,
            settle_seconds=0.5,
            rescan_seconds=1,
            stop_timeout_seconds=30,
            min_free_bytes=0,
            max_in_flight=8,
        )
    )
    lines = [chat_line(f"r{n}", f"Name a colour. ({n})", max_tokens=6) for n in range(150)]
    dropped = [Dropped("", "colours", write_jsonl(tmp_path / "source.jsonl", lines).read_bytes())]
    drop_file(tmp_path / "inbox", dropped[0])

    server = start_server(config, timeout=120)
    try:
        deadline = time.monotonic() + 900
        while len(journal_results(tmp_path)) < 10:
            assert server.process.poll() is None, server.log()[-3000:]
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.05)
        # As systemd ends the unit: the service and everything under it, Ray included.
        everything = psutil.Process(server.process.pid).children(recursive=True)
        server.process.send_signal(signal.SIGKILL)
        for process in everything:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(everything, timeout=60)
        server.process.wait(10)
    finally:
        server.kill()
    before = journal_results(tmp_path)
    assert 10 <= len(before) < 150, "the kill came after the job had finished"

    server = start_server(config, timeout=120)
    try:
        deadline = time.monotonic() + 1800
        while not all_finished(tmp_path, dropped):
            assert server.process.poll() is None, server.log()[-3000:]
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)
        assert server.terminate()[0] == 0
    finally:
        server.kill()
    count = check_site(tmp_path, dropped, statuses=("completed",))
    assert count.problems == []
    assert (count.lost, count.duplicated) == (0, 0)
    final = tmp_path / "outbox" / "colours" / "results.jsonl"
    results = read_jsonl(final)
    assert len(results) == 150
    assert all(record["response"]["body"]["choices"][0]["message"]["content"] for record in results)
    # What was finished before the kill is delivered as it was: it did not run again.
    assert before <= set(final.read_bytes().splitlines())
