"""Weight checks: safetensors only (unless ``allow_pickle``), readable headers, both LoRA factors of every module,
nothing outside ``target_modules``, float dtypes, finite values."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MergeError
from ..model_files import PathLike

logger = logging.getLogger(__name__)


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
