"""How close the `.eta` estimates come to the real run time, on the real engine.

Runs a sequence of jobs through the same path as `batchbox run`, one after the other on one
engine, in a temporary state and outbox, so the repository's history is never touched. The
engine is loaded first, as the service loads it for a model new here: it times its pace
(runner.pace), and that pace record starts the history. Each job is estimated before it
runs from the history before it, as the service would at claim; while it runs, the
estimate of its total run time is taken again (the refined time left plus the time
elapsed) at the first progress report where the engine has processed 10 % and 50 % of the
job's tokens.

Two sequences: `mixed` (the default: questions, instructions, passages to summarise and
one-word labels; max_tokens from 4 to 256; 20 to 2,000 requests) and `new-user` (five chat
jobs of 300 to 1,200 requests with max_tokens 32, 24, 64, 16, 48, the third larger than
any before it).

Prints the sequence; per job the three estimates and the actual run time with their
errors, and the CPU seconds other processes used while it ran; the median absolute errors
over the jobs after the first two against the targets (at claim <= 10 %, at 10 % of the
tokens <= 5 %, at 50 % <= 3 %); the first job's error (target <= 50 %, from the pace alone);
and how quiet the machine was over the whole run (benchmarks.quiet).

    python benchmarks/eta_accuracy.py [--sequence mixed|new-user] [--model smollm2-135m]
        [--config config.yaml] [--save run.json] [--replay run.json] [--jobs 3] [--scale 0.25]

`--save` keeps what the run observed (the pace, records, progress traces, CPU seconds),
after every job; `--replay` evaluates the current estimator against such a file without
running anything, which is how the estimator is tuned without spending half an hour per
try. Exit status 0 when the three targets hold, 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from benchmarks.estimator import JobShape, estimate_run
from benchmarks.quiet import Quiet
from benchmarks.record import append_pace, knows_pace, pace_record
from benchmarks.refine import refine
from runner.run import Progress
from watcher.commands import new_spool_job
from watcher.config import Config, load_config
from watcher.engines import EnginePool
from watcher.execute import (
    INPUT,
    RunHooks,
    estimate_job,
    execute_job,
    job_shape,
    validate_job,
)
from watcher.jobs import Job
from watcher.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"before": 10.0, "at 10%": 5.0, "at 50%": 3.0}
POINTS = {"at 10%": 0.10, "at 50%": 0.50}
MIN_EARLIER = 2  # the first jobs of a sequence, which the medians leave out


@dataclass(frozen=True)
class Plan:
    """One job of the sequence: how many requests, of what kind, asking for how much."""

    name: str
    requests: int
    kind: str  # "question", "instruction", "summary", "label" or "mixed"
    max_tokens: tuple[int, ...]  # drawn from for each request


# Sizes chosen so that the whole sequence takes about a quarter of an hour on two idle cores
# (much longer when other work shares them).
PLANS = (
    Plan("questions-20", 20, "question", (64,)),
    Plan("summaries-40", 40, "summary", (128,)),
    Plan("instructions-48", 48, "instruction", (192,)),
    Plan("mixed-100", 100, "mixed", (16, 64, 128)),
    Plan("labels-2000", 2000, "label", (4,)),
    Plan("questions-200", 200, "question", (48,)),
    Plan("summaries-60", 60, "summary", (96, 192)),
    Plan("instructions-100", 100, "instruction", (32, 128)),
    Plan("mixed-300", 300, "mixed", (16, 32)),
    Plan("questions-30", 30, "question", (256,)),
)
# A new user's first five chat jobs, from an empty history: one max_tokens each, the third
# larger than any before it.
NEW_USER = (
    Plan("new-32", 300, "mixed", (32,)),
    Plan("new-24", 600, "mixed", (24,)),
    Plan("new-64", 800, "mixed", (64,)),
    Plan("new-16", 1200, "mixed", (16,)),
    Plan("new-48", 500, "mixed", (48,)),
)
SEQUENCES = {"mixed": PLANS, "new-user": NEW_USER}

QUESTIONS = (
    "What is the capital of Australia?",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What is photosynthesis?",
    "Who painted the Mona Lisa?",
    "How far is the Moon from the Earth?",
    "What causes thunder?",
    "Why is the ocean salty?",
    "What is the difference between a virus and a bacterium?",
    "How do airplanes fly?",
    "What is the boiling point of water at the top of Mount Everest?",
    "Why do leaves change colour in autumn?",
    "What is inflation, in simple terms?",
    "How many bones are in the human body?",
    "What does DNA stand for?",
    "Why do we have leap years?",
    "What is the largest planet in the solar system?",
    "How does a compass work?",
    "What is the speed of light?",
    "Why do onions make people cry?",
    "What language is spoken in Brazil?",
    "How do bees make honey?",
    "What is a black hole?",
    "Who invented the telephone?",
    "What is the tallest mountain in Africa?",
    "Why is the sky dark at night?",
    "How does a microwave oven heat food?",
    "What are the three states of matter?",
    "What is the main ingredient of guacamole?",
    "How long does light from the Sun take to reach Earth?",
)
INSTRUCTIONS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how to change a flat tyre, step by step.",
    "Write a haiku about the sea.",
    "List ten ideas for a rainy afternoon with children.",
    "Describe the water cycle for a school textbook.",
    "Write a cover letter for a job as a librarian.",
    "Give me a recipe for a simple vegetable soup.",
    "Explain the rules of chess to a beginner.",
    "Write a limerick about a forgetful wizard.",
    "Draft a friendly reminder email about an overdue invoice.",
    "Compare trains and planes for travelling across Europe.",
    "Write a product description for a reusable water bottle.",
    "Suggest a weekly exercise plan for someone starting to run.",
    "Explain what a database index is and why it helps.",
    "Write a dialogue between a customer and a baker.",
)
OPINIONS = (
    "I loved",
    "I was disappointed by",
    "Nothing special about",
    "Absolutely brilliant:",
    "Would not recommend",
    "Pleasantly surprised by",
    "Waste of money:",
    "Five stars for",
)
SUBJECTS = (
    "the battery life of this phone.",
    "the service at this restaurant, the waiter forgot our order twice.",
    "this novel; the ending made me cry.",
    "the hotel room, which was clean and quiet.",
    "these headphones after only a week of use.",
    "the delivery, which arrived two days early.",
)
SENTENCES = (
    "The harbour town was founded by fishermen who followed the herring along the coast.",
    "For two centuries its fortunes rose and fell with the size of the catch.",
    "In the eighteenth century a merchant family built warehouses along the quay.",
    "Their ships carried salted fish south and came back with wine, cloth and spices.",
    "A stone lighthouse was raised on the northern headland after a winter of wrecks.",
    "When the railway arrived, fresh fish could reach the capital in a single night.",
    "The population doubled within a generation, and new streets climbed the hill.",
    "A school, a hospital and a covered market followed, paid for by a tax on landings.",
    "Then the herring vanished, and no one could agree on why.",
    "Some blamed overfishing, others the warming water or the new steam trawlers.",
    "The warehouses emptied, the young left for the cities, and the market closed.",
    "For thirty years the town seemed to be sinking into the sea it had lived from.",
    "Its revival began with a festival started by a retired teacher and a few friends.",
    "Visitors came for the music and stayed for the cliffs, the light and the food.",
    "Artists rented the old warehouses as studios and opened galleries on the quay.",
    "Today the harbour holds more sailing boats than fishing boats.",
    "The lighthouse is a museum, and the covered market has reopened on Saturdays.",
    "Residents still argue about whether the town has been saved or merely changed.",
    "Housing has become expensive, and many cottages stand empty in winter.",
    "Yet the festival still ends, every summer, with a procession of boats at dusk.",
)


def request_text(kind: str, chooser: random.Random) -> str:
    if kind == "mixed":
        kind = chooser.choice(("question", "instruction", "summary"))
    if kind == "question":
        return chooser.choice(QUESTIONS)
    if kind == "instruction":
        return chooser.choice(INSTRUCTIONS)
    if kind == "label":
        review = f"{chooser.choice(OPINIONS)} {chooser.choice(SUBJECTS)}"
        return f"Is this review positive or negative? Answer with one word.\n\n{review}"
    count = chooser.randint(4, len(SENTENCES))
    start = chooser.randrange(len(SENTENCES))
    passage = " ".join(SENTENCES[(start + index) % len(SENTENCES)] for index in range(count))
    return f"Summarise the following passage in a few sentences.\n\n{passage}"


def job_lines(plan: Plan, seed: int) -> bytes:
    chooser = random.Random(seed)
    lines = []
    for index in range(plan.requests):
        body = {
            "messages": [{"role": "user", "content": request_text(plan.kind, chooser)}],
            "max_tokens": chooser.choice(plan.max_tokens),
            "temperature": chooser.choice((0.7, 0.8, 1.0)),
        }
        lines.append(
            {"custom_id": f"{plan.name}-{index}", "method": "POST", "url": "/v1/chat/completions"}
            | {"body": body}
        )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


# -- running ----------------------------------------------------------------------------


def site_config(config_path: Path, folder: Path) -> Config:
    """The given config with its folders in `folder` and its model paths absolute."""
    data = yaml.safe_load(config_path.read_text())
    base = config_path.resolve().parent
    data.update(inbox="inbox", outbox="outbox", state="state")
    models_dir = data.get("models_dir")
    if models_dir:
        data["models_dir"] = str((base / models_dir).resolve())
    for model in data["models"].values():
        if model.get("path"):
            model["path"] = str((base / model["path"]).resolve())
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def run_job(config: Config, pool: EnginePool, plan: Plan, model: str, seed: int) -> dict:
    """Run one planned job; what it looked like, its record and its progress trace."""
    job: Job = new_spool_job(config, plan.name)
    (job.out / INPUT).write_bytes(job_lines(plan, seed))
    validate_job(job, config, model)
    shape = job_shape(job)
    trace: list[list[float]] = []

    def observe(job: Job, progress: Progress) -> None:
        trace.append(
            [
                round(time.monotonic() - progress.started, 3),
                progress.engine_prompt_tokens,
                progress.engine_completion_tokens,
                job.completed + job.failed,
                progress.tally.completion_tokens,  # of the requests finished
                progress.in_flight,
            ]
        )

    job.estimate = estimate_job(job, config.folder("state")).as_dict()  # as the service does
    load_before = os.getloadavg()[0]
    quiet = Quiet().start()
    target = execute_job(job, config, pool, config.folder("outbox"), RunHooks(observe))
    quiet.stop()
    if target is None:
        raise SystemExit(f"{plan.name} stopped before it finished")
    record = json.loads((target / "benchmark.json").read_bytes())
    shutil.rmtree(target)
    return {
        "plan": plan.name,
        "shape": {
            "model": shape.model,
            "endpoint": shape.endpoint,
            "requests": shape.requests,
            "prompt_chars": shape.prompt_chars,
            "max_tokens": [[value, count] for value, count in shape.max_tokens.items()],
        },
        "record": record,
        "trace": trace,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "quiet": quiet.as_dict(),
    }


def measure_load(config: Config, pool: EnginePool, model: str) -> dict | None:
    """Load the engine, timing its pace as the service does for a model new here; the pace
    record it leaves in the history, if any."""
    state = config.folder("state")
    state.mkdir(parents=True, exist_ok=True)
    pool.wants_pace = lambda spec: not knows_pace(state, spec.alias)
    started = time.monotonic()
    client, _ = pool.client_for(config.model_spec(model))
    print(f"loaded {model} in {time.monotonic() - started:.1f} s", flush=True)
    if not client.info.pace:
        return None
    info = client.info
    record = pace_record(
        model=model,
        source=info.source,
        engine={"hardware": info.hardware, "engine_version": info.engine_version}
        | {"settings": {**info.settings, "max_in_flight": config.max_in_flight}},
        pace=info.pace,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    )
    append_pace(state, record)
    steps = len(info.pace["steps"])
    print(f"  timed its pace on {steps} engine steps in {info.pace['seconds']:.1f} s", flush=True)
    return record


def run_sequence(arguments: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="eta-accuracy-"))
    try:
        config = site_config(Path(arguments.config), folder)
        if arguments.model not in config.models:
            raise SystemExit(f"model {arguments.model!r} is not in {arguments.config}")
        pool = EnginePool()
        quiet = Quiet().start()
        try:
            pace = measure_load(config, pool, arguments.model)
            name = arguments.sequence + (f" at {arguments.scale:g}" if arguments.scale != 1 else "")
            run = {"sequence": name, "pace": pace, "jobs": []}
            observed = run["jobs"]
            plans = [
                replace(plan, requests=max(1, round(plan.requests * arguments.scale)))
                for plan in SEQUENCES[arguments.sequence][: arguments.jobs]
            ]
            for index, plan in enumerate(plans):
                observed.append(run_job(config, pool, plan, arguments.model, seed=index))
                run["quiet"] = Quiet.stop(quiet).as_dict()
                if arguments.save:  # after every job, so that a stopped run keeps what it saw
                    Path(arguments.save).write_text(json.dumps(run))
                record = observed[-1]["record"]
                print(
                    f"  ran {plan.name}: {record['run_seconds']:.1f} s "
                    f"(estimated {record['estimate']['run_seconds']:.1f} s); "
                    f"others used {observed[-1]['quiet']['others_cpu_seconds']} CPU s",
                    flush=True,
                )
        finally:
            pool.close()
        return run
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- evaluating -------------------------------------------------------------------------


def shape_of(observation: dict) -> JobShape:
    shape = observation["shape"]
    return JobShape(
        model=shape["model"],
        endpoint=shape["endpoint"],
        requests=shape["requests"],
        prompt_chars=shape["prompt_chars"],
        max_tokens={value: count for value, count in shape["max_tokens"]},
    )


def refine_at(estimate: dict, entry: list[float], total: int, counted: float):
    """The refined time left at one point of a progress trace, the engine's counters having
    last moved at `counted`."""
    elapsed, prompt, completion, done = entry[:4]
    extra = {}
    if len(entry) >= 6:  # traces saved before these two were added lack them
        extra = {"finished_completion": entry[4], "in_flight": int(entry[5])}
    return refine(
        estimate, elapsed, prompt, completion, int(done), total, counted=counted, **extra
    )


def estimates_at_points(estimate: dict, trace: list[list[float]], total: int) -> dict:
    """The estimated total run time at the first report past each share of the tokens."""
    found: dict[str, float | None] = dict.fromkeys(POINTS)
    final_tokens = trace[-1][1] + trace[-1][2] if trace else 0
    counters, counted = None, 0.0
    for entry in trace:
        if (entry[1], entry[2]) != counters:
            counters, counted = (entry[1], entry[2]), entry[0]
        for point, share in POINTS.items():
            if found[point] is None and entry[1] + entry[2] >= share * final_tokens:
                left = refine_at(estimate, entry, total, counted)
                found[point] = entry[0] + left.seconds_left
    return found


def evaluate(run: dict) -> list[dict]:
    """Every job's estimates by the current estimator, from the jobs before it (and the
    engine's pace timed at its load, when the run has it)."""
    rows = []
    observed = run["jobs"]
    pace = [run["pace"]] if run.get("pace") else []
    for index, observation in enumerate(observed):
        record = observation["record"]
        history = pace + [earlier["record"] for earlier in observed[:index]]
        estimate = estimate_run(shape_of(observation), history)
        actual = record["run_seconds"]
        row = {
            "plan": observation["plan"],
            "requests": observation["shape"]["requests"],
            "earlier": index,
            "basis": estimate.basis,
            "tokens": (record["prompt_tokens"], record["completion_tokens"]),
            "predicted_tokens": (estimate.prompt_tokens, estimate.completion_tokens),
            "actual": actual,
            "before": estimate.run_seconds,
            "others": (observation.get("quiet") or {}).get("others_cpu_seconds"),
        }
        total = observation["shape"]["requests"]
        row.update(estimates_at_points(estimate.as_dict(), observation["trace"], total))
        rows.append(row)
    return rows


