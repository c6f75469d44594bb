"""LoRA adapters merged inside one PeftModel (:func:`merge_adapters`): into a new adapter, or into the base weights."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import card
from ..config import MergeConfig
from ..errors import MergeError
from ..io import atomic_output_dir
from ..lora import LoraModule, delta_weight, lora_modules, svd_factors
from ..lowrank import randomized_factors
from ..methods import FitProblem, MergeContext, merge_deltas, merge_streamed
from ..names import portable_name
from ..validation import (
    check_adapter_files,
    check_adapters_loaded,
    check_distinct_inputs,
    check_finite,
    check_model_finite,
    check_output_location,
    check_path_list,
    check_rank,
    check_record_matches,
    model_fingerprint,
    model_source_folder,
    warn_unused_options,
)
from .plan import (
    MergePlan,
    MergeReport,
    PathLike,
    check_transfer,
    device_of,
    dtype_of,
    expert_names,
    load_probes,
    peak_rss_mb,
    plan_merge,
    probes_present,
    progress_bar,
    resolve_config,
    write_extra_files,
)
from .streaming import chunk_for

logger = logging.getLogger(__name__)

__all__ = ["merge_adapters"]

_SOURCE_ATTR = "_sens_peft_sources"


def _modules_to_save_of(peft_model, adapter: str) -> set[str]:
    from peft.utils import ModulesToSaveWrapper

    return {name for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save}


def _check_lora_finite(modules: list[LoraModule], names: list[str], folders: list[Optional[Path]]) -> None:
    """A NaN/Inf in any LoRA factor would spread through the merged ΔW: refuse, naming expert and tensor.

    A cheap pass over all factors (:func:`_all_finite`), and the per-tensor check only when it finds something,
    to name the tensor.
    """
    found = [(module, name, folder, f) for module in modules for name, folder in zip(names, folders)
             if (f := module.factors(name)) is not None]
    tensors = [t for *_, f in found for t in (f.A, f.B) if t.is_floating_point()]
    if tensors and _all_finite(tensors):
        return
    for module, name, folder, f in found:
        where = folder / "adapter_model.safetensors" if folder is not None else None
        suffixes = ("lora_embedding_A", "lora_embedding_B") if module.embedding else ("lora_A.weight",
                                                                                      "lora_B.weight")
        for suffix, tensor in zip(suffixes, (f.A, f.B)):
            check_finite(tensor, f"expert {name!r}", f"{module.name}.{suffix}", where)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite: one sum per tensor (NaN and Inf propagate through it; ~15x faster than
    ``isfinite`` on the CPU, which writes a mask) and one check per device. A sum can overflow where no value
    does; that reads as False and the caller's exact per-tensor check then clears it."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor.sum(dtype=torch.float32))
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


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
    names = expert_names(folders)
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
        - ``output="lora"``, a method with exact LoRA factors (``task_arithmetic``): exact concatenation. Per module, ``A = [c_k s_k A_k]`` (rows)
          and ``B = [B_k]`` (columns) over the experts adapting it, where ``s_k`` is the adapter's effective
          scaling on that layer (rsLoRA, alpha/rank patterns included). The new adapter has ``r = lora_alpha``
          = the largest per-module concatenated rank (scaling exactly 1, ``use_rslora=False``, no patterns);
          modules adapted by fewer experts are zero-padded, which leaves ``B @ A`` unchanged.
        - ``output="lora"``, TIES/DARE: per module ``ΔW_k`` (fp32 on the device), merged by
          the method, then truncated SVD to ``rank`` (default: the largest expert
          rank) with ``B = U·diag(S)``, ``A = Vh`` (all singular values on B, as PEFT's ``*_svd`` types).
        - ``output="full"``: the merged ΔW (no SVD, no truncation) is added to the base weights in place and the
          LoRA layers are removed (like ``merge_and_unload``): the input PeftModel is consumed.

    Raises:
        MergeError: empty or duplicate adapters, unknown names, an existing ``adapter_name``, DoRA / lora_bias /
            non-LoRA adapters, conflicting ``modules_to_save``, missing sidecars when ``sens`` needs them.
    """
    start = time.perf_counter()
    cfg = resolve_config(config, config_kwargs)
    adapters = check_path_list(adapters, "adapters")
    _check_request(model, adapters, adapter_name, save_to, overwrite)
    warn_unused_options(cfg, sensitivities=sensitivities, probes=probes, transferability=transferability,
                        kind=cfg.output)
    peft_model, names, folders = _prepare_peft_model(model, adapters, allow_pickle=allow_pickle)
    owners, modules = _adapted_modules(peft_model, names, folders, adapter_name, cfg)
    cfg = _default_for_layouts(cfg, modules)
    device = device_of(cfg)
    plan = plan_merge(cfg, names, folders, sensitivities=sensitivities, transferability=transferability,
                      probes_usable=cfg.method is None and _can_fit(modules, names, probes, folders),
                      compute_transfer=functools.partial(_transfer, peft_model, names, folders, probes, cfg, device),
                      check_record=functools.partial(_check_record, peft_model, modules))
    cfg = plan.config
    _check_layouts(plan, modules)
    work = [(module, [k for k, a in enumerate(names) if a in module.adapters()]) for module in modules]
    if plan.method.needs_probes:
        plan = _fit_on_probes(peft_model, plan, work, probes, device)
    new_rank, exact = _output_rank(plan, work)
    logger.info("merging %d modules of %d experts with %s (output=%s%s) on %s", len(work), len(names), cfg.method,
                cfg.output, f", rank {new_rank}" if cfg.output == "lora" else "", device)
    if cfg.output == "lora":
        result_model = _add_merged_adapter(peft_model, plan, work, owners, adapter_name, new_rank, exact, device,
                                           progress)
    else:
        _fill_full(peft_model, plan, work, device, progress)
        result_model = peft_model.unload()
        if cfg.dtype is not None:
            result_model = result_model.to(dtype_of(cfg.dtype))
            check_model_finite(result_model)
    sources = [portable_name(f) if f else f"adapter:{n}" for n, f in zip(names, folders)]
    output_dir = None
    if save_to is not None:
        output_dir = _save(save_to, overwrite, peft_model, result_model, plan, sources, adapter_name, new_rank,
                           sorted(owners), extra_files)
    return MergeReport(config=cfg, coefficients=plan.table, experts=names, output_dir=output_dir,
                       adapter_name=adapter_name if cfg.output == "lora" else None,
                       seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), transfer=plan.transfer,
                       model=result_model, sources=sources,
                       details={"modules": len(work), "rank": new_rank if cfg.output == "lora" else None,
                                "device": str(device)})


