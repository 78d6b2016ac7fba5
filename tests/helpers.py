"""Small shared helpers for the tests: request lines, JSONL files, and the SPEC §5 invariant."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

# Set by .ci/run, which installs the tools: there a test never skips for want of one.
REQUIRE_TOOLS = "BATCHBOX_REQUIRE_TOOLS"


def requires_tool(name: str, package: str | None = None) -> pytest.MarkDecorator:
    """Skip, saying why, a test that needs a program this machine lacks (a fresh clone need
    not have it); where $BATCHBOX_REQUIRE_TOOLS is set it runs, and fails without it."""
    missing = shutil.which(name) is None and not os.environ.get(REQUIRE_TOOLS)
    return pytest.mark.skipif(
        missing,
        reason=f"{name} is not installed (apt-get install {package or name}); CI installs it",
    )


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def chat_line(custom_id: Any, content: str = "hello there", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": messages, **body},
    }


def completion_line(custom_id: Any, prompt: Any = "once upon a time", **body: Any) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"prompt": prompt, **body},
    }


def embedding_line(custom_id: Any, text: Any = "some text", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": EMBEDDINGS,
        "body": {"input": text, **body},
    }


def encode(item: dict[str, Any] | bytes | str) -> bytes:
    """One line's bytes, without its newline: dicts as JSON, bytes as they are."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return json.dumps(item).encode()


def write_jsonl(path: Path, items: list[dict[str, Any] | bytes | str]) -> Path:
    path.write_bytes(b"".join(encode(item) + b"\n" for item in items))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def input_lines(path: Path) -> dict[int, str | None]:
    """Each non-blank line's 1-based number and the custom_id it carries, if readable.

    Read here independently of the code under test, the plain way a user's script would.
    """
    lines: dict[int, str | None] = {}
    for number, data in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not data.strip():
            continue
        if number == 1:
            data = data.removeprefix(b"\xef\xbb\xbf")
        try:
            item = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            item = None
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        lines[number] = custom_id if isinstance(custom_id, str) and custom_id else None
    return lines


def assert_every_line_once(input_path: Path, out_folder: Path) -> tuple[list, list]:
    """SPEC §5: every non-blank input line is in exactly one of results or errors, once.

    Results join to the first line with their custom_id; errors by `error.line`. Returns the
    result and error records for further checks.
    """
    lines = input_lines(input_path)
    first_line_of: dict[str, int] = {}
    for number, custom_id in lines.items():
        if custom_id is not None:
            first_line_of.setdefault(custom_id, number)
    results = read_jsonl(out_folder / "results.jsonl")
    errors = read_jsonl(out_folder / "errors.jsonl")

    result_lines = []
    for record in results:
        assert record["error"] is None and record["response"]["status_code"] == 200, record
        assert record["custom_id"] in first_line_of, f"result for unknown {record['custom_id']}"
        result_lines.append(first_line_of[record["custom_id"]])
    error_lines = []
    for record in errors:
        assert record["response"] is None, record
        line = record["error"]["line"]
        assert line in lines, f"error for line {line}, which is not a request line"
        if record["custom_id"] is not None:
            assert record["custom_id"] == lines[line], record
        error_lines.append(line)

    twice = sorted(n for n, count in Counter(result_lines).items() if count > 1)
    assert not twice, f"lines with more than one result: {twice}"
    twice = sorted(n for n, count in Counter(error_lines).items() if count > 1)
    assert not twice, f"lines with more than one error: {twice}"
    both = sorted(set(result_lines) & set(error_lines))
    assert not both, f"lines in both results and errors: {both}"
    missing = sorted(set(lines) - set(result_lines) - set(error_lines))
    assert not missing, f"lines in neither results nor errors: {missing}"
    return results, errors


ROOT = Path(__file__).resolve().parent.parent


def model_preparation():
    """`scripts/prepare_models.py`, the setup step that makes the shipped models' folders,
    imported as a module (it is a script, not part of an installed package)."""
    import importlib.util
    import sys

    name = "prepare_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def shipped_config(folder: Path, **overrides: Any) -> Path:
    """The shipped config.yaml, with its folders in `folder`, its model paths absolute, the
    shipped models prepared, and `overrides` applied: real vLLM with the real small models."""
    import os

    import yaml

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_preparation().prepare_models(ROOT / "models")
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data.update(inbox="inbox", outbox="outbox", state="state", **overrides)
    for model in data["models"].values():
        if "path" in model:
            model["path"] = str(ROOT / model["path"])
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fill(folder: Path, leave: int = 0) -> list[Path]:
    """Fill the filesystem with 64 KiB files, then remove some to leave about `leave` bytes."""
    folder.mkdir(exist_ok=True)
    chunk = b"x" * 65536
    files = []
    while True:
        path = folder / f"filler{len(files)}"
        try:
            with open(path, "wb") as handle:
                handle.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC
            path.unlink(missing_ok=True)
            break
        files.append(path)
    while leave > 0 and files:
        files.pop().unlink()
        leave -= 65536
    return files
