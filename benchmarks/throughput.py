"""Throughput: the same chat file through raw vLLM, vLLM's batch runner, `batchbox run` and
the service, on this machine, in one run.

    python benchmarks/throughput.py [--requests 2000] [--config config.yaml]
        [--engine-core in,own] [--kv-cache 1,2] [--only abcd]

(a) `LLM.chat` on all prompts at once, the ceiling; (b) `python -m
vllm.entrypoints.openai.run_batch`; (c) `batchbox run`; (d) `batchbox serve`, dropping the
file into the inbox and waiting for its outbox folder. Every request sets `ignore_eos` and
its own `max_tokens`, so each variant generates exactly the same tokens. For each it prints
the wall time including model load, generation throughput (completion tokens per second of
generation, and all tokens per second), and the peak resident memory of the process tree,
then the ratios (c)/(a), (d)/(a) and (c)/(b).

Each setting runs all chosen variants with the same engine environment: `--engine-core in`
keeps vLLM's engine core in the engine's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), `own`
gives it a process of its own (=1, vLLM's default and what run_batch does); `--kv-cache`
sets VLLM_CPU_KVCACHE_SPACE in GiB. Without them the config's own environment is used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BATCHBOX = [sys.executable, "-m", "watcher.cli"]
TOPICS = [
    "the sea",
    "a city at night",
    "bread",
    "a chess game",
    "rain",
    "an old clock",
    "mountains",
    "a library",
    "trains",
    "the moon",
    "gardens",
    "a market",
]


def make_requests(count: int, seed: int = 7) -> list[dict]:
    """Chat requests with varied prompt lengths (a line to a paragraph) and output lengths."""
    chooser = random.Random(seed)
    requests = []
    for index in range(count):
        topic = chooser.choice(TOPICS)
        context = " ".join(chooser.choice(TOPICS) for _ in range(chooser.randint(0, 40)))
        prompt = f"Write about {topic}. Keep in mind: {context}".strip()
        requests.append(
            {
                "custom_id": f"r{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": chooser.choice([8, 16, 24, 32, 48]),
                    "temperature": 0.8,
                    "seed": index,
                    "ignore_eos": True,
                },
            }
        )
    return requests


class PeakMemory:
    """Samples the resident memory of a process and its children every 0.2 s, and the CPU
    seconds each has used (the last sample of each: a process that lives less than 0.2 s
    is missed)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            total = 0
            for process in [self.process, *self._children()]:
                try:
                    with process.oneshot():
                        total += process.memory_info().rss
                        times = process.cpu_times()
                        self.cpu[process.pid] = times.user + times.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.2)

    def _children(self) -> list[psutil.Process]:
        try:
            return self.process.children(recursive=True)
        except psutil.Error:
            return []

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds of the whole tree, and of the top process alone."""
        return sum(self.cpu.values()), self.cpu.get(self.process.pid, 0.0)


def run_measured(command: list[str], environment: dict[str, str], **kwargs) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command, env=environment, **kwargs)
    memory = PeakMemory(process.pid)
    if process.wait() != 0:
        raise SystemExit(f"{command[:4]} failed with exit status {process.returncode}")
    wall = time.monotonic() - started
    return {"wall": wall, "peak": memory.done(), **cpu_figures(memory)}


def cpu_figures(memory: PeakMemory) -> dict:
    tree, top = memory.cpu_seconds()
    return {"cpu": tree, "cpu_top": top}


RAW = """
import json, sys, time
started = time.monotonic()
from vllm import LLM, SamplingParams
settings = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], **settings)
loaded = time.monotonic()
lines = [json.loads(line) for line in open(sys.argv[3])]
conversations = [line["body"]["messages"] for line in lines]
params = [SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"],
          seed=b["seed"], ignore_eos=True) for b in (line["body"] for line in lines)]
