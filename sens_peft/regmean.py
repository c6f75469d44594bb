"""Data-aware merge math on tensors: RegMean (Jin et al., ICLR 2023) and Fisher merging (Matena & Raffel, 2022).

Pure functions, no I/O and no module state: the merge methods read the statistics from the sidecars
(:meth:`sens_peft.store.SensitivityRecord.statistic`) and call these per tensor.

Conventions. Weights are torch ``Linear`` weights ``W [out, in]`` (``y = x @ W.T``). A Gram matrix is
``G = sum_tokens x x^T [in, in]`` of the module's inputs over the expert's calibration data; a diagonal Gram is
its diagonal ``[in]``. RegMean minimises ``sum_k ||X_k W^T - X_k W_k^T||^2``, whose solution is

    ``W = (sum_k W_k G_k) (sum_k G_k)^-1``        (the paper writes ``(sum G_k)^-1 sum G_k W_k`` for ``y = x W``).

The solve runs in float64 (``dtype=`` to change) with a Cholesky factorisation. When ``sum_k G~_k`` is not
positive definite (an input feature no expert's data excites, or rank deficiency from few tokens), a ridge
``lam * I`` is added, ``lam = ridge * mean(diag(sum G~))`` with ``ridge`` growing from ``1e-8`` by 100x until the
factorisation succeeds, and the ridge pulls toward the plain average, not toward 0:

    ``W = (sum_k W_k G~_k + lam * mean_k W_k) (sum_k G~_k + lam I)^-1``

so a direction no data sees keeps the average weight. Because ``sum_k W0 G~_k (sum G~_k)^-1 = W0`` (and likewise
with the ridge, since ``mean_k (W0 + D_k) = W0 + mean_k D_k``), merging task vectors ``D_k = W_k - W0`` and adding
``W0`` gives exactly the merge of the full weights: ``regmean(W0 + D_k) = W0 + regmean(D_k)``.

With sidecars (format 2), per Linear weight ``name`` of expert ``k``::

    G_k = record_k.statistic("gram", name)       # [in, in], or [in] when stored diagonal; None if not captured
    F_k = record_k.statistic("fisher", name)     # E[g^2], the weight's shape
    n_k = record_k.statistic_count("gram", name)  # tokens behind G_k

RegMean uses the token *sums* as stored (an expert with more calibration tokens weighs more, as in the paper);
divide by ``n_k`` first to weigh the experts equally. ``Conv1D`` weights (GPT-2) are ``[in, out]``: transpose
them before and after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "shrink_gram",
    "regmean_merge",
    "regmean_merge_diag",
    "regmean_lora_factors",
    "fisher_merge",
    "nystrom_factor",
    "lowrank_gram",
]

# First relative ridge tried when the summed Gram is not positive definite; multiplied by 100 per retry.
RIDGE_START = 1e-8
RIDGE_STEPS = 8


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: the paper's shrinkage of the off-diagonal entries.

    ``alpha = 1`` is plain RegMean; ``alpha = 0`` keeps only the diagonal (a per-input-column weighted average).
    A 1-D (diagonal) Gram is returned unchanged: shrinkage does not touch the diagonal.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"shrink_gram: alpha must be in [0, 1], got {alpha!r}")
    if gram.dim() == 1:
        return gram
    _check_square(gram, "gram")
    if float(alpha) == 1.0:
        return gram
    return float(alpha) * gram + (1.0 - float(alpha)) * torch.diag_embed(torch.diagonal(gram))


def _check_square(gram: Tensor, what: str) -> None:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{what} must be a square [in, in] matrix or an [in] diagonal, got {list(gram.shape)}")


def _check_inputs(weights: Sequence[Tensor], grams: Sequence[Tensor]) -> int:
    if not weights:
        raise ValueError("regmean: no experts given")
    if len(weights) != len(grams):
        raise ValueError(f"regmean: {len(weights)} weights but {len(grams)} Gram matrices")
    fan_in = weights[0].shape[-1]
    for k, (w, g) in enumerate(zip(weights, grams)):
        if w.dim() != 2 or w.shape != weights[0].shape:
            raise ValueError(f"regmean: weight {k} has shape {list(w.shape)}, expected {list(weights[0].shape)}")
        if g.shape[0] != fan_in or (g.dim() == 2 and g.shape != (fan_in, fan_in)) or g.dim() not in (1, 2):
            raise ValueError(
                f"regmean: Gram {k} has shape {list(g.shape)}, expected [{fan_in}, {fan_in}] or [{fan_in}] for "
                f"weights [out, {fan_in}] (torch Linear layout)"
            )
    return fan_in


def _as_matrix(gram: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """A fresh ``dtype`` copy of :func:`shrink_gram` ``(gram, alpha)`` (a diagonal Gram as a diagonal matrix).

    Shrunk in place on the copy: one ``[in, in]`` pass instead of four temporaries (at ``in`` = 5632 in float64
    those took ~15 % of a RegMean solve). Bit for bit the same values: an off-diagonal entry is ``alpha * G_ij``
    either way, a diagonal one ``alpha * G_ii + (1 - alpha) * G_ii`` with the same two roundings.
    """
    if gram.dim() == 1:
        return torch.diag_embed(gram.to(dtype))
    _check_square(gram, "gram")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrink_gram: alpha must be in [0, 1], got {alpha!r}")
    g = gram.to(dtype, copy=True)
    if alpha != 1.0:
        diag = g.diagonal()
        rest = diag * (1.0 - alpha)
        g.mul_(alpha)
        diag.add_(rest)
    return g


def _cholesky_with_ridge(total: Tensor) -> tuple[Tensor, float]:
    """Cholesky factor of ``total + lam I`` with the smallest ``lam`` of the ridge ladder that works (0 first)."""
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        return factor, 0.0
    scale = float(torch.diagonal(total).abs().mean()) or 1.0
    eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    ridge = RIDGE_START
    for _ in range(RIDGE_STEPS):
        lam = ridge * scale
        factor, info = torch.linalg.cholesky_ex(total + lam * eye)
        if int(info) == 0:
            return factor, lam
        ridge *= 100.0
    raise ValueError(f"regmean: the summed Gram matrix is not positive definite even with a ridge of {lam:.3g}")


def regmean_merge(
    weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    alpha: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """RegMean merge of torch Linear weights (or their task vectors): ``(sum W_k G~_k)(sum G~_k)^-1``.

    Args:
        weights: ``K`` tensors ``[out, in]``: full weights, or task vectors ``W_k - W0`` (see the module
            docstring: the base cancels).
        grams: ``K`` input Grams ``[in, in]`` (or diagonals ``[in]``, treated as diagonal matrices).
        alpha: Off-diagonal shrinkage of :func:`shrink_gram` (1 = no shrinkage).
        dtype: Dtype of the solve (float64 by default; float32 is enough for well-conditioned Grams).

    Returns:
        The merged ``[out, in]`` tensor in ``weights[0].dtype``.
    """
    _check_inputs(weights, grams)
    if all(g.dim() == 1 for g in grams):
        return regmean_merge_diag(weights, grams)
    # one shrunk Gram at a time: peak memory is two [in, in] matrices whatever the number of experts
    total, rhs = None, None
    for w, gram in zip(weights, grams):
        g = _as_matrix(gram, alpha, dtype)  # a fresh copy: the first one can become the running sum
        term = w.to(dtype) @ g  # [out, in]
        total = g if total is None else total.add_(g)
        rhs = term if rhs is None else rhs.add_(term)
    factor, lam = _cholesky_with_ridge(total)
    if lam:
        rhs = rhs + lam * torch.stack([w.to(dtype) for w in weights]).mean(0)
    # W S = rhs  <=>  S W^T = rhs^T  (S symmetric)
    merged = torch.cholesky_solve(rhs.T, factor).T
    return merged.to(weights[0].dtype)


def regmean_merge_diag(weights: Sequence[Tensor], diags: Sequence[Tensor]) -> Tensor:
    """RegMean with diagonal Grams: per input column ``j``, ``W[:, j] = sum_k d_k[j] W_k[:, j] / sum_k d_k[j]``.

    Columns no expert's data excites (``sum_k d_k[j] = 0``) get the plain average. Math in float64.
    """
    _check_inputs(weights, diags)
    d = torch.stack([(g if g.dim() == 1 else torch.diagonal(g)).to(torch.float64) for g in diags])  # [K, in]
    if (d < 0).any():
        raise ValueError("regmean_merge_diag: a Gram diagonal has negative entries")
    w = torch.stack([x.to(torch.float64) for x in weights])  # [K, out, in]
    total = d.sum(0)
    weighted = (w * d[:, None, :]).sum(0) / torch.where(total > 0, total, 1.0)
    merged = torch.where(total > 0, weighted, w.mean(0))
    return merged.to(weights[0].dtype)


def regmean_lora_factors(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scalings: Sequence[float],
    grams: Sequence[Tensor],
    alpha: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Exact low-rank RegMean of LoRA experts: factors ``(A [R, in], B [out, R])`` with ``R = sum_k r_k``.

    ``dW_k = s_k B_k A_k``, so ``sum_k dW_k G~_k S^-1 = [B_1 .. B_K] @ stack_k(s_k A_k G~_k S^-1)`` with
    ``S = sum_k G~_k``: ``B @ A`` (scaling 1) equals :func:`regmean_merge` of the dense deltas, ridge included
    (its average term ``lam * mean_k dW_k`` is folded in as ``s_k A_k (G~_k + lam/K I) S'^-1``).

    Args:
        As: ``lora_A`` weights ``[r_k, in]``.
        Bs: ``lora_B`` weights ``[out, r_k]``.
        scalings: ``s_k`` (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        grams: Input Grams ``[in, in]`` (or diagonals ``[in]``).
        alpha: Off-diagonal shrinkage.
        dtype: Dtype of the solve.

    Returns:
        ``(A, B)`` in ``As[0].dtype``; the merged delta is ``B @ A`` (use LoRA scaling 1, or divide ``A`` by the
        output adapter's scaling).
    """
    if not (len(As) == len(Bs) == len(scalings) == len(grams)) or not As:
        raise ValueError(
            f"regmean_lora_factors: got {len(As)} A, {len(Bs)} B, {len(scalings)} scalings, {len(grams)} Grams"
        )
    fan_in = As[0].shape[1]
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != fan_in:
            raise ValueError(
                f"regmean_lora_factors: expert {k} has A {list(a.shape)} and B {list(b.shape)}; expected "
                f"A [r, {fan_in}] and B [out, r]"
            )
    _check_inputs([torch.empty(1, fan_in, device=a.device) for a in As], grams)  # the Grams against fan_in
    total, scaled, lefts = None, [], []
    for a, s, gram in zip(As, scalings, grams):
        g = _as_matrix(gram, alpha, dtype)  # a fresh copy: the first one can become the running sum
        scaled.append(float(s) * a.to(dtype))  # s_k A_k [r_k, in]
        lefts.append(scaled[-1] @ g)  # s_k A_k G~_k [r_k, in]
        total = g if total is None else total.add_(g)
    factor, lam = _cholesky_with_ridge(total)
    parts = []
    for scaled_a, left in zip(scaled, lefts):
        if lam:  # the ridge's pull toward the average delta, shared equally by the K experts
            left = left + (lam / len(As)) * scaled_a
        parts.append(torch.cholesky_solve(left.T, factor).T)
    merged_a = torch.cat(parts, 0).to(As[0].dtype)
    merged_b = torch.cat([b for b in Bs], 1)
    return merged_a, merged_b


