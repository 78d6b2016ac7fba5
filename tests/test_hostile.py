"""Hostile input against a live `batchbox serve`: the inbox is a share anyone can write to.

Whatever is dropped, the service keeps running, answers with a clear error, loses nothing
valid and reaches nothing beyond its folders. The corpus (tests/hostilekit.py) goes to ONE
service in batches, with a good job after each batch; each item is then checked on its own.
Drops that have stopped the service outright each get a small service of their own first.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import assert_every_line_once, read_jsonl
from hostilekit import (
    DELIVERED,
    IGNORED,
    KEPT,
    REFUSED,
    REMOVED,
    REPLACED_FIRST,
    REPLACED_SECOND,
    SOLO,
    CorpusRun,
    HostileServer,
    Item,
    build_corpus,
    can_drop_capabilities,
    digest_of,
    fingerprint,
    good_item,
    hostile_config,
    no_reader,
    pwned_path,
    run_corpus,
    snapshot,
)
from servicekit import OUTBOX_FILES, read_json, wait_for

UNPRIVILEGED = can_drop_capabilities()

# -- drops that have stopped or frozen the whole service: a service each, and a restart --

FREEZE = (
    "; the OSError after the rename becomes ClaimInterrupted, and Service.claim calls "
    "disk_trouble for any errno: nothing is claimed or started for 30 s, doubling at each "
    "failed re-adoption"
)
SOLO_BUGS = {}


def _solo_param(item: Item):
    marks = []
    if item.key in SOLO_BUGS:
        marks = [pytest.mark.xfail(strict=True, reason=SOLO_BUGS[item.key])]
    if item.unprivileged and not UNPRIVILEGED:
        marks = [pytest.mark.skip(reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")]
    return pytest.param(item, marks=marks, id=item.key)


@dataclass
class Place:
    inbox: Path
    outbox: Path
    spool: Path


@pytest.mark.parametrize("item", [_solo_param(item) for item in SOLO])
def test_a_drop_that_can_stop_the_service_is_answered_and_the_service_goes_on(
    item: Item, tmp_path: Path
) -> None:
    server = HostileServer(hostile_config(tmp_path), unprivileged=item.unprivileged).start()
    config = server.config
    place = Place(config.folder("inbox"), config.folder("outbox"), config.folder("state") / "jobs")
    try:
        item.make(place.inbox)
        time.sleep(1.2)  # settled and claimed, or noted by a rescan
        good = good_item(1)
        good.make(place.inbox)
        wait_for(
            lambda: good.handled(place.inbox, place.outbox) or not server.alive(),
            10,
            "a good job dropped after it",
        )
        assert server.alive(), f"batchbox serve stopped:\n{server.tail()}"
        assert good.handled(place.inbox, place.outbox), "a good job dropped next is delivered"
        wait_for(lambda: item.handled(place.inbox, place.outbox), 5, item.key)
        CHECKS[item.outcome](place, item)
        # What the drop left must not stop the next start either.
        code, _ = server.terminate()
        assert code == 0, server.tail()
        server = HostileServer(server.config_path, "restart.log", item.unprivileged).start()
        wait_for(lambda: not any(place.spool.iterdir()), 10, "the spool to empty")
        assert server.alive(), server.tail()
    finally:
        server.kill()


# -- the corpus, through one service --------------------------------------------------------


@dataclass
class Hostile:
    server: HostileServer
    base: Path  # the parent of the config root: nothing may be written here but in root
    root: Path
    run: CorpusRun
    token: str
    before: dict

    @property
    def inbox(self) -> Path:
        return self.server.config.folder("inbox")

    @property
    def outbox(self) -> Path:
        return self.server.config.folder("outbox")

    @property
    def spool(self) -> Path:
        return self.server.config.folder("state") / "jobs"

    @property
    def place(self) -> Place:
        return Place(self.inbox, self.outbox, self.spool)

    def item(self, key: str) -> Item:
        return next(item for item in self.run.items if item.key == key)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "box"
    token = secrets.token_hex(6)
    items = build_corpus(base / "outside", token)
    before = snapshot(base, exclude=root)
    server = HostileServer(hostile_config(root)).start()
    hostile = None
    try:
        inbox, outbox = server.config.folder("inbox"), server.config.folder("outbox")
        run = run_corpus(inbox, outbox, items)
        hostile = Hostile(server, base, root, run, token, before)
        yield hostile
    finally:
        (hostile.server if hostile else server).kill()


def spool_leftovers(place: Place, item: Item) -> list[str]:
    """Spool folders still holding the item's job: taken, but neither queued nor delivered."""
    left = []
    for work in place.spool.iterdir() if place.spool.is_dir() else []:
        try:
            record = json.loads((work / "job.json").read_bytes())
        except (OSError, ValueError):
            continue
        if record.get("stem") == item.stem and record.get("subdir") == item.subdir:
            left.append(f"{work.name}: {record.get('status')}")
    return left


