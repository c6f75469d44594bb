"""Task arithmetic: ``lambda * sum_k c_k delta_k``; exact LoRA output by concatenating the experts' factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .base import MergeContext, MergeMethod
from .common import padded_factors, weights_view
from .registry import register_method
from .streamed import StreamJob, linear_kernel


@register_method
class TaskArithmetic(MergeMethod):
    """``sum_k c_k delta_k``."""

    name = "task_arithmetic"
    description = "Task Arithmetic (Ilharco et al., 2023): θ = θ₀ + λ Σ_k c_k δ_k"
    reference = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)"

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: Optional[MergeContext] = None) -> Tensor:
        return (stacked * weights_view(coefficients, stacked.dim() - 1)).sum(dim=0)

    def stream(self, job: StreamJob) -> bool:
        return linear_kernel(job)

    def exact_lora_rank(self, ranks: Sequence[int], params: Mapping[str, Any]) -> Optional[int]:
        # the concatenation is exact only for the plain weighted sum (an explicit trim_by="sensitivity" is not)
        return sum(ranks) if params.get("trim_by") == "magnitude" else None

    def lora_factors(self, factors: Sequence[tuple[Tensor, Tensor, float]], coefficients: Sequence[float],
                     rank: int, device: torch.device, ctx: Optional[MergeContext] = None) -> tuple[Tensor, Tensor]:
        """``A = [c_k s_k A_k]`` (rows) and ``B = [B_k]`` (columns), zero-padded to ``rank``: ``B @ A`` is exactly
        ``sum_k c_k s_k B_k A_k``."""
        parts_a = [a.to(device=device, dtype=torch.float32) * (c * s) for (a, _, s), c in zip(factors, coefficients)]
        parts_b = [b.to(device=device, dtype=torch.float32) for _, b, _ in factors]
        return padded_factors(torch.cat(parts_a, 0), torch.cat(parts_b, 1), rank)