def _can_fit(modules: list[LoraModule], names: list[str], probes, folders: list[Optional[Path]]) -> bool:
    """Whether ``method=None`` may fit on the probes: every expert has a probe set and the fit's dense parts (one
    fp32 ``ΔW`` per expert and adapted module) are within the fit's memory limit (``method="probe_fit"`` asked by
    name is not limited)."""
    from .fitting import default_may_fit

    if not probes_present(probes, folders):
        return False
    need = 4 * sum(module.base_weight().numel() * sum(a in names for a in module.adapters()) for module in modules)
    return default_may_fit(need, "one fp32 delta per expert and adapted module")


def _default_for_layouts(cfg: MergeConfig, modules: list[LoraModule]) -> MergeConfig:
    """``method=None`` with fan_in_fan_out (Conv1D) layers: task arithmetic, since RegMean cannot read them yet."""
    if cfg.method is None and any(m.transposed for m in modules):
        logger.warning("method=None: fan_in_fan_out (Conv1D) LoRA layers are not supported by RegMean yet; merging "
                       "with task_arithmetic")
        return dataclasses.replace(cfg, method="task_arithmetic")
    return cfg


def _check_layouts(plan: MergePlan, modules: list[LoraModule]) -> None:
    """Input Grams are [in, in] for torch Linear weights [out, in]; a fan_in_fan_out (Conv1D) weight is [in, out],
    which a square layer would take silently the wrong way round: refused until that layout is supported. A
    method that combines full weights (SLERP) is refused: LoRA experts' full weights are not formed here."""
    if plan.method.full_weights:
        raise MergeError(f"method {plan.config.method!r} combines the experts' full weights, not their deltas, so it "
                         "cannot merge LoRA adapters; merge full models with merge_models (e.g. after merging "
                         "each adapter into its base), or use a delta method")
    if "gram" in plan.needs:
        flipped = [m.name for m in modules if m.transposed]
        if flipped:
            raise MergeError(f"method {plan.config.method!r} reads input Grams, which are not supported for "
                             f"fan_in_fan_out (Conv1D) LoRA layers yet: {flipped[:3]}; use another method")


