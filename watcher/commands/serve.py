"""`batchbox serve`: the appliance in the foreground (what the systemd unit starts)."""

from __future__ import annotations

import argparse
import signal
import sys

from watcher.config import Config
from watcher.errors import EXIT_OK
from watcher.logs import configure_logging
from watcher.owner import wait_for_state


def serve(args: argparse.Namespace, config: Config) -> int:
    from watcher.service import Service

    configure_logging(sys.stdout)
    service = Service(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    # The state folder's one owner for the service's whole life (watcher.owner).
    lock = wait_for_state(config.folder("state"), service.stopping)
    if lock is None:
        return EXIT_OK  # stopped while waiting for a `batchbox run` to end
    try:
        service.serve_forever()
    finally:
        lock.release()
    return EXIT_OK
