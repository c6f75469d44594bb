"""Probe-fitted merge coefficients (AdaMerging's idea, supervised by the experts' probe sets): the pure math.

The merged delta of tensor ``t`` in coefficient group ``g(t)`` is ``Σ_k c[k, g] · part_k(t)``, where the parts are
a base method's per-expert contributions with its selection (TIES trim, DARE drop, sign election) held fixed, so the
merge is linear in ``c``. ``c`` starts at the base method's coefficients; Adam minimises the merged model's loss on
the *fit* rows of every expert's probe set (the mean over experts of each expert's mean token loss, so that every
task weighs the same whatever its probe's length), and the ``c`` with the lowest loss on the *held-out* rows is kept
(early stopping: the start itself when no step improves it).

Nothing here reads files or knows about PEFT: the caller gives the parts, the probes and ``logits(deltas, batch)``,
a forward pass of the base model with the given deltas added to its weights (differentiable in the deltas).
Deterministic given the seed (the split) on the CPU; on a GPU up to the nondeterminism of its kernels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .store import ProbeSet
from .transfer import scored_positions

logger = logging.getLogger(__name__)

__all__ = ["FitOutcome", "FitPart", "ProbeObjective", "fit_coefficients", "merged_deltas", "split_rows"]

#: ``logits(deltas, batch)``: the base model's logits ``[B, T, V]`` with ``deltas`` (tensor name → delta in the
#: weight's layout) added to its weights, for ``batch`` (``input_ids``, ``attention_mask``).
LogitsFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class FitPart:
    """One merged tensor: its coefficient group, the experts that contribute and their parts.

    Attributes:
        name: Tensor name (the key of the delta given to ``logits``).
        group: Column of ``c`` the tensor uses.
        experts: Row of ``c`` of each part (``len(experts) == parts.shape[0]``).
        parts: ``[K_t, ...]`` parts: the merged delta is ``Σ_i c[experts[i], group] · parts[i]``.
    """

    name: str
    group: int
    experts: tuple[int, ...]
    parts: Tensor


@dataclass
class FitOutcome:
    """What a fit did.

    Attributes:
        values: ``[K, G]`` the kept coefficients (the best held-out step, or the start).
        start: ``[K, G]`` the starting coefficients.
        held_before, held_after: Held-out loss at the start and at the kept coefficients.
        fit_before, fit_after: Fit-rows loss at the start and at the kept coefficients.
        best_step: Step whose coefficients were kept (0: the start).
        steps_run: Adam steps taken (fewer than asked when early stopping ended the fit).
        history: Held-out loss after each step.
    """

    values: Tensor
    start: Tensor
    held_before: float
    held_after: float
    fit_before: float
    fit_after: float
    best_step: int
    steps_run: int
    history: list[float] = field(default_factory=list)


def split_rows(num: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows ``0..num-1`` split into (fit, held-out) by a permutation seeded with ``seed``.

    ``round(num · holdout)`` rows are held out, at least one on each side when ``num >= 2`` and ``holdout > 0``
    (a one-row probe is fit and held out at once: early stopping then watches the fit loss).
    """
    if num < 1:
        raise ValueError(f"a probe set needs at least one row, got {num}")
    order = torch.randperm(num, generator=torch.Generator().manual_seed(int(seed))).tolist()
    if num == 1 or holdout <= 0.0:
        return order, order
    held = min(num - 1, max(1, round(num * holdout)))
    return sorted(order[held:]), sorted(order[:held])


def merged_deltas(values: Tensor, parts: Sequence[FitPart]) -> dict[str, Tensor]:
    """Tensor name → ``Σ_i c[experts[i], group] · parts[i]`` (differentiable in ``values``)."""
    out = {}
    for part in parts:
        coeffs = values[list(part.experts), part.group].to(device=part.parts.device, dtype=part.parts.dtype)
        out[part.name] = torch.tensordot(coeffs, part.parts, dims=1)
    return out


