"""Ray against the local engine: one chat file through `batchbox run` with the model on the
local backend, then on a local Ray with one replica, on this machine, in one run.

    python benchmarks/ray_local.py [--requests 1000] [--config config.yaml]

Both runs get the same requests (each with `ignore_eos` and its own `max_tokens`, so both
generate exactly the same tokens) and the same engine settings; the second only adds
`backend: ray` with one replica of all the cores (or `--num-gpus 1` on a GPU machine). For each it
prints the wall time including model load (and Ray's start), the load and generation
seconds from the benchmark record, generation throughput, and the peak resident memory of
the process tree, and the CPU seconds other processes used meanwhile (a quiet machine
shows few); then the Ray run's generation throughput and wall time against local.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import (  # noqa: E402 - the repository's root comes first
    BATCHBOX,
    batchbox_figures,
    make_requests,
    run_measured,
)

MODEL = "smollm2-135m"


def write_config(source: Path, work: Path, ray: dict | None) -> Path:
    """The config with its folders in `work` and the model on Ray when `ray` is given."""
    data = yaml.safe_load(source.read_text())
    data.update(inbox="inbox", outbox="outbox", state="state", settle_seconds=1)
    for model in data["models"].values():
        if "path" in model:
            model["path"] = str((source.parent / model["path"]).resolve())
    if ray is not None:
        data["models"][MODEL].update(backend="ray", ray=ray)
    work.mkdir(parents=True)
    target = work / "config.yaml"
    target.write_text(yaml.safe_dump(data))
    return target


def busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine and this process's waited-for children have used."""
    times = psutil.cpu_times()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(times) - times.idle - getattr(times, "iowait", 0.0), (
        children.ru_utime + children.ru_stime
    )


def measure(config: Path, data: Path, environment: dict[str, str]) -> dict:
    out = config.parent / "outbox"
    machine, own = busy_seconds()
    with open(config.parent / "run.log", "w") as log:
        measured = run_measured(
            [*BATCHBOX, "-c", str(config), "run", str(data), "-o", str(out)],
            environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    machine_after, own_after = busy_seconds()
    figures = {**measured, **batchbox_figures(out / data.stem)}
    # What else ran meanwhile: on a busy machine the two runs are not comparable.
    figures["others_cpu"] = max((machine_after - machine) - (own_after - own), 0.0)
    record = json.loads((out / data.stem / "benchmark.json").read_text())
    figures["hardware"] = record["hardware"]
    failed = record["request_counts"].get("failed", 0)
    if failed:
        raise SystemExit(f"{failed} requests failed; see {out / data.stem / 'errors.jsonl'}")
    figures["completion_per_second"] = figures["completion_tokens"] / figures["generate"]
    return figures


def show(name: str, figures: dict) -> None:
    print(
        f"{name:<22} wall {figures['wall']:7.1f} s (load {figures['load']:5.1f} s, "
        f"generation {figures['generate']:7.1f} s)   "
        f"{figures['completion_per_second']:7.1f} completion tok/s   "
        f"peak {figures['peak'] / 2**20:6.0f} MiB   on {figures['hardware']}   "
        f"other processes' CPU {figures['others_cpu']:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    # Ray sets a replica's OMP_NUM_THREADS to its num_cpus: all the cores, as the local
    # engine uses them.
    parser.add_argument(
        "--num-cpus", type=float, default=float(os.cpu_count() or 1), help="the replica's CPUs"
    )
    parser.add_argument("--num-gpus", type=float, default=0.0, help="the replica's GPUs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchbox-ray-local-"))
    ray = {"address": "local", "concurrency": 1, "num_cpus": args.num_cpus}
    if args.num_gpus:
        ray["num_gpus"] = args.num_gpus
    local_config = write_config(args.config, work / "local", None)
    ray_config = write_config(args.config, work / "ray", ray)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    data = work / "requests.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_requests(args.requests)))
    print(f"{args.requests} chat requests for {MODEL} on {os.cpu_count()} cores; work in {work}")

    local = measure(local_config, data, environment)
    show("local backend", local)
    clustered = measure(ray_config, data, environment)
    show("Ray, one replica", clustered)
    if clustered["completion_tokens"] != local["completion_tokens"]:
        raise SystemExit("the two runs generated different numbers of tokens")
    throughput = clustered["completion_per_second"] / local["completion_per_second"]
    wall = local["wall"] / clustered["wall"]
    print(f"Ray/local generation throughput: {throughput:.3f}")
    print(f"local/Ray wall time (higher is better for Ray): {wall:.3f}")
    results = {"local": local, "ray": clustered, "throughput_ratio": throughput, "wall": wall}
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
