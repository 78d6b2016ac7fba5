"""Validation: count and check a taken file, pick its model, and note what the queue and the
estimator need. A file that cannot run fails as a whole with a job-level error."""

from __future__ import annotations

from pathlib import Path

from runner.lines import FileRejected
from runner.run import scan_file
from runner.types import CodedError
from watcher.config import Config
from watcher.jobs import Job, fail_job
from watcher.spool import INPUT
from watcher.tickets import find_ticket, read_ticket_into


class JobError(CodedError):
    """The job cannot run; it is delivered as failed with this error."""


def resolve_model(
    config: Config, ticket_model: str | None, subdir: str, line_models: set[str]
) -> str:
    """Ticket, then inbox subfolder, then the lines' one model, then the default."""
    aliases = ", ".join(config.models)
    if ticket_model is not None:
        if ticket_model not in config.models:
            raise JobError(
                "unknown_model",
                f"the ticket names model {ticket_model!r}, which is not configured "
                f"(configured: {aliases})",
            )
        return ticket_model
    if subdir and subdir in config.models:
        return subdir
    if len(line_models) == 1 and next(iter(line_models)) in config.models:
        return next(iter(line_models))
    if config.default_model is not None:
        return config.default_model
    raise JobError(
        "no_model",
        f"no model resolves for this file: name one of {aliases} in a ticket, "
        "drop it into inbox/<model>/, or set default_model",
    )


def validate_job(
    job: Job, config: Config, ticket_model: str | None = None, input_path: Path | None = None
) -> None:
    """Count and check the input, pick its model, and fill in what the queue needs."""
    path = input_path or job.out / INPUT
    try:
        summary = scan_file(path, config.limits_value, job.defaults)
    except FileRejected as error:
        raise JobError(error.code, error.message, error.line) from None
    job.model = resolve_model(config, ticket_model, job.subdir, summary.models)
    job.endpoint = summary.endpoint
    job.total = summary.lines
    job.prompt_chars = summary.prompt_chars
    job.max_tokens = [[value, count] for value, count in summary.max_tokens.items()]
    job.input_signature = input_signature(path)
    job.engine_kind = config.model_spec(job.model).engine_kind
    served = config.models[job.model].endpoints
    if job.endpoint not in served:
        raise JobError(
            "wrong_endpoint",
            f"model {job.model!r} serves {', '.join(served)}, not {job.endpoint}",
        )


def check_job(job: Job, config: Config, ticket_model: str | None = None) -> None:
    """Validate a taken job; what makes it fail is recorded in `job.errors`."""
    try:
        validate_job(job, config, ticket_model)
    except JobError as error:
        fail_job(job, error.code, error.message, error.line)


def revalidate(job: Job, config: Config) -> None:
    """Validate a job taken before a stop, with the ticket that was taken with it (the claim
    may have stopped before its record took the ticket's values)."""
    ticket_model = None
    ticket_path = find_ticket(job.out, job.stem)
    if ticket_path is not None:
        known = len(job.errors)
        ticket_model = read_ticket_into(job, ticket_path)
        if len(job.errors) > known:
            return  # a bad ticket fails the job by itself
    check_job(job, config, ticket_model)


def input_signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]
