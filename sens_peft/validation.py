"""The validation layer: every input of a merge or a sensitivity pass goes through these checks, whatever its form
(folder, file, record object, tensor), so that nothing can give a silently wrong result.

Every check raises a :class:`~sens_peft.errors.SensPeftError` (mostly :class:`~sens_peft.io.MergeError`) naming
the expert, the file or tensor, and what was expected. The checks are cheap (headers, names, one ``isfinite`` per
tensor already in memory) so they run on every merge:

* :func:`check_path_list`, :func:`check_distinct_inputs`, :func:`check_output_location` - the shape of the
  arguments: a list of folders (not one string), no input twice (symlinks and spellings resolved), no output inside
  an input (the base model included, see :func:`model_source_folder`).
* :func:`check_model_folder`, :func:`read_safetensors_header`, :func:`check_adapter_contents`,
  :func:`check_source_dtypes`, :func:`check_output_dtype` - weights: safetensors only unless ``allow_pickle``, a
  readable header, both LoRA factors of every module, nothing outside ``target_modules``, float dtypes.
* :func:`check_record`, :func:`check_probe`, :func:`check_token_batches` - sidecars and data: dtypes, shapes,
  finiteness, a record that is not all zeros (a diverged run), token ids inside the vocabulary.
* :func:`check_rank`, :func:`warn_unused_options` - options that cannot apply are said so, not silently ignored.

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

from .errors import SensPeftError, SidecarError
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
        check_adapter_contents(folder, label)
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


# --------------------------------------------------------------------------------------------------------------
# arguments: lists of folders, duplicates, outputs inside inputs


class InputTypeError(SensPeftError, TypeError):
    """An argument has the wrong type (e.g. one string where a list of folders is expected)."""


def check_path_list(items: Any, what: str) -> list[Any]:
    """``items`` as a list; one string/path instead of a list is an error, not a list of characters."""
    if isinstance(items, (str, bytes, os.PathLike)):
        raise InputTypeError(
            f"{what} must be a list (of folders, one entry per expert), got the single {type(items).__name__} "
            f"{os.fsdecode(items)!r}; pass [{os.fsdecode(items)!r}]"
        )
    try:
        return list(items)
    except TypeError as err:
        raise InputTypeError(f"{what} must be a list (of folders, one entry per expert), got "
                             f"{type(items).__name__}") from err


def _identity(item: Any) -> str:
    """A folder's resolved path (symlinks and spellings agree), anything else its string."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if path.exists():
            return str(path.resolve())
    return str(item)


def check_distinct_inputs(items: Iterable[Any], what: str) -> None:
    """MergeError when one input is listed twice, through a symlink or another spelling of its path included."""
    seen: dict[str, Any] = {}
    for item in items:
        key = _identity(item)
        if key in seen:
            same = "" if str(seen[key]) == str(item) else f" (as {str(seen[key])!r} and {str(item)!r})"
            raise MergeError(f"{what} are listed more than once: [{key!r}]{same}; each expert may be merged only "
                             "once (symlinks and other spellings of a path are resolved)")
        seen[key] = item


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def check_output_location(out: PathLike, inputs: Iterable[Optional[PathLike]]) -> None:
    """MergeError when the output folder is an input folder, lies inside one, or contains one."""
    out_path = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_path = Path(inp).expanduser().resolve()
        if not inp_path.exists():
            continue  # an adapter name, not a folder
        if out_path == inp_path or _is_within(out_path, inp_path) or _is_within(inp_path, out_path):
            raise MergeError(
                f"output folder {out_path} overlaps the input folder {inp_path}; choose an output outside the inputs "
                "(the base model's folder is an input too)"
            )


