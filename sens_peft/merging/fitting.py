"""The model-in-the-loop step of a merge: a method with ``needs_probes`` fits on the experts' probe sets (its
:meth:`~sens_peft.methods.MergeMethod.fit` hook) before any tensor is merged, and its table replaces the plan's.

The entry points build the :class:`~sens_peft.methods.FitProblem` (their deltas, their model); this module holds
what they share: the forward pass of a model with deltas added to some weights, and the plan update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ..errors import MergeError
from ..methods import FitProblem
from .plan import MergePlan

logger = logging.getLogger(__name__)

__all__ = ["delta_logits", "fit_plan", "fitting_mode"]


def delta_logits(root: torch.nn.Module, paths: Mapping[str, str]):
    """``logits(deltas, batch)`` of ``root`` with ``deltas`` (tensor name → delta) added to the weights at
    ``paths`` (tensor name → parameter path in ``root``), via ``torch.func.functional_call``: the other weights are
    used in place, and the base weights are never copied (only ``W + ΔW`` of the replaced ones is formed)."""
    from torch.func import functional_call

    params = dict(root.named_parameters(remove_duplicate=False))
    missing = sorted(set(paths.values()) - set(params))
    if missing:
        raise MergeError(f"the model has no parameter(s) {missing[:3]} to add merged deltas to")

    def logits(deltas: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        replaced = {}
        for name, delta in deltas.items():
            weight = params[paths[name]]
            replaced[paths[name]] = weight + delta.to(device=weight.device, dtype=weight.dtype)
        return functional_call(root, replaced, args=(), kwargs=dict(batch)).logits

    return logits


@contextlib.contextmanager
def fitting_mode(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in eval mode on ``device`` for the fit; its mode and device are restored afterwards."""
    was_training = model.training
    first = next(model.parameters(), None)
    home = first.device if first is not None else device
    try:
        if home != device:
            logger.info("moving the model from %s to %s for the probe fit", home, device)
            model.to(device)
        model.eval()
        yield
    finally:
        if home != device:
            model.to(home)
        model.train(was_training)


def fit_plan(plan: MergePlan, problem: FitProblem) -> MergePlan:
    """The plan with the method's fitted coefficient table and its report."""
    result = plan.method.fit(problem)
    if list(result.table.experts) != list(plan.experts):
        raise MergeError(f"method {plan.config.method!r} fitted a table for experts {result.table.experts}, the "
                         f"merge has {plan.experts}")
    if not torch.isfinite(result.table.values).all():
        raise MergeError(f"method {plan.config.method!r} fitted non-finite coefficients")
    return dataclasses.replace(plan, table=result.table, fit=result.report)
