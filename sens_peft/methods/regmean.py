"""RegMean (Jin et al., ICLR 2023): per Linear layer, the weights that best reproduce every expert's outputs on its
own calibration inputs, ``W = (Σ_k c_k ΔW_k G̃_k)(Σ_k G̃_k)⁻¹`` with ``G_k`` the mean input Gram ``E[x xᵀ]`` of
expert ``k`` (captured by :class:`~sens_peft.SensitivityCallback` / ``compute_sensitivity`` with
``SensitivityConfig(gram=...)``) and ``G̃ = a·G + (1 − a)·diag(G)`` its shrinkage. The math is in
:mod:`sens_peft.regmean`.

Coefficients enter linearly (``c_k ≡ 1`` is the paper's RegMean, ``c_k ≡ λ`` scales it), so with equal Grams the
merge is the coefficient-weighted *average* ``Σ_k c_k ΔW_k / K`` (the paper's "simple average" limit), and a tensor
without Grams (embeddings, norms: not the input of a Linear) takes exactly that average. LoRA experts are merged
exactly in factor form (rank ``Σ_k r_k``). Weights are read in torch ``Linear`` layout ``[out, in]``; GPT-2's
``Conv1D`` (``[in, out]``) is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ..regmean import regmean_lora_factors, regmean_merge
from .base import MergeContext, MergeMethod, Param
from .common import padded_factors, weights_view
from .registry import register_method

# 0.99, not the paper's 1: picked on validation over the quick benchmark's six cells (benchmarks/README.md); a 1 %
# diagonal boost conditions nearly singular Grams (maps/LoRA: 50.4 at 1.0, 65.4 at 0.99). Shared with probe_fit's
# RegMean base.
SHRINKAGE = Param("shrinkage", float, 0.99, "off-diagonal Gram scale a (1: plain RegMean, 0: diagonal only)", 0.0, 1.0)


def _average(stacked: Tensor, coefficients: Tensor) -> Tensor:
    return (stacked * weights_view(coefficients, stacked.dim() - 1)).sum(dim=0) / stacked.shape[0]


@register_method
class RegMean(MergeMethod):
    """Regression mean: the least-squares merge of each Linear layer on the experts' own input statistics."""

    name = "regmean"
    description = "RegMean: per Linear, W = (Σ c_k ΔW_k G_k)(Σ G_k)⁻¹ from the experts' captured input Grams"
    reference = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 " \
                "(arXiv 2212.09849)"
    parameters = (SHRINKAGE,)
    needs = ("gram",)
    optional_statistics = ("gram",)  # tensors that are no Linear's weight have none: they are averaged

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: Optional[MergeContext] = None) -> Tensor:
        grams = ctx.statistic("gram") if ctx is not None else None
        if grams is None or stacked.dim() != 3:  # [K, out, in]: a Linear weight
            return _average(stacked, coefficients)
        weighted = stacked * weights_view(coefficients, 2)
        merged = regmean_merge(list(weighted), list(grams), float(ctx.params.get("shrinkage", 1.0)))
        return merged.to(stacked.dtype)

    def exact_lora_rank(self, ranks: Sequence[int], params: Mapping[str, Any]) -> Optional[int]:
        return sum(ranks)

    def lora_factors(self, factors: Sequence[tuple[Tensor, Tensor, float]], coefficients: Sequence[float],
                     rank: int, device: torch.device, ctx: Optional[MergeContext] = None) -> tuple[Tensor, Tensor]:
        """``B = [B_k]``, ``A = stack_k(c_k s_k A_k G̃_k S⁻¹)``: ``B @ A`` is exactly :meth:`combine` of the dense
        deltas (the average, ``A = stack_k(c_k s_k A_k / K)``, when the module has no Grams)."""
        grams = ctx.statistic("gram") if ctx is not None else None
        As = [a.to(device=device, dtype=torch.float32) for a, _, _ in factors]
        Bs = [b.to(device=device, dtype=torch.float32) for _, b, _ in factors]
        if grams is None:
            A_cat = torch.cat([a * (c * s / len(factors)) for a, (_, _, s), c in zip(As, factors, coefficients)], 0)
        else:
            scalings = [c * s for (_, _, s), c in zip(factors, coefficients)]
            A_cat, _ = regmean_lora_factors(As, Bs, scalings, list(grams), float(ctx.params.get("shrinkage", 1.0)))
        return padded_factors(A_cat.to(torch.float32), torch.cat(Bs, 1), rank)