def fisher_merge(
    deltas: Sequence[Tensor],
    fishers: Sequence[Tensor],
    coefficients: Optional[Sequence[float]] = None,
) -> Tensor:
    """Fisher-weighted average ``sum_k c_k F_k D_k / sum_k c_k F_k`` per element (Matena & Raffel).

    Works on full weights or task vectors alike (the base cancels as in RegMean). With equal Fisher maps it is
    the coefficient-weighted average ``sum_k c_k D_k / sum_k c_k`` (task arithmetic with ``lambda_k = c_k /
    sum c``); elements where every ``c_k F_k`` is 0 get that average too. Math in float64.

    Args:
        deltas: ``K`` tensors of one shape.
        fishers: ``K`` non-negative diagonal Fisher maps ``E[g^2]`` of the same shape.
        coefficients: Per-expert ``c_k >= 0`` (default 1 each; their sum must be positive).

    Returns:
        The merged tensor in ``deltas[0].dtype``.
    """
    if not deltas or len(deltas) != len(fishers):
        raise ValueError(f"fisher_merge: {len(deltas)} deltas and {len(fishers)} Fisher maps")
    coeffs = [1.0] * len(deltas) if coefficients is None else [float(c) for c in coefficients]
    if len(coeffs) != len(deltas) or any(c < 0 for c in coeffs) or sum(coeffs) <= 0:
        raise ValueError(f"fisher_merge: coefficients must be {len(deltas)} values >= 0 with a positive sum")
    for k, (d, f) in enumerate(zip(deltas, fishers)):
        if d.shape != deltas[0].shape or f.shape != d.shape:
            raise ValueError(
                f"fisher_merge: expert {k} has delta {list(d.shape)} and Fisher {list(f.shape)}, expected both "
                f"{list(deltas[0].shape)}"
            )
    c = torch.tensor(coeffs, dtype=torch.float64, device=deltas[0].device)
    shape = (-1,) + (1,) * deltas[0].dim()
    d = torch.stack([x.to(torch.float64) for x in deltas])
    f = torch.stack([x.to(torch.float64) for x in fishers])
    if (f < 0).any():
        raise ValueError("fisher_merge: a Fisher map has negative entries")
    weights = c.view(shape) * f
    total = weights.sum(0)
    average = (c.view(shape) * d).sum(0) / c.sum()
    merged = torch.where(total > 0, (weights * d).sum(0) / torch.where(total > 0, total, 1.0), average)
    return merged.to(deltas[0].dtype)


