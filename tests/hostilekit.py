"""A corpus of hostile drops for the inbox, each with the answer it must get.

The inbox is a share anyone can write to. Each `Item` here makes one bad (or odd) thing in
the inbox and says what the service must answer: a failed `.status` with an error code and a
word of its message, an outbox folder holding every line once, or nothing at all. The
corpus is generated, never stored: `build_corpus` writes what must lie outside the inbox
(link targets, originals) at once, and each item's `make` drops its part when asked.

Shared by tests/test_hostile.py and tests/hostile_memory.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servicekit import Server, wait_for, write_config

MB = 1 << 20
LIMITS = {"max_file_bytes": 60 * MB, "max_line_bytes": 1 * MB, "max_lines": 1000}
# About 400 requests a second: small jobs finish at once, the 900-line one runs ~2 s.
ENGINE = {"fake_seconds_per_step": 0.02, "fake_batch": 8}
CHAT = "/v1/chat/completions"

DELIVERED = "delivered"  # claimed: a final `.status`, and an outbox folder with every line once
REFUSED = "refused"  # never claimed: a failed `.status` beside it; the thing itself left alone
REMOVED = "removed"  # a `.cancel` for no job: removed, and nothing else happens
IGNORED = "ignored"  # not a drop at all: left alone, nothing written beside it
KEPT = "kept"  # not lost: left where it is, or delivered

FINAL = ("completed", "failed", "cancelled")


def hostile_config(root: Path, **overrides: Any) -> Path:
    """The fake engine with small limits, so over-limit input is cheap to make."""
    settings: dict[str, Any] = {
        "settle_seconds": 0.3,
        "rescan_seconds": 1,
        "stop_timeout_seconds": 10,
        "limits": LIMITS,
        "engine": ENGINE,
    }
    settings.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    return write_config(root, **settings)


# -- the service, optionally without root's capabilities ---------------------------------


def can_drop_capabilities() -> bool:
    """Whether `setpriv` can start a process without any capability (as the systemd unit's
    empty CapabilityBoundingSet does): then root's service cannot read a file mode 000."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


class HostileServer(Server):
    """`batchbox serve` with a log of its own (so that a restart waits for its own
    `service_ready`) and, optionally, without capabilities."""

    def __init__(self, config_path: Path, log_name: str = "serve.log", unprivileged=False):
        prefix = ("setpriv", "--bounding-set=-all", "--") if unprivileged else ()
        super().__init__(config_path, log_name, prefix)


# -- request lines -------------------------------------------------------------------------


def request(custom_id: str, text: str = "hello there", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **body},
    }


def line(item: dict[str, Any]) -> bytes:
    return json.dumps(item, ensure_ascii=False).encode() + b"\n"


def requests(prefix: str, count: int, text: str = "hello there") -> bytes:
    return b"".join(line(request(f"{prefix}{index}", f"{text} {index}")) for index in range(count))


def digest_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MB):
            sha.update(block)
    return sha.hexdigest()


