"""The API's systemd unit passes `systemd-analyze verify`, scores at most 2.0, and may write
only its part of the state folder and the inbox."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "batchbox-api.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            found.setdefault(name, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_both_units_verify_and_the_api_unit_scores_at_most_2() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-unit")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scores = dict(re.findall(r"unit (\S+): verify passed; exposure score ([0-9.]+)", result.stdout))
    assert float(scores["batchbox.service"]) <= 1.5
    assert float(scores["batchbox-api.service"]) <= 2.0


def test_the_api_unit_writes_only_its_state_and_the_inbox() -> None:
    unit = settings()
    assert unit["ExecStart"] == ["/srv/batchbox/.venv/bin/batchbox api"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/srv/batchbox/state/api /srv/batchbox/inbox"]
    assert unit["InaccessiblePaths"] == ["-/srv/batchbox/state/jobs"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    assert unit["User"] == unit["Group"] == ["batchbox"]
    assert "PrivateNetwork" not in unit  # it serves HTTP
