"""What a command reports when it cannot do its work, and the exit status each one means.

Exit status 0 on success, 2 for a bad config or bad arguments, 1 for anything else
(`watcher.cli` turns these into one sentence on standard error).
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class CommandFailed(Exception):
    """The command could not do its work: exit status 1."""


class StartError(CommandFailed):
    """The service cannot start; the message says why in one sentence."""