class ProbeObjective:
    """The experts' probe sets split into fit and held-out rows, and the loss of a merge on either split.

    The rows of every expert share batches (right-padded to the longest probe), each token weighted by
    ``1 / (K · scored tokens of its expert's split)``: the sum over a split is the mean over experts of each
    expert's mean token loss, whatever the batching.

    Args:
        probes: One probe set per expert (its task's data).
        holdout: Fraction of each probe's rows held out for early stopping.
        seed: Seeds the split (expert ``k`` uses ``seed + k``).
        device: Where the batches go (the model's device).
        batch_size: Rows per forward pass.

    Raises:
        ValueError: when a split of some probe has no scored token.
    """

    def __init__(self, probes: Sequence[ProbeSet], holdout: float, seed: int, device: torch.device,
                 batch_size: int = 64) -> None:
        width = max(int(p.input_ids.shape[1]) for p in probes)
        self.batches: dict[str, list[dict[str, Tensor]]] = {}
        self.counts: dict[str, list[int]] = {"fit": [], "held": []}
        self.rows: dict[str, list[int]] = {"fit": [], "held": []}
        splits = [split_rows(len(probe), holdout, seed + k) for k, probe in enumerate(probes)]
        for s, split in enumerate(("fit", "held")):
            rows = []
            for k, probe in enumerate(probes):
                idx = torch.tensor(splits[k][s], dtype=torch.long)
                part = {key: _pad(getattr(probe, key)[idx], width, fill) for key, fill in _PADDING.items()}
                count = int(scored_positions(part["attention_mask"], part["labels"]).sum())
                if count == 0:
                    raise ValueError(f"probe set {k}: its {split} rows {splits[k][s]} have no scored token "
                                     "(labels all -100)")
                part["weight"] = torch.full((len(idx),), 1.0 / (count * len(probes)))
                self.counts[split].append(count)
                self.rows[split].append(len(idx))
                rows.append(part)
            packed = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
            self.batches[split] = [{key: value[b:b + batch_size].to(device) for key, value in packed.items()}
                                   for b in range(0, len(packed["weight"]), batch_size)]

    def loss(self, logits: LogitsFn, deltas: Mapping[str, Tensor], split: str, backward: bool = False) -> float:
        """Mean over experts of each expert's mean token loss on ``split`` (``"fit"`` / ``"held"``) with ``deltas``
        added; with ``backward=True`` each batch's loss is back-propagated (into the deltas) and freed."""
        total = 0.0
        for batch in self.batches[split]:
            out = logits(deltas, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
            mask = scored_positions(batch["attention_mask"], batch["labels"])[:, :-1]
            losses = F.cross_entropy(out[:, :-1][mask].float(), batch["labels"][:, 1:][mask], reduction="none")
            value = (losses * batch["weight"][:, None].expand_as(mask)[mask]).sum()
            if backward:
                value.backward()
            total += float(value.detach())
        return total


_PADDING = {"input_ids": 0, "attention_mask": 0, "labels": -100}


def _pad(t: Tensor, width: int, fill: int) -> Tensor:
    """``[N, T]`` right-padded to ``[N, width]`` with ``fill``."""
    return F.pad(t, (0, width - t.shape[1]), value=fill) if t.shape[1] < width else t


def fit_coefficients(start: Tensor, parts: Sequence[FitPart], objective: ProbeObjective, logits: LogitsFn, *,
                     steps: int, lr: float, patience: int = 0) -> FitOutcome:
    """Adam on ``c`` (``[K, G]``, from ``start``) against the fit loss; keeps the best held-out ``c``.

    Each step back-propagates the batches into the merged deltas (detached leaves: the model's backward never
    re-enters the merge), then the merge once into ``c``.

    Args:
        start: ``[K, G]`` starting coefficients.
        parts: The merged tensors (see :class:`FitPart`).
        objective: The probe splits.
        logits: Forward pass of the base model with deltas added.
        steps: Adam steps at most (0: only the start's losses are measured).
        lr: Adam learning rate.
        patience: Stop after this many steps without a held-out improvement (0: run every step).

    Returns:
        A :class:`FitOutcome`; its ``values`` are ``start`` exactly when no step lowered the held-out loss.
    """
    device = parts[0].parts.device if parts else torch.device("cpu")  # the coefficients live with the parts
    values = start.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

    def losses(c: Tensor) -> tuple[float, float]:
        with torch.no_grad():
            merged = merged_deltas(c, parts)
            return objective.loss(logits, merged, "held"), objective.loss(logits, merged, "fit")

    held_before, fit_before = losses(values)
    if not math.isfinite(held_before):
        raise ValueError(f"the held-out probe loss of the starting merge is {held_before}; check the experts")
    best, best_loss, best_step, history = values.detach().clone(), held_before, 0, []
    optimizer = torch.optim.Adam([values], lr=lr)
    step = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        merged = merged_deltas(values, parts)
        leaves = {name: delta.detach().requires_grad_(True) for name, delta in merged.items()}
        objective.loss(logits, leaves, "fit", backward=True)
        grads = [leaves[name].grad for name in merged]
        used = [(t, g) for t, g in zip(merged.values(), grads) if g is not None]
        torch.autograd.backward([t for t, _ in used], [g for _, g in used])
        optimizer.step()
        with torch.no_grad():
            held = objective.loss(logits, merged_deltas(values, parts), "held")
        history.append(held)
        logger.debug("probe fit step %d: held-out loss %.5f", step, held)
        if held < best_loss:
            best, best_loss, best_step = values.detach().clone(), held, step
        elif patience and step - best_step >= patience:
            break
    fit_after = losses(best)[1] if best_step else fit_before
    return FitOutcome(values=best.cpu(), start=start.detach().clone().to(torch.float32), held_before=held_before,
                      held_after=best_loss, fit_before=fit_before, fit_after=fit_after, best_step=best_step,
                      steps_run=step if steps else 0, history=history)
