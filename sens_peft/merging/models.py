"""Full fine-tunes merged tensor by tensor from disk to disk (:func:`merge_models`), on one process or split by
shards across the processes of a distributed launch.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import card
from ..config import MergeConfig
from ..errors import MergeError
from ..io import (
    TensorSource,
    atomic_output_dir,
    check_config_compatible,
    copy_model_files,
    parse_size,
    plan_shards,
    read_model_config,
)
from ..methods import get_method
from ..names import portable_name
from ..validation import (
    check_path_list,
    check_record_matches,
    check_source_dtypes,
    model_fingerprint,
    warn_unused_options,
)
from . import plan as planning
from .distributed import Comm
from .plan import MergePlan, MergeReport, PathLike, plan_merge
from .streaming import ShardMerger, check_tensors, out_nbytes

logger = logging.getLogger(__name__)

__all__ = ["merge_models"]


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

    Shard plan and distributed merges: see the module docstring.

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
    import time

    start = time.perf_counter()
    cfg = planning.resolve_config(config, config_kwargs)
    comm = Comm.open(distributed, distributed_timeout)
    try:
        with comm.step():
            warn_unused_options(cfg, sensitivities=sensitivities, probes=probes, transferability=transferability,
                                kind="models")
            inputs = _Inputs.open(comm, cfg, base, experts, out_dir, overwrite, allow_pickle)
            cfg = _with_model_settings(cfg, inputs)
        try:
            plan = plan_merge(cfg, inputs.names, list(inputs.experts), sensitivities=sensitivities,
                              transferability=transferability, step=comm.step,
                              probes_usable=cfg.method is None and _can_fit(inputs, probes, comm.distributed),
                              compute_transfer=lambda: comm.root_call(lambda: inputs.transfer(cfg, probes, comm)),
                              check_record=inputs.check_record)
            if plan.method.needs_probes:
                from .fitting import fit_full_models

                with comm.step():
                    plan = fit_full_models(plan, inputs, probes, comm.distributed)
            with comm.step():
                shards = plan_shards([(n, out_nbytes(inputs.base_src, n, inputs.out_dtype))
                                      for n in inputs.base_src.names()], parse_size(max_shard_size))
            shard_ids = shards.assign(comm.world_size)[comm.rank]
            if comm.rank != 0 and progress is None:
                progress = False
            merged, copied = _write(comm, inputs, plan, shards, shard_ids, out_dir, overwrite, prefetch, progress,
                                    extra_files)
        finally:
            inputs.close()
    finally:
        comm.close()
    details: dict[str, Any] = {"shards": shards.files, "merged_tensors": merged, "copied_tensors": copied,
                               "device": str(inputs.device)}
    if comm.distributed:
        details.update(world_size=comm.world_size, rank_shards=[shards.files[i] for i in shard_ids])
    return MergeReport(config=plan.config, coefficients=plan.table, experts=inputs.names,
                       output_dir=Path(out_dir).resolve(), adapter_name=None, seconds=time.perf_counter() - start,
                       peak_rss_mb=planning.peak_rss_mb(), transfer=plan.transfer, model=None,
                       sources=[str(e) for e in inputs.experts], details=details)


def _can_fit(inputs: _Inputs, probes, distributed: bool) -> bool:
    """Whether ``method=None`` may fit on the probes: every expert has a probe set, one process, and the base with
    K parts of every tensor within the in-memory fit's limit (otherwise the default falls back, with a warning)."""
    from .fitting import default_may_fit, full_fit_bytes

    if not planning.probes_present(probes, list(inputs.experts)):
        return False
    if distributed:
        logger.warning("method=None: the experts have probe sets, but a distributed merge does not fit on them; the "
                       "default falls back")
        return False
    return default_may_fit(full_fit_bytes(inputs.base_src, len(inputs.experts)),
                           f"the base and {len(inputs.experts)} parts of every tensor in fp32")


def _with_model_settings(cfg: MergeConfig, inputs: _Inputs) -> MergeConfig:
    """``cfg`` with the method's parameters that come from the base model's config.json (SLERP's ``num_layers``
    when a per-layer ``t`` is given without it)."""
    if cfg.method is None:
        return cfg
    try:
        updates = get_method(cfg.method).model_settings(cfg.method_params(), inputs.base_cfg)
    except ValueError as err:
        raise MergeError(f"base ({inputs.base / 'config.json'}): {err}") from err
    return dataclasses.replace(cfg, params={**cfg.params, **updates}) if updates else cfg


