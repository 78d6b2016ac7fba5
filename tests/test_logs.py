"""Log lines as journald keeps them: JSON, one per line, with the traceback of an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from watcher.logs import configure_logging


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    """Logging configured as `batchbox serve` does under systemd, into a file: JSON lines."""
    path = tmp_path / "serve.log"
    with open(path, "w") as stream:
        configure_logging(stream)
        try:
            yield path
        finally:
            structlog.reset_defaults()


def failing_claim() -> None:
    raise PermissionError("cannot open inbox/locked.jsonl")


def test_an_exception_logged_in_json_carries_its_traceback(json_log: Path) -> None:
    log = structlog.get_logger()
    try:
        failing_claim()
    except PermissionError:
        log.exception("claim_crashed", path="inbox/locked.jsonl")
    [line] = json_log.read_text().splitlines()
    record = json.loads(line)
    assert record["event"] == "claim_crashed" and record["level"] == "error"
    assert "exc_info" not in record, record
    traceback = record["exception"]
    assert traceback.startswith("Traceback (most recent call last):"), traceback
    assert "in failing_claim" in traceback
    assert traceback.rstrip().endswith("PermissionError: cannot open inbox/locked.jsonl")


def test_a_line_without_an_exception_has_no_traceback_key(json_log: Path) -> None:
    structlog.get_logger().info("service_ready", queued=0)
    record = json.loads(json_log.read_text())
    assert record["event"] == "service_ready" and "exception" not in record
