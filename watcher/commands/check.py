"""`batchbox check`: validate the config and the machine, and say what is wrong."""

from __future__ import annotations

import argparse

from watcher.config import Config
from watcher.errors import EXIT_FAILED, EXIT_OK
from watcher.machine import check_machine


def check(args: argparse.Namespace, config: Config) -> int:
    problems = check_machine(config, print)
    return EXIT_FAILED if problems else EXIT_OK
