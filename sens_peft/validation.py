"""Input checks shared by the merge entry points: refuse anything that could give a silently wrong merge.

Every check raises :class:`~sens_peft.io.MergeError` naming the expert, the file or tensor, and what was expected.
The checks are cheap (metadata, names, one ``isfinite`` per tensor already in memory) so they run on every merge:

* :func:`check_adapter_files` - an adapter folder holds safetensors weights; pickled ``adapter_model.bin`` is
  refused unless ``allow_pickle=True`` (unpickling untrusted files can run code).
* :func:`check_finite` - expert (or base) weights contain no NaN/Inf.
* :func:`check_record_matches` - a sensitivity sidecar belongs to this expert: every scored tensor exists in it
  (and, for LoRA, is one of the adapter's modules), and the base-model fingerprint stored by the capture side
  (:data:`FINGERPRINT_KEY`) agrees with the base being merged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .io import CONFIG_KEYS, MergeError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Sidecar metadata key holding a JSON object of the base model's architecture and sizes (see model_fingerprint).
FINGERPRINT_KEY = "base_fingerprint"

# config fields that identify a base model's shape: two bases that differ in any of them cannot share adapters
# (the merge's compatibility keys minus those that name a class or a tying choice rather than a shape).
FINGERPRINT_FIELDS = tuple(k for k in CONFIG_KEYS if k not in ("architectures", "n_inner", "tie_word_embeddings"))

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                  ".lora_magnitude_vector", ".weight", ".bias")


def model_fingerprint(config: Any) -> dict[str, Any]:
    """The architecture/size fields of a model config (a ``PretrainedConfig`` or a ``config.json`` dict).

    Stored in sidecar metadata under :data:`FINGERPRINT_KEY` so that a merge can tell that a sidecar was computed on
    another base model (different vocabulary, depth or width) even when the tensor names coincide.
    """
    if config is None:
        return {}
    data = config if isinstance(config, Mapping) else (config.to_dict() if hasattr(config, "to_dict") else {})
    text_config = data.get("text_config")
    if isinstance(text_config, Mapping):  # multimodal wrappers keep the language model's sizes here
        data = {**text_config, **{k: v for k, v in data.items() if k in ("model_type",)}}
    return {k: data[k] for k in FINGERPRINT_FIELDS if data.get(k) is not None}


def check_fingerprint(stored: Optional[Union[str, Mapping[str, Any]]], current: Mapping[str, Any], label: str, file: PathLike) -> None:
    """Compare a sidecar's stored fingerprint (JSON text, may be absent) with the current base's fingerprint."""
    if not stored or not current:
        return
    try:
        stored_dict = dict(stored) if isinstance(stored, Mapping) else json.loads(stored)
    except (TypeError, ValueError) as err:
        raise MergeError(f"{label}: {file}: metadata {FINGERPRINT_KEY!r} is not valid JSON") from err
    if not isinstance(stored_dict, dict):
        raise MergeError(f"{label}: {file}: metadata {FINGERPRINT_KEY!r} must be a JSON object")
    diffs = [f"{k}: sidecar={stored_dict[k]!r}, base={current[k]!r}"
             for k in sorted(set(stored_dict) & set(current)) if stored_dict[k] != current[k]]
    if diffs:
        raise MergeError(
            f"{label}: {file} was computed on another base model ({'; '.join(diffs)}); recompute it on this base "
            "with compute_sensitivity(...)"
        )


def module_of(tensor_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.weight`` / ``...q_proj.weight`` → ``model.layers.0.self_attn.q_proj``."""
    for suffix in _LORA_SUFFIXES:
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def check_record_matches(
    record: Any,
    label: str,
    file: PathLike,
    *,
    modules: Optional[Iterable[str]] = None,
    tensors: Optional[Iterable[str]] = None,
    fingerprint: Optional[Mapping[str, Any]] = None,
) -> None:
    """Raise MergeError when a sensitivity record does not belong to the expert it is merged with.

    Args:
        record: A :class:`~sens_peft.store.SensitivityRecord`.
        label: The expert, for messages (``"expert 'math'"``).
        file: Where the record came from, for messages.
        modules: LoRA: the adapter's adapted module names (``model.layers.0.self_attn.q_proj``). Every scored
            tensor must belong to one of them.
        tensors: Full models: the model's tensor names. Every scored tensor must be one of them.
        fingerprint: The merged base's :func:`model_fingerprint`, compared with the stored one (when stored).
    """
    check_fingerprint(record.metadata.get(FINGERPRINT_KEY), fingerprint or {}, label, file)
    if modules is not None:
        allowed = set(modules)
        foreign = [n for n in record.tensor_names if module_of(n) not in allowed]
        what = f"which the adapter does not adapt (it adapts {len(allowed)} modules, e.g. {sorted(allowed)[:3]})"
    elif tensors is not None:
        allowed = set(tensors)
        foreign = [n for n in record.tensor_names if n not in allowed]
        what = "which the model does not have"
    else:
        return
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise MergeError(
            f"{label}: {file} scores tensor {foreign[0]!r}{more}, {what}; the sidecar belongs to another adapter or "
            "base model. Recompute it with compute_sensitivity(...) on this expert"
        )


def check_finite(tensor: torch.Tensor, label: str, name: str, where: Optional[PathLike] = None) -> None:
    """MergeError when a floating tensor holds NaN or Inf (names the expert, tensor and file)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        place = f" in {where}" if where else ""
        raise MergeError(
            f"{label}: tensor {name!r}{place} contains {bad} non-finite value(s) ({kind}); refusing to merge "
            "a broken expert"
        )


def check_adapter_files(folder: PathLike, label: str, allow_pickle: bool = False) -> None:
    """An adapter folder must hold ``adapter_model.safetensors``; a pickled ``adapter_model.bin`` only with
    ``allow_pickle=True``."""
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        return
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise MergeError(
                f"{label}: {folder} holds only a pickle checkpoint (adapter_model.bin); loading it can run arbitrary "
                "code. Convert it to safetensors, or pass allow_pickle=True if you trust the file"
            )
        logger.warning("%s: loading the pickle checkpoint %s (allow_pickle=True)", label, folder / "adapter_model.bin")
        return
    raise MergeError(f"{label}: {folder} has no adapter weights (expected adapter_model.safetensors)")
