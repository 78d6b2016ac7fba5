"""`batchbox estimate FILE`: the estimate the service would write for a file, without
running it."""

from __future__ import annotations

import argparse
from datetime import timedelta

from benchmarks.record import History
from watcher.commands.arguments import input_file, known_model
from watcher.config import Config
from watcher.errors import EXIT_OK, CommandFailed
from watcher.estimates import estimate_job
from watcher.forecast import forecast_job
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
    state = config.folder("state")
    history = History(state)
    job.estimate = estimate_job(job, history).as_dict()
    job.sequence = 1 << 62  # behind every job already queued at its priority
    records = history.records()
    forecast = forecast_job(job, spool_jobs(state), records, config.idle_unload_seconds)
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
