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
    estimate_job,
    execute_job,
    finish_job,
    validate_job,
)
from watcher.jobs import Job, JobStatus, fail_job, load_job, new_job_id, now, write_status
from watcher.logs import configure_logging
from watcher.tickets import TicketError, find_ticket, load_ticket

log = structlog.get_logger()


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
    if args.model is not None and args.model not in config.models:
        raise UsageError(f"model {args.model!r} is not configured ({', '.join(config.models)})")
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
        try:
            validate_job(job, config, ticket_model)
        except JobError as error:
            fail_job(job, error.code, error.message, error.line)
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
    if args.model is not None and args.model not in config.models:
        raise UsageError(f"model {args.model!r} is not configured ({', '.join(config.models)})")
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
    result = estimate_job(job, config.folder("state"))
    ahead = [job for job in spool_jobs(config) if not job.status.finished]
    waiting = sum(float((other.estimate or {}).get("run_seconds", 0.0)) for other in ahead)
    finish = now() + timedelta(seconds=round(waiting + result.run_seconds))
    print(f"{path.name}: {job.total} requests on {job.model} ({job.endpoint})")
    print(f"run time: about {format_seconds(result.run_seconds)}")
    if ahead:
        print(f"queue: {len(ahead)} job(s) ahead, about {format_seconds(waiting)}")
    print(f"finished by: {finish.isoformat()} if dropped now")
    print(f"basis: {result.basis}")
    return EXIT_OK


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def bench(args: argparse.Namespace, config: Config) -> int:
    raise CommandFailed("bench is not built yet")
