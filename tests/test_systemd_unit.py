"""The systemd unit passes `systemd-analyze verify` and keeps its exposure score low."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "batchbox.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def test_the_unit_verifies_and_scores_at_most_1_5() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-unit")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    score = float(re.search(r"exposure score ([0-9.]+)", result.stdout).group(1))
    assert score <= 1.5


def test_the_unit_is_a_notify_service_with_a_watchdog_and_no_privileges() -> None:
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert int(settings["WatchdogSec"]) > 0
    assert settings["Restart"] == "on-failure"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == "yes"
    assert settings["User"] == settings["Group"] == "batchbox"
    # One writable path holding inbox, outbox and state: renames between them must not
    # cross from one mount to another (each ReadWritePaths= entry is a mount of its own).
    assert settings["ReadWritePaths"] == "/srv/batchbox"
    read_only = " ".join(line for line in text.splitlines() if line.startswith("ReadOnlyPaths="))
    assert "/srv/batchbox/.venv" in read_only and "/srv/batchbox/config.yaml" in read_only
    assert "char-nvidia-frontend rw" in text  # the GPU stays reachable
