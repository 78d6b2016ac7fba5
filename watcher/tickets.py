"""Tickets: `<stem>.yaml` beside a job's data file, with the few keys a user may set.

A ticket can never set engine options, model sources, paths or anything that runs code:
the schema forbids every other key, and safe loading refuses every YAML tag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from watcher.config import ConfigError, describe_errors, load_yaml

TICKET_SUFFIXES = (".yaml", ".yml")


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


class TicketError(Exception):
    pass


def find_ticket(folder: Path, stem: str) -> Path | None:
    for suffix in TICKET_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file() and not path.is_symlink():
            return path
    return None


def load_ticket(path: Path, max_bytes: int = 1 << 20) -> Ticket:
    """Read a ticket; the error names the file and the key at fault."""
    if path.stat().st_size > max_bytes:
        raise TicketError(f"ticket {path.name}: larger than {max_bytes} bytes")
    try:
        data = load_yaml(path)
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
