"""`batchbox serve`: the appliance in the foreground (what the systemd unit starts)."""

from __future__ import annotations

import argparse
import signal
import sys

from watcher.config import Config
from watcher.errors import EXIT_OK
from watcher.logs import configure_logging


def serve(args: argparse.Namespace, config: Config) -> int:
    from watcher.service import Service

    configure_logging(sys.stdout)
    service = Service(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    service.serve_forever()
    return EXIT_OK
