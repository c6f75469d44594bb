"""Model folder files: weight file names, the files copied into a merged model, and config.json checks."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from .errors import MergeError

PathLike = Union[str, os.PathLike]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Files copied from the base folder into a merged full model (when present).
COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# config.json keys that must agree between a base model and its experts for a merge to make sense.
CONFIG_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "tie_word_embeddings",
)


def read_model_config(folder: PathLike, label: str = "model") -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (MergeError if missing or unreadable)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeError(f"{label}: {path} does not exist; a full model folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MergeError(f"{label}: cannot read {path}: {err}") from err


#: config.json keys that hold a model's number of transformer blocks, in the order they are read.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(config: Mapping[str, Any]) -> Optional[int]:
    """The number of transformer blocks a model's ``config.json`` states (a multimodal config's ``text_config``
    first), or None when it states none. The one reader of the layer count: per-layer gradient lists (a mergekit
    recipe's settings, SLERP's ``t``) are spread over it."""
    config = config.get("text_config") or config
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_config_compatible(base: dict[str, Any], other: dict[str, Any], label: str, base_label: str = "base") -> None:
    """Raise MergeError when ``other`` is not the same architecture and size as ``base``.

    Compares :data:`CONFIG_KEYS` (architecture names, hidden and intermediate sizes, layer and head counts,
    vocabulary size, embedding tying) and names every differing key with both values.
    """
    diffs = []
    for key in CONFIG_KEYS:
        if key in base or key in other:
            a, b = base.get(key), other.get(key)
            if a != b:
                diffs.append(f"{key}: {base_label}={a!r}, {label}={b!r}")
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size") for d in diffs):
            hint = (" (different vocabulary sizes usually mean added tokens; resize the embeddings of the base"
                    " and every expert to the same tokenizer first)")
        raise MergeError(f"{label} does not match {base_label}: " + "; ".join(diffs) + hint)


def copy_model_files(src: PathLike, dst: PathLike, files: tuple[str, ...] = COPY_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src`` into ``dst``."""
    copied = []
    for name in files:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied
