"""`batchbox estimate FILE`: the estimate the service would write for a file, without
running it."""

from __future__ import annotations

import argparse
from datetime import timedelta

from benchmarks.record import History
from watcher.commands.arguments import input_file, known_model
from watcher.config import Config
from watcher.errors import EXIT_OK, CommandFailed
from watcher.etas import estimate_job
from watcher.jobs import Job
from watcher.sidecars import now
from watcher.spool import spool_jobs
from watcher.tickets import TicketError, apply_ticket, find_ticket, load_ticket
from watcher.validate import JobError, validate_job


def show_estimate(args: argparse.Namespace, config: Config) -> int:
    path = input_file(args.file)
    known_model(config, args.model)
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
        ticket_model = apply_ticket(job, ticket)
    try:
        validate_job(job, config, ticket_model, input_path=path)
    except JobError as error:
        raise CommandFailed(error.message) from None
    result = estimate_job(job, History(config.folder("state")))
    ahead = [job for job in spool_jobs(config.folder("state")) if not job.status.finished]
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
