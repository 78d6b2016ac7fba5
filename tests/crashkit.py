"""Helpers for the crash, fault and state-machine tests: a site of dropped files, the check
of SPEC section 8's promise after everything has settled, and the figures the crash tests
report (kills, lost and duplicated results, requests run again per crash)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import input_lines, read_jsonl
from servicekit import FINAL, OUTBOX_FILES, Server, chat_line, jsonl

# -- what is dropped ---------------------------------------------------------------------


@dataclass
class Dropped:
    """One file dropped into the inbox: where, and its bytes."""

    subdir: str
    stem: str
    data: bytes

    @property
    def where(self) -> str:
        return f"{self.subdir}/{self.stem}" if self.subdir else self.stem


def request_file(prefix: str, count: int, bad_every: int = 0) -> bytes:
    """`count` chat lines with ids `<prefix><n>`; every `bad_every`-th line is not valid,
    so errors.jsonl (joined by line number) is resumed as well as results.jsonl."""
    lines: list[Any] = []
    for index in range(count):
        line = chat_line(f"{prefix}{index}", f"question {index} of {prefix}", max_tokens=8)
        if bad_every and index % bad_every == bad_every - 1:
            line["method"] = "GET"
        lines.append(line)
    return jsonl(lines)


def drop_file(inbox: Path, dropped: Dropped) -> None:
    folder = inbox / dropped.subdir if dropped.subdir else inbox
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{dropped.stem}.jsonl.part"
    part.write_bytes(dropped.data)
    part.rename(folder / f"{dropped.stem}.jsonl")


# -- the check -----------------------------------------------------------------------------


@dataclass
class Count:
    """Lines of the inputs checked, and how many were missing or there more than once."""

    lines: int = 0
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: Count) -> None:
        self.lines += other.lines
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.problems += other.problems


def count_lines(input_path: Path, folder: Path) -> Count:
    """Every non-blank input line in exactly one of results/errors, once: what is not."""
    lines = input_lines(input_path)
    first_line_of: dict[str, int] = {}
    for number, custom_id in lines.items():
        if custom_id is not None:
            first_line_of.setdefault(custom_id, number)
    seen: Counter[int] = Counter()
    count = Count(lines=len(lines))
    for record in read_jsonl(folder / "results.jsonl"):
        line = first_line_of.get(record["custom_id"])
        if line is None:
            count.problems.append(f"{folder}: a result for unknown {record['custom_id']!r}")
            continue
        seen[line] += 1
    for record in read_jsonl(folder / "errors.jsonl"):
        line = record["error"]["line"]
        if line not in lines:
            count.problems.append(f"{folder}: an error for line {line}, not a request line")
            continue
        seen[line] += 1
    count.lost = sum(1 for number in lines if seen[number] == 0)
    count.duplicated = sum(times - 1 for times in seen.values() if times > 1)
    return count


def outbox_folders(outbox: Path) -> dict[str, Path]:
    """Delivered folders by their place (`stem` or `subdir/stem`): those holding status.json."""
    return {
        str(status.parent.relative_to(outbox)): status.parent
        for status in outbox.rglob("status.json")
    }


def check_site(root: Path, dropped: list[Dropped], statuses: tuple[str, ...] = FINAL) -> Count:
    """SPEC section 8 after a run with crashes: one complete outbox folder per dropped file,
    every line in it once, only final sidecars left in the inbox, an empty spool.

    Returns the counts; `problems` lists everything else that is wrong."""
    outbox = root / "outbox"
    total = Count()
    folders = outbox_folders(outbox)
    expected = {item.where for item in dropped}
    if set(folders) != expected:
        total.problems.append(f"outbox folders {sorted(folders)}, expected {sorted(expected)}")
    for folder in folders.values():
        names = {path.name for path in folder.iterdir()}
        if not OUTBOX_FILES <= names or any(name.startswith(".") for name in names):
            total.problems.append(f"{folder} holds {sorted(names)}")
            continue
        status = json.loads((folder / "status.json").read_bytes())
        if status["status"] not in statuses:
            total.problems.append(f"{folder} is {status['status']}")
        count = count_lines(folder / "input.jsonl", folder)
        total.add(count)
    by_place = {item.where: item for item in dropped}
    for place, item in by_place.items():
        folder = folders.get(place)
        if folder is None:
            total.lost += len(input_lines_of(item.data))
            continue
        if (folder / "input.jsonl").read_bytes() != item.data:
            total.problems.append(f"{folder}/input.jsonl is not the file dropped")
    total.problems += leftovers(root)
    return total


def input_lines_of(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


def leftovers(root: Path) -> list[str]:
    """What must not be there once everything is delivered: anything in the inbox but final
    `.status` sidecars (and the model folders), any spool job, temporary files."""
    problems = []
    inbox = root / "inbox"
    for path in inbox.rglob("*"):
        if path.is_dir():
            continue
        if path.suffix != ".status":
            problems.append(f"left in the inbox: {path.relative_to(inbox)}")
            continue
        try:
            document = json.loads(path.read_bytes())
        except ValueError:
            problems.append(f"a torn sidecar: {path}")
            continue
        if document.get("status") not in FINAL or not document.get("outbox"):
            problems.append(f"{path.relative_to(inbox)} is {document.get('status')}")
    jobs = root / "state" / "jobs"
    if jobs.is_dir() and any(jobs.iterdir()):
        problems.append(f"spool jobs left: {sorted(path.name for path in jobs.iterdir())}")
    return problems


def sidecars_are_whole(inbox: Path) -> list[str]:
    """Every `.status` and `.eta` in the inbox parses: none is torn or empty."""
    problems = []
    for path in [*inbox.rglob("*.status"), *inbox.rglob("*.eta")]:
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except ValueError:
            problems.append(f"a torn sidecar: {path}")
            continue
        if not isinstance(document, dict):
            problems.append(f"not an object: {path}")
    return problems


def delivered_folders_are_whole(outbox: Path) -> list[str]:
    """Every folder that has appeared in the outbox is complete, whatever is going on."""
    problems = []
    for place, folder in outbox_folders(outbox).items():
        names = {path.name for path in folder.iterdir()}
        if not OUTBOX_FILES <= names:
            problems.append(f"{place} lacks {sorted(OUTBOX_FILES - names)}")
            continue
        count = count_lines(folder / "input.jsonl", folder)
        if count.lost or count.duplicated or count.problems:
            problems.append(f"{place}: {count}")
    for path in outbox.rglob("*"):
        if path.name.startswith(".") and path.name.endswith((".partial", ".tmp")):
            problems.append(f"a half-written thing in the outbox: {path}")
    return problems


def all_finished(root: Path, dropped: list[Dropped]) -> bool:
    inbox, outbox = root / "inbox", root / "outbox"
    for item in dropped:
        folder = inbox / item.subdir if item.subdir else inbox
        try:
            document = json.loads((folder / f"{item.stem}.status").read_bytes())
        except (FileNotFoundError, ValueError):
            return False
        if document.get("status") not in FINAL or not document.get("outbox"):
            return False
        if not (outbox / document["outbox"] / "status.json").is_file():
            return False
    jobs = root / "state" / "jobs"
    return not (jobs.is_dir() and any(jobs.iterdir()))


def journal_lines(root: Path) -> set[bytes]:
    """The whole result lines in the journals of the jobs in the spool: what is done."""
    lines: set[bytes] = set()
    for path in (root / "state" / "jobs").glob("*/out/results.jsonl"):
        data = path.read_bytes()
        lines.update(data[: data.rfind(b"\n") + 1].splitlines())
    return lines


def requests_run(log: Path) -> int:
    """How many requests the fake engine took in, from its `fake_log_requests` file."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_bytes().splitlines() if line.strip())


