"""Per-row inner products of a few vectors, for the methods whose coefficients come from angles (SLERP, Model
Stock): computed in float64 over a whole tensor, chunk by chunk (streamed) or at once (dense)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .common import chunks

__all__ = ["dense_row_grams", "row_grams", "row_of"]


def row_grams(vectors: Callable[[int, int], Tensor], numel: int, rows: int, chunk: int,
              device: torch.device) -> Tensor:
    """``G[r, i, j] = <v_i, v_j>`` over row ``r`` (float64, ``[rows, V, V]``) of ``V`` flat vectors of ``numel``
    entries split into ``rows`` equal consecutive rows; ``vectors(s, e)`` gives their entries ``s:e`` as ``[V, n]``."""
    length = numel // rows
    acc = None
    for s, e in chunks(numel, chunk):
        x = vectors(s, e).to(torch.float64)
        upper = torch.triu_indices(x.shape[0], x.shape[0], device=device)
        products = x[upper[0]] * x[upper[1]]  # [pairs, n]
        if acc is None:
            acc = torch.zeros(rows, products.shape[0], dtype=torch.float64, device=device)
        if rows == 1:
            acc[0] += products.sum(dim=1)
        else:
            acc.index_add_(0, torch.arange(s, e, device=device) // length, products.T)
    return _symmetric(acc, upper)


def dense_row_grams(stacked: Tensor, rows: int) -> Tensor:
    """:func:`row_grams` of the ``V`` tensors stacked in ``stacked`` (``[V, ...]``)."""
    x = stacked.reshape(stacked.shape[0], rows, -1).to(torch.float64)
    return torch.einsum("vrl,wrl->rvw", x, x)


def _symmetric(acc: Tensor, upper: Tensor) -> Tensor:
    size = int(upper.max()) + 1
    grams = torch.zeros(acc.shape[0], size, size, dtype=torch.float64, device=acc.device)
    grams[:, upper[0], upper[1]] = acc
    grams[:, upper[1], upper[0]] = acc
    return grams


def row_of(values: Tensor, s: int, e: int, numel: int) -> Tensor:
    """Per-row ``values`` (``[rows]``) spread over the flat entries ``s:e`` (fp32)."""
    rows = values.numel()
    if rows == 1:
        return values.to(torch.float32).reshape(1).expand(e - s)
    return values.to(torch.float32)[torch.arange(s, e, device=values.device) // (numel // rows)]
