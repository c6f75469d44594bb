"""Model Breadcrumbs (Davari & Belilovsky, 2023): per tensor, drop the ``gamma`` fraction of entries of largest
``|delta|`` (outliers) and the smallest, keeping ``density`` of them, then task arithmetic (``breadcrumbs``) or
TIES's sign election (``breadcrumbs_ties``), as mergekit's methods of those names (no rescale; ``breadcrumbs_ties``
sums the agreeing entries unless ``normalize``). At ``density = 1`` nothing is dropped (mergekit's convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MergeContext, MergeMethod, Param
from .drops import OutlierDrop, chunk_kernel, elect_merge, outlier_keep_mask
from .registry import register_method
from .streamed import StreamJob
from .task_arithmetic import TaskArithmetic
from .ties import DIVISOR_PARAM

__all__ = ["Breadcrumbs", "BreadcrumbsTies"]

_GAMMA = Param("gamma", float, 0.01, "fraction of the largest |delta| entries dropped per tensor (mergekit: 0.01)",
               low=0.0, high=1.0)


class _Breadcrumbs(MergeMethod):
    reference = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, 2023 " \
                "(arXiv 2312.06795)"
    consensus = False

    def merge_kept(self, kept: Tensor, coefficients: Tensor, params) -> Tensor:
        if self.consensus:
            return elect_merge(kept, coefficients, params)
        return TaskArithmetic().combine(kept, coefficients)

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        p = ctx.params
        if p["density"] < 1.0:
            keep = torch.stack([outlier_keep_mask(stacked[k].abs(), p["density"], p["gamma"])
                                for k in range(stacked.shape[0])])
            stacked = stacked * keep
        return self.merge_kept(stacked, coefficients, p)

    def stream(self, job: StreamJob) -> bool:
        p = job.params
        drop = OutlierDrop(job, float(p["gamma"])) if p["density"] < 1.0 else None
        return chunk_kernel(job, drop, lambda kept, c, s, e: self.merge_kept(kept, c, p))


@register_method
class Breadcrumbs(_Breadcrumbs):
    """Drop the largest ``gamma`` and the smallest entries (``density`` kept), then task arithmetic."""

    name = "breadcrumbs"
    description = ("Model Breadcrumbs (Davari & Belilovsky, 2023): drop the largest gamma and the smallest "
                   "entries per tensor (density kept), then task arithmetic")
    uses = ("density",)
    parameters = (_GAMMA,)


@register_method
class BreadcrumbsTies(_Breadcrumbs):
    """Breadcrumbs' drop, then TIES's sign election; the agreeing entries summed (mergekit) or averaged."""

    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs' drop, then TIES sign election (agreeing entries summed, as mergekit)"
    uses = ("density", "majority_sign_method", "weighted_election")
    parameters = (_GAMMA, Param("normalize", bool, False, "mean of the agreeing entries instead of their sum"),
                  DIVISOR_PARAM)
    consensus = True