def nystrom_factor(sketch: Tensor, omega: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``F [in, k]`` with ``F F^T ~= G`` from the streamed sketch ``Y = G @ omega`` (Nystrom approximation).

    The numerically stable form of Tropp, Yurtsever, Udell & Cevher (2017, "Fixed-rank approximation of a
    positive-semidefinite matrix from streaming data", Alg. 3): shift ``Y`` by ``nu * omega`` with
    ``nu = sqrt(in) * eps * ||Y||_F`` (``eps`` of the sketch's dtype: fp32 when captured), factor ``omega^T Y_nu`` by Cholesky,
    take the SVD of ``Y_nu C^-1`` and remove the shift from the squared singular values. ``F F^T`` never
    exceeds ``G`` (``G - F F^T`` is PSD up to rounding) and equals it when ``rank(G) <= k``.

    Args:
        sketch: ``Y = G @ omega``, ``[in, k]``.
        omega: The test matrix ``[in, k]`` (Gaussian).
        dtype: Dtype of the factorisation.
    """
    if sketch.shape != omega.shape or sketch.dim() != 2:
        raise ValueError(f"nystrom_factor: sketch {list(sketch.shape)} and omega {list(omega.shape)} must be one "
                         "[in, k] shape")
    y, om = sketch.to(dtype), omega.to(dtype)
    # the shift guards against the rounding of the sketch itself (fp32 when captured): its dtype's epsilon
    eps = torch.finfo(sketch.dtype if sketch.is_floating_point() else torch.float32).eps
    nu = math.sqrt(y.shape[0]) * eps * float(torch.linalg.matrix_norm(y))
    nu = nu or torch.finfo(torch.float32).tiny
    for _ in range(RIDGE_STEPS):
        y_nu = y + nu * om
        core = om.T @ y_nu
        factor, info = torch.linalg.cholesky_ex((core + core.T) * 0.5)
        if int(info) == 0:
            break
        nu *= 10.0
    else:
        raise ValueError("nystrom_factor: the sketch is not positive semi-definite (is it G @ omega of a Gram?)")
    e = torch.linalg.solve_triangular(factor, y_nu.T, upper=False).T  # Y_nu L^-T, [in, k]
    u, sigma, _ = torch.linalg.svd(e, full_matrices=False)
    lam = (sigma * sigma - nu).clamp_min(0.0)
    return u * lam.sqrt()


def lowrank_gram(factor: Tensor, diag: Tensor) -> Tensor:
    """Dense ``[in, in]`` Gram from a low-rank factor and the exact diagonal: ``F F^T + diag(d - rowsum(F^2))``.

    The off-diagonal part is the rank-``k`` Nystrom approximation; the diagonal is exact (the residual
    ``d - rowsum(F^2)`` is clamped at 0 against rounding), so shrinkage ``alpha = 0`` gives the diagonal variant.
    """
    if factor.dim() != 2 or diag.dim() != 1 or factor.shape[0] != diag.shape[0]:
        raise ValueError(f"lowrank_gram: factor {list(factor.shape)} must be [in, k] for a diagonal of "
                         f"{list(diag.shape)}")
    residual = (diag - (factor * factor).sum(1)).clamp_min(0.0)
    return factor @ factor.T + torch.diag_embed(residual)
