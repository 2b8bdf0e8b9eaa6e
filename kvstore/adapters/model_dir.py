"""Check a local Hugging Face model folder before loading anything from it.

    config = check_model_dir("/models/llama3-8b")                      # weights + tokenizer
    config = check_model_dir(path, tokenizer=False, weights="safetensors")

Reads config.json as plain JSON first (for a family transformers does not know, its AutoConfig
fails with a message about its own registry), refuses families and layouts the adapter cannot
serve (`hf.check_config`), then checks that weight files and, when asked, tokenizer files that
this environment can read are there. A bad folder then fails in well under a second, with one
line that says what to change, instead of after the weights are loaded or a run has started.
Returns the transformers config (nothing else is read).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kvstore.adapters.hf import SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_config


class ModelDirError(ValueError):
    """The folder cannot be loaded or served; the one-line message says what is missing or unsupported."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tokenizer_problem(path: Path) -> str | None:
    """Why `path` holds no tokenizer this environment can load, or None when it holds one.

    Readable without optional packages: tokenizer.json (a fast tokenizer), vocab.json + merges.txt
    (byte-level BPE). tokenizer.model needs sentencepiece (or tiktoken: Llama 3's original format),
    *.tiktoken needs tiktoken.
    """
    if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return None
    if (path / "tokenizer.model").is_file():
        if _installed("sentencepiece") or _installed("tiktoken"):
            return None
        return ("has only tokenizer.model, which needs sentencepiece (or tiktoken) to read: "
                "pip install sentencepiece, or add the model's tokenizer.json")
    if any(path.glob("*.tiktoken")):
        return None if _installed("tiktoken") else "has only a *.tiktoken tokenizer: pip install tiktoken"
    return ("has no tokenizer files (tokenizer.json, vocab.json + merges.txt, or tokenizer.model): "
            "copy the model's tokenizer files into it")


def check_weights(path: str | Path, weights: str = "any") -> None:
    """ModelDirError unless `path` holds weight files: "any" (*.safetensors or pytorch_model*.bin)
    or "safetensors" (only those count)."""
    path = Path(path)
    if weights not in ("any", "safetensors"):
        raise ValueError(f"weights must be 'any' or 'safetensors', got {weights!r}")
    found = any(path.glob("*.safetensors")) or (weights == "any" and any(path.glob("pytorch_model*.bin")))
    if not found:
        kinds = "*.safetensors" if weights == "safetensors" else "*.safetensors or pytorch_model*.bin"
        raise ModelDirError(f"{path}: no weight files ({kinds})")


def check_model_dir(path: str | Path, tokenizer: bool = True, weights: str | None = "any") -> Any:
    """The config of the model in `path`, after checking it can be loaded and served.

    tokenizer: also require tokenizer files (see tokenizer_problem).
    weights: "any" (*.safetensors or pytorch_model*.bin), "safetensors" (only those count), or None
      (not checked here: a caller with checks of its own to run first calls check_weights later).
    Raises ModelDirError with a one-line message naming the folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{config_file}: not readable as JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelDirError(f"{path}: model family {model_type!r} (config.json model_type) is not supported; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelDirError(f"{config_file}: transformers cannot read it: {str(exc).splitlines()[0]}") from None
    try:
        check_config(config)
    except UnsupportedModelError as exc:
        raise ModelDirError(f"{path}: {exc}") from None
    if weights is not None:
        check_weights(path, weights)
    if tokenizer:
        problem = tokenizer_problem(path)
        if problem:
            raise ModelDirError(f"{path} {problem}")
    return config
