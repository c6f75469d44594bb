"""What the rank-based drop methods share (DELLA, its sensitivity-ranked variant, Model Breadcrumbs): the keep
probabilities from ranks (MagPrune), the outlier trim, the two rescales, an election that may sum instead of
average, and the chunk kernel of their streamed merges.

Conventions are mergekit's (``mergekit/sparsify.py``, ``generalized_task_arithmetic.py``), re-derived here:

* MagPrune ranks each *row* (dim 1 of a weight, the whole vector of a 1-D tensor) by score, ascending; the entry
  of normalised rank ``r = pos / (n - 1)`` is kept with probability ``density - epsilon + 2 * epsilon * r``. Equal
  scores are ranked in index order (a stable sort; mergekit's sort is unstable there). A row of one entry gets
  the middle probability ``density`` (mergekit divides 0 by 0 there).
* The outlier trim (breadcrumbs) ranks the whole tensor: the ``int(gamma * n)`` largest are dropped, then the
  smallest, so that ``int(density * n)`` are kept (fewer large ones dropped when both do not fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .base import MergeContext
from .common import chunks, compute_dtype, delta_into, weights_view
from .rng import counter_keep_probs, resolve_seed, torch_generator
from .selection import elect_sign, keep_chunk, trim_floats, trim_thresholds
from .streamed import StreamJob
from .ties import elect_and_mean

__all__ = ["OutlierDrop", "RESCALES", "RankedDrop", "check_epsilon", "chunk_kernel", "elect_merge",
           "outlier_keep_mask", "rank_keep_probs", "ranked_drop_dense", "whole_tensor_kernel"]

_INT32_MAX = (1 << 31) - 1  # a trim threshold above every score: keeps nothing

#: How kept entries are rescaled after a MagPrune drop: ``"inverse"`` divides each by its keep probability (the
#: DELLA paper's ``1 / (1 - p_drop)``; DARE's ``1 / density`` when all are equal), ``"l1"`` restores the tensor's
#: L1 norm (mergekit's ``rescale: true``), ``"none"`` leaves them.
RESCALES = ("inverse", "l1", "none")


def check_epsilon(density: float, epsilon: float, name: str, method: str) -> None:
    """ValueError naming the tensor when ``density ± epsilon`` leaves (0, 1] (a drop is needed: density < 1)."""
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon <= 1.0):
        raise ValueError(f"{method} for tensor {name!r}: density={density} with epsilon={epsilon} gives keep "
                         f"probabilities in [{density - epsilon:g}, {density + epsilon:g}]; they must lie in (0, 1], "
                         f"so epsilon must be below {min(density, 1.0 - density + 1e-12):g}")


def rank_keep_probs(scores: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probability of each entry (float64, the shape of ``scores``), from its rank within its row:
    ``density - epsilon`` for the smallest score of a row up to ``density + epsilon`` for the largest.

    Rows: dim 1 of a tensor of two or more dims (mergekit's ``argsort(dim=1)``), the whole of a 1-D tensor.
    """
    if scores.dim() == 0:
        return torch.full_like(scores, density, dtype=torch.float64)
    rows = scores.unsqueeze(0) if scores.dim() == 1 else scores
    n = rows.shape[1]
    if n == 1:  # one entry: the middle of the range (mergekit divides 0 by 0 here)
        return torch.full(scores.shape, density, dtype=torch.float64, device=scores.device)
    order = torch.argsort(rows, dim=1, stable=True)
    steps = torch.arange(n, device=scores.device).reshape((1, n) + (1,) * (rows.dim() - 2)).expand_as(order)
    position = torch.empty_like(order).scatter_(1, order, steps)
    return ((density - epsilon) + position.to(torch.float64) / (n - 1) * (2 * epsilon)).reshape(scores.shape)


def _rescale(delta: Tensor, keep: Tensor, probs: Tensor, how: str) -> Tensor:
    """``delta`` with the dropped entries zeroed and the kept ones rescaled (:data:`RESCALES`)."""
    kept = delta * keep
    if how == "inverse":
        return kept / probs.to(delta.dtype)
    if how == "l1":  # mergekit's rescaled_masked_tensor with the L1 norm
        before, after = delta.abs().sum(), kept.abs().sum()
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept


