"""What each `batchbox` command does, given its arguments and the loaded config."""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

import structlog

from benchmarks.record import read_history
from watcher.cli import EXIT_FAILED, EXIT_OK, CommandFailed, UsageError
from watcher.config import Config
from watcher.engines import EnginePool
from watcher.execute import (
    INPUT,
    JobError,
    RunHooks,
    check_job,
    estimate_job,
    execute_job,
    finish_job,
    validate_job,
)
from watcher.forecast import forecast_job
from watcher.jobs import Job, JobStatus, fail_job, load_job, new_job_id, now, write_status
from watcher.logs import configure_logging
from watcher.tickets import TicketError, find_ticket, load_ticket

log = structlog.get_logger()


def _known_model(config: Config, alias: str | None, required: bool = False) -> None:
    """A model named on the command line must be a configured alias (bad arguments: 2)."""
    if (alias is not None or required) and alias not in config.models:
        raise UsageError(f"model {alias!r} is not configured ({', '.join(config.models)})")


def _input_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"{name} is not a file")
    return path


def new_spool_job(
    config: Config, stem: str, subdir: str = "", sidecar_dir: Path | None = None
) -> Job:
    created = now()
    job_id = new_job_id(created)
    work = config.folder("state") / "jobs" / job_id
    (work / "out").mkdir(parents=True)
    return Job(
        id=job_id,
        stem=stem,
        subdir=subdir,
        work=work,
        sidecar_dir=sidecar_dir,
        created_at=created,
    )


def _prepare_run_job(config: Config, path: Path, model: str | None) -> tuple[Job, str | None]:
    """A spool job holding a copy of the file (and its ticket): `run` leaves the file be."""
    job = new_spool_job(config, path.stem)
    job.origin = str(path.resolve())
    shutil.copyfile(path, job.out / INPUT)
    ticket_model = model
    ticket_path = find_ticket(path.parent, path.stem)
    if ticket_path is not None:
        shutil.copyfile(ticket_path, job.out / f"{path.stem}{ticket_path.suffix}")
        job.has_ticket = True
        try:
            ticket = load_ticket(ticket_path)
        except TicketError as error:
            fail_job(job, "invalid_ticket", str(error))
            return job, None
        ticket_model = model or ticket.model
        job.defaults, job.priority, job.metadata = ticket.defaults, ticket.priority, ticket.metadata
    write_status(job)
    return job, ticket_model