def _check_request(model, adapters: list, adapter_name: str, save_to: Optional[PathLike], overwrite: bool) -> None:
    """The request itself: adapters given once each, a free adapter name, an output folder that may be written."""
    from peft import PeftModel

    if not adapters:
        raise MergeError("no adapters to merge: pass at least one adapter name or folder")
    check_distinct_inputs(adapters, "adapters")
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise MergeError(
            f"an adapter named {adapter_name!r} already exists in the model; pick another adapter_name or "
            "delete_adapter it first"
        )
    if save_to is not None:
        if Path(save_to).exists() and not overwrite:
            raise MergeError(f"output folder {Path(save_to).resolve()} already exists; pass overwrite=True to "
                             "replace it")
        check_output_location(Path(save_to), [model_source_folder(model), *adapters])


def _adapted_modules(peft_model, names: list[str], folders: list[Optional[Path]], adapter_name: str,
                     cfg: MergeConfig) -> tuple[dict[str, str], list[LoraModule]]:
    """The modules_to_save owners and the LoRA modules the experts adapt, checked (config, layer types, finite)."""
    if adapter_name in peft_model.peft_config:
        raise MergeError(f"an adapter named {adapter_name!r} already exists in the model; pick another adapter_name")
    for name in names:
        _check_lora_config(name, peft_model.peft_config[name])
    owners = _modules_to_save_owners(peft_model, names)
    if owners and cfg.output == "full":
        raise MergeError(
            f"modules_to_save ({sorted(owners)}) cannot be merged into a full model yet; use output='lora'"
        )
    modules: list[LoraModule] = []
    every = lora_modules(peft_model)
    for module in every:
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
    check_adapters_loaded(every, names, folders)
    check_rank(cfg.rank if cfg.output == "lora" else None, modules)
    return owners, modules


def _check_record(peft_model, modules: list[LoraModule], k: int, name: str, record, source: str) -> None:
    adapted = {m.name for m in modules if name in m.adapters()} | _modules_to_save_of(peft_model, name)
    fingerprint = model_fingerprint(getattr(peft_model.base_model.model, "config", None))
    check_record_matches(record, f"expert {name!r}", source, modules=adapted, fingerprint=fingerprint)


def _transfer(peft_model, names: list[str], folders: list[Optional[Path]], probes, cfg: MergeConfig,
              device: torch.device) -> torch.Tensor:
    """The transferability matrix from the probes, switching adapters of this one model."""
    from ..transfer import transferability_for_adapters

    vocab = getattr(getattr(peft_model, "config", None), "vocab_size", None)
    probe_sets = load_probes(probes, folders, names, vocab)
    active = peft_model.active_adapter
    try:
        transfer = transferability_for_adapters(peft_model, names, probe_sets, alignment=cfg.alignment, device=device,
                                                vocab_size=vocab)
    finally:
        peft_model.set_adapter(active)
    transfer = check_transfer(transfer, len(names))
    logger.info("transferability matrix:\n%s", transfer)
    return transfer