outputs = llm.chat(conversations, params, use_tqdm=False)
finished = time.monotonic()
print("RESULT " + json.dumps({
    "load": loaded - started, "generate": finished - loaded,
    "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
    "completion_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)}))
"""


def variant_raw(model: dict, source: str, data: Path, environment: dict) -> dict:
    out = data.with_suffix(".raw.json")
    with open(out, "w") as handle:
        measured = run_measured(
            [sys.executable, "-c", RAW, source, json.dumps(model["engine"]), str(data)],
            environment,
            stdout=handle,
        )
    # vLLM logs to standard output too; the figures are on the line marked RESULT.
    marked = [line for line in out.read_text().splitlines() if line.startswith("RESULT ")]
    figures = json.loads(marked[-1].removeprefix("RESULT "))
    return {**measured, **figures}


def engine_flags(engine: dict) -> list[str]:
    """The model's engine settings from the config as vLLM command-line flags, so the batch
    runner gets exactly what (a), (c) and (d) get."""
    flags = []
    for key, value in engine.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def variant_run_batch(model: dict, source: str, data: Path, environment: dict) -> dict:
    out = data.with_suffix(".run_batch.jsonl")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(data),
        "-o",
        str(out),
        "--model",
        source,
        "--served-model-name",
        "smollm2",
        *engine_flags(model["engine"]),
    ]
    with open(data.with_suffix(".run_batch.log"), "w") as log:
        measured = run_measured(command, environment, stdout=log, stderr=log)
    lines = [json.loads(line) for line in out.open()]
    failed = [line for line in lines if line.get("error")]
    if failed:
        raise SystemExit(f"run_batch failed {len(failed)} requests: {failed[0]['error']}")
    usage = [line["response"]["body"]["usage"] for line in lines]
    return {
        **measured,
        "generate": None,
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
    }


def batchbox_figures(folder: Path) -> dict:
    record = json.loads((folder / "benchmark.json").read_text())
    return {
        "generate": record["run_seconds"],
        "load": record["load_seconds"],
        "prompt_tokens": record["prompt_tokens"],
        "completion_tokens": record["completion_tokens"],
    }


def variant_run(config: Path, data: Path, environment: dict) -> dict:
    out = data.parent / "run-outbox"
    with open(data.with_suffix(".run.log"), "w") as log:
        measured = run_measured(
            [*BATCHBOX, "-c", str(config), "run", str(data), "-o", str(out)],
            environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return {**measured, **batchbox_figures(out / data.stem)}


def variant_serve(config: Path, data: Path, environment: dict) -> dict:
    root = config.parent
    log = open(data.with_suffix(".serve.log"), "w")  # noqa: SIM115 - open while it runs
    service = subprocess.Popen(
        [*BATCHBOX, "-c", str(config), "serve"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    memory = PeakMemory(service.pid)

    def wait_for(path: Path) -> None:
        while not path.exists():
            if service.poll() is not None:
                raise SystemExit(f"batchbox serve ended with exit status {service.returncode}")
            time.sleep(0.1)

    wait_for(root / "inbox" / "smollm2-135m")
    started = time.monotonic()
    shutil.copy(data, root / "inbox" / "smollm2-135m" / data.name)
    result = root / "outbox" / "smollm2-135m" / data.stem / "status.json"
    wait_for(result)
    wall = time.monotonic() - started
    figures = cpu_figures(memory)  # before the stop: up to the delivery
    service.terminate()
    service.wait(60)
    log.close()
    return {"wall": wall, "peak": memory.done(), **figures, **batchbox_figures(result.parent)}


def prepare_config(config: Path, work: Path, environment: dict[str, str]) -> tuple[Path, dict]:
    """A config of the setting's own in `work` (its own inbox, outbox and state), with the
    setting's engine environment over the model's."""
    data = yaml.safe_load(config.read_text())
    data.update(inbox="inbox", outbox="outbox", state="state", settle_seconds=1)
    for model in data["models"].values():
        if "path" in model:
            model["path"] = str((config.parent / model["path"]).resolve())
    model = data["models"]["smollm2-135m"]
    model["environment"] = {**model.get("environment", {}), **environment}
    work.mkdir(parents=True, exist_ok=True)
    target = work / "config.yaml"
    target.write_text(yaml.safe_dump(data))
    return target, model


ENGINE_CORE = {"in": "0", "own": "1"}


def settings(engine_cores: str | None, kv_caches: str | None) -> list[tuple[str, dict]]:
    """Each combination of the chosen settings: a label and the environment it sets."""
    cores = engine_cores.split(",") if engine_cores else [None]
    caches = kv_caches.split(",") if kv_caches else [None]
    combinations = []
    for core in cores:
        for cache in caches:
            environment, label = {}, []
            if core is not None:
                environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = ENGINE_CORE[core]
                label.append(f"engine core {core}")
            if cache is not None:
                environment["VLLM_CPU_KVCACHE_SPACE"] = cache
                label.append(f"KV cache {cache} GiB")
            combinations.append((", ".join(label) or "the config's settings", environment))
    return combinations


def show(name: str, figures: dict) -> None:
    generate = figures.get("generate")
    completion = figures["completion_tokens"]
    total = completion + figures["prompt_tokens"]
    seconds = generate if generate else figures["wall"]
    figures["completion_per_second"] = completion / seconds
    figures["total_per_second"] = total / seconds
    print(
        f"{name:<28} wall {figures['wall']:7.1f} s   generation "
        f"{figures['completion_per_second']:7.1f} completion tok/s "
        f"{figures['total_per_second']:8.1f} total tok/s   peak {figures['peak'] / 2**20:7.0f} MiB"
        f"   CPU {figures['cpu']:6.1f} s (top process {figures['cpu_top']:5.1f} s)"
        + ("" if generate else "   (over the wall time: it reports no split)")
    )


def run_setting(label: str, setting: dict, args: argparse.Namespace, work: Path) -> dict:
    config, model = prepare_config(args.config, work, setting)
    source = model["path"]
    environment = {
        **os.environ,
        **model["environment"],
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    data = work / "throughput.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_requests(args.requests)))
    print(f"-- {label}")
    variants = {
        "a": ("(a) LLM.chat, all at once", lambda: variant_raw(model, source, data, environment)),
        "b": ("(b) vLLM run_batch", lambda: variant_run_batch(model, source, data, environment)),
        "c": ("(c) batchbox run", lambda: variant_run(config, data, environment)),
        "d": ("(d) batchbox serve", lambda: variant_serve(config, data, environment)),
    }
    results = {}
    for key in args.only:
        name, run = variants[key]
        results[key] = run()
        show(name, results[key])
    ratios = [
        ("c", "a", "completion_per_second"),
        ("d", "a", "completion_per_second"),
        ("c", "b", "wall"),
        ("d", "b", "wall"),
    ]
    for top, bottom, figure in ratios:
        if top in results and bottom in results:
            value = results[top][figure] / results[bottom][figure]
            what = "generation throughput" if figure != "wall" else "wall time"
            print(f"({top})/({bottom}) {what}: {value:.3f}")
    sys.stdout.flush()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--only", default="abcd", help="which variants to run, e.g. ac")
    parser.add_argument("--engine-core", help="in, own or in,own: where vLLM's engine core runs")
    parser.add_argument("--kv-cache", help="VLLM_CPU_KVCACHE_SPACE values in GiB, e.g. 1,2")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchbox-throughput-"))
    print(f"{args.requests} chat requests for SmolLM2 on {os.cpu_count()} cores; work in {work}")
    everything = {}
    for index, (label, setting) in enumerate(settings(args.engine_core, args.kv_cache)):
        everything[label] = run_setting(label, setting, args, work / f"setting-{index}")
    (work / "results.json").write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