class _ProgressBar:
    """A tqdm bar on a terminal; a structured log line now and then otherwise."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", file=sys.stderr) if sys.stderr.isatty() else None
        self.last_logged = 0.0

    def update(self, job: Job, progress) -> None:
        done = job.completed + job.failed
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(tok_s=f"{job.tokens_per_second or 0:.0f}", refresh=False)
            self.bar.refresh()
            return
        elapsed = now().timestamp()
        if elapsed - self.last_logged >= 10:
            self.last_logged = elapsed
            log.info(
                "progress",
                job=job.id,
                done=done,
                total=job.total,
                tokens_per_second=round(job.tokens_per_second or 0, 1),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _unfinished_run(config: Config, path: Path) -> Job | None:
    """A `run` of this very file that was stopped part way, to resume rather than redo."""
    for job in spool_jobs(config):
        if (
            job.sidecar_dir is None
            and job.origin == str(path.resolve())
            and job.status is JobStatus.IN_PROGRESS
            and filecmp.cmp(path, job.out / INPUT, shallow=False)
        ):
            return job
    return None


def run_file(args: argparse.Namespace, config: Config) -> int:
    configure_logging(sys.stderr)
    path = _input_file(args.file)
    _known_model(config, args.model)
    outbox = Path(args.output).resolve() if args.output else config.folder("outbox")
    outbox.mkdir(parents=True, exist_ok=True)
    job = _unfinished_run(config, path)
    if job is not None:
        log.info("job_resumed", job=job.id, done=job.completed + job.failed, total=job.total)
    else:
        job = _validated_run_job(config, path, args.model, outbox)
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    bar = _ProgressBar(job.total)
    hooks = RunHooks(on_progress=bar.update, stop_requested=stop.is_set)
    pool = EnginePool()
    try:
        target = execute_job(job, config, pool, outbox, hooks)
    finally:
        bar.close()
        pool.close()
    if target is None:
        raise CommandFailed(
            f"stopped with {job.completed + job.failed} of {job.total} requests done; "
            "run the same file again to resume"
        )
    log.info("job_finished", **job.summary())
    print(target)
    if job.status is not JobStatus.COMPLETED:
        raise CommandFailed(f"the job {job.status.value}: {job.errors[0]['message']}")
    return EXIT_OK


def _validated_run_job(config: Config, path: Path, model: str | None, outbox: Path) -> Job:
    job, ticket_model = _prepare_run_job(config, path, model)
    if not job.errors:
        check_job(job, config, ticket_model)
    if job.errors:
        target = finish_job(job, config, outbox, JobStatus.FAILED)
        raise CommandFailed(f"{job.errors[0]['message']} (details in {target})")
    job.estimate = estimate_job(job, config.folder("state")).as_dict()
    return job


def check(args: argparse.Namespace, config: Config) -> int:
    from watcher.machine import check_machine

    problems = check_machine(config, print)
    return EXIT_FAILED if problems else EXIT_OK


def serve(args: argparse.Namespace, config: Config) -> int:
    from watcher.service import Service, StartError

    configure_logging(sys.stdout)
    service = Service(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    try:
        service.serve_forever()
    except StartError as error:
        raise CommandFailed(str(error)) from None
    return EXIT_OK


def spool_jobs(config: Config) -> list[Job]:
    """The jobs the service holds now, read from their records in the spool."""
    jobs = []
    folder = config.folder("state") / "jobs"
    for work in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            jobs.append(load_job(work))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a job being claimed or delivered right now
    return jobs


def status(args: argparse.Namespace, config: Config) -> int:
    jobs = spool_jobs(config)
    running = [job.status_document() for job in jobs if job.status is JobStatus.IN_PROGRESS]
    queued = sorted(
        (job for job in jobs if job.status is JobStatus.QUEUED),
        key=lambda job: (-job.priority, job.sequence),
    )
    recent = list(read_history(config.folder("state")))[-10:]
    report = {
        "running": running,
        "queued": [job.status_document() for job in queued],
        "recent": [
            {key: record.get(key) for key in ("job_id", "model", "status", "finished_at")}
            | {"requests": record.get("request_counts"), "run_seconds": record.get("run_seconds")}
            for record in reversed(recent)
        ],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print_status(report)
    return EXIT_OK


def print_status(report: dict) -> None:
    if not report["running"]:
        print("running: nothing")
    for job in report["running"]:
        counts = job["request_counts"]
        done = counts["completed"] + counts["failed"]
        print(
            f"running: {job['input']} on {job['model']}: {done}/{counts['total']} "
            f"requests, ETA {job['eta'] or 'unknown'}"
        )
    print(f"queued: {len(report['queued'])}")
    for position, job in enumerate(report["queued"], start=1):
        print(
            f"  {position}. {job['input']} on {job['model']}: "
            f"{job['request_counts']['total']} requests, ETA {job['eta'] or 'unknown'}"
        )
    print("recent:")
    for record in report["recent"]:
        counts = record["requests"] or {}
        print(
            f"  {record['finished_at']}  {record['status']:<9} {record['model']}: "
            f"{counts.get('completed', 0)} ok, {counts.get('failed', 0)} failed, "
            f"{record['run_seconds']} s  ({record['job_id']})"
        )


def estimate(args: argparse.Namespace, config: Config) -> int:
    path = _input_file(args.file)
    _known_model(config, args.model)
    job = Job(id="estimate", stem=path.stem, subdir="", work=path.parent, sidecar_dir=None)
    inbox = config.folder("inbox")
    if path.resolve().parent.parent == inbox:
        job.subdir = path.resolve().parent.name
    ticket_model = args.model
    ticket_path = find_ticket(path.parent, path.stem)
    if ticket_path is not None and ticket_model is None:
        try:
            ticket = load_ticket(ticket_path)
        except TicketError as error:
            raise CommandFailed(str(error)) from None
        ticket_model, job.defaults = ticket.model, ticket.defaults
    try:
        validate_job(job, config, ticket_model, input_path=path)
    except JobError as error:
        raise CommandFailed(error.message) from None
    job.estimate = estimate_job(job, config.folder("state")).as_dict()
    job.sequence = 1 << 62  # behind every job already queued at its priority
    history = read_history(config.folder("state"))
    forecast = forecast_job(job, spool_jobs(config), history, config.idle_unload_seconds)
    print(f"{path.name}: {job.total} requests on {job.model} ({job.endpoint})")
    print(f"run time: about {format_seconds(forecast.run_seconds)}")
    if forecast.plan.ahead:
        waiting = forecast.seconds - forecast.run_seconds - forecast.load_seconds
        running = "" if forecast.running_left is None else ", the running one included"
        ahead = forecast.plan.ahead
        print(f"queue: {ahead} job(s) ahead{running}, about {format_seconds(waiting)}")
    if forecast.plan.load:
        print(f"model load: about {format_seconds(forecast.load_seconds)}")
    finish = now() + timedelta(seconds=round(forecast.seconds))
    print(f"finished by: {finish.isoformat()} if dropped now ({round(forecast.seconds)} s)")
    print(f"basis: {forecast.basis}")
    return EXIT_OK


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def bench(args: argparse.Namespace, config: Config) -> int:
    """Run a short calibration batch on a model and record it in the benchmark history, so
    that the first real job of the model is estimated from a measurement, not a guess."""
    import tempfile

    configure_logging(sys.stderr)
    _known_model(config, args.model, required=True)
    state = config.folder("state")
    # A throwaway outbox inside state/: the record goes to the history, the folder away.
    outbox = state / "bench"
    outbox.mkdir(parents=True, exist_ok=True)
    endpoint = config.models[args.model].endpoints[0]
    with tempfile.TemporaryDirectory(prefix="batchbox-bench-") as folder:
        path = Path(folder) / f"calibration-{args.model}.jsonl"
        path.write_bytes(calibration_lines(endpoint))
        job = _validated_run_job(config, path, args.model, outbox)
    job.metadata = {**job.metadata, "calibration": True}
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    pool = EnginePool()
    try:
        target = execute_job(job, config, pool, outbox, RunHooks(stop_requested=stop.is_set))
    finally:
        pool.close()
    if target is None:
        # Nothing to resume: a calibration is only worth it whole.
        shutil.rmtree(job.work, ignore_errors=True)
        raise CommandFailed("the calibration was stopped before it finished; nothing recorded")
    record = json.loads((target / "benchmark.json").read_bytes())
    shutil.rmtree(target, ignore_errors=True)
    if job.status is not JobStatus.COMPLETED:
        raise CommandFailed(f"the calibration {job.status.value}: {job.errors[0]['message']}")
    print(bench_summary(record))
    return EXIT_OK


def bench_summary(record: dict) -> str:
    from runner.types import EMBEDDINGS

    counts, rates = record["request_counts"], record["throughput"]
    tokens = f"{record['prompt_tokens']} prompt"
    if record["endpoint"] != EMBEDDINGS:
        tokens += f" and {record['completion_tokens']} generated"
    failed = f" ({counts['failed']} failed)" if counts.get("failed") else ""
    speed = f"{rates['total_tokens_per_second']:.0f} tokens/s"
    if record["endpoint"] != EMBEDDINGS:
        speed += f", {rates['completion_tokens_per_second']:.0f} generated tokens/s"
    return (
        f"Calibrated {record['model']} on {record['hardware']}: {counts['completed']} "
        f"{record['endpoint']} requests{failed} with {tokens} tokens ran in "
        f"{record['run_seconds']:.1f} s ({speed}, {rates['requests_per_second']:.2f} "
        f"requests/s); loading the model took {record['load_seconds']:.1f} s. The record is "
        f"in the benchmark history, so the next estimate for {record['model']} rests on it."
    )


# Material for calibration prompts: questions, instructions, and a passage to summarise,
# so that prompt and answer lengths spread the way real batches do.
_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Name three uses of copper.",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Who wrote Pride and Prejudice, and when?",
)
_INSTRUCTIONS = (
    "Write a short poem about autumn leaves.",
    "List five tips for a good night's sleep.",
    "Explain recursion to a ten-year-old.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a polite email declining a meeting invitation.",
    "Give step by step directions for brewing tea.",
)
_PASSAGE = (
    "The river town grew up around a ford where traders crossed with salt and wool. Over "
    "the centuries a stone bridge replaced the ford, mills rose along the banks, and the "
    "market square filled every Thursday with farmers from the hills. When the railway "
    "arrived the mills turned to cloth, the population tripled, and rows of brick houses "
    "climbed the valley sides. A century later the mills closed one by one; some became "
    "flats and studios, and the town learned to live from visitors who came for the old "
    "bridge, the walks along the water and the Thursday market, which never stopped. "
)
_MAX_TOKENS = (8, 16, 32, 64, 128, 256)


def calibration_lines(endpoint: str) -> bytes:
    """~48 chat or completion requests, or 64 embedding inputs, of spread-out shapes."""
    from runner.types import COMPLETIONS, EMBEDDINGS

    lines = []
    if endpoint == EMBEDDINGS:
        for index in range(64):
            words = _PASSAGE.split()
            text = " ".join(words[: 4 + (index * 37) % 140])  # 4 to 143 words
            lines.append({"custom_id": f"cal{index}", "url": endpoint, "body": {"input": text}})
    else:
        for index in range(48):
            kind = index % 3
            if kind == 0:
                text = _QUESTIONS[index % len(_QUESTIONS)]
            elif kind == 1:
                text = _INSTRUCTIONS[index % len(_INSTRUCTIONS)]
            else:
                text = "Summarise in a few sentences:\n\n" + _PASSAGE * (1 + index % 4)
            body: dict = {"max_tokens": _MAX_TOKENS[index % 6], "temperature": 0.8, "seed": index}
            if endpoint == COMPLETIONS:
                body["prompt"] = text
            else:
                body["messages"] = [{"role": "user", "content": text}]
            lines.append({"custom_id": f"cal{index}", "url": endpoint, "body": body})
    return b"".join(json.dumps({"method": "POST", **line}).encode() + b"\n" for line in lines)