def model_source_folder(model: Any) -> Optional[Path]:
    """The local folder a transformers model (or a PeftModel's base) was loaded from, when there is one."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        for attr in ("name_or_path",):
            value = getattr(model, attr, None)
            if isinstance(value, str) and value and Path(value).expanduser().is_dir():
                return Path(value).expanduser().resolve()
        config = getattr(model, "config", None)
        value = getattr(config, "_name_or_path", None)
        if isinstance(value, str) and value and Path(value).expanduser().is_dir():
            return Path(value).expanduser().resolve()
        inner = getattr(model, "base_model", None)
        model = getattr(inner, "model", None) if inner is not None and inner is not model else None
    return None


# --------------------------------------------------------------------------------------------------------------
# weight files: safetensors only (unless allow_pickle), readable headers, float dtypes

_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFE_NAMES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_model_folder(folder: PathLike, label: str, allow_pickle: bool = False) -> None:
    """A model or adapter folder must hold safetensors weights with readable headers; pickles (``*.bin``) only
    with ``allow_pickle=True`` (unpickling an untrusted file can run code)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{label}: folder {folder} does not exist")
    safe = [n for n in _SAFE_NAMES if (folder / n).is_file()]
    if not safe:
        pickled = [n for n in _PICKLE_NAMES if (folder / n).is_file()]
        if pickled and not allow_pickle:
            raise MergeError(
                f"{label}: {folder} holds only pickle checkpoints ({', '.join(pickled)}); loading them can run "
                "arbitrary code. Convert them to safetensors, or pass allow_pickle=True if you trust the files"
            )
        if pickled:
            logger.warning("%s: loading the pickle checkpoint(s) %s of %s (allow_pickle=True)", label, pickled,
                           folder)
        return
    for name in safe:
        if name.endswith(".index.json"):
            continue
        read_safetensors_header(folder / name, label)


def read_safetensors_header(path: PathLike, label: str) -> dict[str, Any]:
    """Parse and check a safetensors header (JSON, dtypes, shapes, offsets inside the file); MergeError naming
    the file otherwise. Returns the header without ``__metadata__``."""
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file ({size} bytes): truncated?")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        end_of_data = 0
        for name, info in header.items():
            dtype, shape, (start, end) = info["dtype"], [int(x) for x in info["shape"]], info["data_offsets"]
            itemsize = _ITEMSIZE.get(dtype)
            if itemsize is None:
                raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
            numel = 1
            for dim in shape:
                if dim < 0:
                    raise ValueError(f"tensor {name!r} has a negative dimension in {shape}")
                numel *= dim
            if not 0 <= int(start) <= int(end) or int(end) - int(start) != numel * itemsize:
                raise ValueError(f"tensor {name!r}: offsets {[start, end]} do not fit {dtype} {shape}")
            end_of_data = max(end_of_data, int(end))
        if 8 + length + end_of_data > size:
            raise ValueError(f"the data ends at byte {8 + length + end_of_data}, the file has {size}: truncated?")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu"):
            pass  # the library's own checks (overlapping or non-contiguous data, ...)
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
        raise MergeError(f"{label}: {path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    except Exception as err:  # safetensors' own error type
        if "Safetensor" not in type(err).__name__:
            raise
        raise MergeError(f"{label}: {path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    return header


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_adapter_contents(folder: PathLike, label: str) -> None:
    """An adapter's ``adapter_model.safetensors``: readable, float factors, both ``lora_A`` and ``lora_B`` of
    every module, and no factor of a module outside the config's ``target_modules`` (PEFT would drop it)."""
    folder = Path(folder)
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        return
    header = read_safetensors_header(file, label)
    pairs: dict[str, set[str]] = {}
    for name, info in header.items():
        if info["dtype"] not in _FLOAT_CODES:
            raise MergeError(f"{label}: tensor {name!r} in {file} has dtype {info['dtype']}; LoRA factors must be "
                             "floating point (F32, F16, BF16)")
        if "lora_" not in name or name.endswith((".lora_A.bias", ".lora_B.bias")):
            continue  # modules_to_save copies, LoRA biases: checked by PEFT's loader and the merge's config checks
        for part, suffix in _LORA_PARTS:
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], set()).add(part)
                break
        else:
            raise MergeError(f"{label}: {file} holds tensor {name!r}, which is no LoRA factor name PEFT loads "
                             "(expected <module>.lora_A.weight / .lora_B.weight); the file is corrupt or foreign")
    for module, parts in sorted(pairs.items()):
        for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            if (a in parts) != (b in parts):
                missing = b if a in parts else a
                raise MergeError(
                    f"{label}: {file} has no {missing} for module {_strip_prefix(module)!r} (it has {sorted(parts)}); "
                    "PEFT would fill it with its initial values and drop that module's delta. The file is incomplete"
                )
    _check_targets(folder, label, file, sorted(pairs))


