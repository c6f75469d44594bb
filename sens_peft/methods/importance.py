"""Importance-weighted merge: ``sum_k c_k I_k delta_k / mean_k I_k`` per element, with ``I_k`` expert k's stored
element maps (``mean |w * g|``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import MergeContext, MergeMethod
from .common import weights_view
from .registry import register_method


@register_method
class ImportanceMerge(MergeMethod):
    """Importance-weighted merge: ``sum_k c_k I_k delta_k / mean_k I_k`` per element.

    Fisher merging on task vectors, rescaled by ``K`` so that it is continuous with task arithmetic: equal
    importance gives exactly ``sum_k c_k delta_k``, so ``scale`` means the same as for TA and one lambda grid
    serves both. An expert that matters more for an entry takes a larger share of it. Entries where every
    expert's importance is 0 use that equal-importance limit. The merge entry points require every expert's
    element maps (a :class:`~sens_peft.errors.MergeError` otherwise); called directly without maps,
    :func:`~sens_peft.methods.merge_deltas` gives the equal-importance limit.
    """

    name = "importance"
    description = "Importance-weighted (Fisher-style) merge: Σ_k c_k I_k δ_k / mean_k I_k per element"
    reference = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv 2111.09832)"
    needs = ("element_maps",)

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: Optional[MergeContext] = None) -> Tensor:
        weighted = stacked * weights_view(coefficients, stacked.dim() - 1)
        importance = ctx.statistic("element_maps") if ctx is not None else None
        if importance is None:
            return weighted.sum(dim=0)
        mean = importance.mean(dim=0)
        merged = (importance * weighted).sum(dim=0) / torch.where(mean > 0, mean, torch.ones_like(mean))
        return torch.where(mean > 0, merged, weighted.sum(dim=0))
