"""Merge orchestration: LoRA adapters inside one PeftModel (``merge_adapters``) and full fine-tunes streamed from disk
to disk (``merge_models``).

The math lives elsewhere: :mod:`sens_peft.coefficients` turns sensitivities and transferability into a
coefficient per (expert, layer group), :mod:`sens_peft.methods` combines task vectors. This module decides which
tensors meet, on which device, in which dtype, and where the result goes.

How coefficients map to modules: for every adapted module (LoRA) or tensor (full model) the coefficient vector is
``table.for_name(<canonical weight name>)`` (e.g. ``model.layers.3.mlp.down_proj.weight`` → group ``layers.3``
at ``granularity="layer"``). The table's values already include the per-expert user ``weights`` and the global
``scale``, so the methods are called with ``scale=1``. Where only some LoRA experts adapt a module, only they
take part, with their own coefficients (PEFT does the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import queue
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import fused as _fused
from .config import MergeConfig
from .io import (
    BackgroundWriter,
    BufferPool,
    MergeError,
    ShardPlan,
    ShardWriter,
    TensorSource,
    atomic_output_dir,
    check_config_compatible,
    copy_model_files,
    parse_size,
    plan_shards,
    read_model_config,
)
from .lora import LoraModule, delta_weight, lora_modules, svd_factors
from .methods import (
    DARE_METHODS,
    DEFAULT_CHUNK,
    STREAMED_METHODS,
    _resolve_seed,
    dare_masks,
    merge_streamed,
    trim_thresholds,
)
from .validation import (
    check_adapter_files,
    check_adapters_loaded,
    check_distinct_inputs,
    check_finite,
    check_merged_finite,
    check_model_finite,
    check_output_dtype,
    check_output_location,
    check_path_list,
    check_probe,
    check_rank,
    check_record_matches,
    check_source_dtypes,
    model_fingerprint,
    model_source_folder,
    warn_unused_options,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# MergeConfig.extra keys forwarded to methods.merge_deltas.
_METHOD_EXTRAS = ("weighted_election",)
_SOURCE_ATTR = "_sens_peft_sources"


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        config: The merge configuration used.
        coefficients: The final coefficient table (c per expert and group, incl. weights and scale).
        experts: Expert names, in order.
        output_dir: Folder written (None when nothing was saved).
        adapter_name: Name of the new adapter (``output="lora"``), else None.
        seconds: Wall time of the merge.
        peak_rss_mb: Peak resident memory of the process so far (``ru_maxrss``), in MB.
        transfer: The K×K transferability matrix used, if any.
        model: The PeftModel holding the new adapter (``output="lora"``) or the merged base model (``"full"``);
            None for ``merge_models``.
        sources: Where each expert came from (folder, or ``adapter:<name>``).
        details: Extra facts (ranks, shard files, counts of merged / copied tensors).
    """

    config: MergeConfig
    coefficients: Any
    experts: list[str]
    output_dir: Optional[Path]
    adapter_name: Optional[str]
    seconds: float
    peak_rss_mb: Optional[float]
    transfer: Optional[torch.Tensor]
    model: Any = None
    sources: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# shared helpers


def _write_extra_files(folder: Path, files: Optional[dict[str, str]]) -> None:
    """Write caller-provided text files (e.g. the CLI's recipe copy) inside the atomic output folder."""
    for rel, text in (files or {}).items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise MergeError(f"extra file name {rel!r} must be a plain relative path inside the output folder")
        (folder / rel).write_text(text)


def _resolve_config(config: Optional[MergeConfig], config_kwargs: dict[str, Any]) -> MergeConfig:
    if config is None:
        return MergeConfig(**config_kwargs)
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **config_kwargs) if config_kwargs else config


def _has_element_maps(item) -> bool:
    """Whether a sidecar (record or path/folder) holds per-element maps, without loading its tensors."""
    from safetensors import safe_open

    from .store import SENSITIVITY_FILE, SensitivityRecord

    if isinstance(item, SensitivityRecord):
        return bool(item.element_maps)
    path = Path(item)
    path = path / SENSITIVITY_FILE if path.is_dir() else path
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return any(key.startswith("element.") for key in handle.keys())
    except Exception:  # an unreadable sidecar is reported by the real load, with its file name
        return False


def _resolve_trim(cfg: MergeConfig, sensitivities, folders: Sequence[Optional[PathLike]]) -> MergeConfig:
    """Resolve the automatic settings: ``trim_by="auto"`` becomes ``"sensitivity"`` (TIES, every expert has element
    maps) or ``"magnitude"``, then ``scale=None`` becomes its default for that method and trim."""
    if cfg.trim_by != "auto":
        return dataclasses.replace(cfg, scale=cfg.resolved_scale())
    sources = list(sensitivities) if sensitivities is not None else list(folders)
    use = cfg.method == "ties" and bool(sources) and all(s is not None and _has_element_maps(s) for s in sources)
    if cfg.method == "ties":
        logger.info("trim_by='auto': TIES trims by %s", "the experts' sensitivity maps" if use else
                    "magnitude (not every expert has element maps in its sensitivity.safetensors)")
    cfg = dataclasses.replace(cfg, trim_by="sensitivity" if use else "magnitude")
    return dataclasses.replace(cfg, scale=cfg.resolved_scale())