_LORA_PARTS = (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"), ("lora_embedding_A", ".lora_embedding_A"),
               ("lora_embedding_B", ".lora_embedding_B"), ("lora_magnitude_vector", ".lora_magnitude_vector"))


def check_adapters_loaded(modules: Iterable[Any], names: Iterable[str], folders: Iterable[Optional[Path]]) -> None:
    """After PEFT loaded the adapters: every LoRA factor of an adapter's file is in the model, with the file's
    values. PEFT skips keys it cannot place (a module the model lacks, one outside ``target_modules``, an adapter
    name that clashes with its key renaming) with a warning at most, leaving the initial values in place."""
    from safetensors.torch import load_file

    by_name = {m.name: m for m in modules}
    for name, folder in zip(names, folders):
        file = Path(folder) / "adapter_model.safetensors" if folder is not None else None
        if file is None or not file.is_file():
            continue
        read_safetensors_header(file, f"adapter {name!r}")
        for key, value in load_file(str(file)).items():
            for part, suffix in _LORA_PARTS[:4]:
                if key.endswith(suffix):
                    module_name = _strip_prefix(key[: -len(suffix)])
                    _check_loaded_factor(by_name.get(module_name), name, part, module_name, value, file)
                    break


def _check_loaded_factor(module: Any, adapter: str, part: str, module_name: str, value: torch.Tensor,
                         file: Path) -> None:
    factors = module.factors(adapter) if module is not None else None
    if factors is None:
        raise MergeError(
            f"adapter {adapter!r}: {file} has LoRA factors for module {module_name!r}, which PEFT did not load (the "
            "model has no such module, or it is outside target_modules); merging without them would drop its delta"
        )
    loaded = factors.A if part in ("lora_A", "lora_embedding_A") else factors.B
    if tuple(loaded.shape) != tuple(value.shape) or not torch.equal(loaded.cpu(), value.to(loaded.dtype)):
        raise MergeError(
            f"adapter {adapter!r}: {part} of module {module_name!r} in the model differs from {file} after loading "
            "(PEFT did not load it and kept its initial values; an adapter name that clashes with PEFT's key names, "
            "such as one inside 'weight' or 'lora_embedding', causes this). Rename the adapter folder"
        )


