"""`batchbox run FILE`: run one file now, without the inbox, into the same outbox folder."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import time
from pathlib import Path

import structlog

from benchmarks.record import History
from watcher.commands.arguments import input_file, known_model
from watcher.config import Config
from watcher.deliver import deliver_job
from watcher.engines import EngineKeeper
from watcher.errors import EXIT_FAILED, EXIT_OK, CommandFailed
from watcher.estimates import estimate_job
from watcher.execute import RunHooks, execute_job
from watcher.jobs import Job, JobStatus, write_status
from watcher.logs import configure_logging
from watcher.owner import hold_for_command
from watcher.spool import INPUT, RUNS, new_spool_job, spool_jobs
from watcher.stopping import SignalStop
from watcher.tickets import find_ticket, read_ticket_into
from watcher.validate import check_job

log = structlog.get_logger()


def run_file(args: argparse.Namespace, config: Config) -> int:
    configure_logging(sys.stderr)
    path = input_file(args.file)
    known_model(config, args.model)
    outbox = Path(args.output).resolve() if args.output else config.folder("outbox")
    outbox.mkdir(parents=True, exist_ok=True)
    lock = hold_for_command(config.folder("state"), config.folder("inbox"), "run")
    try:
        return run_locked(config, path, args.model, outbox)
    finally:
        lock.release()


def run_locked(config: Config, path: Path, model: str | None, outbox: Path) -> int:
    job = unfinished_run(config, path)
    if job is not None:
        log.info("job_resumed", job=job.id, done=job.completed + job.failed, total=job.total)
    else:
        job = validated_run_job(config, path, model, outbox)
    bar = ProgressBar(job.total)
    engines = EngineKeeper()
    with stop_on_signals(config) as stop:
        hooks = RunHooks(on_progress=bar.update, stop_requested=stop.is_set)
        try:
            target = execute_job(job, config, engines, outbox, hooks)
        finally:
            bar.close()
            engines.close(timeout=stop.seconds_left(otherwise=10.0) / 2)
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


def stop_on_signals(config: Config) -> SignalStop:
    """SIGINT and SIGTERM stop the run where it is, keeping what is done, within the
    config's stop_timeout_seconds (a second signal ends it at once)."""
    return SignalStop(
        config.stop_timeout_seconds,
        exit_status=EXIT_FAILED,
        last_words="stopped; what was done is kept: run the same file again to resume",
    )


def prepare_run_job(config: Config, path: Path, model: str | None) -> tuple[Job, str | None]:
    """A spool job holding a copy of the file (and its ticket): `run` leaves the file be."""
    job = new_spool_job(config.folder("state"), path.stem, spool=RUNS)
    job.origin = str(path.resolve())
    shutil.copyfile(path, job.out / INPUT)
    ticket_model = model
    ticket_path = find_ticket(path.parent, path.stem)
    if ticket_path is not None:
        shutil.copyfile(ticket_path, job.out / f"{path.stem}{ticket_path.suffix}")
        named = read_ticket_into(job, ticket_path)
        if job.errors:
            return job, None
        ticket_model = model or named
    write_status(job)
    return job, ticket_model


def validated_run_job(config: Config, path: Path, model: str | None, outbox: Path) -> Job:
    """A checked spool job for the file, with its estimate; a file that cannot run is
    delivered as failed and the command fails saying why."""
    job, ticket_model = prepare_run_job(config, path, model)
    if not job.errors:
        check_job(job, config, ticket_model)
    if job.errors:
        target = deliver_job(job, config, outbox, JobStatus.FAILED)
        raise CommandFailed(f"{job.errors[0]['message']} (details in {target})")
    job.estimate = estimate_job(job, History(config.folder("state"))).as_dict()
    return job


def unfinished_run(config: Config, path: Path) -> Job | None:
    """A `run` of this very file that was stopped part way, to resume rather than redo."""
    for job in spool_jobs(config.folder("state"), RUNS):
        if (
            job.sidecar_dir is None
            and job.origin == str(path.resolve())
            and job.status is JobStatus.IN_PROGRESS
            and filecmp.cmp(path, job.out / INPUT, shallow=False)
        ):
            return job
    return None


class ProgressBar:
    """A tqdm bar on a terminal; a structured log line now and then otherwise."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", file=sys.stderr) if sys.stderr.isatty() else None
        self.last_logged = 0.0

    def update(self, job: Job, progress: object) -> None:
        done = job.completed + job.failed
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(tok_s=f"{job.tokens_per_second or 0:.0f}", refresh=False)
            self.bar.refresh()
            return
        if time.monotonic() - self.last_logged >= 10:
            self.last_logged = time.monotonic()
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