# -- the figures ---------------------------------------------------------------------------


@dataclass
class Figures:
    """What the crash tests report at the end of the session."""

    trials: int = 0
    kills: int = 0
    engine_kills: int = 0
    lines: int = 0
    lost: int = 0
    duplicated: int = 0
    valid_lines: int = 0
    requests_run: int = 0
    counted_kills: int = 0  # the kills in trials whose engine counted its requests
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(
        self, kind: str, kills: int, count: Count, valid_lines: int, requests_run: int | None
    ) -> None:
        """One trial; `requests_run` None where the engine does not count them (vLLM)."""
        self.trials += 1
        if kind == "engine":
            self.engine_kills += kills
        else:
            self.kills += kills
        self.lines += count.lines
        self.lost += count.lost
        self.duplicated += count.duplicated
        figures = self.by_kind.setdefault(
            kind, {"trials": 0, "kills": 0, "lost": 0, "duplicated": 0, "run_again": 0}
        )
        figures["trials"] += 1
        figures["kills"] += kills
        figures["lost"] += count.lost
        figures["duplicated"] += count.duplicated
        if requests_run is None:
            figures["run_again"] = None
            return
        self.counted_kills += kills
        self.valid_lines += valid_lines
        self.requests_run += requests_run
        figures["run_again"] += max(requests_run - valid_lines, 0)

    def summary(self) -> dict[str, Any]:
        run_again = max(self.requests_run - self.valid_lines, 0)
        crashes = self.counted_kills
        per_kind = {
            kind: {
                **figures,
                "run_again_per_crash": round(figures["run_again"] / figures["kills"], 1)
                if figures["kills"] and figures["run_again"] is not None
                else None,
            }
            for kind, figures in self.by_kind.items()
        }
        return {
            "kill_trials": self.trials,
            "kills_of_the_service": self.kills,
            "kills_of_the_engine": self.engine_kills,
            "request_lines": self.lines,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "requests_run_again": run_again,
            "run_again_per_crash": round(run_again / crashes, 1) if crashes else None,
            "by_kind": per_kind,
        }


# -- a real `batchbox serve` that is killed --------------------------------------------------


def start_server(config_path: Path, timeout: float = 30.0) -> Server:
    """`batchbox serve` started, with a longer wait than usual for a busy machine."""
    return Server(config_path).start(timeout)