def _strip_prefix(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _check_targets(folder: Path, label: str, file: Path, modules: list[str]) -> None:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return  # reported by the loader, with its file
    targets = config.get("target_modules")
    if not targets or modules == []:
        return
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        cfg = LoraConfig(target_modules=targets, layers_to_transform=config.get("layers_to_transform"),
                         layers_pattern=config.get("layers_pattern"))
    except Exception:  # an unusual config: PEFT's own loader reports it
        return
    outside = [_strip_prefix(m) for m in modules if not check_target_module_exists(cfg, _strip_prefix(m))]
    if outside:
        more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        raise MergeError(
            f"{label}: {file} has LoRA factors for module {outside[0]!r}{more}, outside the config's target_modules "
            f"{targets!r}; PEFT would drop them without a word. Fix adapter_config.json or the weights file"
        )


def check_source_dtypes(base: Any, experts: Iterable[Any], names: Iterable[str]) -> None:
    """Full models: every expert tensor is floating point where the base's is (an integer header on a float
    tensor would be merged as integers), and integer tensors keep the base's exact dtype."""
    for label, src in zip(names, experts):
        for tensor in base.names():
            want, got = base.dtype(tensor), src.dtype(tensor)
            if want.is_floating_point and not got.is_floating_point:
                raise MergeError(
                    f"expert {label!r}: tensor {tensor!r} in {src.file_of(tensor)} has dtype "
                    f"{str(got).replace('torch.', '')}, the base ({base.file_of(tensor)}) has "
                    f"{str(want).replace('torch.', '')}; expert weights must be floating point"
                )
            if not want.is_floating_point and got != want:
                raise MergeError(
                    f"expert {label!r}: tensor {tensor!r} in {src.file_of(tensor)} has dtype {got}, the base has "
                    f"{want}"
                )
    for tensor in base.names():
        if base.dtype(tensor) in (torch.int32, torch.int64) and tensor.endswith((".weight", ".bias")):
            raise MergeError(f"base: tensor {tensor!r} in {base.file_of(tensor)} is stored as "
                             f"{base.dtype(tensor)}; model weights must be floating point")


def check_merged_finite(name: str, tensor: torch.Tensor) -> None:
    """A merged tensor in a narrow float dtype (float16's largest value is 65504) must not have overflowed to Inf.

    Inputs are checked finite and the math runs in float32, so only the final cast to a narrow dtype can
    overflow; wider dtypes are not scanned again (an extra pass over every output byte)."""
    if tensor.dtype in _NARROW and not bool(torch.isfinite(tensor).all()):
        raise MergeError(
            f"merged tensor {name!r} overflows {str(tensor.dtype).replace('torch.', '')} (largest value "
            f"{torch.finfo(tensor.dtype).max:g}): write it as bfloat16 or float32 (dtype=...), or use smaller "
            "weights/scale"
        )


def check_model_finite(model: torch.nn.Module) -> None:
    """:func:`check_merged_finite` for every parameter of a merged model held in memory."""
    for name, param in model.named_parameters():
        check_merged_finite(name, param.detach())


_NARROW = tuple(getattr(torch, n) for n in ("float16", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def check_output_dtype(dtype: Optional[torch.dtype], name: Any) -> Optional[torch.dtype]:
    """Merged weights are written in a float dtype only: ``dtype='int8'`` would truncate them to integers."""
    if dtype is not None and not dtype.is_floating_point:
        raise MergeError(
            f"dtype={name!r} is not a floating-point dtype; merged weights can be written as float32, bfloat16 or "
            "float16 (quantize the merged model afterwards with a quantization library)"
        )
    return dtype


# --------------------------------------------------------------------------------------------------------------
# sidecars and data


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


class DataError(SensPeftError, ValueError):
    """Calibration or probe data the model cannot take (token ids outside its vocabulary, ...)."""


def _check_ids(ids: torch.Tensor, vocab_size: Optional[int], where: str, error: type = SidecarError) -> None:
    if ids.numel() == 0:
        return
    if ids.is_floating_point():
        raise error(f"{where} has dtype {ids.dtype}; token ids must be integers")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise error(f"{where} has token id {low}; ids must be >= 0")
    if vocab_size is not None and high >= vocab_size:
        raise error(f"{where} has token id {high}, outside the model's vocabulary of {vocab_size} "
                           "(another tokenizer, or added tokens without resized embeddings?)")


def vocab_size_of(model: Any) -> Optional[int]:
    """Rows of a model's input embedding (the ids it accepts), else ``config.vocab_size``."""
    try:
        emb = model.get_input_embeddings()
        return int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])
    except Exception:  # not a transformers model: fall back to its config
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(size) if isinstance(size, int) else None


def check_token_batches(batches: Iterable[Mapping[str, Any]], model: Any, where: str = "calibration data"
                        ) -> Iterable[Mapping[str, Any]]:
    """Yield ``batches`` after checking their token ids against the model's vocabulary (a clear error instead of
    ``IndexError: index out of range in self`` from deep inside the embedding)."""
    vocab = vocab_size_of(model)
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if isinstance(ids, torch.Tensor):
            _check_ids(ids, vocab, f"{where}: batch {i}: 'input_ids'", DataError)
        yield batch


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


# --------------------------------------------------------------------------------------------------------------
# options that cannot apply


def check_rank(rank: Optional[int], modules: Iterable[Any]) -> None:
    """A merged LoRA rank above ``min(out, in)`` of a module is padded with zero rows: say so."""
    if rank is None:
        return
    small = []
    for module in modules:
        shape = tuple(module.base_weight().shape)
        if len(shape) == 2 and rank > min(shape):
            small.append(f"{module.name} {list(shape)}")
    if small:
        logger.warning("rank=%d exceeds min(out, in) of %d module(s) (e.g. %s); their factors are zero-padded to "
                       "that rank (no information is added, the file is larger)", rank, len(small), small[0])


def warn_unused_options(config: Any, *, sensitivities: Any = None, probes: Any = None, transferability: Any = None,
                        kind: str = "lora") -> None:
    """Log a warning for each given option the merge will not use.

    ``kind``: ``"lora"`` / ``"full"`` (merge_adapters' output) or ``"models"`` (merge_models).
    """
    sens = getattr(config, "sens", None)
    trim_by = getattr(config, "trim_by", None)
    auto_trim = trim_by == "auto" and getattr(config, "method", None) == "ties"  # may trim by the element maps
    need_task = sens in ("task", "task+cross") or trim_by == "sensitivity" or auto_trim
    need_cross = sens in ("cross", "task+cross")
    if sensitivities is not None and not need_task:
        logger.warning("sensitivities= is ignored: sens=%r and trim_by=%r use no sensitivity scores", sens, trim_by)
    if probes is not None and (not need_cross or transferability is not None):
        why = "transferability= is given" if transferability is not None else f"sens={sens!r} has no cross term"
        logger.warning("probes= is ignored: %s", why)
    if transferability is not None and not need_cross:
        logger.warning("transferability= is ignored: sens=%r has no cross term", sens)
    if kind == "lora" and getattr(config, "dtype", None) is not None:
        logger.warning("dtype=%r is ignored for output='lora' (it sets the dtype of output='full' weights)",
                       config.dtype)
    if kind in ("full", "models") and getattr(config, "rank", None) is not None:
        logger.warning("rank=%r is ignored: it sets the rank of a merged LoRA adapter, and this merge writes full "
                       "weights", config.rank)
    _warn_changed_but_unused(config)


# Method-dependent MergeConfig fields: each method declares the ones it reads (MergeMethod.uses).
_METHOD_FIELDS = ("density", "majority_sign_method", "trim_by", "weighted_election", "seed", "dare_rng")
# Sens fields: field -> (applies?, why not)
_SENS_ONLY = {
    "temperature": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "max_ratio": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "normalization": (lambda c: c.sens in ("task", "task+cross"), "no task term (sens has no 'task')"),
    "granularity": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "tau_normalization": (lambda c: c.sens in ("cross", "task+cross"), "no cross term (sens has no 'cross')"),
    "alignment": (lambda c: c.sens in ("cross", "task+cross"), "no cross term (sens has no 'cross')"),
}


def _warn_changed_but_unused(config: Any) -> None:
    """Warn for each option set away from its default that this method / sens mode does not read."""
    import dataclasses

    from .methods import get_method

    if not dataclasses.is_dataclass(config) or not hasattr(config, "method"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    changed = [n for n in defaults if getattr(config, n) != defaults[n]]
    uses = set(get_method(config.method).uses)
    for name in changed:
        if name in _METHOD_FIELDS and name not in uses:
            logger.warning("%s=%r is ignored with method=%r, sens=%r: the method does not read it (it reads %s)",
                           name, getattr(config, name), config.method, config.sens, sorted(uses) or "none of them")
        elif name in _SENS_ONLY and not _SENS_ONLY[name][0](config):
            logger.warning("%s=%r is ignored with method=%r, sens=%r: %s", name, getattr(config, name),
                           config.method, config.sens, _SENS_ONLY[name][1])


def warn_unused_sensitivity_options(config: Any) -> None:
    """compute_sensitivity runs the calibration pass only: options of the during-training mode do nothing."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name in ("mode", "ema", "every_n_steps"):
        if name in defaults and getattr(config, name) != defaults[name]:
            logger.warning("compute_sensitivity: %s=%r is ignored (it applies to SensitivityCallback during "
                           "training; compute_sensitivity always runs the calibration pass)", name,
                           getattr(config, name))


def check_pretrained_source(item: Any, label: str, allow_pickle: bool = False) -> None:
    """Before ``from_pretrained(item)``: a local adapter or model folder must hold safetensors weights (pickles only
    with ``allow_pickle``). Loaded modules and hub ids pass (transformers prefers safetensors on the hub)."""
    if not isinstance(item, (str, os.PathLike)) or not Path(item).expanduser().is_dir():
        return
    folder = Path(item).expanduser()
    if (folder / "adapter_config.json").is_file():
        check_adapter_files(folder, label, allow_pickle=allow_pickle)
    else:
        check_model_folder(folder, label, allow_pickle=allow_pickle)


def check_sensitivity_inputs(model: Any, base_model: Any, allow_pickle: bool = False) -> None:
    """compute_sensitivity's folders (the expert, an adapter's base model): safetensors unless ``allow_pickle``."""
    check_pretrained_source(model, "compute_sensitivity: model", allow_pickle)
    check_pretrained_source(base_model, "compute_sensitivity: base_model", allow_pickle)
