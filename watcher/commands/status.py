"""`batchbox status`: the running job with its progress and ETA, the queue, recent jobs."""

from __future__ import annotations

import argparse
import json

from benchmarks.record import read_history
from watcher.config import Config
from watcher.errors import EXIT_OK
from watcher.jobs import JobStatus
from watcher.spool import RUNS, spool_jobs


def show_status(args: argparse.Namespace, config: Config) -> int:
    jobs = spool_jobs(config.folder("state"))
    jobs += spool_jobs(config.folder("state"), RUNS)  # a `batchbox run` at work shows too
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
            {key: record.get(key) for key in ("job_id", "input", "model", "status", "finished_at")}
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
            f"  {record['finished_at']}  {record['status']:<9} "
            f"{record['input'] or record['job_id']} on {record['model']}: "
            f"{counts.get('completed', 0)} ok, {counts.get('failed', 0)} failed, "
            f"{record['run_seconds']} s  ({record['job_id']})"
        )