def _device(config: MergeConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss_mb() -> Optional[float]:
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover
        return None
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _progress(iterable, total: int, desc: str, progress: Optional[bool]):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise MergeError(f"dtype={name!r} is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')")
    return check_output_dtype(value, name)


def _expert_names(folders: Sequence[PathLike]) -> list[str]:
    """Adapter-safe names from folder names: dots are not allowed in PEFT module keys; duplicates get ``_2``..."""
    names: list[str] = []
    for folder in folders:
        stem = Path(folder).resolve().name or "expert"
        name = re.sub(r"[^0-9A-Za-z_-]", "_", stem)
        if name in "lora_" or name.isdigit():
            name = f"expert_{name}"  # PEFT warns on names that are substrings of "lora_"
        candidate, i = name, 2
        while candidate in names:
            candidate, i = f"{name}_{i}", i + 1
        names.append(candidate)
    return names


def _sens_parts(config: MergeConfig) -> tuple[bool, bool]:
    sens = config.sens
    return sens in ("task", "task+cross"), sens in ("cross", "task+cross")


def _load_sidecars(items, folders: list[Optional[Path]], experts: list[str], *, kind: str, filename: str,
                   load, passthrough: type, pass_hint: str, missing_hint: str) -> list:
    """One sidecar per expert: from explicit ``items`` (objects or paths) or from each expert's folder."""
    from .store import SidecarError

    if items is not None:
        items = check_path_list(items, kind)
        if len(items) != len(experts):
            raise MergeError(f"{kind} has {len(items)} entries for {len(experts)} experts {experts}")
        paths = [None] * len(items)
    else:
        items, paths = [None] * len(experts), []
        for name, folder in zip(experts, folders):
            if folder is None:
                raise MergeError(f"expert {name!r} was given as a loaded adapter name, so its {filename} is unknown; "
                                 f"{pass_hint}")
            path = folder / filename
            if not path.is_file():
                raise MergeError(f"expert {name!r}: {path} is missing; {missing_hint}")
            paths.append(path)
    out = []
    for name, item, path in zip(experts, items, paths):
        try:
            out.append(item if isinstance(item, passthrough) else load(item if path is None else path))
        except SidecarError as err:
            raise MergeError(f"expert {name!r}: {err}") from err
    return out


def _load_records(
    sensitivities, folders: list[Optional[Path]], experts: list[str], config: MergeConfig
) -> Optional[list]:
    from .store import SENSITIVITY_FILE, SensitivityRecord, load_sensitivity

    need_task, _ = _sens_parts(config)
    if sensitivities is None and not (need_task or config.trim_by == "sensitivity"):
        return None
    need = f"sens={config.sens!r}" if need_task else "trim_by='sensitivity'"
    return _load_sidecars(
        sensitivities, folders, experts, kind="sensitivities", filename=SENSITIVITY_FILE, load=load_sensitivity,
        passthrough=SensitivityRecord,
        pass_hint="pass sensitivities=[...] (records or paths), or sens=None for the plain method",
        missing_hint=f"{need} needs it. Train the expert with SensitivityCallback or run compute_sensitivity(...) on "
                     "it, pass sensitivities=[...], or use sens=None for the plain method",
    )


def _load_probes(probes, folders: list[Optional[Path]], experts: list[str], vocab_size: Optional[int]) -> list:
    from .store import PROBE_FILE, ProbeSet, load_probe

    loaded = _load_sidecars(
        probes, folders, experts, kind="probes", filename=PROBE_FILE,
        load=lambda item: load_probe(item, vocab_size=vocab_size), passthrough=ProbeSet,
        pass_hint="pass probes=[...] or transferability=<K×K tensor>, or use sens='task' / sens=None",
        missing_hint="the cross-task factor (sens includes 'cross') needs each expert's probe set. Pass "
                     "probes=[...] or transferability=<K×K tensor>, or use sens='task'",
    )
    for k, (name, probe) in enumerate(zip(experts, loaded)):
        check_probe(probe, f"expert {name!r}", _record_source(probes, folders, k, PROBE_FILE), vocab_size)
    return loaded


def _check_transfer(transfer, k: int) -> torch.Tensor:
    transfer = torch.as_tensor(transfer, dtype=torch.float32)
    if tuple(transfer.shape) != (k, k):
        raise MergeError(f"transferability must be a {k}×{k} matrix, got shape {list(transfer.shape)}")
    if not torch.isfinite(transfer).all():
        raise MergeError("transferability contains NaN or Inf")
    return transfer


def _coefficients(config: MergeConfig, records, transfer, experts: list[str]):
    from .coefficients import compute_coefficients

    if config.weights is not None and len(config.weights) != len(experts):
        raise MergeError(f"weights has {len(config.weights)} entries for {len(experts)} experts {experts}")
    need_task, need_cross = _sens_parts(config)
    table = compute_coefficients(
        records if need_task else None,
        transfer if need_cross else None,
        expert_names=experts,
        sens=config.sens,
        temperature=config.temperature,
        normalization=config.normalization,
        tau_normalization=config.tau_normalization,
        granularity=config.granularity,
        weights=config.weights,
        scale=config.resolved_scale(),
    )
    try:
        logger.info("merge coefficients (%s, sens=%s): %s", config.method, config.sens, table.summary())
        logger.debug("coefficient table:\n%s", table)
    except Exception:  # a summary is a nicety; never fail a merge on it
        pass
    return table


def _importance(records, name: str, idx: list[int], config: MergeConfig) -> Optional[list[torch.Tensor]]:
    if config.trim_by != "sensitivity":
        return None
    maps = []
    for k in idx:
        emap = records[k].element_maps.get(name) if records is not None else None
        if emap is None:
            raise MergeError(
                f"trim_by='sensitivity' needs the per-element map 'element.{name}' in every expert's sensitivity "
                f"file; expert #{k} has none (record with element_maps=True, or use trim_by='magnitude')"
            )
        maps.append(emap)
    return maps


def _merge_one(config: MergeConfig, deltas, coeffs: torch.Tensor, name: str, importance=None) -> torch.Tensor:
    from .methods import merge_deltas

    return merge_deltas(
        config.method,
        deltas,
        coeffs,
        density=config.density,
        majority_sign_method=config.majority_sign_method,
        scale=1.0,  # the table's coefficients already include config.scale
        seed=config.seed,
        dare_rng=config.dare_rng,
        name=name,
        importance=importance,
        trim_by=config.trim_by,
        # extra knobs of the methods (e.g. weighted_election=False for PEFT's TIES election) pass through
        **{k: v for k, v in (config.extra or {}).items() if k in _METHOD_EXTRAS},
    )


def _record_source(sensitivities, folders: list[Optional[Path]], k: int, filename: Optional[str] = None) -> str:
    """Where expert k's sensitivity record (or probe set, with ``filename``) came from (for error messages)."""
    from .store import SENSITIVITY_FILE

    kind = "probes" if filename else "sensitivities"
    if sensitivities is not None:
        item = list(sensitivities)[k]
        return str(item) if isinstance(item, (str, os.PathLike)) else f"{kind}[{k}] (a {type(item).__name__} object)"
    folder = folders[k]
    return str(folder / (filename or SENSITIVITY_FILE)) if folder is not None else f"{kind}[{k}]"


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters


def _modules_to_save_of(peft_model, adapter: str) -> set[str]:
    from peft.utils import ModulesToSaveWrapper

    return {name for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save}


def _check_lora_finite(modules: list[LoraModule], names: list[str], folders: list[Optional[Path]]) -> None:
    """A NaN/Inf in any LoRA factor would spread through the merged ΔW: refuse, naming expert and tensor."""
    for module in modules:
        for name, folder in zip(names, folders):
            f = module.factors(name)
            if f is None:
                continue
            where = folder / "adapter_model.safetensors" if folder is not None else None
            suffixes = ("lora_embedding_A", "lora_embedding_B") if module.embedding else ("lora_A.weight",
                                                                                          "lora_B.weight")
            for suffix, tensor in zip(suffixes, (f.A, f.B)):
                check_finite(tensor.detach(), f"expert {name!r}", f"{module.name}.{suffix}", where)


def _check_lora_config(name: str, cfg) -> None:
    from peft import LoraConfig, PeftType

    if getattr(cfg, "peft_type", None) != PeftType.LORA or not isinstance(cfg, LoraConfig):
        raise MergeError(
            f"adapter {name!r} is a {getattr(cfg, 'peft_type', type(cfg).__name__)} adapter; only LoRA adapters "
            "can be merged"
        )
    if getattr(cfg, "use_dora", False):
        raise MergeError(f"adapter {name!r} uses DoRA (use_dora=True); its delta is not s·B@A, merging is not supported")
    if getattr(cfg, "lora_bias", False):
        raise MergeError(f"adapter {name!r} uses lora_bias=True; merging LoRA biases is not supported")
    if getattr(cfg, "target_parameters", None):
        raise MergeError(f"adapter {name!r} targets nn.Parameter (target_parameters); merging it is not supported")
    if getattr(cfg, "trainable_token_indices", None):
        raise MergeError(f"adapter {name!r} uses trainable_token_indices; merging it is not supported")
    if getattr(cfg, "layer_replication", None):
        raise MergeError(f"adapter {name!r} uses layer_replication; merging it is not supported")


def _modules_to_save_owners(model, adapters: list[str]) -> dict[str, str]:
    """Module name → the one adapter that saves it (MergeError when two adapters save the same module)."""
    from peft.utils import ModulesToSaveWrapper

    owners: dict[str, str] = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            having = [a for a in adapters if a in module.modules_to_save]
            if len(having) > 1:
                raise MergeError(
                    f"adapters {having} all train module {name!r} fully (modules_to_save); such modules cannot be "
                    "merged. Merge adapters with at most one modules_to_save owner per module"
                )
            if having:
                owners[name] = having[0]
    return owners


def _prepare_peft_model(model, adapters: Sequence[PathLike], allow_pickle: bool = False
                        ) -> tuple[Any, list[str], list[Optional[Path]]]:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        names, folders = [], []
        known = list(model.peft_config)
        sources = getattr(model, _SOURCE_ATTR, {})
        for item in adapters:
            if not isinstance(item, str) or item not in model.peft_config:
                raise MergeError(
                    f"adapter {item!r} is not loaded in the PeftModel (loaded: {known}); with a PeftModel pass "
                    "adapter names, with a base model pass adapter folders"
                )
            names.append(item)
            folders.append(Path(sources[item]) if item in sources else None)
        return model, names, folders
    if not isinstance(model, torch.nn.Module):
        raise MergeError(f"model must be a PeftModel or a transformers model, got {type(model).__name__}")
    folders = [Path(a) for a in adapters]
    for folder in folders:
        if not (folder / "adapter_config.json").is_file():
            raise MergeError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    names = _expert_names(folders)
    for name, folder in zip(names, folders):
        check_adapter_files(folder, f"adapter {name!r}", allow_pickle=allow_pickle)
    bases = {}
    for folder in folders:
        try:
            bases[str(folder)] = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except ValueError as err:
            raise MergeError(f"cannot read {folder / 'adapter_config.json'}: {err}") from err
    if len({b for b in bases.values() if b}) > 1:
        logger.warning("the adapters name different base models %s; merging them assumes they share this base",
                       bases)
    peft_model = None
    for name, folder in zip(names, folders):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                peft_model.load_adapter(str(folder), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as err:
            raise MergeError(
                f"adapter {name!r} ({folder}) does not fit the base model "
                f"{type(model).__name__} (trained on another base? base_model_name_or_path="
                f"{bases[str(folder)]!r}): {err}"
            ) from err
    setattr(peft_model, _SOURCE_ATTR, {n: str(f) for n, f in zip(names, folders)})
    logger.info("loaded %d adapters as %s", len(names), names)
    return peft_model, names, folders


def _new_adapter_config(first_cfg, rank: int, target_modules: set[str], modules_to_save: Optional[list[str]]):
    updates = dict(
        r=rank,
        lora_alpha=rank,  # scaling exactly 1 ...
        use_rslora=False,  # ... which rsLoRA would turn into sqrt(rank) (PEFT copies it: peft#3761)
        rank_pattern={},
        alpha_pattern={},
        target_modules=set(target_modules),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        init_lora_weights=True,  # cheap init; other inits (PiSSA, OLoRA, ...) would rewrite the base weights
        use_dora=False,
        modules_to_save=modules_to_save,
        inference_mode=True,
    )
    known = {f.name for f in dataclasses.fields(first_cfg)}
    return dataclasses.replace(first_cfg, **{k: v for k, v in updates.items() if k in known})


def merge_adapters(
    model,
    adapters: Sequence[Union[str, os.PathLike]],
    *,
    config: Optional[MergeConfig] = None,
    adapter_name: str = "merged",
    save_to: Optional[PathLike] = None,
    sensitivities=None,
    transferability=None,
    probes=None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    allow_pickle: bool = False,
    extra_files: Optional[dict[str, str]] = None,
    **config_kwargs,
) -> MergeReport:
    """Merge LoRA adapters, PEFT style, with Sens-Merging coefficients.

    Args:
        model: A ``PeftModel`` with the adapters loaded (``adapters`` are adapter names), or a base transformers
            model (``adapters`` are adapter folders; they are loaded into a new ``PeftModel`` under names derived
            from the folder names, e.g. ``out/math`` → ``math``, deduplicated with ``_2``...). Sidecars are read
            from those folders; for adapters given by name pass ``sensitivities=`` / ``probes=`` explicitly.
        adapters: Adapter names or folders (at least one, no duplicates).
        config: A :class:`MergeConfig`; when None it is built from ``**config_kwargs`` (when both are given the
            keyword arguments override fields of ``config``).
        adapter_name: Name of the new adapter (``output="lora"``); an existing name is an error.
        save_to: Folder to write the result into (atomically, with ``README.md`` and ``merge_config.json``).
            LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` at the top level, loadable with
            ``PeftModel.from_pretrained(base, save_to)``. Full: a transformers model folder.
        sensitivities: Per-expert ``SensitivityRecord`` objects or paths (default: each folder's sidecar).
        transferability: Explicit K×K transferability matrix (default: computed from the probes by switching
            adapters of this one model).
        probes: Per-expert ``ProbeSet`` objects or paths (default: each folder's ``probe.safetensors``).
        overwrite: Allow replacing an existing ``save_to`` folder.
        progress: Show a tqdm bar (default: when stderr is a terminal).
        allow_pickle: Accept adapter folders holding only ``adapter_model.bin`` (pickle; only for files you
            trust). By default such folders are refused.
        extra_files: Text files (relative name → content) written into the output folder before the atomic
            rename, e.g. the recipe that produced the merge.
        **config_kwargs: :class:`MergeConfig` fields (``method``, ``density``, ``sens``, ``output``, ``rank``...).

    Returns:
        A :class:`MergeReport`; ``report.model`` is the PeftModel with the new (inactive) adapter for
        ``output="lora"`` (call ``set_adapter(adapter_name)``), or the base model with the merged delta added
        for ``output="full"``.

    Output details:
        - ``output="lora"``, ``task_arithmetic``: exact concatenation. Per module, ``A = [c_k s_k A_k]`` (rows)
          and ``B = [B_k]`` (columns) over the experts adapting it, where ``s_k`` is the adapter's effective
          scaling on that layer (rsLoRA, alpha/rank patterns included). The new adapter has ``r = lora_alpha``
          = the largest per-module concatenated rank (scaling exactly 1, ``use_rslora=False``, no patterns);
          modules adapted by fewer experts are zero-padded, which leaves ``B @ A`` unchanged.
        - ``output="lora"``, TIES/DARE: per module ``ΔW_k`` (fp32 on the device), merged by
          :func:`sens_peft.methods.merge_deltas`, then truncated SVD to ``rank`` (default: the largest expert
          rank) with ``B = U·diag(S)``, ``A = Vh`` (all singular values on B, as PEFT's ``*_svd`` types).
        - ``output="full"``: the merged ΔW (no SVD, no truncation) is added to the base weights in place and the
          LoRA layers are removed (like ``merge_and_unload``): the input PeftModel is consumed.

    Raises:
        MergeError: empty or duplicate adapters, unknown names, an existing ``adapter_name``, DoRA / lora_bias /
            non-LoRA adapters, conflicting ``modules_to_save``, missing sidecars when ``sens`` needs them.
    """
    start = time.perf_counter()
    cfg = _resolve_config(config, config_kwargs)
    adapters = check_path_list(adapters, "adapters")
    if not adapters:
        raise MergeError("no adapters to merge: pass at least one adapter name or folder")
    check_distinct_inputs(adapters, "adapters")
    from peft import PeftModel

    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise MergeError(
            f"an adapter named {adapter_name!r} already exists in the model; pick another adapter_name or "
            "delete_adapter it first"
        )
    if save_to is not None:
        out = Path(save_to)
        if out.exists() and not overwrite:
            raise MergeError(f"output folder {out.resolve()} already exists; pass overwrite=True to replace it")
        check_output_location(out, [model_source_folder(model), *adapters])
    warn_unused_options(cfg, sensitivities=sensitivities, probes=probes, transferability=transferability,
                        kind=cfg.output)
    peft_model, names, folders = _prepare_peft_model(model, adapters, allow_pickle=allow_pickle)
    cfg = _resolve_trim(cfg, sensitivities, folders)
    if adapter_name in peft_model.peft_config:
        raise MergeError(f"an adapter named {adapter_name!r} already exists in the model; pick another adapter_name")
    for name in names:
        _check_lora_config(name, peft_model.peft_config[name])
    owners = _modules_to_save_owners(peft_model, names)
    if owners and cfg.output == "full":
        raise MergeError(
            f"modules_to_save ({sorted(owners)}) cannot be merged into a full model yet; use output='lora'"
        )
    device = _device(cfg)

    modules: list[LoraModule] = []
    for module in lora_modules(peft_model):
        present = [a for a in names if a in module.adapters()]
        if not present:
            continue
        if module.embedding is None:
            raise MergeError(
                f"module {module.name!r} is a {type(module.layer).__name__} LoRA layer (adapters {present}); only "
                "Linear, Conv1D (fan_in_fan_out) and Embedding LoRA layers can be merged"
            )
        modules.append(module)
    if not modules:
        raise MergeError(f"adapters {names} adapt no module of the model")

    _check_lora_finite(modules, names, folders)
    check_adapters_loaded(lora_modules(peft_model), names, folders)
    check_rank(cfg.rank if cfg.output == "lora" else None, modules)

    # coefficients
    records = _load_records(sensitivities, folders, names, cfg)
    if records is not None:
        fingerprint = model_fingerprint(getattr(peft_model.base_model.model, "config", None))
        for k, (name, record) in enumerate(zip(names, records)):
            adapted = {m.name for m in modules if name in m.adapters()} | _modules_to_save_of(peft_model, name)
            check_record_matches(record, f"expert {name!r}", _record_source(sensitivities, folders, k),
                                 modules=adapted, fingerprint=fingerprint)
    _, need_cross = _sens_parts(cfg)
    transfer = None
    if transferability is not None:
        transfer = _check_transfer(transferability, len(names))
    elif need_cross:
        from .transfer import transferability_for_adapters

        vocab = getattr(getattr(peft_model, "config", None), "vocab_size", None)
        probe_sets = _load_probes(probes, folders, names, vocab)
        active = peft_model.active_adapter
        try:
            transfer = transferability_for_adapters(
                peft_model, names, probe_sets, alignment=cfg.alignment, device=device, vocab_size=vocab
            )
        finally:
            peft_model.set_adapter(active)
        transfer = _check_transfer(transfer, len(names))
        logger.info("transferability matrix:\n%s", transfer)
    table = _coefficients(cfg, records, transfer, names)

    # per-module expert subsets and ranks
    plan = []
    for module in modules:
        idx = [k for k, a in enumerate(names) if a in module.adapters()]
        plan.append((module, idx))
    max_r = max(module.factors(names[k]).rank for module, idx in plan for k in idx)
    exact_cat = cfg.output == "lora" and cfg.method == "task_arithmetic" and cfg.trim_by == "magnitude"
    if exact_cat:
        new_rank = max(sum(module.factors(names[k]).rank for k in idx) for module, idx in plan)
        if cfg.rank is not None:
            logger.warning("rank=%d is ignored for task_arithmetic with output='lora' (exact concatenation, "
                           "rank %d)", cfg.rank, new_rank)
    else:
        new_rank = cfg.rank or max_r
    logger.info("merging %d modules of %d experts with %s (output=%s%s) on %s", len(plan), len(names), cfg.method,
                cfg.output, f", rank {new_rank}" if cfg.output == "lora" else "", device)

    if cfg.output == "lora":
        first_cfg = peft_model.peft_config[names[0]]
        fifo = {bool(peft_model.peft_config[n].fan_in_fan_out) for n in names}
        if len(fifo) > 1:
            logger.warning("adapters disagree on fan_in_fan_out; PEFT sets it per layer type, the new adapter "
                           "uses the first adapter's value")
        new_cfg = _new_adapter_config(
            first_cfg, new_rank, {m.name for m, _ in plan}, sorted(owners) if owners else None
        )
        peft_model.add_adapter(adapter_name, new_cfg)
        try:
            _fill_lora(peft_model, plan, names, table, records, cfg, device, adapter_name, new_rank, exact_cat,
                       progress)
            for name, owner in owners.items():
                _copy_modules_to_save(peft_model, name, owner, adapter_name)
        except BaseException:
            peft_model.delete_adapter(adapter_name)
            raise
        result_model = peft_model
    else:
        _fill_full(peft_model, plan, names, table, records, cfg, device, progress)
        result_model = peft_model.unload()
        if cfg.dtype is not None:
            result_model = result_model.to(_dtype(cfg.dtype))
            check_model_finite(result_model)

    output_dir = None
    if save_to is not None:
        inputs = [f for f in folders if f is not None] + [model_source_folder(peft_model)]
        with atomic_output_dir(save_to, overwrite=overwrite, inputs=inputs) as tmp:
            if cfg.output == "lora":
                _save_adapter(peft_model, adapter_name, tmp, sorted(owners))
                base_id = getattr(peft_model.peft_config[adapter_name], "base_model_name_or_path", None)
            else:
                result_model.save_pretrained(tmp)
                base_id = getattr(getattr(result_model, "config", None), "_name_or_path", None)
            from .card import write_card

            write_card(
                tmp, cfg.to_dict(), names, [str(f) if f else f"adapter:{n}" for n, f in zip(names, folders)], table,
                kind=f"lora (rank {new_rank})" if cfg.output == "lora" else "full", base_model=base_id or None,
                library_name="peft" if cfg.output == "lora" else "transformers",
                extra={"adapter_name": adapter_name if cfg.output == "lora" else None},
            )
            _write_extra_files(tmp, extra_files)
        output_dir = Path(save_to).resolve()
        logger.info("wrote %s", output_dir)

    seconds = time.perf_counter() - start
    return MergeReport(
        config=cfg,
        coefficients=table,
        experts=names,
        output_dir=output_dir,
        adapter_name=adapter_name if cfg.output == "lora" else None,
        seconds=seconds,
        peak_rss_mb=_peak_rss_mb(),
        transfer=transfer,
        model=result_model,
        sources=[str(f) if f else f"adapter:{n}" for n, f in zip(names, folders)],
        details={"modules": len(plan), "rank": new_rank if cfg.output == "lora" else None, "device": str(device)},
    )


def _fill_lora(peft_model, plan, names, table, records, cfg, device, adapter_name, new_rank, exact_cat, progress):
    for module, idx in _progress(plan, len(plan), "merging modules", progress):
        new = module.factors(adapter_name)
        if new is None:
            raise MergeError(f"the new adapter {adapter_name!r} was not created on module {module.name!r}")
        if abs(new.scaling - 1.0) > 1e-12:
            raise MergeError(f"the new adapter's scaling on {module.name!r} is {new.scaling}, expected 1")
        coeffs = table.for_name(module.weight_name).to(torch.float32)[idx]
        if exact_cat:
            parts_a, parts_b = [], []
            for c, k in zip(coeffs.tolist(), idx):
                f = module.factors(names[k])
                parts_a.append(f.A.to(device=device, dtype=torch.float32) * (c * f.scaling))
                parts_b.append(f.B.to(device=device, dtype=torch.float32))
            A_cat, B_cat = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
            A = torch.zeros(new_rank, A_cat.shape[1], dtype=torch.float32, device=device)
            B = torch.zeros(B_cat.shape[0], new_rank, dtype=torch.float32, device=device)
            A[: A_cat.shape[0]] = A_cat
            B[:, : B_cat.shape[1]] = B_cat
        else:
            merged = _merge_module(module, idx, names, coeffs, records, cfg, device)
            A, B = svd_factors(merged.T if module.transposed else merged, new_rank)
        module.set_factors(adapter_name, A, B)
    for param_name, param in peft_model.named_parameters():
        if f".{adapter_name}." in param_name:
            param.requires_grad_(False)


def _merge_module(module: LoraModule, idx, names, coeffs, records, cfg, device) -> torch.Tensor:
    deltas = [delta_weight(module, module.factors(names[k]), device) for k in idx]
    importance = _importance(records, module.weight_name, idx, cfg)
    if importance is not None:
        importance = [m.to(device=device, dtype=torch.float32) for m in importance]
    if cfg.method in STREAMED_METHODS:
        # the chunked path with a zero base: the same math as merge_deltas (same DARE masks, the same kept
        # entries), without topk over the stacked deltas
        extras = {k: v for k, v in (cfg.extra or {}).items() if k in _METHOD_EXTRAS}
        zero = torch.zeros_like(deltas[0])
        merged, _ = merge_streamed(
            cfg.method, zero, deltas, coeffs.to(device), density=cfg.density,
            majority_sign_method=cfg.majority_sign_method, seed=cfg.seed, dare_rng=cfg.dare_rng,
            name=module.weight_name,
            weighted_election=bool(extras.get("weighted_election", True)), out_dtype=torch.float32,
            importance=importance, trim_by=cfg.trim_by if importance is not None else "magnitude",
            chunk=_chunk_for(device))
        return merged
    return _merge_one(cfg, deltas, coeffs.to(device), module.weight_name, importance)


def _fill_full(peft_model, plan, names, table, records, cfg, device, progress) -> None:
    for module, idx in _progress(plan, len(plan), "merging modules", progress):
        coeffs = table.for_name(module.weight_name).to(torch.float32)[idx]
        merged = _merge_module(module, idx, names, coeffs, records, cfg, device)
        weight = module.base_weight()
        with torch.no_grad():
            updated = weight.data.to(device=device, dtype=torch.float32) + merged
            weight.data.copy_(updated.to(device=weight.device, dtype=weight.dtype))


def _copy_modules_to_save(peft_model, module_name: str, owner: str, adapter_name: str) -> None:
    wrapper = peft_model.base_model.model.get_submodule(module_name)
    if adapter_name not in wrapper.modules_to_save:
        raise MergeError(f"modules_to_save copy of {module_name!r} for {adapter_name!r} was not created")
    wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())
    logger.info("module %s is taken whole from adapter %r (modules_to_save, not scaled)", module_name, owner)


def _save_adapter(peft_model, adapter_name: str, folder: Path, modules_to_save: Sequence[str] = ()) -> None:
    """Save one adapter with its files at the top of ``folder`` (loadable by ``PeftModel.from_pretrained``).

    The tensors are written directly, with PEFT's key layout (``base_model.model.<module>.lora_A.weight``;
    ``base_model.model.<module>.<param>`` for ``modules_to_save``): PEFT's ``save_pretrained`` drops every key
    containing ``.<other adapter name>.``, so an expert adapter named like a module (e.g. ``mlp``) would silently
    remove the merged adapter's ``...mlp...`` factors from the file.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for module in lora_modules(peft_model):
        factors = module.factors(adapter_name)
        if factors is None:
            continue
        prefix = f"base_model.model.{module.name}"
        if module.embedding:
            keys = (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B")
        else:
            keys = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
        tensors[keys[0]] = factors.A.detach().cpu().contiguous().clone()
        tensors[keys[1]] = factors.B.detach().cpu().contiguous().clone()
    root = peft_model.base_model.model
    for module_name in modules_to_save:
        copy = root.get_submodule(module_name).modules_to_save[adapter_name]
        for param, value in copy.state_dict().items():
            tensors[f"base_model.model.{module_name}.{param}"] = value.detach().cpu().contiguous().clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dataclasses.replace(peft_model.peft_config[adapter_name], inference_mode=True)
    cfg.save_pretrained(str(folder))


# --------------------------------------------------------------------------------------------------------------
# full models, streamed


_DONE = object()
# The input bytes the reader may hold ahead of the merge (see _Prefetcher).
_READ_AHEAD_BYTES = 512 * 2**20


class _Prefetcher:
    """Background reader: yields ``[name, base_tensor, [expert tensors], prepared, alone]`` with a read-ahead of
    ``depth`` tensors. ``prepare(name, base, experts, parts)`` returns the jobs (zero-argument callables, about
    ``parts`` of them) that prepare a tensor, or None; they run on two worker threads and ``prepared`` is the list
    of their results (None without jobs). ``alone`` is True for a tensor that little else can overlap with (what
    fits in memory beside it is under a quarter of its size, e.g. it is the last one, or the next one does not fit),
    so its preparation and merge are worth splitting (``parts`` is 2 for it).
    The consumer should clear each list when done with it, so that the tensors go at once.

    Memory is bounded in bytes too: the tensors read and not yet finished by the consumer (the one it is merging
    included, until it asks for the next) stay within ``max_bytes``, except that one tensor alone may exceed it; so
    a vocabulary-sized tensor is read only once the consumer is done with everything before it.
    """

    def __init__(self, names: list[str], base: TensorSource, experts: list[TensorSource], depth: int = 2,
                 max_bytes: int = _READ_AHEAD_BYTES, pool: Optional[BufferPool] = None, mapped: bool = True,
                 prepare: Optional[Callable[[str, torch.Tensor, list[torch.Tensor], int],
                                            Optional[list[Callable[[], Any]]]]] = None,
                 prepare_bytes: Optional[Callable[[int], int]] = None) -> None:
        self.pool = pool
        self.mapped = mapped
        # work done ahead for each tensor (drawing DARE masks, selecting TIES thresholds), on worker threads;
        # prepare_bytes(numel) is what its results hold in memory
        self._prepare = prepare
        self._prepare_bytes = prepare_bytes
        # Two workers: the tensors' preparations are independent (each has its own generator), so while the
        # consumer merges one tensor, the next two are prepared side by side.
        self._workers = ThreadPoolExecutor(2, thread_name_prefix="sens-peft-prepare") if prepare else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._names = names
        self._base = base
        self._experts = experts
        self._max_bytes = max_bytes
        self._queued = 0  # bytes read and not yet finished by the consumer
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sens-peft-prefetch", daemon=True)
        self._thread.start()

    def _nbytes(self, name: str) -> int:
        extra = self._prepare_bytes(_numel_of(self._base, name)) if self._prepare_bytes is not None else 0
        return extra + sum(_out_nbytes(src, name, None) for src in (self._base, *self._experts))

    def _alone(self, sizes: list[int], i: int) -> bool:
        """Whether what can be read while tensor ``i`` is in flight (the tensors after it, up to the first that
        does not fit beside it) is under a quarter of its size: too little to overlap with its work."""
        room = self._max_bytes - sizes[i]
        beside = 0
        for size in sizes[i + 1:]:
            if beside + size > room:
                break
            beside += size
        return beside * 4 < sizes[i]

    def _put(self, item, nbytes: int = 0) -> bool:
        with self._cond:
            self._queued += nbytes
        while not self._stop.is_set():
            try:
                self._queue.put((item, nbytes), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            sizes = [self._nbytes(name) for name in self._names]
            for i, name in enumerate(self._names):
                nbytes = sizes[i]
                with self._cond:  # wait for room before reading, so the bound holds for what is in memory
                    while self._queued and self._queued + nbytes > self._max_bytes and not self._stop.is_set():
                        self._cond.wait(timeout=0.1)
                if self._stop.is_set():
                    return
                base_t = self._base.get(name, self.pool, mapped=self.mapped)
                experts = [e.get(name, self.pool, mapped=self.mapped) for e in self._experts]
                alone = self._alone(sizes, i)
                ready = None
                if self._workers is not None and base_t.is_floating_point():
                    jobs = self._prepare(name, base_t, experts, 2 if alone else 1)
                    if jobs:
                        ready = [self._workers.submit(job) for job in jobs]
                item = (name, base_t, experts, ready, alone)
                if not self._put(item, nbytes):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err)

    def __iter__(self):
        while True:
            item, nbytes = self._queue.get()
            try:
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                name, base_t, experts, ready, alone = item
                # a list, so that the consumer can drop every reference (tqdm's included) by clearing it
                entry = [name, base_t, experts, None if ready is None else [f.result() for f in ready], alone]
                item = base_t = experts = ready = None
                yield entry
            finally:  # the consumer is done with this tensor (it asked for the next one, or stopped)
                with self._cond:
                    self._queued -= nbytes
                    self._cond.notify_all()

    def recycle(self, *tensors: torch.Tensor) -> None:
        """Hand the buffers of tensors the consumer is done with back to the pool (no other view may remain)."""
        if self.pool is not None:
            for tensor in tensors:
                self.pool.give(tensor)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.clear()


def _check_tensors(base: TensorSource, experts: list[TensorSource], names: list[str]) -> None:
    base_names = set(base.names())
    for name, src in zip(names, experts):
        expert_names = set(src.names())
        missing = sorted(base_names - expert_names)
        if missing:
            raise MergeError(
                f"expert {name!r} ({src.folder}) lacks tensor {missing[0]!r} of the base (in "
                f"{base.file_of(missing[0]).name}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )
        extra = sorted(expert_names - base_names)
        if extra:
            raise MergeError(
                f"expert {name!r} has tensor {extra[0]!r} (in {src.file_of(extra[0])}) that the base "
                f"({base.folder}) lacks{f', and {len(extra) - 1} more' if len(extra) > 1 else ''}"
            )
        for tensor in base.names():
            if src.shape(tensor) != base.shape(tensor):
                raise MergeError(
                    f"expert {name!r}: tensor {tensor!r} in {src.file_of(tensor)} has shape "
                    f"{list(src.shape(tensor))}, the base ({base.file_of(tensor)}) has {list(base.shape(tensor))}"
                )


# --------------------------------------------------------------------------------------------------------------
# distributed merges (torchrun / accelerate launch)


def _error_info(err: BaseException) -> tuple[bool, str, str]:
    return isinstance(err, MergeError), type(err).__name__, str(err)


def _remote_error(rank: int, info: tuple[bool, str, str]) -> BaseException:
    """The error another rank reported, for the ranks that did not fail themselves."""
    is_merge_error, type_name, message = info
    if is_merge_error:
        return MergeError(f"{message} (reported by rank {rank})")
    return RuntimeError(f"merge failed on rank {rank}: {type_name}: {message}")


_GROUP_SERIAL = itertools.count()


class _Comm:
    """The collectives a distributed merge needs, over a gloo group; with ``world_size == 1`` every method is a
    plain local call (the single-process merge runs exactly as without it).

    Args:
        group: The process group (None: the default group).
        rank: This process's rank in ``group``.
        world_size: Number of processes in ``group``.
        owns_group: Destroy ``group`` in :meth:`close` (a gloo group created for this merge).
        owns_default: Destroy the default group in :meth:`close` (initialised from torchrun's variables).
    """

    def __init__(self, group=None, rank: int = 0, world_size: int = 1, *, owns_group: bool = False,
                 owns_default: bool = False) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self._owns_group = owns_group
        self._owns_default = owns_default

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def open(cls, distributed: Union[bool, str, None], timeout_s: float) -> _Comm:
        """Join (or create) the process group a distributed merge runs in.

        ``False``/``None``: one process, whatever groups exist. ``"auto"``: the default group when one is
        initialised with more than one process, else a gloo group from torchrun's ``WORLD_SIZE``/``RANK``/
        ``MASTER_ADDR``/``MASTER_PORT`` when ``WORLD_SIZE > 1``, else one process. ``True``: like ``"auto"``,
        but an error when the process was neither launched by torchrun nor joined a group.
        """
        if distributed is None or distributed is False:
            return cls()
        if distributed is not True and distributed != "auto":
            raise MergeError(f"distributed must be True, False or 'auto', got {distributed!r}")
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=float(timeout_s))
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() == 1:
                return cls()
            # A gloo group of its own: the default group may be NCCL (no CPU collectives), and the merge's
            # error exchange should time out on the merge's terms.
            group = dist.new_group(backend="gloo", timeout=timeout)
            return cls(group, dist.get_rank(group), dist.get_world_size(group), owns_group=True)
        launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        world = int(os.environ.get("WORLD_SIZE", "1") or 1) if launched else 1
        if world > 1:
            if not dist.is_available():
                raise MergeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
            # A fresh key prefix per merge: torchrun's agent store outlives the groups, and a re-created default
            # group would otherwise find the previous one's rendezvous keys (and connect to dead peers). Every
            # rank makes the same sequence of merge_models calls, so the counters agree.
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            prefix = f"sens_peft/merge_models/{next(_GROUP_SERIAL)}"
            dist.init_process_group(backend="gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                                    world_size=world, timeout=timeout)
            return cls(None, dist.get_rank(), dist.get_world_size(), owns_default=True)
        if distributed is True and not launched:
            raise MergeError(
                "distributed=True, but no process group is initialised and WORLD_SIZE/RANK are not set: launch "
                "with torchrun / accelerate launch, or call torch.distributed.init_process_group first"
            )
        return cls()

    def close(self) -> None:
        if not (self._owns_group or self._owns_default):
            return
        import torch.distributed as dist

        try:
            if self._owns_group:
                dist.destroy_process_group(self.group)
            elif dist.is_initialized():
                dist.destroy_process_group()
        except Exception as err:  # never mask the merge's own result or error
            logger.warning("could not destroy the merge's process group: %s", err)

    def check(self, err: Optional[BaseException], counts: Sequence[int] = ()) -> list[int]:
        """Every rank reports its error (or None) and counts; if any rank failed, every rank raises (its own
        error, or the first failing rank's). Returns the counts summed over ranks."""
        if not self.distributed:
            if err is not None:
                raise err
            return list(counts)
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        mine = (None if err is None else _error_info(err), [int(c) for c in counts])
        dist.all_gather_object(gathered, mine, group=self.group)
        if err is not None:
            raise err
        for rank, (info, _) in enumerate(gathered):
            if info is not None:
                raise _remote_error(rank, info)
        return [sum(c[i] for _, c in gathered) for i in range(len(counts))]

    @contextlib.contextmanager
    def step(self):
        """A block every rank runs; an error on any rank is raised on all of them at the end of the block."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except BaseException as err:
            self.check(err)
            raise
        self.check(None)

    def root_call(self, fn):
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        result, err = None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:
                err = e
        box = [(result, None if err is None else _error_info(err))]
        # group rank 0 is global rank 0: the merge's groups span all processes in order
        dist.broadcast_object_list(box, src=0, group=self.group)
        if err is not None:
            raise err
        result, info = box[0]
        if info is not None:
            raise _remote_error(0, info)
        return result


def _expert_groups(num: int, parts: int) -> list[list[int]]:
    """``range(num)`` in at most ``parts`` consecutive groups of near-equal size (in order)."""
    size = -(-num // max(1, min(parts, num)))
    return [list(range(i, min(num, i + size))) for i in range(0, num, size)]


def _chunk_for(device: torch.device) -> int:
    """Entries per chunk of the streamed merge: cache-sized on the CPU; on an accelerator, large enough that a
    chunk's ~50 element-wise kernels are not dominated by their launch cost."""
    return DEFAULT_CHUNK if device.type == "cpu" else 1 << 24


def _numel_of(src: TensorSource, name: str) -> int:
    return math.prod(src.shape(name))


def _out_nbytes(src: TensorSource, name: str, out_dtype: Optional[torch.dtype]) -> int:
    """Bytes of tensor ``name`` in the output: ``out_dtype`` for floating-point tensors, else the base dtype."""
    dtype = src.dtype(name)
    if out_dtype is not None and dtype.is_floating_point:
        dtype = out_dtype
    numel = 1
    for s in src.shape(name):
        numel *= int(s)
    return numel * dtype.itemsize


def _check_inputs(name: str, base: Path, base_src: TensorSource, base_t: torch.Tensor, names: list[str],
                  expert_srcs: list[TensorSource], expert_ts: list[torch.Tensor]) -> None:
    """MergeError naming the input (base or expert) and file of tensor ``name`` that holds a NaN/Inf."""
    check_finite(base_t, f"base ({base})", name, base_src.file_of(name))
    for label, src, t in zip(names, expert_srcs, expert_ts):
        check_finite(t, f"expert {label!r}", name, src.file_of(name))


def _merge_shards(
    folder: Path,
    plan: ShardPlan,
    shard_ids: list[int],
    base: Path,
    base_src: TensorSource,
    expert_srcs: list[TensorSource],
    names: list[str],
    table,
    records,
    cfg: MergeConfig,
    device: torch.device,
    out_dtype: Optional[torch.dtype],
    prefetch: int,
    progress: Optional[bool],
) -> tuple[int, int]:
    """Merge and write the tensors of the plan's shards ``shard_ids`` into ``folder``. Returns (merged, copied)."""
    tensor_names = [name for i in shard_ids for name in plan.shards[i]]
    specs = {}
    for name in tensor_names:
        dtype = base_src.dtype(name)
        specs[name] = (base_src.shape(name), out_dtype if out_dtype is not None and dtype.is_floating_point else dtype)
    writer = ShardWriter(folder, max(plan.sizes), plan=plan, shard_ids=shard_ids, specs=specs)
    merged_count = copied_count = 0
    extras = {k: v for k, v in (cfg.extra or {}).items() if k in _METHOD_EXTRAS}
    streamed = cfg.method in STREAMED_METHODS
    # Buffers are recycled, and writes moved to a thread of their own, only when the writer writes each tensor as it
    # comes (a writer that gathers whole shards keeps references to them).
    pool = BufferPool() if writer.streams else None
    sink = BackgroundWriter(writer, pool) if writer.streams else None

    def emit(name: str, tensor: torch.Tensor, done: tuple[torch.Tensor, ...] = ()) -> None:
        """Write ``tensor``; the buffers of ``done`` go back to the pool once it is written."""
        check_merged_finite(name, tensor)
        if sink is None:
            writer.add(name, tensor)
        else:
            sink.add(name, tensor, done)

    prepare = prepare_bytes = None
    if streamed and device.type == "cpu" and cfg.density < 1.0 and cfg.method in (*DARE_METHODS, "ties"):
        # The slowest step of a DARE merge on the CPU is drawing the masks (a hash or a Mersenne-Twister draw per
        # entry and expert), of a TIES merge selecting the trim thresholds; done by the reader's two workers, it
        # overlaps with the merge of the tensor before (torch releases the GIL inside its ops). Each expert's
        # thresholds or counter masks depend on nothing else, so a tensor that little else overlaps with (see
        # _Prefetcher) is prepared in `parts` groups of experts side by side. This runs on the reader thread; the
        # jobs it returns run on the workers.
        def prepare(name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor], parts: int
                    ) -> Optional[list[Callable[[], Any]]]:
            if all(torch.equal(base_t, t) for t in expert_ts):
                return None  # copied, not merged
            num = len(expert_ts)
            if cfg.method == "ties":
                maps = _importance(records, name, list(range(len(names))), cfg)
                return [functools.partial(trim_thresholds, base_t, [expert_ts[k] for k in group], cfg.density,
                                          importance=None if maps is None else [maps[k] for k in group], name=name)
                        for group in _expert_groups(num, parts)]
            if cfg.method == "dare_ties" and cfg.dare_rng == "counter" and device.type == "cpu" \
                    and _fused.supports(base_t.reshape(-1), [t.reshape(-1) for t in expert_ts],
                                        base_t.new_empty(0, dtype=out_dtype or base_t.dtype)) \
                    and _fused.available():
                return None  # the fused loops hash the masks inline, for less than unpacking them would cost
            if cfg.dare_rng != "counter":  # one generator stream for all the experts: one job
                return [functools.partial(dare_masks, base_t.numel(), num, cfg.density, cfg.seed, name,
                                          dare_rng=cfg.dare_rng)]
            seed = _resolve_seed(cfg.seed)  # one key for every group, also when the seed is None
            return [functools.partial(dare_masks, base_t.numel(), num, cfg.density, seed, name,
                                      dare_rng=cfg.dare_rng, experts=group)
                    for group in _expert_groups(num, parts)]

        inline_masks = cfg.method == "dare_ties" and cfg.dare_rng == "counter" and device.type == "cpu" \
            and _fused.available()

        def prepare_bytes(numel: int) -> int:
            packed = cfg.method in DARE_METHODS and not inline_masks
            return (numel + 7) // 8 * len(expert_srcs) if packed else 0  # packed masks

    def prepared(results: Optional[list]) -> dict:
        """merge_streamed's keyword arguments from the results of a tensor's preparation jobs (in expert order)."""
        if results is None:
            return {}
        if cfg.method == "ties":
            return {"thresholds": ([trim for found, _ in results for trim in found],
                                   all(finite for _, finite in results))}
        return {"dare_masks": [mask for masks in results for mask in masks]}

    # A tensor that little else overlaps with (see _Prefetcher) is merged in two halves on two threads.
    helper = ThreadPoolExecutor(1, thread_name_prefix="sens-peft-merge") if streamed and device.type == "cpu" \
        else None

    reader = _Prefetcher(tensor_names, base_src, expert_srcs, depth=prefetch, max_bytes=_READ_AHEAD_BYTES,
                         pool=pool, prepare=prepare, prepare_bytes=prepare_bytes)
    def merge_tensor(name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor], ready, alone: bool) -> bool:
        """Merge (or copy) one tensor and queue it for writing; True if merged, False if copied."""
        dtype = out_dtype or base_t.dtype

        # torch.equal stops at the first difference, so for merged tensors this costs next to nothing.
        if all(torch.equal(base_t, t) for t in expert_ts):
            # Inf == Inf, so a copied tensor is checked here; NaN never compares equal and is caught below.
            check_finite(base_t, f"base ({base})", name, base_src.file_of(name))
            reader.recycle(*expert_ts)
            written = base_t.to(dtype) if base_t.is_floating_point() else base_t
            if written is base_t:
                emit(name, base_t, (base_t,))
            else:
                reader.recycle(base_t)
                emit(name, written)
            return False
        if not base_t.is_floating_point():
            raise MergeError(f"tensor {name!r} is not floating point ({base_t.dtype}) and differs between "
                             "the base and an expert; it cannot be merged")
        if streamed:
            # The non-finite check rides on the merge's own passes; only when it trips are the inputs
            # checked one by one, to name the broken one.
            coeffs = table.for_name(name)
            importance = _importance(records, name, list(range(len(names))), cfg) if cfg.method == "ties" \
                else None
            out = None
            if pool is not None and device.type == "cpu":
                out = pool.take(base_t.numel() * dtype.itemsize).view(dtype).view(base_t.shape)
            kwargs = dict(
                density=cfg.density, majority_sign_method=cfg.majority_sign_method, seed=cfg.seed,
                dare_rng=cfg.dare_rng, name=name,
                weighted_election=bool(extras.get("weighted_election", True)), out_dtype=dtype,
                importance=importance, trim_by=cfg.trim_by if importance is not None else "magnitude",
                chunk=_chunk_for(device), **prepared(ready))
            inputs = (cfg.method, base_t.to(device), [t.to(device) for t in expert_ts], coeffs)
            numel = base_t.numel()
            # halves on chunk borders; TIES halves need the thresholds selected ahead (else both would select them)
            chunk = kwargs["chunk"]
            if helper is not None and alone and numel >= 2 * chunk and not (
                    cfg.method == "ties" and cfg.density < 1.0 and "thresholds" not in kwargs):
                if out is None:
                    out = torch.empty(base_t.shape, dtype=dtype)
                mid = numel // 2 // chunk * chunk
                second = helper.submit(merge_streamed, *inputs, out=out, span=(mid, numel), **kwargs)
                try:
                    merged, finite = merge_streamed(*inputs, out=out, span=(0, mid), **kwargs)
                finally:  # never leave the helper writing into a buffer that is about to be recycled
                    wait([second])
                finite = second.result()[1] and finite
            else:
                merged, finite = merge_streamed(*inputs, out=out, **kwargs)
            if not finite:
                # raises on a NaN/Inf input; a finite overflow is written as computed
                _check_inputs(name, base, base_src, base_t, names, expert_srcs, expert_ts)
            reader.recycle(base_t, *expert_ts)
            emit(name, merged.cpu(), (merged,) if out is not None else ())
            return True
        _check_inputs(name, base, base_src, base_t, names, expert_srcs, expert_ts)
        base_f = base_t.to(device=device, dtype=torch.float32)
        deltas = [t.to(device=device, dtype=torch.float32) - base_f for t in expert_ts]
        coeffs = table.for_name(name).to(device=device, dtype=torch.float32)
        importance = _importance(records, name, list(range(len(names))), cfg)
        if importance is not None:
            importance = [m.to(device=device, dtype=torch.float32) for m in importance]
        merged = base_f + _merge_one(cfg, deltas, coeffs, name, importance)
        reader.recycle(base_t, *expert_ts)
        emit(name, merged.to(dtype).cpu())
        return True

    try:
        for item in _progress(reader, len(tensor_names), "merging tensors", progress):
            if merge_tensor(*item):
                merged_count += 1
            else:
                copied_count += 1
            # the tensors go now, not when the next item arrives (the reader counts them as finished then)
            item.clear()
    except BaseException:
        if sink is not None:
            sink.abort()
        else:
            writer.abort()
        raise
    finally:
        reader.close()
        if helper is not None:
            helper.shutdown(wait=True)
    if sink is not None:
        sink.close()
    else:
        writer.close()
    return merged_count, copied_count


def merge_models(
    base: PathLike,
    experts: Sequence[PathLike],
    out_dir: PathLike,
    *,
    config: Optional[MergeConfig] = None,
    sensitivities=None,
    transferability=None,
    probes=None,
    max_shard_size: Union[int, str] = "2GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
    extra_files: Optional[dict[str, str]] = None,
    prefetch: int = 2,
    distributed: Union[bool, str, None] = False,
    distributed_timeout: float = 600.0,
    **config_kwargs,
) -> MergeReport:
    """Merge full fine-tunes of one base model, streamed one tensor at a time from disk to disk.

    Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` from the base and every expert;
    a background thread reads (memory-maps) the next ``prefetch`` tensors while the current one is merged (math
    in fp32 on ``config.device``: CUDA when available, else CPU), two workers prepare the next tensors' TIES
    thresholds or DARE masks on the CPU, and a writer thread writes merged tensors as they come. At most 512 MB
    of input tensors are in flight (a larger tensor alone). Tensors equal in every expert and the base are copied.
    The output is written in the base's dtype (or ``dtype=``) into shards of at most ``max_shard_size``, with
    ``model.safetensors.index.json`` (one ``model.safetensors`` when it fits), plus the base's
    ``config.json``, ``generation_config.json`` and tokenizer files, ``README.md`` and ``merge_config.json``.
    The folder appears atomically: an error or interruption leaves no ``out_dir``.

    Shard plan: before anything is merged, the output shards are planned from the tensor names (in the base's
    file order), shapes and output dtypes alone: shards are filled in order and one is closed when the next
    tensor would push it over ``max_shard_size`` (a larger tensor gets a shard of its own). The file names
    follow from the number of shards. A single process writes every shard of the plan.

    Distributed merges (``distributed=True`` or ``"auto"``, run under ``torchrun`` / ``accelerate launch``, every
    process calling ``merge_models`` with the same arguments) produce the same bytes as one process:

    * Process group: an initialised default group is used through a gloo group created for the merge (so an
      NCCL default group works too); without one, a gloo group is initialised from torchrun's ``WORLD_SIZE``/
      ``RANK``/``MASTER_ADDR``/``MASTER_PORT``. Groups created here are destroyed before returning. Both have
      ``distributed_timeout`` seconds per collective. ``"auto"`` falls back to one process when neither exists
      (or the world has one process); ``True`` then raises.
    * Every rank computes the same shard plan (no communication) and writes only its shards: shards go, in
      order, to the rank with the fewest bytes so far (round robin for equal shards). DARE's per-tensor seed
      depends on (seed, tensor name) only, so a tensor's bytes do not depend on the rank that merges it.
    * Validation (configs, tensor names and shapes, sidecars, explicit transferability, coefficients) runs on
      every rank; if any rank fails, every rank raises (its own error, or a :class:`MergeError` / RuntimeError
      naming the rank that failed). A computed transferability matrix (``sens`` with ``cross``, which loads
      whole models) is computed on rank 0 only and broadcast.
    * Rank 0 creates the temporary output folder and broadcasts its path (the output's parent must be on a
      file system every rank sees). After writing, the ranks exchange an error flag and their tensor counts;
      then rank 0 writes the index, the config/tokenizer copies, the card and ``extra_files`` and renames the
      folder into place, and tells the other ranks whether that worked. On an error on any rank, rank 0 removes
      the temporary folder after every rank has stopped writing, and every rank raises. A rank that dies
      without raising (killed) leaves the others blocked until ``distributed_timeout`` (torchrun usually stops
      them sooner); its temporary folder is removed by a later merge to the same output.
    * With CUDA and no explicit device index, each rank uses ``cuda:<LOCAL_RANK>``.

    Args:
        base: Base model folder.
        experts: Expert model folders (fine-tunes of ``base``); names are the folder names (deduplicated).
        out_dir: Output folder (must not exist unless ``overwrite``; may not lie inside an input folder).
        config: A :class:`MergeConfig` (or build one from ``**config_kwargs``).
        sensitivities: Per-expert records or paths (default: each expert folder's ``sensitivity.safetensors``).
        transferability: Explicit K×K matrix; default, when ``sens`` includes ``cross``, it is computed from the
            probes with one expert model in memory at a time.
        probes: Per-expert ``ProbeSet`` objects or paths (default: each folder's ``probe.safetensors``).
        max_shard_size: Output shard size (``"2GB"``, ``"500MB"``, or bytes).
        overwrite: Replace an existing ``out_dir``.
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (pickle; only for files you trust).
        progress: Show a tqdm bar (default: when stderr is a terminal, and on rank 0 only).
        prefetch: Read-ahead depth of the background reader, in tensors.
        extra_files: Text files (relative name → content) written into the output folder before the atomic
            rename, e.g. the recipe that produced the merge.
        distributed: ``False`` (default): one process does everything, whatever process groups exist.
            ``True`` / ``"auto"``: split the shards across the processes of a torchrun / accelerate launch
            (see above).
        distributed_timeout: Seconds a collective of a distributed merge waits (for groups created here).
        **config_kwargs: :class:`MergeConfig` fields.

    Returns:
        A :class:`MergeReport` (``model`` is None), the same on every rank; a distributed merge adds
        ``details["world_size"]`` and ``details["rank_shards"]`` (the files this rank wrote).

    Raises:
        MergeError: no experts, incompatible configs (architecture, sizes, vocabulary), missing or differently
            shaped tensors (naming expert, file, tensor and shapes), missing sidecars, unsafe ``out_dir``,
            ``distributed=True`` outside a distributed launch.
    """
    start = time.perf_counter()
    cfg = _resolve_config(config, config_kwargs)
    comm = _Comm.open(distributed, distributed_timeout)
    try:
        return _merge_models(comm, start, cfg, base, experts, out_dir, sensitivities=sensitivities,
                             transferability=transferability, probes=probes, max_shard_size=max_shard_size,
                             overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                             extra_files=extra_files, prefetch=prefetch)
    finally:
        comm.close()


def _merge_models(
    comm: _Comm,
    start: float,
    cfg: MergeConfig,
    base: PathLike,
    experts: Sequence[PathLike],
    out_dir: PathLike,
    *,
    sensitivities,
    transferability,
    probes,
    max_shard_size: Union[int, str],
    overwrite: bool,
    allow_pickle: bool,
    progress: Optional[bool],
    extra_files: Optional[dict[str, str]],
    prefetch: int,
) -> MergeReport:
    with comm.step():
        experts = [Path(e) for e in check_path_list(experts, "experts")]
        if not experts:
            raise MergeError("no experts to merge: pass at least one expert folder")
        base = Path(base)
        resolved = [e.resolve() for e in experts]
        dupes = sorted({str(e) for e in resolved if resolved.count(e) > 1})
        if dupes:
            raise MergeError(f"expert folders are listed more than once: {dupes}")
        if base.resolve() in resolved:
            raise MergeError(f"the base folder {base} is also listed as an expert")
        if Path(out_dir).exists() and not overwrite:
            raise MergeError(f"output folder {Path(out_dir).resolve()} already exists; pass overwrite=True to "
                             "replace it")
        names = _expert_names(experts)
        out_dtype = _dtype(cfg.dtype)
        device = _device(cfg)
        if comm.distributed and device.type == "cuda" and device.index is None:
            local_rank = int(os.environ.get("LOCAL_RANK", comm.rank))
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))

        base_cfg = read_model_config(base, "base")
        for name, folder in zip(names, experts):
            check_config_compatible(base_cfg, read_model_config(folder, f"expert {name!r}"),
                                    f"expert {name!r} ({folder})", f"base ({base})")
        base_src = TensorSource(base, allow_pickle=allow_pickle, label=f"base ({base})")
        expert_srcs = [TensorSource(f, allow_pickle=allow_pickle, label=f"expert {n!r}")
                       for n, f in zip(names, experts)]
        _check_tensors(base_src, expert_srcs, names)
        check_source_dtypes(base_src, expert_srcs, names)
        warn_unused_options(cfg, sensitivities=sensitivities, probes=probes, transferability=transferability,
                            kind="models")

        cfg = _resolve_trim(cfg, sensitivities, list(experts))
        records = _load_records(sensitivities, list(experts), names, cfg)
        if records is not None:
            fingerprint = model_fingerprint(base_cfg)
            for k, (name, record) in enumerate(zip(names, records)):
                check_record_matches(record, f"expert {name!r}", _record_source(sensitivities, list(experts), k),
                                     tensors=base_src.names(), fingerprint=fingerprint,
                                     shapes={n: base_src.shape(n) for n in base_src.names()})
        _, need_cross = _sens_parts(cfg)
        transfer = None
        if transferability is not None:
            transfer = _check_transfer(transferability, len(names))
    if transfer is None and need_cross:
        def compute_transfer() -> torch.Tensor:
            from transformers import AutoModelForCausalLM

            from .transfer import transferability_for_models

            probe_sets = _load_probes(probes, list(experts), names, base_cfg.get("vocab_size"))

            def load_model(k: int) -> torch.nn.Module:
                logger.info("loading expert %r for transferability", names[k])
                return AutoModelForCausalLM.from_pretrained(str(experts[k]), dtype=torch.float32)

            matrix = transferability_for_models(
                load_model, len(names), probe_sets, alignment=cfg.alignment, device=device,
                vocab_size=base_cfg.get("vocab_size"),
            )
            matrix = _check_transfer(matrix, len(names))
            logger.info("transferability matrix:\n%s", matrix)
            return matrix.cpu() if comm.distributed else matrix

        # loads every expert model in turn: once, on rank 0
        transfer = comm.root_call(compute_transfer)
    with comm.step():
        table = _coefficients(cfg, records, transfer, names)
        tensor_names = base_src.names()
        plan = plan_shards([(n, _out_nbytes(base_src, n, out_dtype)) for n in tensor_names],
                           parse_size(max_shard_size))
    files = plan.files
    shard_ids = plan.assign(comm.world_size)[comm.rank]
    if comm.rank != 0 and progress is None:
        progress = False

    finishing = False
    final_err: Optional[BaseException] = None
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(comm.root_call(lambda: stack.enter_context(
                atomic_output_dir(out_dir, overwrite=overwrite, inputs=[base, *experts]))))
            err: Optional[BaseException] = None
            counts = (0, 0)
            try:
                if not tmp.is_dir():
                    raise MergeError(
                        f"rank {comm.rank} does not see the temporary output folder {tmp} that rank 0 created; a "
                        "distributed merge needs the output's parent folder on a file system shared by all ranks"
                    )
                counts = _merge_shards(tmp, plan, shard_ids, base, base_src, expert_srcs, names, table, records,
                                       cfg, device, out_dtype, prefetch, progress)
            except BaseException as e:
                err = e
            # every rank has stopped writing once this returns; on an error rank 0 leaves the with and the
            # temporary folder is removed
            merged_count, copied_count = comm.check(err, counts)
            finishing = True
            if comm.rank == 0:
                plan.write_index(tmp)
                copied = copy_model_files(base, tmp)
                if out_dtype is not None and (tmp / "config.json").is_file():
                    _set_config_dtype(tmp / "config.json", out_dtype)
                from .card import write_card

                write_card(
                    tmp, cfg.to_dict(), names, [str(e) for e in experts], table, kind="full",
                    base_model=base_cfg.get("_name_or_path") or str(base), library_name="transformers",
                    extra={"shards": files, "merged_tensors": merged_count, "copied_tensors": copied_count},
                )
                _write_extra_files(tmp, extra_files)
                logger.info("output: %d shard(s) %s, %d tensors merged, %d copied, files copied from base: %s",
                            len(files), files, merged_count, copied_count, copied)
    except BaseException as e:
        if not (finishing and comm.distributed):
            raise
        final_err = e
    finally:
        base_src.close()
        for src in expert_srcs:
            src.close()
    if comm.distributed:
        comm.check(final_err)  # rank 0's index, card and rename: the other ranks learn how they went
    details: dict[str, Any] = {"shards": files, "merged_tensors": merged_count, "copied_tensors": copied_count,
                               "device": str(device)}
    if comm.distributed:
        details.update(world_size=comm.world_size, rank_shards=[files[i] for i in shard_ids])
    return MergeReport(
        config=cfg,
        coefficients=table,
        experts=names,
        output_dir=Path(out_dir).resolve(),
        adapter_name=None,
        seconds=time.perf_counter() - start,
        peak_rss_mb=_peak_rss_mb(),
        transfer=transfer,
        model=None,
        sources=[str(e) for e in experts],
        details=details,
    )


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    data = json.loads(path.read_text())
    text = str(dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = text
    if "torch_dtype" not in data and "dtype" not in data:
        data["dtype"] = text
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