def _prob_drawer(params: Mapping[str, Any], name: str, device: torch.device) -> Callable[[int, Tensor], Tensor]:
    """``draw(k, probs)``: expert ``k``'s whole keep-mask (fp32 0/1) for per-entry keep probabilities ``probs``;
    called for k = 0, 1, ... in order. ``"counter"``: the hash DARE's masks use (same seed, name and expert);
    ``"torch"``: ``torch.bernoulli`` from a generator seeded per tensor (mergekit draws from the global RNG)."""
    if params["dare_rng"] == "torch":
        generator = torch_generator(params["seed"], name, device)
        return lambda k, probs: torch.bernoulli(probs.to(torch.float32), generator=generator)
    key = resolve_seed(params["seed"])
    return lambda k, probs: counter_keep_probs(probs, 0, key, name, k).reshape(probs.shape)


def ranked_drop_dense(stacked: Tensor, scores: Tensor, ctx: MergeContext, method: str) -> Tensor:
    """Each expert's delta after MagPrune: entries kept with a probability from their rank by ``scores[k]``, then
    rescaled (``ctx.params``: ``density``, ``epsilon``, ``rescale``, ``seed``, ``dare_rng``). Unchanged at density 1."""
    p = ctx.params
    density, epsilon = float(p["density"]), float(p["epsilon"])
    if density >= 1.0:
        return stacked
    check_epsilon(density, epsilon, ctx.name, method)
    draw = _prob_drawer(p, ctx.name, stacked.device)
    out = []
    for k in range(stacked.shape[0]):
        probs = rank_keep_probs(scores[k], density, epsilon)
        out.append(_rescale(stacked[k], draw(k, probs).to(stacked.dtype), probs, p["rescale"]))
    return torch.stack(out)


def outlier_keep_mask(scores: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs' mask (bool, the shape of ``scores``): ranked over the whole tensor by score (equal scores in
    index order, the first counting as larger), the ``int(gamma * n)`` largest are dropped and the next
    ``int(density * n)`` kept; fewer of the largest are dropped when both do not fit (mergekit's convention)."""
    n = scores.numel()
    keep, skip = _outlier_counts(n, density, gamma)
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=scores.device))
    return ((position >= skip) & (position < skip + keep)).reshape(scores.shape)


