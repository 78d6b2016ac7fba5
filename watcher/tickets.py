"""Tickets: `<stem>.yaml` beside a job's data file, with the few keys a user may set, and
the one place a ticket is applied to a job.

A ticket can never set engine options, model sources, paths or anything that runs code:
the schema forbids every other key, and safe loading refuses every YAML tag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from watcher.config import ConfigError, describe_errors, load_yaml
from watcher.inboxnames import is_regular
from watcher.jobs import Job, fail_job

TICKET_SUFFIXES = (".yaml", ".yml")


MAX_TICKET_JSON = 64 * 1024  # what a ticket's values may take once in the status files


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("defaults", "metadata")
    @classmethod
    def _plain_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Values that go into status files and records: JSON, string keys, a bounded size."""
        try:
            size = len(orjson.dumps(value))
        except (TypeError, orjson.JSONEncodeError) as error:
            raise ValueError(f"must be plain JSON values with string keys ({error})") from None
        if size > MAX_TICKET_JSON:
            raise ValueError(f"is {size} bytes as JSON, over the limit of {MAX_TICKET_JSON}")
        return value


class TicketError(Exception):
    pass


def find_ticket(folder: Path, stem: str) -> Path | None:
    """`<stem>.yaml` or `.yml` when it is a regular file; anything else under that name (a
    link, a FIFO, a folder) is never read, and is logged once."""
    for suffix in TICKET_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if is_regular(path, "ticket"):
            return path
    return None


def load_ticket(path: Path, max_bytes: int = 1 << 20) -> Ticket:
    """Read a ticket; the error names the file and the key at fault."""
    if path.stat().st_size > max_bytes:
        raise TicketError(f"ticket {path.name}: larger than {max_bytes} bytes")
    try:
        data = load_yaml(path, aliases=False)
    except ConfigError as error:
        raise TicketError(f"ticket {error}") from None
    if data is None:
        return Ticket()
    if not isinstance(data, dict):
        raise TicketError(f"ticket {path.name}: must be a mapping of keys to values")
    try:
        return Ticket.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            line.replace("Extra inputs are not permitted", "not a ticket key")
            for line in describe_errors(error)
        )
        raise TicketError(f"ticket {path.name}: {problems}") from None


def apply_ticket(job: Job, ticket: Ticket) -> str | None:
    """Give the job what its ticket sets; the model the ticket names, if any."""
    job.has_ticket = True
    job.priority, job.metadata, job.defaults = ticket.priority, ticket.metadata, ticket.defaults
    return ticket.model


def read_ticket_into(job: Job, path: Path) -> str | None:
    """Load a ticket and apply it; a bad ticket becomes the job's error. The model it names."""
    job.has_ticket = True
    try:
        ticket = load_ticket(path)
    except TicketError as error:
        fail_job(job, "invalid_ticket", str(error))
        return None
    return apply_ticket(job, ticket)