def _fit_on_probes(peft_model, plan: MergePlan, work: list, probes, device: torch.device) -> MergePlan:
    """The plan with the coefficients a ``needs_probes`` method fits on the probes (adapters off, so the model
    is the base model, with the merged ΔW added to the adapted modules' base weights)."""
    from .fitting import delta_logits, fit_plan, fitting_mode

    vocab = getattr(getattr(peft_model, "config", None), "vocab_size", None)
    probe_sets = load_probes(probes, plan.folders, plan.experts, vocab,
                             purpose=f"method {plan.config.method!r} fits its coefficients on every expert's probe set")
    root = peft_model.base_model.model
    path_of = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    modules = {module.weight_name: (module, idx) for module, idx in work}

    def deltas(name: str) -> list[torch.Tensor]:
        module, idx = modules[name]
        return [delta_weight(module, module.factors(plan.experts[k]), device) for k in idx]

    def merge(name: str, coeffs: torch.Tensor) -> torch.Tensor:
        return _merge_module(*modules[name], plan, coeffs, device)

    problem = FitProblem(
        experts=plan.experts, tensors={name: idx for name, (_, idx) in modules.items()}, deltas=deltas, merge=merge,
        coefficients=plan.table.for_name,
        logits=delta_logits(root, {name: path_of[id(m.base_weight())] for name, (m, _) in modules.items()}),
        probes=probe_sets, params={**plan.params(), "scale": plan.config.scale}, device=device)
    with fitting_mode(peft_model, device), peft_model.disable_adapter():
        return fit_plan(plan, problem)


def _output_rank(plan: MergePlan, work: list) -> tuple[int, bool]:
    """The new adapter's rank, and whether the method gives exact factors (else the SVD of the merged ΔW)."""
    names, cfg, method = plan.experts, plan.config, plan.method
    ranks = [[module.factors(names[k]).rank for k in idx] for module, idx in work]
    exact = [method.exact_lora_rank(r, plan.params()) for r in ranks] if cfg.output == "lora" else [None]
    if all(r is not None for r in exact):
        new_rank = max(exact)
        if cfg.rank is not None:
            logger.warning("rank=%d is ignored for %s with output='lora' (exact factors, rank %d)", cfg.rank,
                           cfg.method, new_rank)
        if cfg.factorization != MergeConfig.factorization:
            logger.warning("factorization=%r is ignored for %s with output='lora': its factors are exact",
                           cfg.factorization, cfg.method)
        return new_rank, True
    return cfg.rank or max(r for rs in ranks for r in rs), False


def _add_merged_adapter(peft_model, plan: MergePlan, work: list, owners: dict[str, str], adapter_name: str,
                        new_rank: int, exact: bool, device: torch.device, progress: Optional[bool]):
    """Add the new adapter and fill it; on any error the half-made adapter is deleted again."""
    names = plan.experts
    fifo = {bool(peft_model.peft_config[n].fan_in_fan_out) for n in names}
    if len(fifo) > 1:
        logger.warning("adapters disagree on fan_in_fan_out; PEFT sets it per layer type, the new adapter "
                       "uses the first adapter's value")
    new_cfg = _new_adapter_config(peft_model.peft_config[names[0]], new_rank, {m.name for m, _ in work},
                                  sorted(owners) if owners else None)
    # Without modules_to_save, the new factors are created on the meta device (no random init of values that are
    # overwritten anyway: that init was most of a task-arithmetic merge's time) and the merged factors become the
    # parameters (see _FactorPlacer).
    lazy = not owners and _cast_adapter_dtype is not None
    peft_model.add_adapter(adapter_name, new_cfg, low_cpu_mem_usage=lazy)
    try:
        placer = _FactorPlacer(adapter_name) if lazy else None
        _fill_lora(peft_model, plan, work, device, adapter_name, new_rank, exact, progress, placer)
        if placer is not None:
            placer.finish(peft_model, {module.name for module, _ in work})
        for name, owner in owners.items():
            _copy_modules_to_save(peft_model, name, owner, adapter_name)
    except BaseException:
        peft_model.delete_adapter(adapter_name)
        raise
    return peft_model


try:  # the per-layer form of what PeftModel.add_adapter runs over the whole model (recent PEFT)
    from peft.tuners.tuners_utils import cast_adapter_dtype as _cast_adapter_dtype
except ImportError:  # older PEFT: the new adapter is created with PEFT's random init, as before
    _cast_adapter_dtype = None

_FACTOR_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


