"""What the systemd unit must agree with in the config: systemd kills the service
`TimeoutStopSec` after asking it to stop, so that must leave the service its own
`stop_timeout_seconds` and a margin, or a stop is a SIGKILL.

The unit read is the installed one (with its drop-ins) where there is one, else the one
shipped in `systemd/`. systemd's own parser is not at hand where systemd is not (nor is
`systemd-analyze`), so the few lines read here are parsed here: the `[Service]` section's
`TimeoutStopSec=` and `TimeoutSec=`, later assignments winning, in systemd's time units.
"""

from __future__ import annotations

import re
from pathlib import Path

from watcher.config import Config

UNIT = "batchbox.service"
SHIPPED_UNIT = Path(__file__).resolve().parent.parent / "systemd" / UNIT
# Where systemd looks for units, most important first (systemd.unit(5)).
UNIT_FOLDERS = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
STOP_MARGIN_SECONDS = 5.0  # the service's exit, and systemd's own reaction, after its timeout
DEFAULT_TIMEOUT_STOP_SECONDS = 90.0  # systemd's DefaultTimeoutStopSec

# systemd.time(7): the units of a time span, in seconds.
TIME_UNITS = {
    **dict.fromkeys(("usec", "us", "µs", "μs"), 1e-6),
    **dict.fromkeys(("msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "sec", "s", ""), 1.0),
    **dict.fromkeys(("minutes", "minute", "min", "m"), 60.0),
    **dict.fromkeys(("hours", "hour", "hr", "h"), 3600.0),
    **dict.fromkeys(("days", "day", "d"), 86400.0),
    **dict.fromkeys(("weeks", "week", "w"), 604800.0),
    **dict.fromkeys(("months", "month", "M"), 2629800.0),
    **dict.fromkeys(("years", "year", "y"), 31557600.0),
}
SPAN_PART = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([^\d\s.]*)")


class UnitError(ValueError):
    """A value in the unit that systemd would not accept either."""


def time_span_seconds(text: str) -> float:
    """A systemd time span (`90`, `1min 30s`, `infinity`) in seconds."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    seconds, position = 0.0, 0
    while position < len(text):
        match = SPAN_PART.match(text, position)
        if match is None or match.group(2) not in TIME_UNITS:
            raise UnitError(f"{text!r} is not a time span")
        seconds += float(match.group(1)) * TIME_UNITS[match.group(2)]
        position = match.end()
    if not text:
        raise UnitError("an empty time span")
    return seconds


def unit_files(folders: tuple[Path, ...] | None = None, shipped: Path | None = None) -> list[Path]:
    """The installed unit and its drop-ins in the order systemd reads them, else the shipped
    unit; empty when there is neither."""
    folders = UNIT_FOLDERS if folders is None else folders
    shipped = SHIPPED_UNIT if shipped is None else shipped
    installed = next((folder / UNIT for folder in folders if (folder / UNIT).is_file()), None)
    if installed is None:
        return [shipped] if shipped.is_file() else []
    drop_ins: dict[str, Path] = {}
    for folder in reversed(folders):  # a drop-in in a more important folder replaces its name
        for path in sorted((folder / f"{UNIT}.d").glob("*.conf")):
            drop_ins[path.name] = path
    return [installed, *(drop_ins[name] for name in sorted(drop_ins))]


def timeout_stop_seconds(files: list[Path]) -> float:
    """How long systemd waits for the service to stop, as these unit files say."""
    seconds = DEFAULT_TIMEOUT_STOP_SECONDS
    for path in files:
        section = None
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
                key, value = (part.strip() for part in line.split("=", 1))
                if key in ("TimeoutStopSec", "TimeoutSec"):
                    seconds = time_span_seconds(value) if value else DEFAULT_TIMEOUT_STOP_SECONDS
    return seconds


def stop_timeout_problem(
    config: Config, folders: tuple[Path, ...] | None = None, shipped: Path | None = None
) -> str | None:
    """Why systemd would kill the service before it stops by itself, or None."""
    files = unit_files(folders, shipped)
    if not files:
        return None
    try:
        seconds = timeout_stop_seconds(files)
    except (OSError, UnitError) as error:
        return f"the systemd unit {files[0]} cannot be read: {error}"
    needed = config.stop_timeout_seconds + STOP_MARGIN_SECONDS
    if seconds > needed:
        return None
    return (
        f"the systemd unit ({', '.join(map(str, files))}) has TimeoutStopSec={seconds:g}s, "
        f"not more than stop_timeout_seconds ({config.stop_timeout_seconds:g}) plus "
        f"{STOP_MARGIN_SECONDS:g} s, so systemd may kill the service before it has stopped: "
        f"raise TimeoutStopSec above {needed:g}s or lower stop_timeout_seconds"
    )
