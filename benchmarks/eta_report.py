"""The figures of the ETA accuracy benchmark (benchmarks/eta_accuracy.py), from what a run
observed: as the service estimated them then, or as the current estimator would now.

A run holds, for each job, its benchmark record, the max_tokens its requests asked for, and
samples of its `.status` and `.eta` while it ran (SAMPLE_FIELDS); and the
paces the engine timed at its load. Replaying a job estimates it again from the paces and
the records of the jobs before it, as the service does at claim (benchmarks.estimator), and
refines that estimate at the same samples (benchmarks.refine), the engine's counters taken
to have last moved at the first sample that showed them.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.estimator import JobShape, estimate_run
from benchmarks.refine import refine

TARGETS = {"at claim": 10.0, "at 10%": 5.0, "at 50%": 3.0}
POINTS = {"at 10%": 0.10, "at 50%": 0.50}
MIN_EARLIER = 2  # the first jobs of a sequence, which the medians leave out
# What a sample of a running job's sidecars holds, in this order.
SAMPLE_FIELDS = [
    "written",  # when the .status was written (seconds since the epoch)
    "run_seconds",  # its progress: seconds run, and the tokens the engine processed
    "prompt_tokens",
    "completion_tokens",
    "finished_completion_tokens",  # its usage: those of the finished requests
    "requests_done",
    "in_flight",
    "expected_finish",  # the .eta read after it: when it was written + seconds_remaining
]
WRITTEN, RUN_SECONDS, PROMPT, COMPLETION, FINISHED_COMPLETION, DONE, IN_FLIGHT, EXPECTED = range(
    len(SAMPLE_FIELDS)
)


def crossing(job: dict[str, Any], share: float) -> int | None:
    """The first sample whose processed tokens reach `share` of the job's final tokens."""
    record = job["record"]
    total = record["prompt_tokens"] + record["completion_tokens"]
    for index, entry in enumerate(job["samples"]):
        if entry[PROMPT] + entry[COMPLETION] >= share * total:
            return index
    return None


def observed_at(job: dict[str, Any], index: int) -> float | None:
    """The run time the `.eta` of one sample implies: the actual run time, plus how much
    later than the actual end (the final `.status` written) it expected the job to end."""
    expected = job["samples"][index][EXPECTED]
    if expected is None:
        return None
    return job["record"]["run_seconds"] + expected - job["finished"]


def replayed_at(job: dict[str, Any], index: int, estimate: dict[str, Any]) -> float:
    """The run time the current refine makes of one sample: the seconds run, plus the time
    left it refines from the tokens processed by then."""
    samples = job["samples"]
    entry = samples[index]
    counted = index
    while (
        counted > 0
        and samples[counted - 1][PROMPT : COMPLETION + 1] == entry[PROMPT : COMPLETION + 1]
    ):
        counted -= 1
    left = refine(
        estimate,
        entry[RUN_SECONDS],
        entry[PROMPT],
        entry[COMPLETION],
        int(entry[DONE]),
        job["record"]["request_counts"]["total"],
        finished_completion=entry[FINISHED_COMPLETION],
        in_flight=int(entry[IN_FLIGHT]),
        counted=samples[counted][RUN_SECONDS],
    )
    return entry[RUN_SECONDS] + left.seconds_left


def shape_of(job: dict[str, Any]) -> JobShape:
    """The job as the service saw it at claim."""
    record = job["record"]
    return JobShape(
        model=record["model"],
        endpoint=record["endpoint"],
        requests=record["request_counts"]["total"],
        prompt_chars=record["prompt_chars"],
        max_tokens={value: count for value, count in job["max_tokens"]},
    )


def evaluate(run: dict[str, Any], replay: bool = False) -> list[dict[str, Any]]:
    """Every job's estimates: as the service made them while it ran, or (`replay`) as the
    current estimator makes them from the paces and the jobs before it."""
    if any("samples" not in job for job in run["jobs"]):
        raise SystemExit("this run was saved by an older benchmark, which kept no samples")
    rows = []
    for index, job in enumerate(run["jobs"]):
        record = job["record"]
        if replay:
            history = [
                *run.get("paces", []),
                *(earlier["record"] for earlier in run["jobs"][:index]),
            ]
            estimate = estimate_run(shape_of(job), history).as_dict()
        else:
            estimate = record["estimate"]
        row = {
            "plan": job["plan"],
            "requests": record["request_counts"]["total"],
            "basis": estimate["basis"],
            "tokens": (record["prompt_tokens"], record["completion_tokens"]),
            "predicted_tokens": (estimate["prompt_tokens"], estimate["completion_tokens"]),
            "actual": record["run_seconds"],
            "at claim": estimate["run_seconds"],
            "others": (job.get("quiet") or {}).get("others_cpu_seconds"),
            "first_eta": job.get("first_eta"),
            "finished": job.get("finished"),
        }
        for point, share in POINTS.items():
            found = crossing(job, share)
            if found is None:
                row[point] = None
            elif replay:
                row[point] = replayed_at(job, found, estimate)
            else:
                row[point] = observed_at(job, found)
        rows.append(row)
    return rows


def error_percent(estimated: float | None, actual: float) -> float | None:
    if estimated is None or actual <= 0:
        return None
    return 100.0 * abs(estimated - actual) / actual


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'job':<17}{'reqs':>5}{'prompt tokens':>16}{'answer tokens':>16}"
        f"{'at claim':>15}{'at 10%':>15}{'at 50%':>15}{'actual':>9}{'others':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for point in TARGETS:
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


def print_first(row: dict[str, Any], replay: bool) -> None:
    error = error_percent(row["at claim"], row["actual"]) or 0.0
    direction = "over" if row["at claim"] >= row["actual"] else "under"
    print(
        f"first job ({row['plan']}): estimated {row['at claim']:.1f} s, ran "
        f"{row['actual']:.1f} s, {error:.0f} % {direction} (target <= 50 %); "
        f"basis: {row['basis']}"
    )
    first = row["first_eta"]
    if first and not replay:
        waited = row["finished"] - first["written"]
        print(
            f"  its first .eta expected it done {first['seconds_remaining']} s after it was "
            f"written, model load included; it was done {waited:.1f} s after "
            f"(basis: {first['basis']})"
        )


def print_report(run: dict[str, Any], rows: list[dict[str, Any]], replay: bool = False) -> bool:
    """The table, the medians against the targets, the first job and the machine's quiet;
    whether the three targets hold."""
    plans = ", ".join(f"{row['plan']} ({row['requests']})" for row in rows)
    how = "estimated again by the current estimator" if replay else "as the service estimated"
    print(f"\nsequence {run.get('sequence', 'mixed')!r} of {run.get('model')}, {how}: {plans}\n")
    print_table(rows)
    print(
        "(tokens: actual/predicted at claim; each estimate of the run time with its error; "
        "others: CPU seconds other processes used while the job waited and ran)"
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
        print(f"  {point:<8} {median:5.1f} %   target <= {target:.0f} %   {verdict}")
    if rows:
        print_first(rows[0], replay)
    quiet = run.get("quiet")
    if quiet:
        share = quiet["others_cpu_seconds"] / max(quiet["wall_seconds"] * quiet["cores"], 1e-9)
        print(
            f"machine: other processes used {quiet['others_cpu_seconds']:.0f} CPU s during the "
            f"{quiet['wall_seconds']:.0f} s run ({100 * share:.0f} % of {quiet['cores']} "
            f"cores); the service and its engine used {quiet['own_cpu_seconds']:.0f} CPU s"
        )
    return holds
