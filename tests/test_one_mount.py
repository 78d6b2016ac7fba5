"""Inbox, outbox and state must be one mount, not only one filesystem: rename(2) between two
mounts of the same filesystem fails (EXDEV), as between systemd's ReadWritePaths= entries."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from servicekit import BATCHBOX, write_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to bind-mount a folder in a private mount namespace",
)


def in_private_mounts(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_refuses_state_that_is_a_second_mount_of_the_same_filesystem(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    for name in ("inbox", "outbox", "state", "elsewhere"):
        (tmp_path / name).mkdir()
    # The bind mount is on the same filesystem (same st_dev), so only a real rename tells.
    script = f"mount --bind elsewhere state && exec {BATCHBOX} -c {config} serve"
    finished = in_private_mounts(script, tmp_path)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert "not one mount" in finished.stderr
    assert "ReadWritePaths" in finished.stderr
    leftovers = [path.name for path in tmp_path.rglob(".batchbox-rename-probe-*")]
    assert leftovers == []


def test_check_passes_when_all_three_are_one_mount(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    finished = subprocess.run(
        [BATCHBOX, "-c", str(config), "check"], capture_output=True, text=True, timeout=120
    )
    assert "one filesystem" in finished.stdout, finished.stdout + finished.stderr
    assert "not one mount" not in finished.stdout + finished.stderr
