"""DARE (Yu et al., 2024): keep each entry with probability ``density`` and rescale by ``1/density``, then task
arithmetic (``dare_linear``) or TIES's sign election and disjoint mean without a magnitude trim (``dare_ties``, as
``peft.utils.merge_utils.dare_ties``). The masks: :mod:`sens_peft.methods.rng`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .. import fused as _fused
from .base import MergeContext, MergeMethod
from .bits import dare_masks
from .registry import register_method
from .rng import resolve_seed
from .selection import expert_densities
from .streamed import StreamJob, dare_drop, dare_linear_kernel, elect_kernel
from .task_arithmetic import TaskArithmetic
from .ties import DIVISOR_PARAM, elect_and_mean, expert_groups

__all__ = ["DareLinear", "DareTies", "dare_drop_dense"]


def dare_drop_dense(stacked: Tensor, density: float | Sequence[float],
                    draw_keep: Callable[[int], Tensor] | None) -> Tensor:
    """Each expert's delta times its keep-mask, over its ``density`` (one for all, or one per expert); an expert at
    density 1 is unchanged, with no draw."""
    num = stacked.shape[0]
    densities = [float(density)] * num if isinstance(density, (int, float)) else [float(d) for d in density]
    if min(densities) >= 1.0 or draw_keep is None:
        return stacked  # nothing dropped; no draw, like PEFT's prune()
    # expert after expert: with the "torch" generator this is the stream PEFT consumes when the global RNG is
    # seeded, so the masks coincide with PEFT's for fp32 inputs
    return torch.stack([stacked[k] if densities[k] >= 1.0 else
                        stacked[k] * draw_keep(k).to(stacked.dtype) / densities[k] for k in range(num)])


def _densities(params: Mapping[str, Any], num: int) -> float | list[float]:
    """What the mask drawers take: the one density, or the per-expert ones."""
    return params["density"] if params.get("densities") is None else expert_densities(params, num)


class _Dare(MergeMethod):
    """What both DARE methods share: the masks, drawn ahead on worker threads by a streamed merge."""

    random = True
    per_expert_density = True
    reference = "Yu et al., Language Models are Super Mario, ICML 2024 (arXiv 2311.03099)"
    #: Whether the fused loops hash counter masks inline (then nothing is drawn ahead).
    inline_counter = False

    def _inline(self, params: Mapping[str, Any], device: torch.device) -> bool:
        # the fused loops take one density for all the experts
        return self.inline_counter and params["dare_rng"] == "counter" and device.type == "cpu" \
            and _fused.available() and params.get("densities") is None

    def stream_prepare(self, base: Tensor, experts: Sequence[Tensor], params: Mapping[str, Any], name: str,
                       statistics: Mapping[str, Sequence[Tensor]], parts: int, device: torch.device,
                       out_dtype: torch.dtype) -> Optional[list[Callable[[], Any]]]:
        num = len(experts)
        if min(expert_densities(params, num)) >= 1.0:
            return None
        if self._inline(params, device) and _fused.supports(base.reshape(-1), [t.reshape(-1) for t in experts],
                                                            base.new_empty(0, dtype=out_dtype)):
            return None  # the fused loops hash the masks inline, for less than unpacking them would cost
        if params["dare_rng"] != "counter":  # one generator stream for all the experts: one job
            return [functools.partial(dare_masks, base.numel(), num, _densities(params, num), params["seed"], name,
                                      dare_rng=params["dare_rng"])]
        seed = resolve_seed(params["seed"])  # one key for every group, also when the seed is None
        return [functools.partial(dare_masks, base.numel(), num, _densities(params, num), seed, name,
                                  dare_rng=params["dare_rng"], experts=group)
                for group in expert_groups(num, parts)]

    def prepared(self, results: list) -> dict[str, Any]:
        return {"dare_masks": [mask for masks in results for mask in masks]}

    def prepares(self, params: Mapping[str, Any]) -> bool:
        return min(expert_densities(params, 1)) < 1.0  # masks to draw

    def prepare_bytes(self, numel: int, num: int, params: Mapping[str, Any], device: torch.device) -> int:
        if min(expert_densities(params, num)) >= 1.0 or self._inline(params, device):
            return 0
        return (numel + 7) // 8 * num  # packed masks


@register_method
class DareLinear(_Dare):
    """DARE: Bernoulli keep with probability ``density``, rescale by ``1/density``, then task arithmetic."""

    name = "dare_linear"
    description = "DARE (Yu et al., 2024): random drop with rescale, then task arithmetic"
    uses = ("density", "densities", "seed", "dare_rng")

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        drop = dare_drop_dense(stacked, _densities(ctx.params, stacked.shape[0]), ctx.draw_keep)
        return TaskArithmetic().combine(drop, coefficients)

    def stream(self, job: StreamJob) -> bool:
        return dare_linear_kernel(job, dare_drop(job))


@register_method
class DareTies(_Dare):
    """DARE drop and rescale, then TIES sign election and disjoint mean (no magnitude trim, as PEFT)."""

    name = "dare_ties"
    description = "DARE (Yu et al., 2024): random drop with rescale, then TIES sign election"
    uses = ("density", "densities", "majority_sign_method", "weighted_election", "seed", "dare_rng")
    parameters = (DIVISOR_PARAM,)
    inline_counter = True

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        p = ctx.params
        return elect_and_mean(dare_drop_dense(stacked, _densities(p, stacked.shape[0]), ctx.draw_keep), coefficients,
                              p["majority_sign_method"], p["weighted_election"], p["divisor"])

    def stream(self, job: StreamJob) -> bool:
        return elect_kernel(job, dare_drop(job))
