"""Sidecar checks: a sensitivity record or probe set is usable (dtypes, shapes, finite, not all zeros) and belongs to
the expert and base model it is merged with (scored tensors, :data:`FINGERPRINT_KEY`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import MergeError, SidecarError
from ..model_files import CONFIG_KEYS, PathLike
from .data import _check_ids
from .weights import read_safetensors_header

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
    shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
) -> None:
    """Raise MergeError when a sensitivity record is unusable (:func:`check_record`: the same checks for a record
    object as for a sidecar file) or does not belong to the expert it is merged with.

    Args:
        record: A :class:`~sens_peft.store.SensitivityRecord`.
        label: The expert, for messages (``"expert 'math'"``).
        file: Where the record came from, for messages.
        modules: LoRA: the adapter's adapted module names (``model.layers.0.self_attn.q_proj``). Every scored
            tensor must belong to one of them.
        tensors: Full models: the model's tensor names. Every scored tensor must be one of them.
        fingerprint: The merged base's :func:`model_fingerprint`, compared with the stored one (when stored).
        shapes: Tensor name → shape of what the element maps score (their shapes must agree).
    """
    try:
        check_record(record, label, file, shapes)
    except SidecarError as err:
        raise MergeError(str(err)) from err
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


def check_record(record: Any, label: str, file: PathLike,
                 shapes: Optional[Mapping[str, tuple[int, ...]]] = None) -> None:
    """A sensitivity record (loaded from a file or passed as an object) is usable: float, finite, non-negative
    scores of the right lengths, float finite element maps of the scored tensors' shapes, not all zeros."""
    groups, names = list(record.groups), list(record.tensor_names)
    for key, length, signed in (("group_scores", len(groups), False), ("tensor_scores", len(names), False),
                                ("signed_scores", len(names), True)):
        value = getattr(record, key, None)
        if value is None:
            if key == "signed_scores":
                continue
            raise SidecarError(f"{label}: {file}: {key} is missing")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise SidecarError(f"{label}: {file}: tensor {key!r} must be a floating-point tensor, got "
                               f"{getattr(value, 'dtype', type(value).__name__)}")
        if value.dim() != 1 or value.shape[0] != length:
            raise SidecarError(f"{label}: {file}: tensor {key!r} has shape {list(value.shape)}, expected [{length}]")
        if not bool(torch.isfinite(value).all()):
            raise SidecarError(f"{label}: {file}: tensor {key!r} contains NaN or Inf")
        if not signed and bool((value < 0).any()):
            raise SidecarError(f"{label}: {file}: tensor {key!r} has negative entries; |w*g| scores must be >= 0")
    if len(names) and not bool(record.tensor_scores.abs().sum() > 0):
        meta = record.metadata or {}
        raise SidecarError(
            f"{label}: {file}: every sensitivity score is 0 (num_steps={meta.get('num_steps', '?')}, "
            f"num_skipped={meta.get('num_skipped', '?')}): the run that produced it diverged (NaN/Inf gradients) or "
            "no gradient reached the scored tensors. Recompute it with compute_sensitivity(...) on a healthy expert"
        )
    for name, emap in (record.element_maps or {}).items():
        where = f"{label}: {file}: tensor 'element.{name}'"
        if not isinstance(emap, torch.Tensor) or not emap.is_floating_point():
            raise SidecarError(f"{where} has dtype {getattr(emap, 'dtype', type(emap).__name__)}; element maps "
                               "must be floating point")
        if not bool(torch.isfinite(emap).all()):
            raise SidecarError(f"{where} contains NaN or Inf")
        if bool((emap < 0).any()):
            raise SidecarError(f"{where} has negative entries; element maps are |w*g| scores (>= 0)")
        if shapes is not None and name in shapes and tuple(emap.shape) != tuple(shapes[name]):
            raise SidecarError(f"{where} has shape {list(emap.shape)}, the tensor it scores has "
                               f"{list(shapes[name])}")


def check_probe(probe: Any, label: str, file: PathLike, vocab_size: Optional[int] = None) -> None:
    """A probe set (from a file or an object): integer ``[N, T]`` tensors of one shape, token ids in the
    vocabulary, at least one scored label."""
    tensors = {k: getattr(probe, k, None) for k in ("input_ids", "attention_mask", "labels")}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dim() != 2:
            raise SidecarError(f"{label}: {file}: probe tensor {key!r} must be an integer [N, T] tensor, got "
                               f"{getattr(value, 'dtype', type(value).__name__)} "
                               f"{list(getattr(value, 'shape', []))}")
        if value.shape != tensors["input_ids"].shape:
            raise SidecarError(f"{label}: {file}: probe tensor {key!r} has shape {list(value.shape)}, input_ids has "
                               f"{list(tensors['input_ids'].shape)}")
    ids = tensors["input_ids"]
    if ids.numel() == 0:
        raise SidecarError(f"{label}: {file}: the probe holds no tokens")
    mask = tensors["attention_mask"]
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise SidecarError(f"{label}: {file}: probe tensor 'attention_mask' holds values other than 0 and 1")
    _check_ids(ids, vocab_size, f"{label}: {file}: probe tensor 'input_ids'")
    labels = tensors["labels"]
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size if vocab_size else False))
    if bool(bad.any()):
        raise SidecarError(f"{label}: {file}: probe tensor 'labels' has id {int(labels[bad][0])}, outside "
                           f"[0, {vocab_size}) and not -100")
    real = tensors["attention_mask"].bool()
    scored = (labels[:, 1:] != -100) & real[:, 1:] & real[:, :-1]  # as sens_peft.transfer.scored_positions
    if not bool(scored.any()):
        raise SidecarError(f"{label}: {file}: the probe scores no position (labels all -100 or masked out, or "
                           "sequences of one token)")


def read_state_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors state/sidecar file; SidecarError naming the file when it is not one
    (a pickle under that name is never unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        read_safetensors_header(path, "sensitivity state")
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as err:
        raise SidecarError(f"{path} is not a readable safetensors file (truncated, corrupt, or a pickle?); it is "
                           f"never unpickled. Delete it to resume without it: {err}") from err
