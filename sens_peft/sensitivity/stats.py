"""Data-aware merge statistics captured in the calibration pass: input Gram matrices and diagonal Fisher maps.

* **Gram** (for RegMean): for each Linear the merge touches (LoRA: each adapted module's base layer; full
  fine-tunes: each ``nn.Linear``/``Conv1D`` whose weight is scored), ``G = sum_samples sum_tokens x x^T`` of the
  layer's input ``x``, the *expert's own* activations (the calibration pass runs the trained expert). Only
  non-padding tokens count (``attention_mask == 1``; every token when the batch has no mask); prompt tokens and
  other positions whose label is ``-100`` *do* count, since the merged layer sees them as inputs too. Forward hooks
  stash each input during the forward; right after it (before the backward) the inputs are summed into fp32
  buffers on the model's device. Modules whose input is the very same tensor (q/k/v, gate/up in Llama) get one
  Gram and an alias map. ``"diag"`` keeps ``sum x**2`` only. ``"lowrank"`` keeps the exact diagonal plus a
  streamed sketch ``Y = G @ omega`` (``omega``: a seeded Gaussian ``[in, k]``, the same on every rank and for
  every module of one width), turned into a rank-``k`` Nystrom factor ``F`` (``G ~= F F^T`` off the diagonal) when
  the record is built: ``in * (k + 1)`` numbers instead of ``in**2``; inputs no wider than ``k`` are kept full.
* **Fisher**: the diagonal empirical Fisher ``E[g^2]`` of each scored tensor, from the gradients the pass forms
  (one backward per ``calibration_batch_size`` examples): at batch size 1 exactly the mean over samples of the
  squared per-sample gradient; at batch size ``b`` the documented estimate ``b * mean_batches(g_batch^2)``
  (``g_batch`` is the mean gradient of ``b`` samples, whose square has ``1/b`` of the per-sample variance).

Both are sums plus counts, so per-rank or per-chunk partials add up (:meth:`CalibrationStats.merge_`,
:meth:`CalibrationStats.all_reduce_`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..regmean import nystrom_factor
from ..store import SensitivityRecord
from .distributed import all_reduce_sum

logger = logging.getLogger(__name__)

__all__ = ["CalibrationStats", "full_gram_widths", "gram_bytes"]

GRAM_MODES = ("auto", "full", "diag", "lowrank", "none")


def gram_bytes(fan_ins: Sequence[int], mode: str, bytes_per_element: int = 4) -> int:
    """Bytes of the Grams of modules with inputs of size ``fan_ins`` (one entry per stored Gram)."""
    if mode == "none":
        return 0
    return sum((n * n if mode == "full" else n) for n in fan_ins) * bytes_per_element


def full_gram_widths(setting: str, fan_ins: Sequence[int], max_bytes: int) -> set[int]:
    """The input widths whose Grams are kept full (the others are stored as diagonals).

    ``"full"``: all; ``"diag"``/``"none"``: none; ``"auto"``: whole width classes in increasing order while the
    fp32 sums of all full Grams (``fan_ins``: one entry per stored Gram, after sharing) fit in ``max_bytes``. For a
    Llama that keeps every hidden-width input (q/k/v, o, gate/up) full and makes ``down_proj``'s wide input
    diagonal when only those fit; a whole class or nothing, so every layer is treated alike.
    """
    if setting not in GRAM_MODES:
        raise ValueError(f"gram={setting!r} is not one of {list(GRAM_MODES)}")
    if setting in ("diag", "none", "lowrank"):
        return set()
    widths = sorted(set(fan_ins))
    if setting == "full":
        return set(widths)
    keep, total = set(), 0
    for width in widths:
        total += gram_bytes([n for n in fan_ins if n == width], "full")
        if total > max_bytes:
            break
        keep.add(width)
    return keep


def _input_key(x: Tensor) -> tuple:
    # Valid while the tensor is referenced (the stash holds it): same storage, view and version = same values.
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)


class CalibrationStats:
    """Gram and Fisher sums of one calibration pass (or of several merged).

    Args:
        targets: ``(canonical weight name, Linear-like module)`` whose inputs to capture (may be empty).
        gram: ``"auto"``, ``"full"``, ``"diag"`` or ``"none"``.
        gram_max_bytes: Budget of ``"auto"`` for the fp32 full Grams.
        fisher_names: Tensor names whose Fisher maps are summed (empty: no Fisher).
        device: Where the sums live.
        gram_rank: ``k`` of ``"lowrank"``.
        seed: Seed of the ``"lowrank"`` test matrices.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, nn.Module]],
        *,
        gram: str = "auto",
        gram_max_bytes: int = 2**30,
        fisher_names: Sequence[str] = (),
        device: torch.device | str | None = None,
        gram_rank: int = 256,
        seed: int = 0,
    ) -> None:
        self.targets = list(targets) if gram != "none" else []
        self.gram_setting = gram
        self.gram_max_bytes = int(gram_max_bytes)
        self.gram_mode: Optional[str] = None if self.targets else "none"  # full/diag/mixed/lowrank once resolved
        self.full_names: set[str] = set()  # stored Grams kept full (the others are diagonals)
        self.lowrank_names: set[str] = set()  # diagonals that also get a sketch (gram="lowrank")
        self.sketches: dict[str, Tensor] = {}  # Y = G @ omega of the low-rank ones
        self.gram_rank, self.seed = int(gram_rank), int(seed)
        self._omegas: dict[int, Tensor] = {}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grams: dict[str, Tensor] = {}
        self.gram_tokens: dict[str, Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.fisher_names = list(fisher_names)
        self.fisher: dict[str, Tensor] = {}
        self.fisher_batches = torch.zeros((), dtype=torch.int64, device=self.device)
        self.fisher_samples = torch.zeros((), dtype=torch.float64, device=self.device)
        self.batch_size: Optional[int] = None
        self._stash: dict[str, list[Tensor]] = {}
        self._mask: Optional[Tensor] = None
        self._warned_mask = False

    @property
    def enabled(self) -> bool:
        return bool(self.targets) or bool(self.fisher_names)

    # ------------------------------------------------------------------ Gram capture
    def install(self, attention_mask: Optional[Tensor]) -> list[Any]:
        """Register the forward hooks for one batch (``attention_mask``: ``[B, T]`` or None)."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).to(self.device) != 0
        self._stash = {}
        handles = []
        for name, module in self.targets:
            handles.append(module.register_forward_hook(self._make_hook(name)))
        return handles

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor):
                self._stash.setdefault(name, []).append(args[0].detach())

        return hook

    def _rows(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self._mask is not None:
            if self._mask.numel() == rows.shape[0]:
                return rows[self._mask.to(rows.device)]
            if not self._warned_mask:
                logger.warning("a hooked Linear's input has %d rows for %d mask positions; its Gram counts every "
                               "row (padding included)", rows.shape[0], self._mask.numel())
                self._warned_mask = True
        return rows

    def after_forward(self) -> None:
        """Sum the inputs stashed during the forward into the Grams and release them (call before backward)."""
        stash, self._stash = self._stash, {}
        if not stash:
            return
        keys = {name: tuple(_input_key(x) for x in xs) for name, xs in stash.items()}
        if self.gram_mode is None:
            self._resolve(stash, keys)
        self._check_aliases(keys)
        with torch.no_grad():
            for name, xs in stash.items():
                if name in self.aliases:
                    continue
                for x in xs:
                    self._accumulate(name, self._rows(x))

    def _resolve(self, stash: dict[str, list[Tensor]], keys: dict[str, tuple]) -> None:
        """First batch: modules whose inputs are the same tensors share one Gram; then pick full or diag."""
        owner_of: dict[tuple, str] = {}
        for name, _ in self.targets:  # model order: the first module reading an input owns its Gram
            if name not in keys:
                continue
            owner = owner_of.setdefault(keys[name], name)
            if owner != name:
                self.aliases[name] = owner
        widths = {n: stash[n][0].shape[-1] for n in stash if n not in self.aliases}
        full = full_gram_widths(self.gram_setting, list(widths.values()), self.gram_max_bytes)
        if self.gram_setting == "lowrank":  # a sketch as wide as the input is no smaller than the Gram
            full = {w for w in widths.values() if w <= self.gram_rank}
            self.lowrank_names = {n for n, w in widths.items() if w not in full}
        elif self.gram_setting == "auto":
            self.lowrank_names = self._auto_lowrank(widths, full)
        self.full_names = {n for n, w in widths.items() if w in full}
        self.gram_mode = "full" if len(self.full_names) == len(widths) else "mixed" if self.full_names else "diag"
        if self.lowrank_names:
            self.gram_mode = "lowrank"
        logger.info("Gram capture: %s (%d of %d stored Grams full, for %d modules, %d shared)", self.gram_mode,
                    len(self.full_names), len(widths), len(stash), len(self.aliases))

    def _auto_lowrank(self, widths: dict[str, int], full: set[int]) -> set[str]:
        """``"auto"`` above the budget: sketch the inputs wider than ``gram_rank`` that did not fit as full Grams
        when the sketches fit in what is left of the budget (on the toy base a diagonal kept ~10% of RegMean's
        gain over averaging, a rank-32 sketch ~95%: benchmarks/stats_cost.py); diagonal otherwise."""
        rest = {n: w for n, w in widths.items() if w not in full}
        low = {n for n, w in rest.items() if w > self.gram_rank}
        total = (gram_bytes([w for w in widths.values() if w in full], "full")
                 + sum(rest[n] * (self.gram_rank + 1) * 4 for n in low)
                 + gram_bytes([w for n, w in rest.items() if n not in low], "diag"))
        return low if total <= self.gram_max_bytes else set()

    def _check_aliases(self, keys: dict[str, tuple]) -> None:
        """A later batch where an alias no longer reads its owner's input: give it its own copy of the sums so far."""
        for name, owner in list(self.aliases.items()):
            if keys.get(name) != keys.get(owner):
                logger.info("Gram of %s no longer shares %s's input; stored separately from now on", name, owner)
                if owner in self.grams:
                    self.grams[name] = self.grams[owner].clone()
                    self.gram_tokens[name] = self.gram_tokens[owner].clone()
                if owner in self.sketches:
                    self.sketches[name] = self.sketches[owner].clone()
                for names in (self.full_names, self.lowrank_names):
                    if owner in names:
                        names.add(name)
                del self.aliases[name]

    def _accumulate(self, name: str, rows: Tensor) -> None:
        rows = rows.to(self.device, torch.float32)
        fan_in = rows.shape[-1]
        full = name in self.full_names
        if name not in self.grams:
            shape = (fan_in, fan_in) if full else (fan_in,)
            self.grams[name] = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.gram_tokens[name] = torch.zeros((), dtype=torch.int64, device=self.device)
        if full:
            self.grams[name].addmm_(rows.T, rows)
        else:
            self.grams[name].add_((rows * rows).sum(0))
        if name in self.lowrank_names:
            omega = self.omega(fan_in)
            if name not in self.sketches:
                self.sketches[name] = torch.zeros_like(omega)
            self.sketches[name].addmm_(rows.T, rows @ omega)
        self.gram_tokens[name].add_(rows.shape[0])

    def omega(self, fan_in: int) -> Tensor:
        """The seeded Gaussian test matrix ``[fan_in, gram_rank]`` of the low-rank sketches (drawn on the CPU,
        so every device and rank gets the same one)."""
        cache = self._omegas
        if fan_in not in cache:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + fan_in)
            cache[fan_in] = torch.randn(fan_in, self.gram_rank, generator=gen).to(self.device)
        return cache[fan_in]

    # ------------------------------------------------------------------ Fisher
    def update_fisher(self, squared_grads: dict[str, Tensor], ok: Tensor, batch_size: int) -> None:
        """Add one backward's ``g^2`` maps (scaled by the batch size, see the module docstring) if ``ok``."""
        if not self.fisher_names:
            return
        if self.batch_size is None:
            self.batch_size = int(batch_size)
        gate_on_device = self.device.type != "cpu"
        if not gate_on_device and not bool(ok):
            return
        for name, value in squared_grads.items():
            value = value.detach().to(self.device, torch.float32)
            acc = self.fisher.get(name)
            if acc is None:
                acc = self.fisher[name] = torch.zeros_like(value)
            acc.add_(torch.where(ok, value, 0.0) if gate_on_device else value, alpha=float(batch_size))
        self.fisher_batches.add_(ok.to(torch.int64))
        self.fisher_samples.add_(torch.where(ok, float(batch_size), 0.0).to(torch.float64))

    # ------------------------------------------------------------------ combine / export
    def merge_(self, other: CalibrationStats) -> None:
        """Add another pass's sums (same targets and settings) into this one, e.g. two halves of the data."""
        if other.grams and self.grams and (other.full_names != self.full_names or other.aliases != self.aliases
                                           or other.lowrank_names != self.lowrank_names):
            raise ValueError("cannot merge Gram sums with different full/diagonal choices or sharing (alias maps)")
        if not self.grams:
            self.gram_mode, self.full_names, self.aliases = other.gram_mode, set(other.full_names), dict(other.aliases)
            self.lowrank_names = set(other.lowrank_names)
        for name, value in other.sketches.items():
            if name in self.sketches:
                self.sketches[name].add_(value.to(self.device))
            else:
                self.sketches[name] = value.to(self.device).clone()
        for name, value in other.grams.items():
            if name in self.grams:
                self.grams[name].add_(value.to(self.device))
                self.gram_tokens[name].add_(other.gram_tokens[name].to(self.device))
            else:
                self.grams[name] = value.to(self.device).clone()
                self.gram_tokens[name] = other.gram_tokens[name].to(self.device).clone()
        for name, value in other.fisher.items():
            if name in self.fisher:
                self.fisher[name].add_(value.to(self.device))
            else:
                self.fisher[name] = value.to(self.device).clone()
        self.fisher_batches.add_(other.fisher_batches.to(self.device))
        self.fisher_samples.add_(other.fisher_samples.to(self.device))
        self.batch_size = self.batch_size or other.batch_size

    def all_reduce_(self, group: Optional[Any] = None) -> None:
        """Sum every buffer over the process group, for a pass whose batches were split across ranks.

        Every rank must hold the same names (run the same model on its share of the data). The callback's
        after pass runs whole on rank 0, and :func:`compute_sensitivity` whole on every rank that calls it, so
        neither reduces (reducing identical copies would multiply the sums by the world size).
        """
        for name in sorted(self.grams):
            all_reduce_sum(self.grams[name], group)
            all_reduce_sum(self.gram_tokens[name], group)
        for name in sorted(self.sketches):
            all_reduce_sum(self.sketches[name], group)
        for name in sorted(self.fisher):
            all_reduce_sum(self.fisher[name], group)
        all_reduce_sum(self.fisher_batches, group)
        all_reduce_sum(self.fisher_samples, group)

    def attach(self, record: SensitivityRecord, gram_dtype: str = "float32") -> SensitivityRecord:
        """Put the statistics into ``record`` (Grams symmetrised, cast to ``gram_dtype``; Fisher as means)."""
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[gram_dtype]
        bad = [n for n, g in self.grams.items() if not torch.isfinite(g).all()]
        if bad:
            raise ValueError(f"Gram sums of {bad[:3]} are not finite (a calibration batch produced NaN/Inf inputs)")
        for name, value in self.grams.items():
            value = (value + value.T) * 0.5 if value.dim() == 2 else value  # exactly symmetric on disk
            record.grams[name] = value.detach().to("cpu", dtype)
            record.gram_tokens[name] = int(self.gram_tokens[name].item())
        record.gram_aliases.update({n: o for n, o in self.aliases.items() if o in self.grams})
        for name, sketch in self.sketches.items():
            factor = nystrom_factor(sketch.detach().cpu(), self.omega(sketch.shape[0]).cpu())
            record.gram_factors[name] = factor.to(dtype)
        if self.grams:
            record.metadata.update(gram_mode=str(self.gram_mode), gram_dtype=gram_dtype,
                                   gram_tokens_rule="attention_mask (padding excluded, prompt tokens included)")
        if self.sketches:
            record.metadata["gram_rank"] = str(self.gram_rank)
        batches = int(self.fisher_batches.item())
        if self.fisher and batches > 0:
            for name, value in self.fisher.items():
                record.fisher[name] = (value / batches).detach().cpu().float()
            record.metadata.update(
                fisher_samples=str(int(round(float(self.fisher_samples.item())))),
                fisher_estimator="per_sample_grad_sq" if self.batch_size == 1 else "batch_grad_sq_times_batch_size",
            )
        return record
