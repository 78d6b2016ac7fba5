"""`batchbox serve`: the appliance in the foreground (what the systemd unit starts)."""

from __future__ import annotations

import argparse
import os
import sys

import structlog

from watcher.config import Config
from watcher.errors import EXIT_OK
from watcher.logs import configure_logging
from watcher.owner import wait_for_state
from watcher.stopping import SignalStop
from watcher.unitfile import stop_timeout_problem


def serve(args: argparse.Namespace, config: Config) -> int:
    from watcher.service import Service

    configure_logging(sys.stdout)
    if os.environ.get("INVOCATION_ID"):  # started by systemd, whose unit may disagree
        problem = stop_timeout_problem(config)
        if problem:
            structlog.get_logger().warning("unit_stops_too_soon", problem=problem)
    service = Service(config)
    # SIGTERM (systemd's stop) and SIGINT end it within stop_timeout_seconds, whatever it
    # is doing: see watcher.stopping.
    with SignalStop(config.stop_timeout_seconds, on_stop=service.stop):
        # The state folder's one owner for the service's whole life (watcher.owner).
        lock = wait_for_state(config.folder("state"), service.stopping)
        if lock is None:
            return EXIT_OK  # stopped while waiting for a `batchbox run` to end
        try:
            service.serve_forever()
        finally:
            lock.release()
    return EXIT_OK
