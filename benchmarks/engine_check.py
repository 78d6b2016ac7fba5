"""How long `batchbox check` takes on the shipped config, now that it checks every model's
engine settings against the installed vLLM, against importing vLLM's `EngineArgs` (what the
check would cost if it imported vLLM to learn the argument names).

    python benchmarks/engine_check.py [--runs 5]

Prints the median wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCHBOX = str(Path(sys.executable).with_name("batchbox"))


def timed(command: list[str], cwd: Path, runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, capture_output=True, check=False)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="batchbox-check-") as folder:
        site = Path(folder)
        shutil.copyfile(ROOT / "config.yaml", site / "config.yaml")
        (site / "models").symlink_to(ROOT / "models")
        check = timed([BATCHBOX, "check"], site, args.runs)
        imported = timed(
            [sys.executable, "-c", "import vllm.engine.arg_utils"], site, max(1, args.runs // 2)
        )
    check_median, import_median = statistics.median(check), statistics.median(imported)
    print(f"batchbox check (engine settings read from vLLM's source): {check_median:.2f} s")
    print(f"python -c 'import vllm.engine.arg_utils' alone: {import_median:.2f} s")
    print(f"ratio check / import: {check_median / import_median:.3f}")


if __name__ == "__main__":
    main()
