"""Fisher merging (Matena & Raffel, NeurIPS 2022) on task vectors: ``Σ_k c_k F_k δ_k / Σ_k F_k`` per element, with
``F_k`` expert ``k``'s empirical diagonal Fisher ``E[g²]`` (captured by the calibration pass with
``SensitivityConfig(fisher=...)``). The math is :func:`sens_peft.regmean.fisher_merge`.

Like RegMean, coefficients enter linearly: equal Fisher maps give the average ``Σ_k c_k δ_k / K``, and so do entries
where every expert's Fisher is 0. Compare ``importance``, which weights by ``|w ⊙ g|`` and is continuous with task
arithmetic (a sum) instead.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..regmean import fisher_merge
from .base import MergeContext, MergeMethod
from .common import weights_view
from .registry import register_method


@register_method
class FisherMerge(MergeMethod):
    """Fisher-weighted average of the task vectors, per element."""

    name = "fisher"
    description = "Fisher merging: Σ_k c_k F_k δ_k / Σ_k F_k per element, F = the experts' captured E[g²]"
    reference = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv 2111.09832)"
    needs = ("fisher",)

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: Optional[MergeContext] = None) -> Tensor:
        fishers = ctx.statistic("fisher") if ctx is not None else None
        if fishers is None:
            raise ValueError(f"method 'fisher' needs the experts' Fisher maps of tensor {getattr(ctx, 'name', '')!r}")
        weighted = stacked * weights_view(coefficients, stacked.dim() - 1)
        return fisher_merge(list(weighted), list(fishers)).to(stacked.dtype)
