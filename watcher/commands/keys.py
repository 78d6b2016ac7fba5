"""`batchbox key add NAME | list | remove NAME`: the API's keys; `add` prints the new key
once, as the last line of its output. Only a hash of each key is kept."""

from __future__ import annotations

import argparse

from watcher.api.keys import BadKeyName, KeyProblem, add_key, list_keys, remove_key
from watcher.api.storage import ApiFolders
from watcher.config import Config
from watcher.errors import EXIT_OK, CommandFailed, UsageError


def manage_keys(args: argparse.Namespace, config: Config) -> int:
    folders = ApiFolders(config.folder("state") / "api")
    try:
        if args.action == "add":
            made, token = add_key(folders, args.name)
            print(f"Made the key {made.name!r} ({made.id}). It is shown this once only:")
            print(token)  # the last line, for scripts: `batchbox key add NAME | tail -n1`
        elif args.action == "remove":
            removed = remove_key(folders, args.name)
            print(f"Removed the key {removed.name!r} ({removed.id}).")
        else:
            keys = list_keys(folders)
            if not keys:
                print("No keys; make one with `batchbox key add NAME`.")
            for item in keys:
                print(f"{item.name}\t{item.id}\t{item.hint}\tmade {item.created_at}")
    except BadKeyName as error:
        raise UsageError(str(error)) from None
    except KeyProblem as error:
        raise CommandFailed(str(error)) from None
    return EXIT_OK
