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

__all__ = ["FitOutcome", "FitPart", "ProbeObjective", "fit_coefficients", "merged_deltas", "split_rows",
           "token_loss"]

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


def token_loss(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy (fp32) over the scored positions of ``batch``, and their count."""
    mask = scored_positions(batch["attention_mask"], batch["labels"])
    count = int(mask.sum())
    if count == 0:
        return logits.new_zeros((), dtype=torch.float32), 0
    targets = batch["labels"][:, 1:][mask[:, :-1]]
    chosen = logits[:, :-1][mask[:, :-1]].float()
    return F.cross_entropy(chosen, targets, reduction="sum"), count


def merged_deltas(values: Tensor, parts: Sequence[FitPart]) -> dict[str, Tensor]:
    """Tensor name → ``Σ_i c[experts[i], group] · parts[i]`` (differentiable in ``values``)."""
    out = {}
    for part in parts:
        coeffs = values[list(part.experts), part.group].to(device=part.parts.device, dtype=part.parts.dtype)
        out[part.name] = torch.tensordot(coeffs, part.parts, dims=1)
    return out


class ProbeObjective:
    """The experts' probe sets split into fit and held-out rows, and the loss of a merge on either split.

    Args:
        probes: One probe set per expert (its task's data).
        holdout: Fraction of each probe's rows held out for early stopping.
        seed: Seeds the split.
        device: Where the batches go (the model's device).
        batch_size: Rows per forward pass.

    Raises:
        ValueError: when a split of some probe has no scored token.
    """

    def __init__(self, probes: Sequence[ProbeSet], holdout: float, seed: int, device: torch.device,
                 batch_size: int = 16) -> None:
        self.batches: dict[str, list[list[dict[str, Tensor]]]] = {"fit": [], "held": []}
        self.counts: dict[str, list[int]] = {"fit": [], "held": []}
        self.rows: dict[str, list[int]] = {"fit": [], "held": []}
        for k, probe in enumerate(probes):
            fit_rows, held_rows = split_rows(len(probe), holdout, seed + k)
            for split, rows in (("fit", fit_rows), ("held", held_rows)):
                batches = [self._batch(probe, rows[s:s + batch_size], device)
                           for s in range(0, len(rows), batch_size)]
                count = sum(int(scored_positions(b["attention_mask"], b["labels"]).sum()) for b in batches)
                if count == 0:
                    raise ValueError(f"probe set {k}: its {split} rows {rows} have no scored token (labels all -100)")
                self.batches[split].append(batches)
                self.counts[split].append(count)
                self.rows[split].append(len(rows))

    @staticmethod
    def _batch(probe: ProbeSet, rows: list[int], device: torch.device) -> dict[str, Tensor]:
        idx = torch.tensor(rows, dtype=torch.long)
        return {key: getattr(probe, key)[idx].to(device) for key in ("input_ids", "attention_mask", "labels")}

    def loss(self, logits: LogitsFn, deltas: Callable[[], Mapping[str, Tensor]], split: str,
             backward: bool = False) -> float:
        """Mean over experts of each expert's mean token loss on ``split`` (``"fit"`` / ``"held"``).

        ``deltas()`` builds the merged deltas; it is called once per batch so that, with ``backward=True``, each
        batch's graph is freed after its backward pass (the gradients of the coefficients accumulate).
        """
        total, num = 0.0, len(self.batches[split])
        for batches, count in zip(self.batches[split], self.counts[split]):
            for batch in batches:
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                summed, _ = token_loss(logits(deltas(), inputs), batch)
                value = summed / (count * num)
                if backward:
                    value.backward()
                total += float(value.detach())
        return total


def fit_coefficients(start: Tensor, parts: Sequence[FitPart], objective: ProbeObjective, logits: LogitsFn, *,
                     steps: int, lr: float, patience: int = 0) -> FitOutcome:
    """Adam on ``c`` (``[K, G]``, from ``start``) against the fit loss; keeps the best held-out ``c``.

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

    def current() -> dict[str, Tensor]:
        return merged_deltas(values, parts)

    with torch.no_grad():
        held_before = objective.loss(logits, current, "held")
        fit_before = objective.loss(logits, current, "fit")
    if not math.isfinite(held_before):
        raise ValueError(f"the held-out probe loss of the starting merge is {held_before}; check the experts")
    best, best_loss, best_step, history = values.detach().clone(), held_before, 0, []
    optimizer = torch.optim.Adam([values], lr=lr)
    step = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        objective.loss(logits, current, "fit", backward=True)
        optimizer.step()
        with torch.no_grad():
            held = objective.loss(logits, current, "held")
        history.append(held)
        logger.debug("probe fit step %d: held-out loss %.5f", step, held)
        if held < best_loss:
            best, best_loss, best_step = values.detach().clone(), held, step
        elif patience and step - best_step >= patience:
            break
    with torch.no_grad():
        fit_after = objective.loss(logits, lambda: merged_deltas(best, parts), "fit") if best_step else fit_before
    return FitOutcome(values=best.cpu(), start=start.detach().clone().to(torch.float32), held_before=held_before,
                      held_after=best_loss, fit_before=fit_before, fit_after=fit_after, best_step=best_step,
                      steps_run=step if steps else 0, history=history)
