"""The README's test command on a fresh machine: a test that needs a program the machine
lacks (rsync) is skipped with the reason, not failed; where .ci/run has installed the tools
($BATCHBOX_REQUIRE_TOOLS), the same test runs, so a missing tool there is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REQUIRE_TOOLS

ROOT = Path(__file__).resolve().parent.parent
NEED_RSYNC = [
    "tests/test_service.py::test_an_upload_is_claimed_once[rsync]",
    "tests/test_settle.py::test_an_rsync_upload_is_completed_once_and_its_temporary_never_named",
]


def run_without_rsync(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    """pytest on the tests that need rsync, with a PATH on which there is none."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    settings = {key: value for key, value in os.environ.items() if key != REQUIRE_TOOLS}
    settings.update(PATH=str(empty), **environment)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *NEED_RSYNC],
        cwd=ROOT,
        env=settings,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_rsync_its_tests_are_skipped_saying_why(tmp_path: Path) -> None:
    run = run_without_rsync(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 skipped" in run.stdout, run.stdout
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 2 and all("rsync is not installed" in line for line in skips), skips


@pytest.mark.parametrize("required", ["1"])
def test_where_ci_installed_the_tools_a_missing_one_fails(tmp_path: Path, required: str) -> None:
    run = run_without_rsync(tmp_path, **{REQUIRE_TOOLS: required})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 failed" in run.stdout and "rsync" in run.stdout, run.stdout
