"""Model Stock (Jang et al., 2024): per tensor (or per row with ``filter_wise``), the experts' task vectors'
mean pairwise cosine ``cos`` sets ``t = K cos / (1 + (K - 1) cos)``, and the merge is
``w = t * mean_k(w_k) + (1 - t) * w_base``, i.e. the delta ``t * mean_k delta_k`` (mergekit's ``model_stock``:
norms clamped at 1e-6, cosines clamped to [-1, 1], ``t = 0`` where ``1 + (K - 1) cos`` vanishes).

Coefficients: ``t * sum_k c_k delta_k / K`` (with the default weights 1, the paper's mean); the angles are those of
the unweighted deltas. LoRA output (per-tensor ``t``): exact factors, the experts' concatenated with ``c_k t / K``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .base import MergeContext, MergeMethod, Param
from .drops import chunk_kernel
from .registry import register_method
from .rowstats import dense_row_grams, row_grams, row_of
from .streamed import StreamJob
from .task_arithmetic import TaskArithmetic

__all__ = ["ModelStock", "stock_ratio"]


def stock_ratio(grams: Tensor) -> Tensor:
    """Model Stock's ``t`` per row (float64 ``[rows]``) from the deltas' Gram matrices ``[rows, K, K]``."""
    num = grams.shape[1]
    norms = torch.diagonal(grams, dim1=1, dim2=2).clamp(min=0).sqrt()
    i, j = torch.triu_indices(num, num, offset=1, device=grams.device)
    cos = (grams[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1.0, 1.0).mean(dim=1)
    denominator = 1.0 + (num - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base (mergekit)
    return torch.where(singular, torch.zeros_like(cos), num * cos / torch.where(singular, 1.0, denominator))


@register_method
class ModelStock(MergeMethod):
    """``t * sum_k c_k delta_k / K`` with ``t`` from the deltas' mean pairwise cosine (per tensor or per row)."""

    name = "model_stock"
    description = ("Model Stock (Jang et al., 2024): θ = θ₀ + t·mean_k δ_k, t = K·cos/(1+(K−1)·cos) from the "
                   "task vectors' mean pairwise cosine per tensor")
    reference = "Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv 2403.19522)"
    parameters = (Param("filter_wise", bool, False, "one t per row (output filter) instead of per tensor"),)

    @staticmethod
    def rows(shape: torch.Size, filter_wise: bool) -> int:
        """Rows sharing one ``t``: mergekit's last-dim rows with ``filter_wise``, else the whole tensor."""
        if not filter_wise or len(shape) < 2 or shape[-1] == 0:
            return 1
        return math.prod(shape) // shape[-1]

    def _check(self, num: int, name: str) -> None:
        if num < 2:
            raise ValueError(f"model_stock for tensor {name!r}: needs at least 2 experts (their angle sets t), got {num}")

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        num = stacked.shape[0]
        self._check(num, ctx.name)
        rows = self.rows(stacked.shape[1:], ctx.params["filter_wise"])
        ratio = stock_ratio(dense_row_grams(stacked, rows)).to(stacked.dtype)
        mean = TaskArithmetic().combine(stacked, coefficients) / num
        return (mean.reshape(rows, -1) * ratio[:, None]).reshape(mean.shape)

    def exact_lora_rank(self, ranks: Sequence[int], params: Mapping[str, Any]) -> Optional[int]:
        # one t per tensor scales a concatenation of the factors; per-row t would depend on the weight's layout
        return None if params.get("filter_wise") else sum(ranks)

    def lora_factors(self, factors: Sequence[tuple[Tensor, Tensor, float]], coefficients: Sequence[float],
                     rank: int, device: torch.device, ctx: Optional[MergeContext] = None) -> tuple[Tensor, Tensor]:
        """Task arithmetic's concatenated factors with coefficients ``c_k t / K``; ``t`` from the ΔW's inner
        products ``<s_i B_i A_i, s_j B_j A_j> = s_i s_j sum((B_iᵀ B_j) ⊙ (A_i A_jᵀ))`` (no ΔW is formed)."""
        num = len(factors)
        self._check(num, ctx.name if ctx is not None else "")
        a = [f[0].to(device=device, dtype=torch.float64) for f in factors]
        b = [f[1].to(device=device, dtype=torch.float64) for f in factors]
        grams = torch.empty(1, num, num, dtype=torch.float64, device=device)
        for i in range(num):
            for j in range(num):
                grams[0, i, j] = factors[i][2] * factors[j][2] * ((b[i].T @ b[j]) * (a[i] @ a[j].T)).sum()
        ratio = float(stock_ratio(grams)[0])
        return TaskArithmetic().lora_factors(factors, [c * ratio / num for c in coefficients], rank, device)

    def stream(self, job: StreamJob) -> bool:
        num, numel = job.num, job.base.numel()
        self._check(num, job.name)
        rows = self.rows(job.shape, job.params["filter_wise"])

        def deltas(s: int, e: int) -> Tensor:
            base = job.base[s:e].to(torch.float32)
            return torch.stack([x[s:e].to(torch.float32) - base for x in job.experts])

        ratio = stock_ratio(row_grams(deltas, numel, rows, job.chunk, job.device))

        def merge(kept: Tensor, coeffs: Tensor, s: int, e: int) -> Tensor:
            return TaskArithmetic().combine(kept, coeffs) / num * row_of(ratio, s, e, numel)

        return chunk_kernel(job, None, merge)