def fingerprint(path: Path) -> tuple | None:
    """What must not change about a path outside the inbox: type, size, mtime, content."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    content = digest_of(path) if stat.S_ISREG(info.st_mode) else None
    if stat.S_ISLNK(info.st_mode):
        content = os.readlink(path)
    return (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, content)


# -- one item --------------------------------------------------------------------------------


@dataclass
class Item:
    key: str  # the test id
    name: str  # what is dropped, relative to the inbox
    outcome: str  # DELIVERED, REFUSED, REMOVED, IGNORED or KEPT
    make: Callable[[Path], None] = field(repr=False)
    status: str | None = None  # the job's final state
    code: str | None = None  # errors[0].code in the .status, or the code of `line`
    word: str | None = None  # a word the error message holds (any case)
    line: int | None = None  # the line that must get its own error in errors.jsonl
    batch: int = 1
    digest: str | None = None  # sha256 of the bytes dropped: input.jsonl must be them
    has_ticket: bool = False
    sidecar: bool = True  # False where no `.status` can stand beside it
    follow_up: Callable[[Path], None] | None = field(default=None, repr=False)
    done: Callable[[Path, Path], bool] | None = field(default=None, repr=False)
    guarded: dict[Path, tuple | None] = field(default_factory=dict, repr=False)
    original: Path | None = None  # a copy of what was dropped, kept outside the inbox
    custom: bool = False  # checked by a test of its own, not the generic one
    file_type: int | None = None  # what a refused thing must still be (stat.S_IFLNK, ...)
    unprivileged: bool = False  # needs a service without root's capabilities

    @property
    def stem(self) -> str:
        return Path(self.name).name.removesuffix(".jsonl")

    @property
    def subdir(self) -> str:
        parent = Path(self.name).parent
        return "" if parent == Path(".") else str(parent)

    def status_path(self, inbox: Path) -> Path:
        return inbox / self.subdir / f"{self.stem}.status"

    def outbox_folder(self, inbox: Path, outbox: Path) -> Path:
        document = read_status(self.status_path(inbox)) if self.sidecar else None
        if document and document.get("outbox"):
            return outbox / document["outbox"]
        return outbox / self.subdir / self.stem

    def handled(self, inbox: Path, outbox: Path) -> bool:
        """Whether the service has answered, rightly or wrongly: time to look."""
        if self.done is not None:
            return self.done(inbox, outbox)
        if self.outcome == REMOVED:
            return not os.path.lexists(inbox / self.name)
        if self.outcome in (IGNORED, KEPT):
            return True
        if not self.sidecar:
            return not os.path.lexists(inbox / self.name)
        document = read_status(self.status_path(inbox))
        if document is None or document.get("status") not in FINAL:
            return False
        if self.outcome == REFUSED or document.get("id") is None:
            return True  # refused, even if it was meant to be delivered
        return (outbox / (document.get("outbox") or "\0") / "status.json").is_file()


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def put(folder: Path, name: str, data: bytes, mode: int | None = None) -> Path:
    """Drop a file whole: written under an ignored name, then renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".hostile-{os.getpid()}-{time.monotonic_ns()}"
    temporary.write_bytes(data)
    if mode is not None:
        os.chmod(temporary, mode)
    final = folder / name
    os.rename(temporary, final)
    return final


def _dropping(name: str, data: bytes, mode: int | None = None) -> Callable[[Path], None]:
    def make(inbox: Path) -> None:
        put(inbox / Path(name).parent, Path(name).name, data, mode)

    return make


def _ticket_and_data(stem: str, ticket: str, data: bytes) -> Callable[[Path], None]:
    def make(inbox: Path) -> None:
        put(inbox, f"{stem}.yaml", ticket.encode())
        put(inbox, f"{stem}.jsonl", data)

    return make


def job_item(key: str, name: str, data: bytes, **expect: Any) -> Item:
    return Item(
        key=key,
        name=name,
        outcome=DELIVERED,
        make=expect.pop("make", None) or _dropping(name, data),
        digest=hashlib.sha256(data).hexdigest(),
        **expect,
    )


def good_item(index: int) -> Item:
    """A plain valid job, dropped between the bad ones."""
    return job_item(f"good-{index}", f"good-{index}.jsonl", requests(f"g{index}-", 10), batch=0)


# -- the corpus ------------------------------------------------------------------------------


def build_corpus(outside: Path, token: str) -> list[Item]:
    """Every hostile item, in batches. `outside` is a folder beside the config root that
    the service must never write; `token` names the file a YAML tag would create."""
    outside.mkdir(parents=True, exist_ok=True)
    items = [*_bad_bytes(), *_bad_kinds(outside), *_big(outside)]
    items += [*_names(), *_tickets(token), *_moving(outside)]
    return items


def _failed(key: str, name: str, data: bytes, code: str, word: str, **more: Any) -> Item:
    """A file that fails as a whole, with `code` in its `.status`."""
    return job_item(key, name, data, status="failed", code=code, word=word, **more)


def _second_line_fails(key: str, name: str, second: bytes, code: str, word: str) -> Item:
    """A file whose second line fails on its own with `code`, while the first runs."""
    data = line(request("anchor")) + second
    return job_item(key, name, data, status="completed", code=code, word=word, line=2)