class _FactorPlacer:
    """Puts the merged factors into a new adapter that PEFT created on the meta device.

    Where a parameter lives is PEFT's choice: created fp32 on the CPU, moved and cast to the base layer's device
    and dtype, then fp16/bf16 upcast to fp32 (``add_adapter`` without ``low_cpu_mem_usage``). For the first layer
    of each kind (base layer type, weight dtype and device, embedding or not) that placement runs on empty memory
    with PEFT's own functions and the factors are copied in; later layers of the kind get the factors converted
    to the dtype and device recorded then, as the parameters themselves. Same dtypes, devices and values as
    copying into PEFT-initialised parameters, without the init and the per-layer moves.
    """

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.places: dict[tuple, tuple[torch.dtype, torch.device, torch.dtype, torch.device]] = {}

    def put(self, module: LoraModule, A: torch.Tensor, B: torch.Tensor) -> None:
        weight = module.base_weight()
        key = (type(module.layer.get_base_layer()), weight.dtype, weight.device, module.embedding)
        place = self.places.get(key)
        if place is None:
            _materialize_layer(module, self.adapter)
            module.set_factors(self.adapter, A, B, frozen=True)
            new = module.factors(self.adapter)
            self.places[key] = (new.A.dtype, new.A.device, new.B.dtype, new.B.device)
            return
        module.assign_factors(self.adapter, A.to(dtype=place[0], device=place[1]).contiguous(),
                              B.to(dtype=place[2], device=place[3]).contiguous())

    def finish(self, peft_model, filled: set[str]) -> None:
        """Layers PEFT adapted that the merge did not fill get zeros (``B @ A = 0``, as PEFT's init gave);
        nothing may stay on the meta device."""
        for module in lora_modules(peft_model):
            if self.adapter not in module.adapters():
                continue
            left = [name for name, p in module.layer.named_parameters()
                    if p.is_meta and f".{self.adapter}." in f".{name}."]
            if left and module.name in filled:
                raise MergeError(f"the new adapter {self.adapter!r} still has meta-device parameters on "
                                 f"{module.name!r} after the merge: {left}")
            if left:
                _materialize_layer(module, self.adapter)
                f = module.factors(self.adapter)
                module.set_factors(self.adapter, torch.zeros_like(f.A), torch.zeros_like(f.B), frozen=True)


def _materialize_layer(module: LoraModule, adapter: str) -> None:
    """Empty CPU fp32 memory for the adapter's meta-device factors on one layer, then PEFT's placement of it."""
    cpu = torch.device("cpu")
    for attr in _FACTOR_CONTAINERS:
        container = getattr(module.layer, attr, None)
        if container is None or adapter not in container:
            continue
        item = container[adapter]
        if isinstance(item, torch.nn.Module):
            for key, param in list(item.named_parameters(recurse=False)):
                if param.is_meta:
                    setattr(item, key, _empty_param(param, cpu))
        elif item.is_meta:
            container[adapter] = _empty_param(item, cpu)
    module.layer._move_adapter_to_device_of_base_layer(adapter)
    _cast_adapter_dtype(module.layer, adapter_name=adapter, autocast_adapter_dtype=True)


def _empty_param(param: torch.Tensor, device: torch.device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                              requires_grad=param.requires_grad)


def _module_context(plan: MergePlan, module: LoraModule, idx: list[int], device: torch.device) -> MergeContext:
    """The module's statistics (stacked, fp32 on ``device``) and the method's parameters, for exact factors."""
    stats = {kind: torch.stack([m.to(device=device, dtype=torch.float32) for m in maps])
             for kind, maps in plan.statistics(module.weight_name, idx).items()}
    return MergeContext(name=module.weight_name, params=plan.params(), statistics=stats, device=device)