def error_percent(estimated: float | None, actual: float) -> float | None:
    if estimated is None or actual <= 0:
        return None
    return 100.0 * abs(estimated - actual) / actual


def print_report(run: dict, rows: list[dict]) -> bool:
    plans = ", ".join(f"{row['plan']} ({row['requests']})" for row in rows)
    print(f"sequence {run.get('sequence', 'mixed')!r}: {plans}\n")
    header = (
        f"{'job':<17}{'reqs':>5}{'prompt tokens':>16}{'answer tokens':>16}"
        f"{'at claim':>15}{'at 10%':>15}{'at 50%':>15}{'actual':>9}{'others':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for point in ("before", *POINTS):
            error = error_percent(row[point], row["actual"])
            cells.append(
                f"{row[point]:7.1f} s {error:4.0f}%" if error is not None else f"{'-':>14}"
            )
        prompt, completion = row["tokens"]
        predicted_prompt, predicted_completion = row["predicted_tokens"]
        others = "" if row["others"] is None else f"{row['others']:.0f} s"
        print(
            f"{row['plan']:<17}{row['requests']:>5}"
            f"{prompt:>7}/{predicted_prompt:<8.0f}{completion:>7}/{predicted_completion:<8.0f}"
            + "".join(f" {cell:>14}" for cell in cells)
            + f"{row['actual']:7.1f} s{others:>9}"
        )
    print(
        "(tokens: actual/predicted at claim; each estimate of the total run time with its "
        "error; others: CPU seconds other processes used while the job ran)"
    )
    counted = rows[MIN_EARLIER:]
    holds = True
    print(f"\nmedian absolute error over the {len(counted)} jobs after the first {MIN_EARLIER}:")
    for point, target in TARGETS.items():
        errors = [error_percent(row[point], row["actual"]) for row in counted]
        errors = [error for error in errors if error is not None]
        median = statistics.median(errors) if errors else float("nan")
        met = bool(errors) and median <= target
        holds = holds and met
        verdict = "met" if met else "NOT met"
        label = "at claim" if point == "before" else point
        print(f"  {label:<8} {median:5.1f} %   target <= {target:.0f} %   {verdict}")
    if rows:
        first = rows[0]
        error = error_percent(first["before"], first["actual"])
        direction = "over" if first["before"] >= first["actual"] else "under"
        print(
            f"first job ({first['plan']}): estimated {first['before']:.1f} s, ran "
            f"{first['actual']:.1f} s, {error:.0f} % {direction} (target <= 50 %); "
            f"basis: {first['basis']}"
        )
    quiet = run.get("quiet")
    if quiet:
        share = quiet["others_cpu_seconds"] / max(quiet["wall_seconds"] * quiet["cores"], 1e-9)
        print(
            f"machine: other processes used {quiet['others_cpu_seconds']:.0f} CPU s during the "
            f"{quiet['wall_seconds']:.0f} s run ({100 * share:.0f} % of {quiet['cores']} "
            f"cores); this run used {quiet['own_cpu_seconds']:.0f} CPU s"
        )
    return holds


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a configured chat model")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--sequence", choices=sorted(SEQUENCES), default="mixed")
    parser.add_argument("--jobs", type=int, default=len(PLANS), help="run the first N jobs")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="run each job with this share of its requests (a quick look on a busy machine)",
    )
    parser.add_argument("--save", help="write what the run observed to this JSON file")
    parser.add_argument("--replay", help="evaluate a saved run instead of running jobs")
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the table
    configure_logging(sys.stderr)
    if arguments.replay:
        run = json.loads(Path(arguments.replay).read_text())
    else:
        run = run_sequence(arguments)
    return 0 if print_report(run, evaluate(run)) else 1


if __name__ == "__main__":
    sys.exit(main())
