"""The `batchbox` command. Exit status 0 on success, 2 for a bad config or bad arguments,
1 for anything else; errors are one plain sentence on standard error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from watcher.config import Config, ConfigError, find_config, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class CommandFailed(Exception):
    """The command could not do its work: exit status 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exits with 2 too, but wordier
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchbox", description="A watch-folder appliance for LLM batches.")
    parser.add_argument("-c", "--config", help="config file (else $BATCHBOX_CONFIG, ./config.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands.add_parser("serve", help="run the appliance in the foreground")
    run = commands.add_parser("run", help="run one file now and write its outbox folder")
    run.add_argument("file")
    run.add_argument("-m", "--model", help="a configured model alias")
    run.add_argument("-o", "--output", help="the outbox folder to write into")
    status = commands.add_parser("status", help="the queue, the running job, recent jobs")
    status.add_argument("--json", action="store_true")
    estimate = commands.add_parser("estimate", help="the estimate for a file, without running")
    estimate.add_argument("file")
    estimate.add_argument("-m", "--model")
    commands.add_parser("check", help="validate the config and the machine")
    bench = commands.add_parser("bench", help="run a short calibration batch for a model")
    bench.add_argument("model")
    # -- the HTTP API (watcher/api) --
    commands.add_parser("api", help="serve the OpenAI-compatible API and the status page")
    key = commands.add_parser("key", help="API keys: add NAME, list, remove NAME")
    key_actions = key.add_subparsers(dest="action", required=True, parser_class=Parser)
    key_actions.add_parser("add", help="make a key and print it once").add_argument("name")
    key_actions.add_parser("list", help="the keys, without the keys themselves")
    key_actions.add_parser("remove", help="remove a key").add_argument("name")
    return parser


def _handlers() -> dict[str, Callable[[argparse.Namespace, Config], int]]:
    from watcher import commands
    from watcher.api import commands as api_commands

    return {
        "api": api_commands.serve_api,
        "key": api_commands.key,
        "run": commands.run_file,
        "check": commands.check,
        "serve": commands.serve,
        "status": commands.status,
        "estimate": commands.estimate,
        "bench": commands.bench,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = load_config(find_config(args.config))
        return _handlers()[args.command](args, config)
    except (UsageError, ConfigError) as error:
        print(f"batchbox: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as error:
        print(f"batchbox: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("batchbox: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # the last line of defence: a sentence, not a traceback
        if os.environ.get("BATCHBOX_DEBUG"):
            raise
        print(f"batchbox: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy, so that the exception classes the
    # commands raise are the ones main() catches.
    from watcher.cli import main as imported_main

    sys.exit(imported_main())