def _factorize(cfg: MergeConfig, delta: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.factorization == "exact":
        return svd_factors(delta, rank)
    return randomized_factors(delta, rank, seed=cfg.seed or 0, name=name)


def _fill_lora(peft_model, plan: MergePlan, work: list, device: torch.device, adapter_name: str, new_rank: int,
               exact: bool, progress: Optional[bool], placer: Optional[_FactorPlacer]) -> None:
    for module, idx in progress_bar(work, len(work), "merging modules", progress):
        new = module.factors(adapter_name)
        if new is None:
            raise MergeError(f"the new adapter {adapter_name!r} was not created on module {module.name!r}")
        if abs(new.scaling - 1.0) > 1e-12:
            raise MergeError(f"the new adapter's scaling on {module.name!r} is {new.scaling}, expected 1")
        coeffs = plan.coefficients(module.weight_name).to(torch.float32)[idx]
        if exact:
            factors = [(f.A, f.B, f.scaling) for f in (module.factors(plan.experts[k]) for k in idx)]
            A, B = plan.method.lora_factors(factors, coeffs.tolist(), new_rank, device,
                                            _module_context(plan, module, idx, device))
            A, B = _own(A, factors), _own(B, factors)
        else:
            merged = _merge_module(module, idx, plan, coeffs, device)
            A, B = _factorize(plan.config, merged.T if module.transposed else merged, new_rank, module.weight_name)
        if placer is not None:
            placer.put(module, A, B)
        else:
            module.set_factors(adapter_name, A, B, frozen=True)
    if placer is None:  # the modules_to_save copies are the new adapter's other parameters
        for param_name, param in peft_model.named_parameters():
            if f".{adapter_name}." in param_name:
                param.requires_grad_(False)


def _own(tensor: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``tensor``, or a copy of it where it shares memory with an expert's factor (it becomes a parameter)."""
    ptr = tensor.untyped_storage().data_ptr()
    shared = any(t.untyped_storage().data_ptr() == ptr for a, b, _ in factors for t in (a, b))
    return tensor.clone() if shared else tensor


def _merge_module(module: LoraModule, idx: list[int], plan: MergePlan, coeffs: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """The merged ΔW of one module (fp32 on ``device``) from the experts that adapt it."""
    deltas = [delta_weight(module, module.factors(plan.experts[k]), device) for k in idx]
    kwargs = plan.tensor_kwargs(module.weight_name, idx, device)
    if plan.method.chunked(plan.params()):
        # the chunked path with a zero base: the same math as merge_deltas (same DARE masks, the same kept
        # entries), without topk over the stacked deltas
        merged, _ = merge_streamed(plan.config.method, torch.zeros_like(deltas[0]), deltas, coeffs.to(device),
                                   out_dtype=torch.float32, chunk=chunk_for(device), **kwargs)
        return merged
    return merge_deltas(plan.config.method, deltas, coeffs.to(device), scale=1.0, **kwargs)


def _fill_full(peft_model, plan: MergePlan, work: list, device: torch.device, progress: Optional[bool]) -> None:
    for module, idx in progress_bar(work, len(work), "merging modules", progress):
        coeffs = plan.coefficients(module.weight_name).to(torch.float32)[idx]
        merged = _merge_module(module, idx, plan, coeffs, device)
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


def _save(save_to: PathLike, overwrite: bool, peft_model, result_model, plan: MergePlan, sources: list[str],
          adapter_name: str, new_rank: int, owners: list[str], extra_files: Optional[dict[str, str]]) -> Path:
    """Write the new adapter (or the merged model), its card and the extra files into ``save_to``, atomically."""
    cfg, lora = plan.config, plan.config.output == "lora"
    inputs = [f for f in plan.folders if f is not None] + [model_source_folder(peft_model)]
    with atomic_output_dir(save_to, overwrite=overwrite, inputs=inputs) as tmp:
        if lora:
            _save_adapter(peft_model, adapter_name, tmp, owners)
            base_id = getattr(peft_model.peft_config[adapter_name], "base_model_name_or_path", None)
        else:
            result_model.save_pretrained(tmp)
            base_id = getattr(getattr(result_model, "config", None), "_name_or_path", None)
        record = card.merge_record(cfg.to_dict(), plan.experts, sources, plan.table,
                                   kind=f"lora (rank {new_rank})" if lora else "full", base_model=portable_name(base_id),
                                   extra={"adapter_name": adapter_name if lora else None,
                                          "statistics": plan.statistics_summary(),
                                          **({"fit": plan.fit} if plan.fit is not None else {})})
        card.write_card(tmp, record, plan.table, library_name="peft" if lora else "transformers")
        write_extra_files(tmp, extra_files)
    output_dir = Path(save_to).resolve()
    logger.info("wrote %s", output_dir)
    return output_dir


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