@dataclass
class _Inputs:
    """The checked inputs of a full-model merge: folders, names, configs, tensor sources, device."""

    base: Path
    experts: list[Path]
    names: list[str]
    base_cfg: dict
    base_src: TensorSource
    expert_srcs: list[TensorSource]
    device: torch.device
    out_dtype: Optional[torch.dtype]

    @classmethod
    def open(cls, comm: Comm, cfg: MergeConfig, base: PathLike, experts, out_dir: PathLike, overwrite: bool,
             allow_pickle: bool) -> _Inputs:
        experts = [Path(e) for e in check_path_list(experts, "experts")]
        if not experts:
            raise MergeError("no experts to merge: pass at least one expert folder")
        base = Path(base)
        resolved = [e.resolve() for e in experts]
        dupes = sorted({str(e) for e in resolved if resolved.count(e) > 1})
        if dupes:
            raise MergeError(f"expert folders are listed more than once: {dupes}")
        # a full-weight method (SLERP) does not read the base's tensors: one of its inputs may be the base folder
        full_weights = cfg.method is not None and get_method(cfg.method).full_weights
        if base.resolve() in resolved and not full_weights:
            raise MergeError(f"the base folder {base} is also listed as an expert")
        if Path(out_dir).exists() and not overwrite:
            raise MergeError(f"output folder {Path(out_dir).resolve()} already exists; pass overwrite=True to "
                             "replace it")
        names = planning.expert_names(experts)
        device = planning.device_of(cfg)
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
        check_tensors(base_src, expert_srcs, names)
        check_source_dtypes(base_src, expert_srcs, names)
        return cls(base, experts, names, base_cfg, base_src, expert_srcs, device, planning.dtype_of(cfg.dtype))

    def check_record(self, k: int, name: str, record, source: str) -> None:
        check_record_matches(record, f"expert {name!r}", source, tensors=self.base_src.names(),
                             fingerprint=model_fingerprint(self.base_cfg),
                             shapes={n: self.base_src.shape(n) for n in self.base_src.names()})

    def transfer(self, cfg: MergeConfig, probes, comm: Comm) -> torch.Tensor:
        """The transferability matrix from the probes, loading one expert model at a time (on rank 0 only)."""
        from transformers import AutoModelForCausalLM

        from ..transfer import transferability_for_models

        vocab = self.base_cfg.get("vocab_size")
        probe_sets = planning.load_probes(probes, list(self.experts), self.names, vocab)

        def load_model(k: int) -> torch.nn.Module:
            logger.info("loading expert %r for transferability", self.names[k])
            return AutoModelForCausalLM.from_pretrained(str(self.experts[k]), dtype=torch.float32)

        matrix = transferability_for_models(load_model, len(self.names), probe_sets, alignment=cfg.alignment,
                                            device=self.device, vocab_size=vocab)
        matrix = planning.check_transfer(matrix, len(self.names))
        logger.info("transferability matrix:\n%s", matrix)
        return matrix.cpu() if comm.distributed else matrix

    def close(self) -> None:
        self.base_src.close()
        for src in self.expert_srcs:
            src.close()


def _write(comm: Comm, inputs: _Inputs, plan: MergePlan, shards, shard_ids: list[int], out_dir: PathLike,
           overwrite: bool, prefetch: int, progress: Optional[bool], extra_files: Optional[dict[str, str]]
           ) -> tuple[int, int]:
    """Every rank writes its shards into rank 0's temporary folder; rank 0 finishes the folder (index, copies,
    card) and renames it into place. Returns the (merged, copied) tensor counts over all ranks."""
    finishing = False
    final_err: Optional[BaseException] = None
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(comm.root_call(lambda: stack.enter_context(
                atomic_output_dir(out_dir, overwrite=overwrite, inputs=[inputs.base, *inputs.experts]))))
            err: Optional[BaseException] = None
            counts = (0, 0)
            try:
                if not tmp.is_dir():
                    raise MergeError(
                        f"rank {comm.rank} does not see the temporary output folder {tmp} that rank 0 created; a "
                        "distributed merge needs the output's parent folder on a file system shared by all ranks"
                    )
                counts = ShardMerger(tmp, shards, shard_ids, inputs.base, inputs.base_src, inputs.expert_srcs, plan,
                                     inputs.device, inputs.out_dtype, prefetch).run(progress)
            except BaseException as e:
                err = e
            # every rank has stopped writing once this returns; on an error rank 0 leaves the with and the
            # temporary folder is removed
            merged_count, copied_count = comm.check(err, counts)
            finishing = True
            if comm.rank == 0:
                shards.write_index(tmp)
                _finish_folder(tmp, inputs, plan, shards.files, merged_count, copied_count, extra_files)
    except BaseException as e:
        if not (finishing and comm.distributed):
            raise
        final_err = e
    if comm.distributed:
        comm.check(final_err)  # rank 0's index, card and rename: the other ranks learn how they went
    return merged_count, copied_count


def _finish_folder(tmp: Path, inputs: _Inputs, plan: MergePlan, files: list[str], merged: int, copied: int,
                   extra_files: Optional[dict[str, str]]) -> None:
    """The files beside the shards: the base's config/tokenizer copies, the card, the caller's extra files."""
    copied_files = copy_model_files(inputs.base, tmp)
    if inputs.out_dtype is not None and (tmp / "config.json").is_file():
        _set_config_dtype(tmp / "config.json", inputs.out_dtype)
    record = card.merge_record(plan.config.to_dict(), inputs.names, [portable_name(e) for e in inputs.experts],
                               plan.table,
                               kind="full", base_model=portable_name(inputs.base_cfg.get("_name_or_path"), inputs.base),
                               extra={"shards": files, "merged_tensors": merged, "copied_tensors": copied,
                                      "statistics": plan.statistics_summary(),
                                      **({"fit": plan.fit} if plan.fit is not None else {})})
    card.write_card(tmp, record, plan.table, library_name="transformers")
    planning.write_extra_files(tmp, extra_files)
    logger.info("output: %d shard(s) %s, %d tensors merged, %d copied, files copied from base: %s",
                len(files), files, merged, copied, copied_files)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    data = json.loads(path.read_text())
    text = str(dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = text
    if "torch_dtype" not in data and "dtype" not in data:
        data["dtype"] = text
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
