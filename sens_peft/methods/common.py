"""Small helpers the method kernels share: chunk ranges, the fp32 delta of a chunk, dtypes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK", "chunks", "compute_dtype", "delta_into", "padded_factors", "weights_view"]

# Flat chunk processed at a time: a few fp32 buffers of this size stay in cache and bound the scratch memory,
# whatever the tensor's size (a 65M-entry embedding is not materialised as K fp32 copies).
DEFAULT_CHUNK = 1 << 18


def chunks(numel: int, chunk: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(s, e)`` ranges of ``chunk`` entries covering ``start:numel`` (the last one shorter)."""
    for s in range(start, numel, chunk):
        yield s, min(numel, s + chunk)


def delta_into(out: Tensor, expert: Tensor, base: Tensor | None, base_f: Tensor) -> Tensor:
    """``out = fp32(expert) - fp32(base)``. ``base`` (if given) is first converted into ``base_f``.

    A plain ``torch.sub(bf16, bf16, out=fp32)`` would subtract in bf16; converting first keeps the fp32 math of
    :func:`~sens_peft.methods.merge_deltas`, and a dtype-converting ``copy_`` plus a same-dtype ``sub_`` is also
    ~2x faster than a mixed-dtype ``sub``.
    """
    if base is not None:
        base_f.copy_(base)
    out.copy_(expert)
    return out.sub_(base_f)


def weights_view(coefficients: Tensor, ndim: int) -> Tensor:
    """``[K]`` coefficients viewed as ``[K, 1, ...]`` to broadcast over stacked ``[K, ...]`` deltas."""
    return coefficients.reshape(coefficients.shape + (1,) * ndim)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the merge math: fp64 inputs stay fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def padded_factors(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Exact LoRA factors ``A [r, in]``, ``B [out, r]`` zero-padded to ``rank`` (fp32): ``B @ A`` is unchanged.
    Factors already of that rank (and fp32) come back as they are, not copied."""
    if A.shape[0] == rank == B.shape[1] and A.dtype == B.dtype == torch.float32:
        return A, B
    A_out = torch.zeros(rank, A.shape[1], dtype=torch.float32, device=A.device)
    B_out = torch.zeros(B.shape[0], rank, dtype=torch.float32, device=B.device)
    A_out[: A.shape[0]] = A
    B_out[:, : B.shape[1]] = B
    return A_out, B_out
