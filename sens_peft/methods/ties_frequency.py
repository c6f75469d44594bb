"""TIES with the sign elected by count (``majority_sign_method="frequency"``) as a method of its own, with a
parameter of its own: the example of a method added in one file (registered, streamed, in cards, recipes and
``sens-peft merge --help`` with no other edit).

``min_agree`` (default 1) keeps an entry only where at least that many experts' kept deltas agree with the
elected sign; at 1 the method is exactly ``ties`` with ``majority_sign_method="frequency"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import MergeContext, MergeMethod, Param
from .dense import merge_deltas
from .registry import register_method
from .selection import elect_sign, magnitude_trim_mask
from .streamed import StreamJob, elect_kernel, ties_trim
from .ties import Ties


@register_method
class TiesFrequency(Ties):
    """TIES electing each entry's sign by the number of experts (not their mass), needing ``min_agree`` votes."""

    name = "ties_frequency"
    description = "TIES with the sign elected by count; entries need min_agree agreeing experts"
    uses = ("density", "trim_by", "weighted_election")
    parameters = (Param("min_agree", int, 1, "experts that must agree with the elected sign to keep an entry",
                        low=1, high=64),)

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        p = ctx.params
        if p["density"] < 1.0:
            scores = stacked.abs() if p["trim_by"] == "magnitude" else ctx.statistic("element_maps")
            if scores is None:
                raise ValueError(f"ties_frequency for tensor {ctx.name!r}: trim_by='sensitivity' needs importance maps")
            stacked = stacked * torch.stack([magnitude_trim_mask(scores[k], p["density"])
                                             for k in range(stacked.shape[0])])
        weighted = stacked * coefficients.reshape(coefficients.shape + (1,) * (stacked.dim() - 1))
        voters = weighted if p["weighted_election"] else stacked
        agree = voters.sign() == elect_sign(voters, "frequency")
        count = agree.sum(dim=0)
        merged = (weighted * agree).sum(dim=0) / count.clamp(min=1)
        return torch.where(count >= p["min_agree"], merged, torch.zeros_like(merged))

    def stream(self, job: StreamJob) -> bool:
        if job.params["min_agree"] > 1:  # the chunked kernel has no agreement floor: the dense hook does it
            return _dense_stream(self, job)
        return elect_kernel(_with(job, majority_sign_method="frequency"), ties_trim(job))


def _with(job: StreamJob, **params: Any) -> StreamJob:
    job.params = {**job.params, **params}
    return job


def _dense_stream(method: MergeMethod, job: StreamJob) -> bool:
    """The whole span through the dense hook (fp32), written into ``job.out``."""
    s, e = job.first, job.stop
    base = job.base.float()
    deltas = [(x.float() - base).reshape(job.shape) for x in job.experts]
    maps = job.statistics.get("element_maps")
    p = {k: v for k, v in job.params.items() if k not in ("min_agree",)}
    merged = base + merge_deltas(method.name, deltas, job.coeffs, importance=maps, min_agree=job.params["min_agree"],
                                 **p).reshape(-1)
    job.out[s:e].copy_(merged[s:e])
    return bool(torch.isfinite(merged[s:e]).all())
