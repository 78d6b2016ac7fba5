"""Checks of what a command was given on its command line (bad arguments: exit status 2)."""

from __future__ import annotations

from pathlib import Path

from watcher.config import Config
from watcher.errors import UsageError


def known_model(config: Config, alias: str | None, required: bool = False) -> None:
    """A model named on the command line must be a configured alias."""
    if (alias is not None or required) and alias not in config.models:
        raise UsageError(f"model {alias!r} is not configured ({', '.join(config.models)})")


def input_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"{name} is not a file")
    return path
