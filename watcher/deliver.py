"""Delivery: a finished job's folder is completed, recorded in the benchmark history, and
renamed into the outbox in one move; only then does its `.status` say it is finished."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.record import append_history, build_record, read_history
from runner.durable import (
    copy_tree_durably,
    make_folders_durably,
    rename_durably,
    write_json_atomic,
)
from runner.journal import Journal, Tally
from runner.run import fail_remaining
from watcher.config import Config
from watcher.jobs import Job, JobStatus, mark_finalizing, mark_finished, write_record
from watcher.sidecars import iso, now
from watcher.spool import INPUT

STATUS_JSON = "status.json"


@dataclass
class RunTimes:
    """What a run measured, for the benchmark record."""

    load_seconds: float = 0.0
    run_seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)
    samples: list[list] = field(default_factory=list)


def take_tally(job: Job, tally: Tally) -> None:
    job.completed, job.failed = tally.completed, tally.failed
    job.prompt_tokens, job.completion_tokens = tally.prompt_tokens, tally.completion_tokens


def deliver_job(
    job: Job, config: Config, outbox: Path, final: JobStatus, times: RunTimes | None = None
) -> Path:
    """Write what is missing, record the benchmark, and deliver the folder in one rename.

    Safe to call again on a job whose finishing was cut short (a crash, a full disk): each
    step is done again or found done, and the folder is delivered once.
    """
    times = times or RunTimes()
    again = job.final is not None  # finishing began before, and may have reached the history
    mark_finalizing(job, final)
    if final is JobStatus.CANCELLED:
        code, message = "batch_cancelled", "the job was cancelled before this request ran"
    else:
        first = job.errors[0]["message"] if job.errors else "the job failed"
        code, message = "batch_failed", f"the job failed before this request ran: {first}"
    tally = fail_remaining(
        job.out / INPUT,
        Journal(job.out),
        code,
        message,
        config.limits_value,
        job.defaults,
        job.endpoint,
    )
    take_tally(job, tally)
    # A file that failed before it was counted: what fail_remaining saw is its size.
    job.total = max(job.total, tally.completed + tally.failed)
    target = pick_outbox_folder(outbox, job.subdir, job.stem, reserved_names(config, outbox))
    job.outbox = str(target.relative_to(outbox)) if target.is_relative_to(outbox) else str(target)
    record = benchmark_record(job, config, final, times)
    write_json_atomic(job.out / STATUS_JSON, job.final_document(final))
    write_json_atomic(job.out / "benchmark.json", record)
    # The spool now says where it goes, so a restart delivers it once; the sidecar in the
    # inbox names the outbox folder only once the folder is there.
    write_record(job)
    state = config.folder("state")
    if not (again and in_history(state, job.id)):
        append_history(state, record)
    deliver_folder(job.out, target)
    mark_finished(job, final)
    shutil.rmtree(job.work, ignore_errors=True)  # the sidecar and the outbox hold the rest
    return target


def in_history(state: Path, job_id: str) -> bool:
    return any(record.get("job_id") == job_id for record in read_history(state))


def benchmark_record(job: Job, config: Config, final: JobStatus, times: RunTimes) -> dict[str, Any]:
    model = job.model or ""
    spec = config.model_spec(model) if model in config.models else None
    requested = [value for value, _ in job.max_tokens if value is not None]
    return build_record(
        job_id=job.id,
        status=final.value,
        model=model,
        source=spec.source if spec else "",
        endpoint=job.endpoint,
        engine=times.engine,
        counts={"total": job.total, "completed": job.completed, "failed": job.failed},
        prompt_tokens=job.prompt_tokens,
        completion_tokens=job.completion_tokens,
        prompt_chars=job.prompt_chars,
        requested_max_tokens=max(requested) if requested else None,
        load_seconds=times.load_seconds,
        run_seconds=max(job.run_seconds, times.run_seconds),
        runs=job.runs,
        estimate=job.estimate,
        finished_at=iso(now()) or "",
        metadata=job.metadata,
        completion_samples=times.samples,
        input_name=job.input_name,
        engine_kind=job.engine_kind,
    )


def pick_outbox_folder(
    outbox: Path, subdir: str, stem: str, reserved: Callable[[str], bool] = lambda name: False
) -> Path:
    """`outbox/<dir>/<stem>`, with -2, -3, ... when the name is taken.

    No job's folder ever holds another: a job dropped in the inbox itself never takes a
    name `reserved` for the jobs of a subfolder (a model alias, a folder in the inbox), and
    the jobs of a subfolder go to a container of their own when a job's folder has its name.
    """
    parent = container_for(outbox, subdir, reserved) if subdir else outbox
    make_folders_durably(parent)  # the delivered folder must not vanish with a new parent
    candidate, number = parent / stem, 1
    while os.path.lexists(candidate) or (not subdir and reserved(candidate.name)):
        number += 1
        candidate = parent / f"{stem}-{number}"
    return candidate


def container_for(outbox: Path, subdir: str, reserved: Callable[[str], bool]) -> Path:
    """The folder holding the jobs of `inbox/<subdir>/`: `outbox/<subdir>`, else the first of
    `<subdir>-2`, `-3`, ... that is a container already or free and not reserved."""
    candidate, number = outbox / subdir, 1
    while True:
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            if number == 1 or not reserved(candidate.name):
                return candidate
        else:
            if stat.S_ISDIR(info.st_mode) and not os.path.lexists(candidate / STATUS_JSON):
                return candidate  # a container: job folders always hold their status.json
        number += 1
        candidate = outbox / f"{subdir}-{number}"


def reserved_names(config: Config, outbox: Path) -> Callable[[str], bool]:
    """Names a job from the inbox itself must leave free in the outbox: those of the model
    subfolders and of any other folder in the inbox, whose jobs are delivered in them. An
    outbox of its own (`batchbox run -o DIR`) holds no such folders."""
    if outbox != config.folder("outbox"):
        return lambda name: False
    inbox = config.folder("inbox")
    return lambda name: name in config.models or os.path.isdir(inbox / name)


def deliver_folder(source: Path, target: Path) -> None:
    """Put a finished folder into the outbox at once: one rename, made durable."""
    try:
        rename_durably(source, target)
    except OSError as error:
        if error.errno != 18:  # EXDEV: another filesystem, which only `run -o` can ask for
            raise
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by a run stopped while copying
        copy_tree_durably(source, staging)
        rename_durably(staging, target)
        shutil.rmtree(source)
