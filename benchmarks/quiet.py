"""How quiet the machine was while a benchmark ran: the CPU seconds other processes used.

A CPU engine's pace is as good as the cores it gets, so a timing figure means little
without this one. Other processes' CPU time is the machine's busy time (psutil's system
CPU times less idle and I/O wait) less what this process's whole tree used: itself and
every descendant, such as a `batchbox serve` it started and that service's engine process,
with the processes each of them started and has already waited for.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling, since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def own_seconds() -> float:
    """CPU seconds this process and every descendant have used, waited-for ones included.

    A process that has ended and been waited for is gone from the tree, and its time (with
    its own waited-for descendants') is in its parent's children_* times: so each living
    process counts its own and its children_* times, and nothing is counted twice."""
    me = psutil.Process(os.getpid())
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # ended meanwhile; its time is in its parent's children_* once waited
        total += times.user + times.system + times.children_user + times.children_system
    return total


@dataclass
class Quiet:
    """A span of time, with the CPU seconds spent in it by this process tree and by others."""

    cores: int = psutil.cpu_count() or 1
    started: float = 0.0
    busy_at_start: float = 0.0
    own_at_start: float = 0.0
    wall: float = 0.0
    own: float = 0.0
    others: float = 0.0

    def start(self) -> Quiet:
        self.started = time.monotonic()
        self.busy_at_start = machine_busy_seconds()
        self.own_at_start = own_seconds()
        return self

    def stop(self) -> Quiet:
        self.wall = time.monotonic() - self.started
        self.own = own_seconds() - self.own_at_start
        busy = machine_busy_seconds() - self.busy_at_start
        self.others = max(busy - self.own, 0.0)
        return self

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_seconds": round(self.wall, 1),
            "own_cpu_seconds": round(self.own, 1),
            "others_cpu_seconds": round(self.others, 1),
            "cores": self.cores,
        }

    def describe(self) -> str:
        share = self.others / max(self.wall * self.cores, 1e-9)
        return (
            f"other processes used {self.others:.0f} CPU s in {self.wall:.0f} s "
            f"({100 * share:.0f} % of {self.cores} cores); this run used {self.own:.0f} CPU s"
        )