def test_the_service_is_alive_and_answered_every_item(hostile: Hostile) -> None:
    run = hostile.run
    assert hostile.server.alive(), hostile.server.tail()
    assert run.stalled_after is None, f"no good job delivered after batch {run.stalled_after}"
    assert run.unhandled == [], run.unhandled
    assert not hostile.server.events("job_crashed"), hostile.server.events("job_crashed")
    good = good_item(99)
    good.make(hostile.inbox)
    wait_for(lambda: good.handled(hostile.inbox, hostile.outbox), 15, "a last good job")


def test_good_jobs_between_bad_ones_are_delivered_complete_and_untouched(
    hostile: Hostile,
) -> None:
    assert len(hostile.run.goods) == 4
    for good in hostile.run.goods:
        folder = hostile.outbox / good.stem
        assert OUTBOX_FILES <= {path.name for path in folder.iterdir()}
        assert read_json(folder / "status.json")["status"] == "completed"
        assert digest_of(folder / "input.jsonl") == good.digest
        results, errors = assert_every_line_once(folder / "input.jsonl", folder)
        assert len(results) == 10 and errors == []
        assert read_json(hostile.inbox / f"{good.stem}.status")["status"] == "completed"


# Items whose answer is wrong today: the bug, where it lives, and what happens.
BUGS = {}

CORPUS_KEYS = [
    "random-binary",
    "latin-1",
    "empty",
    "blank-lines",
    "nested-100000-deep",
    "nan-temperature",
    "10000-digit-temperature",
    "duplicate-custom-ids",
    "symlink-to-etc-passwd",
    "symlink-outside-the-inbox",
    "fifo",
    "directory",
    "line-of-50-MB",
    "more-lines-than-max-lines",
    "more-bytes-than-max-file-bytes",
    "hard-link-to-outside-file",
    "name-with-spaces",
    "unicode-name",
    "leading-dash",
    "newline-in-name",
    "ticket-python-tag",
    "ticket-unknown-key",
    "ticket-unknown-model",
    "ticket-engine-options",
    "ticket-trust-remote-code",
    "ticket-model-path",
    "ticket-model-hub",
    "ticket-model-source",
    "ticket-outbox-path",
    "ticket-alias-expansion",
    "cancel-for-no-job",
    "symlinked-folder-to-outside",
    "file-inside-a-folder-named-jsonl",
]


def _param(key: str):
    marks = [pytest.mark.xfail(strict=True, reason=BUGS[key])] if key in BUGS else []
    return pytest.param(key, marks=marks, id=key)


def test_the_corpus_is_the_one_checked_here(hostile: Hostile) -> None:
    assert [item.key for item in hostile.run.items if not item.custom] == CORPUS_KEYS


@pytest.mark.parametrize("key", [_param(key) for key in CORPUS_KEYS])
def test_each_item_gets_its_answer(hostile: Hostile, key: str) -> None:
    item = hostile.item(key)
    CHECKS[item.outcome](hostile.place, item)
    for path, expected in item.guarded.items():
        assert fingerprint(path) == expected, f"{path} changed"


def check_error(document: dict, item: Item) -> None:
    assert document["status"] == item.status, document
    if item.status == "failed":
        error = document["errors"][0]
        assert error["code"] == item.code, document["errors"]
        assert item.word.lower() in error["message"].lower(), error


def check_delivered(place: Place, item: Item) -> None:
    inbox, outbox = place.inbox, place.outbox
    assert not os.path.lexists(inbox / item.name), "taken files leave the inbox"
    assert spool_leftovers(place, item) == []
    if item.sidecar:
        document = read_json(item.status_path(inbox))
        check_error(document, item)
        assert document["outbox"], document
    folder = item.outbox_folder(inbox, outbox)
    wait_for(lambda: (folder / "status.json").is_file(), 5, f"{folder} to be delivered")
    assert OUTBOX_FILES <= {path.name for path in folder.iterdir()}
    status = read_json(folder / "status.json")
    check_error(status, item)
    if item.digest is not None:
        assert digest_of(folder / "input.jsonl") == item.digest, "input.jsonl is not as dropped"
    counts = status["request_counts"]
    assert counts["total"] == request_lines(folder / "input.jsonl")
    assert counts["total"] == counts["completed"] + counts["failed"], counts
    results, errors = every_line_once(folder / "input.jsonl", folder)
    if item.line is not None:
        own = [record["error"] for record in errors if record["error"]["line"] == item.line]
        assert own and own[0]["code"] == item.code, own
        assert item.word.lower() in own[0]["message"].lower(), own
    if item.has_ticket:
        assert (folder / f"{item.stem}.yaml").is_file(), "the ticket goes with its job"


def request_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for data in handle if data.strip())


