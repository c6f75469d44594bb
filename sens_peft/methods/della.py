"""DELLA (Deep et al., 2024): MagPrune, a random drop whose keep probability rises with the entry's magnitude rank
in its row (``density ± epsilon``), the kept entries rescaled, then TIES's sign election and disjoint mean
(``della``) or task arithmetic (``della_linear``), as mergekit's methods of those names.

The masks are DARE's ``"counter"`` hash compared with each entry's own probability: with ``epsilon = 0`` and the
same seed, ``della`` is ``dare_ties`` and ``della_linear`` is ``dare_linear``, mask for mask (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import MergeContext, MergeMethod, Param
from .drops import RESCALES, RankedDrop, chunk_kernel, elect_merge, ranked_drop_dense, whole_tensor_kernel
from .registry import register_method
from .streamed import StreamJob
from .task_arithmetic import TaskArithmetic
from .ties import DIVISOR_PARAM

__all__ = ["Della", "DellaLinear", "MAGPRUNE_PARAMS"]

#: MagPrune's parameters (DELLA and its sensitivity-ranked variant).
MAGPRUNE_PARAMS = (
    Param("epsilon", float, 0.15, "keep probabilities span density ± epsilon over each row's ranks (mergekit: 0.15)",
          low=0.0, high=0.5),
    Param("rescale", str, "inverse", "kept entries: / their keep probability (the paper), 'l1': restore the "
          "tensor's L1 norm (mergekit's rescale), 'none'", choices=RESCALES),
)


class _MagPrune(MergeMethod):
    """A rank-based random drop, then a combination; subclasses say what ranks the entries and how they combine."""

    reference = ("Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
                 "Sampling, 2024 (arXiv 2406.11617)")
    #: Whether the kept deltas go through TIES's sign election (else they are summed as task arithmetic).
    consensus = True

    def draws_masks(self, params: Mapping[str, Any]) -> bool:
        # its own seeded draw (not ``random``'s ctx.draw_keep), reported on the card like DARE's
        return True

    def scores(self, stacked: Tensor, ctx: MergeContext) -> Tensor:
        """``[K, ...]`` ranking scores of the deltas."""
        return stacked.abs()

    def stream_maps(self, job: StreamJob):
        """Per-expert flat ranking scores of a streamed merge (None: ``|delta|``)."""
        return None

    def merge_kept(self, kept: Tensor, coefficients: Tensor, params) -> Tensor:
        if self.consensus:
            return elect_merge(kept, coefficients, params)
        return TaskArithmetic().combine(kept, coefficients)

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        kept = ranked_drop_dense(stacked, self.scores(stacked, ctx), ctx, self.name)
        return self.merge_kept(kept, coefficients, ctx.params)

    def stream(self, job: StreamJob) -> bool:
        p = job.params
        if p["density"] >= 1.0:
            return chunk_kernel(job, None, lambda kept, c, s, e: self.merge_kept(kept, c, p))
        if p["rescale"] == "l1" or p["dare_rng"] == "torch":
            return whole_tensor_kernel(job, self.combine)  # a whole-tensor norm, or one generator stream
        drop = RankedDrop(job, self.stream_maps(job), self.name)
        return chunk_kernel(job, drop, lambda kept, c, s, e: self.merge_kept(kept, c, p))


@register_method
class Della(_MagPrune):
    """DELLA: MagPrune by ``|delta|`` per row, rescale, then sign election and the mean of the agreeing entries."""

    name = "della"
    description = ("DELLA (Deep et al., 2024): drop with probability by magnitude rank in each row (density ± "
                   "epsilon), rescale, then TIES sign election")
    uses = ("density", "majority_sign_method", "weighted_election", "seed", "dare_rng")
    parameters = MAGPRUNE_PARAMS + (
        Param("normalize", bool, True, "mean of the agreeing entries (True, TIES) or their sum (mergekit's "
              "normalize: false)"),
        DIVISOR_PARAM,
    )


@register_method
class DellaLinear(_MagPrune):
    """DELLA's drop and rescale, then task arithmetic (mergekit's ``della_linear``)."""

    name = "della_linear"
    description = "DELLA's magnitude-ranked drop and rescale, then task arithmetic (no sign election)"
    uses = ("density", "seed", "dare_rng")
    parameters = MAGPRUNE_PARAMS
    consensus = False
