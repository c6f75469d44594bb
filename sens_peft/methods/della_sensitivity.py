"""Sensitivity-ranked drop: DELLA's MagPrune with each entry's keep probability set by its rank in the expert's
stored per-element sensitivity map (``mean |w * g|``, the ``element_maps`` statistic) instead of its magnitude,
then TIES's sign election and disjoint mean.

The question it answers: does the sensitivity the callback captures tell which entries a random drop should
spare better than magnitude does? Its controls are DARE-TIES at the same density (``epsilon = 0``: the same masks,
tested) and the same merge with the maps shuffled (the quality benchmark's control).
"""

from __future__ import annotations

from torch import Tensor

from .base import MergeContext, Param
from .della import MAGPRUNE_PARAMS, _MagPrune
from .registry import register_method
from .selection import importance_maps
from .streamed import StreamJob

__all__ = ["DellaSensitivity"]


@register_method
class DellaSensitivity(_MagPrune):
    """MagPrune ranked by the stored element maps, rescale, sign election, disjoint mean."""

    name = "della_sensitivity"
    description = ("Sensitivity-ranked drop: DELLA's drop with keep probability by the rank of the stored "
                   "per-element sensitivity in each row (density ± epsilon), rescale, TIES sign election")
    reference = ("Deep et al., DELLA-Merging, 2024 (arXiv 2406.11617), ranked by the element maps of Sens-Merging "
                 "(Liu et al., 2025, arXiv 2502.12420)")
    uses = ("density", "majority_sign_method", "weighted_election", "seed", "dare_rng")
    needs = ("element_maps",)
    parameters = MAGPRUNE_PARAMS + (
        Param("normalize", bool, True, "mean of the agreeing entries (True, TIES) or their sum"),
    )

    def scores(self, stacked: Tensor, ctx: MergeContext) -> Tensor:
        maps = ctx.statistic("element_maps")
        if maps is None:
            raise ValueError(f"merge_deltas for tensor {ctx.name!r}: method 'della_sensitivity' ranks entries by the "
                             "experts' element maps (importance=...), and none were given")
        return maps

    def stream_maps(self, job: StreamJob):
        maps = job.statistics.get("element_maps")
        if maps is None:
            raise ValueError(f"merge_streamed for tensor {job.name!r}: method 'della_sensitivity' ranks entries by "
                             "the experts' element maps (importance=...), and none were given")
        return importance_maps(maps, job.num, job.shape, job.name, job.device)