def _outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept, largest entries dropped) of the outlier trim of ``n`` entries."""
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return keep, n - bottom - keep


def elect_merge(kept: Tensor, coefficients: Tensor, params: Mapping[str, Any]) -> Tensor:
    """TIES's sign election over the kept deltas ``[K, ...]``, then the mean of the agreeing entries (``normalize``,
    as TIES; divided by their count, or by their coefficients' sum with ``divisor="weights"``, mergekit's
    ``normalize: true``) or their sum (mergekit's ``normalize: false``)."""
    if params.get("normalize", True):
        return elect_and_mean(kept, coefficients, params["majority_sign_method"], params["weighted_election"],
                              params.get("divisor", "count"))
    weighted = kept * weights_view(coefficients, kept.dim() - 1)
    voters = weighted if params["weighted_election"] else kept
    agree = voters.sign() == elect_sign(voters, params["majority_sign_method"])
    return (weighted * agree).sum(dim=0)


# --------------------------------------------------------------------------------------------------------
# Streamed merges
# --------------------------------------------------------------------------------------------------------


class RankedDrop:
    """MagPrune's drop step for :func:`chunk_kernel` (``"counter"`` masks, ``"inverse"``/``"none"`` rescale): the
    probabilities of a chunk come from the whole rows that hold it (scored again from the inputs, so chunks need
    not start on a row), or, for tensors that are not 2-D, from the whole tensor once per expert."""

    finite = True

    def __init__(self, job: StreamJob, maps: Optional[list[Tensor]], method: str) -> None:
        p = job.params
        self.density, self.epsilon, self.rescale = float(p["density"]), float(p["epsilon"]), p["rescale"]
        check_epsilon(self.density, self.epsilon, job.name, method)
        self.key = resolve_seed(p["seed"])
        self.job, self.maps = job, maps
        self.row = job.shape[1] if len(job.shape) == 2 else None
        self.whole: dict[int, Tensor] = {}

    def scores(self, k: int, a: int, b: int) -> Tensor:
        if self.maps is not None:
            return self.maps[k][a:b].to(torch.float32)
        job = self.job
        return (job.experts[k][a:b].to(torch.float32) - job.base[a:b].to(torch.float32)).abs_()

    def probs(self, k: int, s: int, e: int) -> Tensor:
        numel = self.job.base.numel()
        if self.row is None:
            if k not in self.whole:
                scores = self.scores(k, 0, numel).reshape(self.job.shape)
                self.whole[k] = rank_keep_probs(scores, self.density, self.epsilon).reshape(-1)
            return self.whole[k][s:e]
        first, last = s // self.row * self.row, min(numel, -(-e // self.row) * self.row)
        rows = self.scores(k, first, last).reshape(-1, self.row)
        return rank_keep_probs(rows, self.density, self.epsilon).reshape(-1)[s - first: e - first]

    def apply(self, k: int, s: int, e: int, d: Tensor, kp: Tensor, check: Tensor) -> None:
        check += d.sum()  # dropped entries must not hide a NaN/Inf
        probs = self.probs(k, s, e)
        d.mul_(counter_keep_probs(probs, s, self.key, self.job.name, k))
        if self.rescale == "inverse":
            d.div_(probs.to(torch.float32))


class OutlierDrop:
    """Breadcrumbs' drop step for :func:`chunk_kernel`: two exact trims of ``|delta|`` (the selection TIES uses,
    equal scores kept in index order), the entries the wider keeps and the narrower does not."""

    def __init__(self, job: StreamJob, gamma: float) -> None:
        numel = job.base.numel()
        keep, skip = _outlier_counts(numel, float(job.params["density"]), gamma)
        base, experts = job.base.reshape(job.shape), [e.reshape(job.shape) for e in job.experts]
        self.finite = True
        self.trims: list[list] = []
        for count in (skip + keep, skip):  # the wider trim, then the top entries it drops
            if count == 0 or count >= numel:  # nothing / everything kept: no selection to make
                self.trims.append([trim_floats(-1 if count else _INT32_MAX, 0)] * job.num)
                continue
            # a density whose int(density * numel) is exactly count, whatever the rounding
            found, finite = trim_thresholds(base, experts, (count + 0.5) / numel, chunk=job.chunk, fused=job.fused)
            self.finite = self.finite and finite
            self.trims.append([trim_floats(threshold, tie_end) for threshold, tie_end in found])
        self.buffers = job.buffers(3)

    def apply(self, k: int, s: int, e: int, d: Tensor, kp: Tensor, check: Tensor) -> None:
        check += d.sum()
        n = e - s
        scores, outer, inner = (b[:n] for b in self.buffers)
        torch.abs(d, out=scores)
        wide, narrow = self.trims
        keep = keep_chunk(scores, wide[k], s, outer)
        keep.sub_(keep_chunk(scores, narrow[k], s, inner))  # the narrower set lies inside the wider one
        d.mul_(keep)


def chunk_kernel(job: StreamJob, drop: Any, merge: Callable[[Tensor, Tensor, int, int], Tensor]) -> bool:
    """``out = base + merge(kept deltas, coefficients, s, e)`` chunk by chunk: per chunk the ``[K, n]`` fp32 deltas,
    each dropped in place by ``drop.apply`` (None: kept whole), then ``merge`` (the method's dense formula on them).
    Returns False when a non-finite value was seen."""
    num = job.num
    base_f, keep = job.buffers(2)
    stacked = torch.empty(num, job.chunk, dtype=torch.float32, device=job.device)
    coeffs = torch.tensor(job.coeffs, dtype=torch.float32, device=job.device)
    check = torch.zeros((), dtype=torch.float32, device=job.device)
    for s, e in chunks(job.stop, job.chunk, job.first):
        n = e - s
        bf = base_f[:n].copy_(job.base[s:e])
        for k in range(num):
            delta_into(stacked[k, :n], job.experts[k][s:e], None, bf)
            if drop is not None:
                drop.apply(k, s, e, stacked[k, :n], keep[:n], check)
        bf.add_(merge(stacked[:, :n], coeffs, s, e))
        check += bf.sum()
        job.out[s:e].copy_(bf)
    return (drop is None or drop.finite) and bool(torch.isfinite(check))


def whole_tensor_kernel(job: StreamJob, combine: Callable[[Tensor, Tensor, MergeContext], Tensor]) -> bool:
    """A streamed merge done on the whole tensor with the method's dense hook (settings that need the whole tensor
    at once: an L1 rescale, ``torch`` masks); writes the job's span."""
    dtype = compute_dtype(job.base.dtype)
    base = job.base.to(dtype)
    stacked = torch.stack([e.to(dtype) - base for e in job.experts]).reshape((job.num,) + tuple(job.shape))
    stats = {kind: torch.stack([m.reshape(job.shape).to(device=job.device, dtype=dtype) for m in maps])
             for kind, maps in job.statistics.items() if maps is not None}
    ctx = MergeContext(name=job.name, params=job.params, statistics=stats, device=job.device)
    merged = base + combine(stacked, torch.tensor(job.coeffs, dtype=dtype, device=job.device), ctx).reshape(-1)
    job.out[job.first: job.stop].copy_(merged[job.first: job.stop])
    return bool(torch.isfinite(merged).all()) and math.isfinite(float(stacked.sum()))