def every_line_once(input_path: Path, folder: Path) -> tuple[list, list]:
    """helpers.assert_every_line_once, for input that Python's json cannot even fail on: it
    raises RecursionError on a line nested 100,000 deep. Such a line is handed to the helper
    as a line of the same number that is not JSON, which is what the service saw in it."""
    try:
        return assert_every_line_once(input_path, folder)
    except RecursionError:
        pass
    with tempfile.TemporaryDirectory() as scratch:
        readable = Path(scratch) / "input.jsonl"
        with open(input_path, "rb") as source, open(readable, "wb") as target:
            for data in source:
                try:
                    json.loads(data)
                except RecursionError:
                    data = b"not JSON\n"
                except ValueError:
                    pass
                target.write(data)
        return assert_every_line_once(readable, folder)


def check_refused(place: Place, item: Item) -> None:
    document = read_json(item.status_path(place.inbox))
    check_error(document, item)
    path = place.inbox / item.name
    assert stat.S_IFMT(os.lstat(path).st_mode) == item.file_type, "left where it was, as it was"
    if item.file_type == stat.S_IFIFO:
        assert no_reader(path), "the service holds the FIFO open"
    assert not (place.outbox / item.stem).exists()
    assert spool_leftovers(place, item) == []


def check_removed(place: Place, item: Item) -> None:
    assert not os.path.lexists(place.inbox / item.name)
    assert not item.status_path(place.inbox).exists()
    assert not (place.outbox / item.stem).exists()


def check_ignored(place: Place, item: Item) -> None:
    path = place.inbox / item.name
    assert path.is_file(), f"{item.name} was taken"
    if item.digest is not None:
        assert digest_of(path) == item.digest
    assert not item.status_path(place.inbox).exists()
    assert not (place.outbox / item.subdir / item.stem).exists()


def check_kept(place: Place, item: Item) -> None:
    """Not lost: still where it was dropped, or delivered."""
    if not os.path.lexists(place.inbox / item.name):
        assert (item.outbox_folder(place.inbox, place.outbox) / "status.json").is_file()


CHECKS = {
    DELIVERED: check_delivered,
    REFUSED: check_refused,
    REMOVED: check_removed,
    IGNORED: check_ignored,
    KEPT: check_kept,
}


def test_a_line_over_max_line_bytes_gets_line_too_long_in_errors_jsonl(hostile: Hostile) -> None:
    item = hostile.item("line-of-50-MB")
    error = read_jsonl(hostile.outbox / item.stem / "errors.jsonl")[0]["error"]
    assert error["line"] == 1
    assert error["code"] == "line_too_long", error


def test_a_file_truncated_while_it_runs_loses_no_line_or_fails_saying_so(
    hostile: Hostile,
) -> None:
    item = hostile.item("truncated-while-it-runs")
    folder = item.outbox_folder(hostile.inbox, hostile.outbox)
    status = read_json(folder / "status.json")
    if status["status"] == "failed":
        assert "changed" in status["errors"][0]["message"], status["errors"]
        return
    assert status["status"] == "completed", status
    counts = status["request_counts"]
    assert counts["total"] == counts["completed"] + counts["failed"], counts
    assert_every_line_once(item.original, folder)


def test_a_file_replaced_right_after_its_claim_is_a_second_job(hostile: Hostile) -> None:
    inputs = {}
    for name in ("replaced", "replaced-2"):
        folder = hostile.outbox / name
        assert read_json(folder / "status.json")["status"] == "completed"
        results, errors = assert_every_line_once(folder / "input.jsonl", folder)
        assert errors == []
        inputs[(folder / "input.jsonl").read_bytes()] = len(results)
    assert inputs == {REPLACED_FIRST: 5, REPLACED_SECOND: 3}
    assert read_json(hostile.inbox / "replaced.status")["status"] == "completed"


STATUS_KEYS = {
    "id",
    "input",
    "model",
    "endpoint",
    "status",
    "request_counts",
    "queue_position",
    "created_at",
    "in_progress_at",
    "completed_at",
    "updated_at",
    "eta",
    "usage",
    "throughput",
    "outbox",
    "errors",
}


def test_a_refusal_status_has_every_key_of_the_status_format(hostile: Hostile) -> None:
    document = read_json(hostile.item("fifo").status_path(hostile.inbox))
    assert STATUS_KEYS <= set(document), sorted(STATUS_KEYS - set(document))


def test_nothing_is_written_outside_the_config_root(hostile: Hostile) -> None:
    assert snapshot(hostile.base, exclude=hostile.root) == hostile.before
    assert not os.path.lexists(pwned_path(hostile.token)), "the YAML tag ran"
    # The ticket that names `outbox: /etc` (and every other) wrote nothing there.
    assert not {item.stem for item in hostile.run.items} & set(os.listdir("/etc"))


# Last: it stops the corpus's service and starts a new one on what the corpus left.
def test_the_service_starts_again_on_what_the_corpus_left(hostile: Hostile) -> None:
    code, seconds = hostile.server.terminate()
    assert code == 0, hostile.server.tail()
    hostile.server = HostileServer(hostile.server.config_path, "restart.log").start()
    wait_for(lambda: not any(hostile.spool.iterdir()), 10, "the spool to empty")
    good = good_item(100)
    good.make(hostile.inbox)
    wait_for(lambda: good.handled(hostile.inbox, hostile.outbox), 15, "a good job after restart")
