"""The `batchbox` commands, one module each: each takes its parsed arguments and the loaded
config, does its work, and returns the exit status (or raises a `watcher.errors` error)."""