def _bad_bytes() -> list[Item]:
    nan = line(request("nan", temperature="@NAN@")).replace(b'"@NAN@"', b"NaN")
    # 10,000 digits; written as a decimal so that a reader in Python (int() stops at 4,300
    # digits) sees the same custom_id as the service.
    digits = b"1" + b"0" * 9_998 + b".5"
    huge = line(request("huge", temperature="@HUGE@")).replace(b'"@HUGE@"', digits)
    nesting = b"[" * 100_000 + b"]" * 100_000
    deep = b'{"custom_id": "deep", "method": "POST", "url": "%s", "body": {"messages": %s}}\n'
    deep %= (CHAT.encode(), nesting)
    binary = b"\x89PNG\r\n\x1a\n" + random.Random(1234).randbytes(64 * 1024)
    latin = json.dumps(request("café", "résumé"), ensure_ascii=False).encode("latin-1")
    dupes = line(request("dup")) + line(request("dup", "again")) + line(request("other"))
    return [
        _failed("random-binary", "binary.jsonl", binary, "invalid_encoding", "UTF-8"),
        _failed("latin-1", "latin.jsonl", requests("ok", 2) + latin + b"\n", "invalid_encoding",
                "UTF-8"),
        _failed("empty", "empty.jsonl", b"", "empty_file", "no request lines"),
        _failed("blank-lines", "blank.jsonl", b"\n\n   \n\t\r\n\n", "empty_file",
                "no request lines"),
        _second_line_fails("nested-100000-deep", "deep.jsonl", deep, "invalid_json", "nested"),
        _second_line_fails("nan-temperature", "nan.jsonl", nan, "invalid_json", "JSON"),
        _second_line_fails("10000-digit-temperature", "huge-number.jsonl", huge,
                           "invalid_request", "temperature"),
        job_item("duplicate-custom-ids", "dupes.jsonl", dupes, status="completed",
                 code="duplicate_custom_id", word="dup", line=2),
    ]  # fmt: skip


def _bad_kinds(outside: Path) -> list[Item]:
    secret = outside / "secret.jsonl"
    secret.write_bytes(requests("secret", 3))
    passwd = Path("/etc/passwd")

    def link(name: str, target: Path) -> Callable[[Path], None]:
        return lambda inbox: (inbox / name).symlink_to(target)

    def refused(key: str, name: str, make: Callable[[Path], None], word: str, **more) -> Item:
        return Item(key=key, name=name, outcome=REFUSED, make=make, status="failed",
                    code="not_a_regular_file", word=word, **more)  # fmt: skip

    return [
        refused("symlink-to-etc-passwd", "etc-passwd.jsonl", link("etc-passwd.jsonl", passwd),
                "symbolic link", guarded={passwd: fingerprint(passwd)}, file_type=stat.S_IFLNK),
        refused("symlink-outside-the-inbox", "outside-link.jsonl",
                link("outside-link.jsonl", secret), "symbolic link",
                guarded={secret: fingerprint(secret)}, file_type=stat.S_IFLNK),
        refused("fifo", "pipe.jsonl", lambda inbox: os.mkfifo(inbox / "pipe.jsonl"), "pipe",
                file_type=stat.S_IFIFO),
        refused("directory", "folder.jsonl", lambda inbox: (inbox / "folder.jsonl").mkdir(),
                "folder", file_type=stat.S_IFDIR),
    ]  # fmt: skip


