"""The streamed engine: :func:`merge_streamed` computes ``base + merge(experts - base)`` chunk by chunk, without
forming the deltas, for methods with a chunked hook (:meth:`MergeMethod.stream`).

This module holds the dispatcher (validate, build a :class:`StreamJob`, call the method's hook) and the kernels
the built-in methods' hooks are made of: :func:`linear_kernel` (task arithmetic), :func:`dare_linear_kernel`, and
:func:`elect_kernel` (drop or trim, sign election, disjoint mean; TIES and DARE-TIES), whose drop step is one of
the ``*Drop`` objects below. On the CPU the election kernel runs the fused C loops of :mod:`sens_peft.fused` when
they can take the inputs; both paths give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from .. import fused as _fused
from . import rng
from .bits import draw_dare_masks, unpack_bits
from .common import DEFAULT_CHUNK, chunks, delta_into
from .dense import TRIM_BY
from .registry import get_method
from .rng import DARE_RNGS, counter_keep, counter_keys, keep_threshold, resolve_seed
from .selection import (
    MAJORITY_SIGN_METHODS,
    check_densities,
    expert_densities,
    importance_maps,
    keep_chunk,
    shrink_chunk,
    trim_floats,
    trim_thresholds,
)

__all__ = ["StreamJob", "dare_drop", "dare_linear_kernel", "elect_kernel", "linear_kernel", "merge_streamed",
           "ties_trim"]


@dataclass
class StreamJob:
    """One streamed merge of one tensor (flat views), as a method's chunked hook gets it.

    Attributes:
        name: Tensor name. base, experts, out: flat tensors (``out`` contiguous, on the base's device).
        coeffs: Per-expert coefficients (incl. the global scale). shape: The tensor's shape.
        first, stop: The flat span merged (``first`` a multiple of 8). chunk: Entries per chunk.
        params: Every parameter the method sees. statistics: Per-expert statistics by kind (unchecked).
        prepared: Work done ahead (``thresholds``, ``dare_masks``). fused: Use the fused loops (None: when able).
    """

    name: str
    base: Tensor
    experts: list[Tensor]
    coeffs: list[float]
    out: Tensor
    shape: torch.Size
    first: int
    stop: int
    chunk: int
    params: Mapping[str, Any]
    statistics: Mapping[str, Optional[Sequence[Tensor]]] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)
    fused: Optional[bool] = None

    @property
    def num(self) -> int:
        return len(self.experts)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def buffers(self, count: int) -> list[Tensor]:
        return [torch.empty(self.chunk, dtype=torch.float32, device=self.device) for _ in range(count)]


def _checked_out(out: Optional[Tensor], numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(numel, dtype=dtype, device=device)
    if out.numel() != numel or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"merge_streamed: out is {out.dtype} {tuple(out.shape)} on {out.device}, expected "
                         f"{dtype} with {numel} contiguous entries on {device}")
    return out.reshape(-1)


def _job(method: str, base: Tensor, experts: Sequence[Tensor], coefficients, params: dict, name: str,
         statistics: dict, prepared: dict, out: Optional[Tensor], out_dtype, span, chunk: int,
         fused: Optional[bool]) -> StreamJob:
    """The validated :class:`StreamJob` of a :func:`merge_streamed` call."""
    for key, allowed in (("majority_sign_method", MAJORITY_SIGN_METHODS), ("dare_rng", DARE_RNGS),
                         ("trim_by", TRIM_BY)):
        if params[key] not in allowed:
            raise ValueError(f"merge_streamed: {key}={params[key]!r} is not one of {list(allowed)}")
    if not (0.0 < float(params["density"]) <= 1.0):
        raise ValueError(f"merge_streamed: density must be in (0, 1], got {params['density']!r}")
    params["densities"] = check_densities(params.get("densities"), len(experts), "merge_streamed")
    coeffs = [float(c) for c in torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1).tolist()]
    if len(coeffs) != len(experts) or not experts:
        raise ValueError(f"merge_streamed: got {len(coeffs)} coefficients for {len(experts)} experts")
    numel = base.numel()
    for k, e in enumerate(experts):
        if e.numel() != numel:
            raise ValueError(f"merge_streamed: expert {k} of {name!r} has shape {tuple(e.shape)}, "
                             f"expected {tuple(base.shape)}")
    out = _checked_out(out, numel, out_dtype or base.dtype, base.device)
    first, stop = (0, numel) if span is None else (int(span[0]), int(span[1]))
    if not (0 <= first <= stop <= numel and first % 8 == 0):
        raise ValueError(f"merge_streamed: span={span!r} must be (start, stop) with 0 <= start <= stop <= "
                         f"{numel} and start a multiple of 8")
    return StreamJob(name, base.reshape(-1), [e.reshape(-1) for e in experts], coeffs, out, base.shape, first, stop,
                     max(1, min(int(chunk), numel)), params, statistics, prepared, fused)


def merge_streamed(method: str, base: Tensor, experts: Sequence[Tensor], coefficients: Tensor | Sequence[float],
                   *, density: float = 1.0, majority_sign_method: str = "total", seed: int | None = 0,
                   name: str = "", weighted_election: bool = True, out_dtype: torch.dtype | None = None,
                   importance: Sequence[Tensor] | None = None, trim_by: str = "magnitude",
                   chunk: int = DEFAULT_CHUNK, out: Tensor | None = None,
                   dare_masks: Sequence[Tensor] | None = None,
                   thresholds: tuple[list[tuple[int, int]], bool] | None = None,
                   dare_rng: str = "counter", span: tuple[int, int] | None = None,
                   fused: bool | None = None, statistics: Mapping[str, Sequence[Tensor]] | None = None,
                   densities: Sequence[float] | None = None, **params: Any) -> tuple[Tensor, bool]:
    """``base + merge_deltas(method, [e - base for e in experts], coefficients, ...)`` without the deltas.

    The same math as :func:`~sens_peft.methods.merge_deltas` (fp32, coefficients already including the global
    scale) for methods with a chunked hook, computed chunk by chunk over the flattened tensor into a few reused
    fp32 buffers: memory is the inputs, the output and a few chunks (plus ``K`` bit-packed masks for DARE with
    ``dare_rng="torch"`` or ``dare_masks``). Results agree with ``merge_deltas`` to fp32 rounding (bit for bit for
    TIES / DARE-TIES); DARE masks are the ones ``merge_deltas`` draws. TIES keeps exactly ``int(density * numel)``
    entries per expert; where entries tie at the threshold the first ones in index order are kept.

    Args:
        method: A registered method with a chunked hook.
        base: Base tensor (any float dtype). experts: ``K`` tensors of its shape, on its device.
        coefficients: ``[K]`` per-expert scalars (including the global scale).
        density, majority_sign_method, seed, name, weighted_election, importance, trim_by, dare_rng: As for
            ``merge_deltas`` (``importance`` is used only by ``ties`` with ``trim_by="sensitivity"``).
        out_dtype: dtype of the result (default: the base's). chunk: Entries processed at a time.
        out: Optional preallocated result (``out_dtype``, the base's number of entries, contiguous, same device).
        dare_masks: DARE masks drawn ahead with :func:`~sens_peft.methods.dare_masks` (same inputs).
        thresholds: The TIES trim computed ahead with :func:`~sens_peft.methods.trim_thresholds` (same inputs).
        span: ``(start, stop)``: merge only the flat entries ``start:stop`` into ``out`` (``start`` a multiple
            of 8); merging the spans of a partition (e.g. on two threads) gives the same tensor as one call.
        fused: ``None``: the fused C loops when they can take the inputs; ``False``: torch ops; ``True``: the fused
            loops or an error. Both give the same bits.
        statistics: Other per-expert statistics by kind. densities: Per-expert ``density`` (as for
            ``merge_deltas``; the fused loops take one density, so these run the torch ops).
        **params: The method's own parameters.

    Returns:
        ``(merged, finite)``: the merged tensor with the base's shape, and False when a non-finite value was seen
        in a delta or the result, or could not be ruled out (TIES keeping nothing); the caller then checks the
        inputs. A False can also come from a finite sum overflowing.
    """
    impl = get_method(method)
    values = dict(density=float(density), majority_sign_method=majority_sign_method, trim_by=trim_by,
                  weighted_election=weighted_election, seed=seed, dare_rng=dare_rng, densities=densities)
    values.update({p.name: p.default for p in impl.parameters})
    values.update(impl.check_params(params))
    if not impl.chunked(values):
        raise ValueError(f"merge_streamed: method {method!r} has no chunked hook with these settings (merge it with "
                         "merge_deltas)")
    prepared = {key: value for key, value in (("dare_masks", dare_masks), ("thresholds", thresholds)) if value is not None}
    job = _job(method, base, experts, coefficients, values, name, {**(statistics or {}), "element_maps": importance},
               prepared, out, out_dtype, span, chunk, fused)
    finite = impl.stream(job)
    return job.out.reshape(job.shape), finite


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


def linear_kernel(job: StreamJob) -> bool:
    """Task arithmetic: base + sum_k c_k (e_k - base) == (1 - sum_k c_k) base + sum_k c_k e_k. No delta is formed,
    one pass per input (a bf16->fp32 copy and a multiply-add), the same fp32 math up to rounding."""
    acc, tmp = job.buffers(2)
    check = torch.zeros((), dtype=torch.float32, device=job.device)
    base_weight = 1.0 - math.fsum(job.coeffs)
    for s, e in chunks(job.stop, job.chunk, job.first):
        n = e - s
        ac, tm = acc[:n], tmp[:n]
        ac.copy_(job.base[s:e]).mul_(base_weight)
        for k in range(job.num):
            ac.add_(tm.copy_(job.experts[k][s:e]), alpha=job.coeffs[k])
        check += ac.sum()
        job.out[s:e].copy_(ac)
    return bool(torch.isfinite(check))


def dare_linear_kernel(job: StreamJob, drop: Any) -> bool:
    """DARE then task arithmetic: per chunk, each delta dropped and rescaled by ``drop``, then summed."""
    base_f, acc, tmp, keep = job.buffers(4)
    check = torch.zeros((), dtype=torch.float32, device=job.device)
    for s, e in chunks(job.stop, job.chunk, job.first):
        n = e - s
        bf, ac, tm, kp = base_f[:n], acc[:n], tmp[:n], keep[:n]
        bf.copy_(job.base[s:e])
        ac.zero_()
        for k in range(job.num):
            delta_into(tm, job.experts[k][s:e], None, bf)
            drop.apply(k, s, e, tm, kp, check)
            ac.add_(tm, alpha=job.coeffs[k])
        bf.add_(ac)
        check += bf.sum()
        job.out[s:e].copy_(bf)
    return drop.finite and bool(torch.isfinite(check))


class NoDrop:
    """Keep every entry."""

    finite = True

    def apply(self, k: int, s: int, e: int, d: Tensor, kp: Tensor, check: Tensor) -> None:
        pass

    def fused_args(self) -> Optional[dict]:
        return dict(drop="none")


class DareDrop:
    """DARE's drop and ``1/density`` rescale, with counter masks hashed per chunk or packed masks unpacked."""

    finite = True

    def __init__(self, job: StreamJob) -> None:
        p = job.params
        self.density, self.name, self.job = float(p["density"]), job.name, job
        self.densities = expert_densities(p, job.num)
        self.uniform = p.get("densities") is None
        self.counter = p["dare_rng"] == "counter" and "dare_masks" not in job.prepared
        self.lanes = torch.empty(2 * (job.chunk // 8 + 1), dtype=torch.int64, device=job.device)
        if self.counter:
            self.key = resolve_seed(p["seed"])
            self.scratch = (torch.empty(job.chunk, dtype=torch.int32, device=job.device),
                            torch.empty(job.chunk, dtype=torch.int32, device=job.device))
            return
        masks = job.prepared.get("dare_masks")
        numel = job.base.numel()
        if masks is not None:
            if len(masks) != job.num or any(m.numel() != (numel + 7) // 8 or m.device != job.device for m in masks):
                raise ValueError(f"merge_streamed: dare_masks must be {job.num} packed masks of {numel} entries on "
                                 f"{job.device}")
            self.masks = list(masks)
        else:
            self.masks = draw_dare_masks(numel, job.num, self.densities, p["dare_rng"], p["seed"], job.name,
                                         job.device, job.chunk)

    def keep(self, k: int, s: int, e: int, into: Tensor) -> Tensor:
        """Expert ``k``'s DARE keep-mask of entries ``s:e`` as fp32 0/1 in ``into``."""
        if self.counter:
            return counter_keep(into, s, self.densities[k], self.key, self.name, k, self.scratch)
        return unpack_bits(self.masks[k][s // 8: (e + 7) // 8], e - s, into, self.lanes)

    def apply(self, k: int, s: int, e: int, d: Tensor, kp: Tensor, check: Tensor) -> None:
        check += d.sum()  # dropped entries must not hide a NaN/Inf
        if self.densities[k] < 1.0:  # an expert at density 1 keeps everything
            d.mul_(self.keep(k, s, e, kp)).div_(self.densities[k])

    def fused_args(self) -> Optional[dict]:
        if not self.uniform:
            return None  # the fused loops take one density
        if not self.counter:
            return dict(drop="packed", density=self.density, masks=self.masks)
        job = self.job
        blocks = range(job.first // rng.COUNTER_BLOCK, max(job.first, job.stop - 1) // rng.COUNTER_BLOCK + 1)
        keys = torch.tensor([[counter_keys(self.key, self.name, k, b) for b in blocks] for k in range(job.num)],
                            dtype=torch.int32).reshape(job.num, len(blocks), 2)
        return dict(drop="counter", density=self.density, keys=keys, first_block=blocks[0],
                    block_size=rng.COUNTER_BLOCK, keep_threshold=keep_threshold(self.density))


class TrimDrop:
    """TIES's trim: each expert keeps the entries its thresholds select, by ``|delta|`` or by an importance map."""

    def __init__(self, job: StreamJob, imps: list[Tensor]) -> None:
        thresholds = job.prepared.get("thresholds")
        if thresholds is None:
            thresholds = _trims(job, imps)
        found, self.finite = thresholds
        if len(found) != job.num:
            raise ValueError(f"merge_streamed: thresholds for {len(found)} experts, expected {job.num}")
        self.trims = [trim_floats(threshold, tie_end) for threshold, tie_end in found]
        self.imps = imps

    def apply(self, k: int, s: int, e: int, d: Tensor, kp: Tensor, check: Tensor) -> None:
        if self.imps:
            check += d.sum()  # trimmed entries must not hide a NaN/Inf
            d.mul_(keep_chunk(self.imps[k][s:e], self.trims[k], s, kp))
        else:
            shrink_chunk(d, self.trims[k], s)

    def fused_args(self) -> Optional[dict]:
        if self.imps:
            if not _fused.supports(self.imps[0], self.imps, self.imps[0]):
                return None
            return dict(drop="importance", trims=self.trims, importance=self.imps)
        return dict(drop="trim", trims=self.trims)


def _trims(job: StreamJob, imps: list[Tensor]) -> tuple[list[tuple[int, int]], bool]:
    """:func:`trim_thresholds` of every expert, at each one's density (one call per run of equal densities)."""
    densities = expert_densities(job.params, job.num)
    found: list[tuple[int, int]] = []
    finite = True
    k = 0
    while k < job.num:
        end = k + 1
        while end < job.num and densities[end] == densities[k]:
            end += 1
        trims, ok = trim_thresholds(job.base.reshape(job.shape), [e.reshape(job.shape) for e in job.experts[k:end]],
                                    densities[k], importance=imps[k:end] or None, chunk=job.chunk, fused=job.fused)
        found.extend(trims)
        finite = finite and ok
        k = end
    return found, finite


def dare_drop(job: StreamJob) -> Any:
    """The drop step of a DARE method (none at density 1). Chunks start on byte borders of the packed masks."""
    if min(expert_densities(job.params, job.num)) >= 1.0:
        return NoDrop()
    job.chunk = max(8, job.chunk - job.chunk % 8)
    return DareDrop(job)


def ties_trim(job: StreamJob) -> Any:
    """The drop step of TIES: the magnitude or importance trim (none at density 1)."""
    p = job.params
    if min(expert_densities(p, job.num)) >= 1.0:
        return NoDrop()
    imps = []
    if p["trim_by"] == "sensitivity":
        imps = importance_maps(job.statistics.get("element_maps"), job.num, job.shape, job.name, job.device)
    return TrimDrop(job, imps)


def elect_kernel(job: StreamJob, drop: Any) -> bool:
    """Drop/trim, sign election and disjoint mean (TIES, DARE-TIES), fused on the CPU when possible."""
    p = job.params
    # the sign each expert's vote has relative to its delta, and the weight of its vote
    vote_sign = [(c > 0) - (c < 0) if p["weighted_election"] else 1 for c in job.coeffs]
    vote_weight = job.coeffs if p["weighted_election"] else [1.0] * job.num
    # the fused loops divide by the count of agreeing entries only
    fusable = job.fused is not False and p.get("divisor", "count") == "count" \
        and _fused.supports(job.base, job.experts, job.out)
    args = drop.fused_args() if fusable else None
    if args is not None and _fused.available():
        bad = _fused.ties_merge(job.first, job.stop, job.base, job.experts, job.out, coefficients=job.coeffs,
                                vote_weight=vote_weight, vote_sign=vote_sign,
                                count_votes=p["majority_sign_method"] != "total", **args)
        return drop.finite and bad == 0
    if job.fused is True:
        raise RuntimeError(f"merge_streamed: fused=True, but the fused loops cannot take this merge (device "
                           f"{job.device}, dtypes {sorted({str(t.dtype) for t in (job.base, job.out, *job.experts)})}"
                           f"; available: {_fused.available()})")
    finite = _elect_torch(job, drop, vote_sign, vote_weight)
    return drop.finite and finite


def _elect_torch(job: StreamJob, drop: Any, vote_sign: list[int], vote_weight: list[float]) -> bool:
    """The election kernel in torch ops. Per chunk: the K kept deltas, the elected sign, then the disjoint mean
    over the entries that agree with it. The deltas are kept unscaled and each coefficient enters through the
    ``value`` of an ``addcmul``, which rounds like the separate product and sum of merge_deltas (``add`` with
    ``alpha`` fuses a multiply-add and would not); sign(c * d) = sign(c) * sign(d) gives the scaled votes' signs.
    Masks are fp32 0/1: on the CPU, comparisons into and products with bool tensors are several times slower."""
    num, coeffs, by_total = job.num, job.coeffs, job.params["majority_sign_method"] == "total"
    divisor = job.params.get("divisor", "count")
    # what each agreeing entry adds to the divisor: 1 (a count) or its expert's coefficient
    weigh = coeffs if divisor == "weights" else [1.0] * num
    base_f, acc, keep, count, sign, agree = job.buffers(6)
    kept = job.buffers(num)
    ones = torch.ones(job.chunk, dtype=torch.float32, device=job.device)
    check = torch.zeros((), dtype=torch.float32, device=job.device)
    for s, e in chunks(job.stop, job.chunk, job.first):
        n = e - s
        bf, mass, cnt, ag, sg, kp, one = base_f[:n], acc[:n], count[:n], agree[:n], sign[:n], keep[:n], ones[:n]
        bf.copy_(job.base[s:e])
        for k in range(num):
            d = kept[k][:n]
            delta_into(d, job.experts[k][s:e], None, bf)
            drop.apply(k, s, e, d, kp, check)
            if by_total:
                if k == 0:
                    torch.mul(d, vote_weight[0], out=mass)
                else:
                    mass.addcmul_(d, one, value=vote_weight[k])
            else:
                vote = torch.sign(d, out=ag)
                if k == 0:
                    torch.mul(vote, vote_sign[0], out=mass)
                else:
                    mass.add_(vote, alpha=vote_sign[k])  # +-1 or 0 times a sign: exact
        # elected sign: +1 where mass >= 0 (ties go to +1), else -1
        torch.ge(mass, 0, out=sg).mul_(2.0).sub_(1.0)
        total = mass  # reuse: the mass is no longer needed
        none_yet = True
        for k in range(num):
            if vote_sign[k] == 0:
                continue  # a zero coefficient: its votes are zeros, which never agree
            # sign(vote) == elected  <=>  vote * elected > 0 (zeros, i.e. trimmed/dropped entries, never agree)
            torch.mul(kept[k][:n], sg, out=ag)
            (torch.gt if vote_sign[k] > 0 else torch.lt)(ag, 0, out=ag)
            if none_yet:
                torch.mul(kept[k][:n], ag, out=total).mul_(coeffs[k])  # (d * a) * c == (d * c) * a for a in {0, 1}
                cnt.copy_(ag).mul_(weigh[k])
                none_yet = False
            else:
                total.addcmul_(kept[k][:n], ag, value=coeffs[k])
                cnt.add_(ag, alpha=weigh[k])
        if none_yet:  # every coefficient is zero: nothing agrees
            total.zero_()
            cnt.zero_()
        if divisor == "none":
            bf.add_(total)
        elif divisor == "weights":  # a zero sum of weights divides by 1 (mergekit's rule)
            bf.addcdiv_(total, cnt.masked_fill_(cnt == 0, 1.0))
        else:
            bf.addcdiv_(total, cnt.clamp_(min=1))  # base + total / count, rounded as the two steps would be
        check += bf.sum()
        job.out[s:e].copy_(bf)
    return bool(torch.isfinite(check))
