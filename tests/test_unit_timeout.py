"""systemd kills the service `TimeoutStopSec` after asking it to stop: the unit must give it
its own stop_timeout_seconds and a margin. The shipped unit and the shipped config agree, and
`batchbox check` warns when the unit in use (the installed one, with its drop-ins, else the
shipped one) does not."""

from __future__ import annotations

from pathlib import Path

import pytest
from servicekit import write_config

from watcher import unitfile
from watcher.config import load_config
from watcher.machine import check_machine
from watcher.unitfile import (
    SHIPPED_UNIT,
    STOP_MARGIN_SECONDS,
    stop_timeout_problem,
    time_span_seconds,
    timeout_stop_seconds,
    unit_files,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_unit_gives_the_shipped_config_time_to_stop() -> None:
    config = load_config(ROOT / "config.yaml")
    seconds = timeout_stop_seconds([SHIPPED_UNIT])
    assert seconds > config.stop_timeout_seconds + STOP_MARGIN_SECONDS
    assert stop_timeout_problem(config, folders=(), shipped=SHIPPED_UNIT) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60", 60),
        ("45s", 45),
        ("2min", 120),
        ("1min 30s", 90),
        ("1min30s", 90),
        ("1.5h", 5400),
        ("500ms", 0.5),
        ("infinity", float("inf")),
    ],
)
def test_systemd_time_spans(text: str, seconds: float) -> None:
    assert time_span_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5 parsecs", "1min x"])
def test_a_bad_time_span_is_refused(text: str) -> None:
    with pytest.raises(unitfile.UnitError):
        time_span_seconds(text)


def unit(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["[Unit]", "Description=x", "[Service]", *lines, ""]))
    return path


def test_the_installed_unit_and_its_drop_ins_win_over_the_shipped_one(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    shipped = unit(tmp_path / "shipped" / "batchbox.service", "TimeoutStopSec=600")
    assert unit_files((etc, lib), shipped) == [shipped]
    installed = unit(lib / "batchbox.service", "TimeoutStopSec=600")
    assert unit_files((etc, lib), shipped) == [installed]
    assert timeout_stop_seconds(unit_files((etc, lib), shipped)) == 600
    unit(lib / "batchbox.service.d" / "10-stop.conf", "TimeoutSec=20")
    unit(etc / "batchbox.service.d" / "20-stop.conf", "TimeoutStopSec=2min")
    assert timeout_stop_seconds(unit_files((etc, lib), shipped)) == 120
    # The same name in a more important folder replaces the drop-in.
    unit(etc / "batchbox.service.d" / "10-stop.conf", "TimeoutStopSec=5")
    unit(etc / "batchbox.service.d" / "20-stop.conf", "TimeoutStopSec=")  # back to the default
    files = unit_files((etc, lib), shipped)
    assert etc / "batchbox.service.d" / "10-stop.conf" in files
    assert lib / "batchbox.service.d" / "10-stop.conf" not in files
    assert timeout_stop_seconds(files) == unitfile.DEFAULT_TIMEOUT_STOP_SECONDS


def test_check_warns_when_the_installed_unit_would_kill_the_service_before_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = (tmp_path / "etc",)
    monkeypatch.setattr(unitfile, "UNIT_FOLDERS", folders)
    config = load_config(write_config(tmp_path, stop_timeout_seconds=30))
    installed = unit(folders[0] / "batchbox.service", "TimeoutStopSec=30s")

    said: list[str] = []
    problems = check_machine(config, said.append)

    warnings = [line for line in said if line.startswith("warning: ")]
    assert len(warnings) == 1, said
    assert str(installed) in warnings[0] and "TimeoutStopSec=30s" in warnings[0]
    assert "stop_timeout_seconds (30)" in warnings[0]
    assert problems == []  # a warning: the appliance still runs

    unit(folders[0] / "batchbox.service", "TimeoutStopSec=90")
    said.clear()
    check_machine(config, said.append)
    assert not [line for line in said if line.startswith("warning: ")], said
