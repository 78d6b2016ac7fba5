"""The `batchbox` command: arguments in, one command run, errors out as an exit status and
one plain sentence on standard error (0 success, 2 bad config or arguments, 1 otherwise)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from importlib import import_module

from watcher.config import Config, ConfigError, find_config, load_config
from watcher.errors import EXIT_FAILED, EXIT_USAGE, CommandFailed, UsageError

# Each command: the module under watcher.commands and the function in it.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "serve"),
    "run": ("run", "run_file"),
    "status": ("status", "show_status"),
    "estimate": ("estimate", "show_estimate"),
    "check": ("check", "check"),
    "bench": ("bench", "bench_model"),
    "api": ("api", "serve_api"),
    "key": ("keys", "manage_keys"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exits with 2 too, but wordier
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchbox", description="A watch-folder appliance for LLM batches.")
    parser.add_argument("-c", "--config", help="config file (else $BATCHBOX_CONFIG, ./config.yaml)")
    # -c/--config after the command name too; SUPPRESS keeps a command that is not given it
    # from overwriting the one given before the name.
    config_after = Parser(add_help=False)
    config_after.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add = functools.partial(commands.add_parser, parents=[config_after])
    add("serve", help="run the appliance in the foreground")
    run = add("run", help="run one file now and write its outbox folder")
    run.add_argument("file")
    run.add_argument("-m", "--model", help="a configured model alias")
    run.add_argument("-o", "--output", help="the outbox folder to write into")
    status = add("status", help="the queue, the running job, recent jobs")
    status.add_argument("--json", action="store_true")
    estimate = add("estimate", help="the estimate for a file, without running")
    estimate.add_argument("file")
    estimate.add_argument("-m", "--model")
    add("check", help="validate the config and the machine")
    bench = add("bench", help="run a short calibration batch for a model")
    bench.add_argument("model")
    add("api", help="serve the OpenAI-compatible API and the status page")
    key = add("key", help="API keys: add NAME, list, remove NAME")
    key_actions = key.add_subparsers(dest="action", required=True, parser_class=Parser)
    add_action = functools.partial(key_actions.add_parser, parents=[config_after])
    add_action("add", help="make a key and print it once").add_argument("name")
    add_action("list", help="the keys, without the keys themselves")
    add_action("remove", help="remove a key").add_argument("name")
    return parser


def handler(command: str) -> Callable[[argparse.Namespace, Config], int]:
    module, function = COMMANDS[command]
    return getattr(import_module(f"watcher.commands.{module}"), function)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = load_config(find_config(args.config))
        return handler(args.command)(args, config)
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