def _long_line_chunks(size: int) -> Iterator[bytes]:
    """One request line with `size` bytes of content, in blocks of a megabyte."""
    yield (
        b'{"custom_id": "long", "method": "POST", "url": "%s", "body": {"messages": ['
        % (CHAT.encode())
        + b'{"role": "user", "content": "'
    )
    block = b"a" * MB
    for _ in range(size // MB):
        yield block
    yield b'"}]}}\n'


def _zeros_digest(head: bytes, size: int) -> str:
    sha = hashlib.sha256(head)
    zeros = bytes(MB)
    rest = size - len(head)
    for _ in range(rest // MB):
        sha.update(zeros)
    sha.update(bytes(rest % MB))
    return sha.hexdigest()


def _big(outside: Path) -> list[Item]:
    # The 50 MB line and the sparse file are written straight into the inbox (under an
    # ignored name, then renamed); only their digests are kept, never their bytes.
    long_size = 50 * MB
    long_digest = hashlib.sha256()
    for chunk in _long_line_chunks(long_size):
        long_digest.update(chunk)

    def make_long(inbox: Path) -> None:
        temporary = inbox / ".hostile-long"
        with open(temporary, "wb") as handle:
            for chunk in _long_line_chunks(long_size):
                handle.write(chunk)
        os.rename(temporary, inbox / "long-line.jsonl")

    head = requests("big", 3)
    sparse_size = 61 * MB

    def make_sparse(inbox: Path) -> None:
        temporary = inbox / ".hostile-sparse"
        temporary.write_bytes(head)
        os.truncate(temporary, sparse_size)  # a hole of NUL bytes: no disk, no time
        os.rename(temporary, inbox / "too-large.jsonl")

    hard_source = outside / "hard.jsonl"
    hard_source.write_bytes(requests("hard", 4))
    return [
        Item(key="line-of-50-MB", name="long-line.jsonl", outcome=DELIVERED, make=make_long,
             status="failed", code="no_valid_lines", word="over the limit",
             digest=long_digest.hexdigest(), batch=2),
        _failed("more-lines-than-max-lines", "many-lines.jsonl", requests("m", 1001),
                "too_many_lines", "1000", batch=2),
        Item(key="more-bytes-than-max-file-bytes", name="too-large.jsonl", outcome=DELIVERED,
             make=make_sparse, status="failed", code="file_too_large", word="over the limit",
             digest=_zeros_digest(head, sparse_size), batch=2),
        # Decided: a hard link is a regular file like any other. Claiming renames the link
        # into the spool; the file it shares its bytes with outside is never written.
        job_item("hard-link-to-outside-file", "hardlink.jsonl", hard_source.read_bytes(),
                 make=lambda inbox: os.link(hard_source, inbox / "hardlink.jsonl"),
                 status="completed", batch=2, guarded={hard_source: fingerprint(hard_source)}),
    ]  # fmt: skip


def _names() -> list[Item]:
    names = {
        "name-with-spaces": "with spaces.jsonl",
        "unicode-name": "résumé 日本.jsonl",
        "leading-dash": "-rf.jsonl",
        "newline-in-name": "new\nline.jsonl",
    }
    return [
        job_item(key, name, requests(f"{key}-", 3), status="completed", batch=2)
        for key, name in names.items()
    ]


def _after_status_folder(stem: str, data: bytes) -> Callable[[Path], None]:
    def make(inbox: Path) -> None:
        (inbox / f"{stem}.status").mkdir()
        put(inbox, f"{stem}.jsonl", data)

    return make


def _laughs(levels: int) -> str:
    """A ticket of a few hundred bytes whose aliases expand to 10**levels strings."""
    lines = ['  l0: &l0 ["ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha"]']
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "metadata:\n" + "\n".join(lines) + "\n"


TICKETS = {
    # key: (ticket text, expected code, word of the message)
    "ticket-python-tag": (
        'model: !!python/object/apply:os.system ["touch {pwned}"]\n',
        "invalid_ticket",
        "python/object/apply",
    ),
    "ticket-unknown-key": ("colour: blue\n", "invalid_ticket", "colour"),
    "ticket-unknown-model": ("model: gpt-9\n", "unknown_model", "gpt-9"),
    "ticket-engine-options": (
        "engine: {gpu_memory_utilization: 0.99}\n",
        "invalid_ticket",
        "engine",
    ),
    "ticket-trust-remote-code": (
        "trust_remote_code: true\n",
        "invalid_ticket",
        "trust_remote_code",
    ),
    "ticket-model-path": ("path: /srv/models/evil\n", "invalid_ticket", "path"),
    "ticket-model-hub": ("hub: evil/model\n", "invalid_ticket", "hub"),
    "ticket-model-source": ("source: /srv/models/evil\n", "invalid_ticket", "source"),
    "ticket-outbox-path": ("outbox: /etc\n", "invalid_ticket", "outbox"),
    # Decided: aliases have no use in a five-key ticket; one that expands a few hundred bytes
    # into 100,000 strings (copied into every .status write) is refused, naming the alias.
    "ticket-alias-expansion": (_laughs(5), "invalid_ticket", "alias"),
}


def pwned_path(token: str) -> Path:
    return Path(f"/tmp/pwned-{token}")


def _tickets(token: str) -> list[Item]:
    items = []
    for key, (text, code, word) in TICKETS.items():
        stem = key.removeprefix("ticket-")
        data = requests(f"{stem}-", 2)
        text = text.replace("{pwned}", str(pwned_path(token)))
        make = _ticket_and_data(stem, text, data)
        item = _failed(key, f"{stem}.jsonl", data, code, word, make=make, batch=3, has_ticket=True)
        if key == "ticket-python-tag":
            item.guarded = {pwned_path(token): None}
        items.append(item)
    ghost = _dropping("ghost.cancel", b"")
    cancel = Item(
        key="cancel-for-no-job", name="ghost.cancel", outcome=REMOVED, make=ghost, batch=3
    )
    return [*items, cancel]


# -- items that move while the service handles them -------------------------------------------


def _moving(outside: Path) -> list[Item]:
    return [_truncated(outside), _replaced(), *_beside(outside)]


def _truncated(outside: Path) -> Item:
    """A large valid file whose writer still holds it open and truncates it to a third
    once the job runs: every line of what was dropped must still end in exactly one of
    results or errors, or the job fails, saying that its input changed."""
    data = b"".join(line(request(f"t{index}", "w" * 4000)) for index in range(900))
    original = outside / "originals" / "truncated.jsonl"
    original.parent.mkdir(parents=True, exist_ok=True)
    original.write_bytes(data)
    handle: dict[str, int] = {}

    def make(inbox: Path) -> None:
        descriptor = os.open(inbox / ".hostile-truncated", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(descriptor, data)
        os.rename(inbox / ".hostile-truncated", inbox / "truncated.jsonl")
        handle["fd"] = descriptor

    def follow_up(inbox: Path) -> None:
        descriptor = handle.pop("fd")
        try:
            wait_for(
                lambda: (
                    (read_status(inbox / "truncated.status") or {}).get("status")
                    in ("in_progress", *FINAL)
                ),
                30,
                "truncated.jsonl to run",
            )
            os.ftruncate(descriptor, len(data) // 3)
        finally:
            os.close(descriptor)

    return Item(
        key="truncated-while-it-runs", name="truncated.jsonl", outcome=DELIVERED, make=make,
        follow_up=follow_up, batch=4, original=original, custom=True,
    )  # fmt: skip


REPLACED_FIRST = requests("first-", 5)
REPLACED_SECOND = requests("second-", 3)


def _replaced() -> Item:
    """A file replaced by another of the same name right after it was claimed: two jobs."""

    def follow_up(inbox: Path) -> None:
        wait_for(lambda: (inbox / "replaced.status").exists(), 30, "replaced.jsonl claimed")
        put(inbox, "replaced.jsonl", REPLACED_SECOND)

    def done(inbox: Path, outbox: Path) -> bool:
        folders = [outbox / "replaced", outbox / "replaced-2"]
        return all((folder / "status.json").is_file() for folder in folders)

    return Item(key="replaced-after-its-claim", name="replaced.jsonl", outcome=DELIVERED,
                make=_dropping("replaced.jsonl", REPLACED_FIRST), follow_up=follow_up, done=done,
                batch=4, custom=True)  # fmt: skip


def _beside(outside: Path) -> list[Item]:
    """Things next to the inbox's own folders that the service must leave alone."""
    target = outside / "linked-folder"
    target.mkdir(parents=True, exist_ok=True)
    victim = target / "victim.jsonl"
    victim.write_bytes(requests("victim", 2))

    inner = requests("in", 2)

    def make_link(inbox: Path) -> None:
        (inbox / "linked").symlink_to(target, target_is_directory=True)

    return [
        # A symlinked folder: never followed, so nothing in it is taken or written beside.
        Item(key="symlinked-folder-to-outside", name="linked/victim.jsonl", outcome=IGNORED,
             make=make_link, batch=4,
             guarded={victim: fingerprint(victim), target: fingerprint(target)}),
        # A file inside the folder named folder.jsonl (refused in batch 1 as "a folder"):
        # left alone, as the rescan leaves it (it never descends into a folder named *.jsonl).
        Item(key="file-inside-a-folder-named-jsonl", name="folder.jsonl/inner.jsonl",
             outcome=IGNORED, make=_dropping("folder.jsonl/inner.jsonl", inner), batch=4,
             digest=hashlib.sha256(inner).hexdigest()),
    ]  # fmt: skip


# -- items that have stopped or frozen the whole service: each gets a service of its own ----


def _bad_name(inbox: Path) -> None:
    with open(os.fsencode(inbox) + b"/bad-\xff-name.jsonl", "wb") as handle:
        handle.write(requests("bad-name-", 2))


def _solo_ticket(key: str, stem: str, text: str, word: str) -> Item:
    data = requests(f"{stem}-", 2)
    make = _ticket_and_data(stem, text, data)
    return _failed(key, f"{stem}.jsonl", data, "invalid_ticket", word, make=make, has_ticket=True)


LONGEST_NAME = "x" * 249 + ".jsonl"  # 255 bytes, as long as a name may be

SOLO = [
    # Decided: only that the service goes on and the file is not lost (left, or delivered).
    Item(key="name-not-utf-8", name="bad-\udcff-name.jsonl", outcome=KEPT, make=_bad_name),
    # Decided: a folder is not a cancel; it is left alone, and the service goes on.
    Item(key="folder-named-x-cancel", name="stop.cancel", outcome=KEPT,
         make=lambda inbox: (inbox / "stop.cancel").mkdir()),
    # Decided: taken and delivered to outbox/<stem>/ like any other; only the `.status`
    # (256 bytes) cannot exist.
    job_item("name-of-255-bytes", LONGEST_NAME, requests("long-name-", 3), status="completed",
             sidecar=False),
    # Decided: a folder where the job's `.status` must go does not stop the job.
    job_item("folder-named-like-its-status", "status-folder.jsonl", requests("sf", 2),
             make=_after_status_folder("status-folder", requests("sf", 2)),
             status="completed", sidecar=False),
    # Decided: refused where it lies (the service, without CAP_DAC_OVERRIDE, cannot read a
    # file of mode 000): a file that cannot be read cannot be delivered either.
    Item(key="unreadable-file", name="locked.jsonl", outcome=REFUSED,
         make=_dropping("locked.jsonl", requests("locked", 2), mode=0), status="failed",
         code="claim_failed", word="permission", file_type=stat.S_IFREG, unprivileged=True),
    _solo_ticket("ticket-priority-over-64-bits", "bigint",
                 "priority: 100000000000000000000000000\n", "priority"),
    _solo_ticket("ticket-metadata-non-string-key", "intkey",
                 "metadata: {nested: {1: one}}\n", "metadata"),
    _solo_ticket("ticket-recursive-alias", "recursive",
                 "metadata: {loop: &loop [*loop]}\n", "alias"),
    _solo_ticket("ticket-nested-100000-deep", "deepticket",
                 "metadata: {a: " + "[" * 100_000 + "]" * 100_000 + "}\n", "ticket"),
]  # fmt: skip


# -- driving the corpus ------------------------------------------------------------------------


@dataclass
class CorpusRun:
    items: list[Item]
    goods: list[Item]
    unhandled: list[str]
    seconds: float
    stalled_after: int | None = None  # the batch after which a good job was not delivered


def run_corpus(
    inbox: Path,
    outbox: Path,
    items: list[Item],
    timeout: float = 90.0,
    on_batch: Callable[[int], None] = lambda batch: None,
) -> CorpusRun:
    """Drop the corpus batch by batch, a good job after each batch (and its delivery awaited,
    to prove the service still flows); then wait until every item is handled."""
    started = time.monotonic()
    goods: list[Item] = []
    threads: list[threading.Thread] = []
    stalled = None
    for batch in sorted({item.batch for item in items}):
        on_batch(batch)
        for item in (item for item in items if item.batch == batch):
            item.make(inbox)
            if item.follow_up is not None:
                thread = threading.Thread(target=_quietly, args=(item.follow_up, inbox))
                thread.start()
                threads.append(thread)
        good = good_item(batch)
        good.make(inbox)
        goods.append(good)
        try:
            wait_for(lambda good=good: good.handled(inbox, outbox), 30, good.key)
        except AssertionError:
            stalled = batch
            break
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and stalled is None:
        if all(item.handled(inbox, outbox) for item in items):
            break
        time.sleep(0.1)
    for thread in threads:
        thread.join(35)
    unhandled = [item.key for item in items if not item.handled(inbox, outbox)]
    return CorpusRun(items, goods, unhandled, time.monotonic() - started, stalled)


def _quietly(action: Callable[[Path], None], inbox: Path) -> None:
    try:
        action(inbox)
    except AssertionError:
        pass  # the item's own check reports what went wrong


def no_reader(fifo: Path) -> bool:
    """True when nobody holds the FIFO open for reading (opening it to write fails)."""
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        return error.errno == errno.ENXIO
    os.close(descriptor)
    return False


def snapshot(folder: Path, exclude: Path) -> dict[str, tuple | None]:
    """Every path under `folder` but `exclude`, with its fingerprint."""
    found: dict[str, tuple | None] = {}
    for path in _walk(folder, exclude):
        found[str(path.relative_to(folder))] = fingerprint(path)
    return found


def _walk(folder: Path, exclude: Path) -> Iterator[Path]:
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if path == exclude:
            continue
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path, exclude)
