"""Selection kernels: TIES's trim (top-``density`` entries per tensor, exactly, chunk by chunk), the sign election
and the disjoint mean."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import fused as _fused
from ..config import MAJORITY_SIGN_METHODS
from .common import DEFAULT_CHUNK, chunks, delta_into

__all__ = ["DIVISORS", "MAJORITY_SIGN_METHODS", "check_densities", "disjoint_mean", "expert_densities", "elect_sign", "importance_maps", "keep_chunk",
           "magnitude_trim_mask", "shrink_chunk", "trim_floats", "trim_thresholds"]



def magnitude_trim_mask(scores: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``int(density * numel)`` largest entries of ``scores`` (per tensor).

    ``density >= 1`` keeps everything. Ties between equal scores are broken by ``torch.topk``, as in
    PEFT's ``magnitude_based_pruning``, so the same inputs give the same mask.

    Args:
        scores: Non-negative scores (``|delta|`` or an importance map).
        density: Fraction to keep.

    Returns:
        Boolean tensor with the shape of ``scores``.
    """
    if density >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    k = int(density * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(flat, k=k, largest=True).indices] = True
    return mask.reshape(scores.shape)


def elect_sign(stacked: Tensor, method: str = "total") -> Tensor:
    """Per-entry majority sign (+1 or -1; ties go to +1) of stacked tensors ``[K, ...]``.

    Args:
        stacked: The (trimmed, possibly scaled) deltas stacked on dim 0.
        method: ``"total"`` elects the sign of the summed values, ``"frequency"`` the more frequent sign.

    Returns:
        Tensor ``[...]`` of +1/-1 in the dtype of ``stacked``.
    """
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r} is not one of {list(MAJORITY_SIGN_METHODS)}")
    return torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)


#: What the sum of the agreeing entries of a sign election is divided by: their ``"count"`` (TIES, PEFT), the
#: sum of their experts' ``"weights"`` (mergekit's ``normalize: true``), or nothing (``"none"``, mergekit's
#: ``normalize: false``).
DIVISORS = ("count", "weights", "none")


def disjoint_mean(values: Tensor, agree: Tensor, divisor: str = "count", weights: Tensor | None = None) -> Tensor:
    """Mean over dim 0 of the entries where ``agree`` is True (0 where no entry agrees).

    Args:
        values: ``[K, ...]`` values to average.
        agree: ``[K, ...]`` boolean mask of the entries that take part.
        divisor: One of :data:`DIVISORS`. ``"weights"`` divides by the sum of ``weights`` (``[K]``, one per
            expert) over the agreeing entries, 1 where that sum is 0 (mergekit's rule).

    Returns:
        ``[...]`` tensor.
    """
    total = (values * agree).sum(dim=0)
    if divisor == "none":
        return total
    if divisor == "weights":
        if weights is None:
            raise ValueError("disjoint_mean: divisor='weights' needs the experts' weights")
        denom = (agree * weights.reshape(weights.shape + (1,) * (agree.dim() - 1))).sum(dim=0)
        return total / torch.where(denom == 0, torch.ones_like(denom), denom)
    if divisor != "count":
        raise ValueError(f"divisor={divisor!r} is not one of {list(DIVISORS)}")
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def expert_densities(params, num: int) -> list[float]:
    """Each expert's density: ``params["densities"]`` when set (``num`` unused), else ``params["density"]`` for
    ``num`` experts."""
    densities = params.get("densities")
    return [float(params["density"])] * num if densities is None else [float(d) for d in densities]


def check_densities(densities: Sequence[float] | None, num: int, where: str) -> list[float] | None:
    """``densities`` as floats, checked: ``num`` of them, each in (0, 1] (None stays None)."""
    if densities is None:
        return None
    values = list(densities)
    if len(values) != num:
        raise ValueError(f"{where}: got {len(values)} densities for {num} experts (one per expert)")
    for k, d in enumerate(values):
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
            raise ValueError(f"{where}: densities[{k}] must be in (0, 1], got {d!r}")
    return [float(d) for d in values]




# fp32 bit patterns of |x| compare like the values (non-negative floats); NaN (0x7fc...) sorts above Inf.
_INF_HI = 0x7F80
_INF_BITS = 0x7F800000


def _scores(out: Tensor, expert: Tensor | None, base: Tensor, s: int, e: int, bufs: dict) -> Tensor:
    """Trim scores of entries ``s:e``: ``|expert - base|``, or ``base`` itself (an importance map) without expert."""
    if expert is None:
        return out.copy_(base[s:e])
    return delta_into(out, expert[s:e], base[s:e], bufs["base"][: e - s])


def _trim_threshold(expert: Tensor | None, base: Tensor, k: int, chunk: int, bufs: dict
                    ) -> tuple[int, int, bool]:
    """Threshold of the ``k`` largest ``|expert - base|`` entries (flat), computed chunk by chunk.

    With ``expert=None``, ``base`` holds the (non-negative) scores themselves, e.g. an importance map.

    Exact selection by a two-level radix histogram on the fp32 bit patterns of ``|delta|`` (high then low 16
    bits) instead of a full ``topk``; entries equal to the threshold are kept in index order until exactly ``k``
    are kept (:func:`_trim_chunk`). Returns ``(threshold, need, finite)``: entries whose ``|delta|`` bit pattern is
    above ``threshold`` are kept, plus the first ``need`` equal to it; ``finite`` is False if a delta was NaN/Inf.
    """
    numel = base.numel()
    device = base.device
    tmp, bits = bufs["tmp"], bufs["bits"]
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for s, e in chunks(numel, chunk):
        n = e - s
        _scores(tmp[:n], expert, base, s, e, bufs)
        torch.bitwise_right_shift(tmp[:n].abs_().view(torch.int32), 16, out=bits[:n])
        hist += torch.bincount(bits[:n], minlength=1 << 16)
    finite = int(hist[_INF_HI:].sum()) == 0
    # high 16 bits of the k-th largest: the first bin (from the top) where the count from above reaches k
    from_top = hist.flip(0).cumsum(0)
    hi_pos = int(torch.searchsorted(from_top, k))
    hi = (1 << 16) - 1 - hi_pos
    above_hi = int(from_top[hi_pos - 1]) if hi_pos > 0 else 0
    lo_hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for s, e in chunks(numel, chunk):
        n = e - s
        _scores(tmp[:n], expert, base, s, e, bufs)
        # entries of the high bin map to 1..65536, the others to 0 or 65537 (dropped below)
        rel = torch.sub(tmp[:n].abs_().view(torch.int32), (hi << 16) - 1, out=bits[:n]).clamp_(0, (1 << 16) + 1)
        lo_hist += torch.bincount(rel, minlength=(1 << 16) + 2)[1:-1]
    lo_from_top = lo_hist.flip(0).cumsum(0)
    lo_pos = int(torch.searchsorted(lo_from_top, k - above_hi))
    threshold = (hi << 16) | ((1 << 16) - 1 - lo_pos)
    above = above_hi + (int(lo_from_top[lo_pos - 1]) if lo_pos > 0 else 0)
    need = k - above  # entries equal to the threshold still to keep, first ones in index order
    at_threshold = int(lo_hist[threshold & 0xFFFF])
    if need == at_threshold:  # every tied entry is kept: a plain >= threshold
        threshold -= 1
        need = 0
    return threshold, need, finite


# Sampled selection (see _sampled_thresholds): tensors below _SAMPLE_MIN_NUMEL use the radix selection; the band
# is _BAND_SIGMAS standard deviations of the sample rank wide on each side (a miss is never wrong, only slower).
_SAMPLE_MIN_NUMEL = 1 << 20
_SAMPLE_MAX = 1 << 17
_BAND_SIGMAS = 5.0
_INT32_MAX = (1 << 31) - 1


def _bits(value: int) -> float:
    """The fp32 number whose bit pattern is ``value`` (scores compare faster as floats than as integers)."""
    return float(torch.tensor(value, dtype=torch.int32).view(torch.float32))


def _plan_band(sample: Tensor, k: int, numel: int) -> tuple[str, int, int]:
    """How to find the ``k``-th largest of ``numel`` non-negative scores, from the bit patterns of a uniform random
    sample of them: ``("tie", v, v)`` when the sample puts it inside a run of equal values ``v`` (bf16 deltas have
    many), else ``("band", hi, lo)`` with ``lo < hi`` bracketing it with near certainty."""
    m = sample.numel()
    p = k / numel
    rank = p * m  # expected (fractional) rank of the k-th largest in the sample, from the top
    margin = int(_BAND_SIGMAS * math.sqrt(m * p * (1.0 - p))) + 8
    at = min(m - 1, max(0, int(rank)))
    hi_at = int(math.floor(rank)) - margin
    lo_at = int(math.ceil(rank)) + margin

    ordered = torch.sort(sample).values  # one int32 sort costs less than the three kthvalue calls it replaces

    def from_top(i: int) -> int:  # the (i+1)-th largest sample value
        return int(ordered[m - 1 - i])

    hi = from_top(hi_at) if hi_at >= 0 else _INT32_MAX
    lo = from_top(lo_at) if lo_at < m else -1
    value = from_top(at)
    if value in (hi, lo):
        return "tie", value, value
    return "band", hi, lo


def _threshold_from_counts(k: int, above: int, at_least: int) -> tuple[int, int] | None:
    """``(need, all_tied_kept)`` for a threshold value with ``above`` scores strictly above it and ``at_least`` at or
    above it; None when the ``k``-th largest is not that value."""
    if not above < k <= at_least:
        return None
    return k - above, int(k == at_least)


def _sampled_thresholds(scores: Callable[[int, int, int, Tensor], Tensor],
                        sample: Callable[[int, Tensor], Tensor], num: int, numel: int, k: int, chunk: int,
                        device: torch.device, counts: Callable | None = None
                        ) -> tuple[list[tuple[int, int] | None], bool, list[Tensor | None]]:
    """Thresholds of the ``k`` largest scores of each of ``num`` score tensors, in one pass over them.

    A uniform random sample of each tensor's scores locates its ``k``-th largest: either inside a run of equal
    values ``v`` (then one pass counts the scores above and at ``v``), or inside a narrow band ``(lo, hi)`` (then
    one pass counts the scores at or above ``hi`` and gathers the few inside, and the threshold is selected among
    those). This is exact: where the sample misled (chance about 1e-6 per tensor) the entry is None and the caller
    falls back to the radix selection. The sample comes from a generator seeded by ``numel``: deterministic.

    Args:
        scores: ``scores(j, s, e, out)`` writes the non-negative fp32 scores ``s:e`` of tensor ``j`` into ``out``
            (or returns them from elsewhere) and returns them; called for each ``j`` in order, chunk by chunk.
        sample: ``sample(j, index)`` returns the fp32 scores of tensor ``j`` at the flat positions ``index``.
        counts: ``counts(j, band, hi, lo, cap)``: tensor ``j``'s whole counting pass at once, as
            :func:`sens_peft.fused.count_scores` does it (then ``scores`` is not called).

    Returns:
        (per tensor ``(threshold, need)`` as :func:`_trim_threshold` gives them, or None; ``finite``: False if a
        score was NaN/Inf; per tensor with ``need > 0`` the number of scores equal to the threshold in each chunk,
        else None).
    """
    m = min(_SAMPLE_MAX, numel // 16)
    gen = torch.Generator().manual_seed(numel)
    # one position drawn uniformly in each of m equal strata: a uniform sample (of lower variance than a plain
    # one, so the binomial band is conservative), already in increasing order
    stride = numel // m
    index = (torch.arange(m, dtype=torch.int64) * stride).add_(torch.randint(0, stride, (m,), generator=gen))
    index = index.to(device)
    plans = [_plan_band(sample(j, index).abs().view(torch.int32), k, numel) for j in range(num)]
    # gathering stops past ~8x the expected band (+ a chunk): a band this much wider than planned is a miss anyway
    cap = 8 * int(2 * (_BAND_SIGMAS * math.sqrt(m * 0.25) + 8) / m * numel) + chunk
    counted = _Counts(num, device)
    if counts is not None:  # the fused loops: one pass per expert
        counted.fused(plans, counts, cap)
    else:
        counted.torch(plans, scores, numel, chunk, cap)
    finite = int(counted.top) < _INF_BITS
    results: list[tuple[int, int] | None] = []
    ties: list[Tensor | None] = [None] * num
    for j in range(num):
        found, ties[j] = counted.threshold(j, plans[j], k)
        results.append(found)
    return results, finite, ties


class _Counts:
    """What the counting pass of :func:`_sampled_thresholds` gathers per score tensor ``j``: ``upper[j]`` (scores
    ``>= hi`` for a band, ``> v`` for a tie), ``lower[j]`` (``>= v``, tie), the band's entries (``inside[j]``, None
    once past the cap) or the per-chunk tie counts (``tied[j]``), and the largest bit pattern seen (``top``)."""

    def __init__(self, num: int, device: torch.device) -> None:
        self.upper = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(num)]
        self.lower = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(num)]
        self.inside: list[list[Tensor] | None] = [[] for _ in range(num)]
        self.tied: list[list[Tensor]] = [[] for _ in range(num)]
        self.gathered = [0] * num
        self.top = torch.zeros((), dtype=torch.int32, device=device)
        self.device = device

    def fused(self, plans: list, counts: Callable, cap: int) -> None:
        for j, (mode, hi, lo) in enumerate(plans):
            hi_f, lo_f = _bits(hi), _bits(lo) if lo >= 0 else -1.0
            self.upper[j], self.lower[j], per_chunk, picked, top_j = counts(j, mode == "band", hi_f, lo_f, cap)
            self.top = torch.maximum(self.top, torch.tensor(top_j, dtype=torch.int32))
            if mode == "tie":
                self.tied[j] = list(per_chunk)
            elif picked is None:
                self.inside[j] = None
            else:
                self.inside[j] = list(torch.split(picked, per_chunk.tolist()))

    def torch(self, plans: list, scores: Callable, numel: int, chunk: int, cap: int) -> None:
        floats = [(_bits(hi), _bits(lo) if lo >= 0 else -1.0) for _, hi, lo in plans]
        buf = torch.empty(chunk, dtype=torch.float32, device=self.device)
        mask = torch.empty(chunk, dtype=torch.float32, device=self.device)
        over = torch.empty(chunk, dtype=torch.int8, device=self.device)
        within = torch.empty(chunk, dtype=torch.int8, device=self.device)
        for s, e in chunks(numel, chunk):
            n = e - s
            for j in range(len(plans)):
                values = scores(j, s, e, buf[:n])
                self.top = torch.maximum(self.top, values.view(torch.int32).max())
                mode, _, _ = plans[j]
                hi, lo = floats[j]
                # comparisons into fp32 (to count) or int8 (to select) are several times faster than into bool here
                if mode == "tie":
                    above = torch.gt(values, hi, out=mask[:n]).sum()
                    at_least = torch.ge(values, hi, out=mask[:n]).sum()
                    self.upper[j] += above
                    self.lower[j] += at_least
                    self.tied[j].append(at_least - above)
                    continue
                torch.ge(values, hi, out=over[:n])
                self.upper[j] += over[:n].sum(dtype=torch.int32)
                if self.inside[j] is None:
                    continue
                band = torch.gt(values, lo, out=within[:n]).sub_(over[:n]).view(torch.bool)
                picked = values.view(torch.int32)[band]
                self.gathered[j] += picked.numel()
                if self.gathered[j] > cap:
                    self.inside[j] = None
                else:
                    self.inside[j].append(picked)

    def threshold(self, j: int, plan: tuple[str, int, int], k: int) -> tuple[tuple[int, int] | None, Tensor | None]:
        """Tensor ``j``'s ``(threshold, need)`` (None where the sample misled) and its per-chunk tie counts."""
        mode, hi, lo = plan
        if mode == "tie":
            counted = _threshold_from_counts(k, int(self.upper[j]), int(self.lower[j]))
            if counted is None:
                return None, None
            need, all_kept = counted
            if all_kept:
                return (hi - 1, 0), None
            return (hi, need), torch.stack(self.tied[j]).to(torch.int64).cpu()
        inside = self.inside[j]
        if inside is None:
            return None, None
        band = torch.cat(inside).cpu() if inside else torch.empty(0, dtype=torch.int32)
        wanted = k - int(self.upper[j])  # rank of the k-th largest among the band's entries, from the top
        if not 0 < wanted <= band.numel():
            return None, None
        threshold = int(torch.kthvalue(band, band.numel() - wanted + 1).values)
        need = wanted - int((band > threshold).sum())
        if need == int((band == threshold).sum()):
            return (threshold - 1, 0), None
        return (threshold, need), torch.stack([(picked == threshold).sum() for picked in inside]).to(torch.int64).cpu()


def _threshold_float(threshold: int) -> float:
    """The float to compare scores with (``score > it``) for a bit-pattern threshold of :func:`_trim_threshold`."""
    if threshold < 0:  # "keep every score >= 0"
        return -1.0
    if threshold >= _INF_BITS:  # keep nothing (NaN bit patterns would compare false either way)
        return math.inf
    return _bits(threshold)


def _tie_end(scores: Callable[[int, int], Tensor], numel: int, chunk: int, threshold: int, need: int,
             tie_counts: Tensor | None) -> int:
    """The flat position just after the ``need``-th score (in index order) equal to the fp32 bit pattern
    ``threshold``: 0 when ``need`` is 0. ``scores(s, e)`` gives the scores of entries ``s:e``; ``tie_counts``
    (the number of ties in each ``chunk``, from the counting pass) saves scanning for the chunk that holds it."""
    if need <= 0:
        return 0
    value = _bits(threshold)
    if tie_counts is None:  # count chunk by chunk until the need-th tie
        before = 0
        for s, e in chunks(numel, chunk):
            here = int(torch.eq(scores(s, e), value).sum())
            if before + here >= need:
                break
            before += here
    else:
        cumulative = tie_counts.cumsum(0)
        c = int(torch.searchsorted(cumulative, need))  # first chunk where the running count reaches need
        before = int(cumulative[c - 1]) if c > 0 else 0
        s, e = c * chunk, min(numel, (c + 1) * chunk)
    positions = torch.nonzero(torch.eq(scores(s, e), value)).reshape(-1)
    return s + int(positions[need - before - 1]) + 1


def keep_chunk(scores: Tensor, trim: tuple[float, float, int], s: int, out: Tensor) -> Tensor:
    """fp32 0/1 keep-mask of the non-negative fp32 ``scores`` of entries ``s : s + len(scores)`` for a trim
    ``(above, at_least, tie_end)`` (see :func:`_trim_floats`): scores above the threshold, and before position
    ``tie_end`` the scores equal to it too."""
    above, at_least, tie_end = trim
    m = min(max(tie_end - s, 0), scores.numel())
    if m:
        torch.gt(scores[:m], at_least, out=out[:m])
    if m < scores.numel():
        torch.gt(scores[m:], above, out=out[m:])
    return out


def shrink_chunk(values: Tensor, trim: tuple[float, float, int], s: int) -> Tensor:
    """Zero, in place, the entries of ``values`` (entries ``s : s + len(values)``) that a trim by ``|values|``
    drops (see :func:`_keep_chunk`); ``hardshrink`` does the comparison and the product in one pass, and keeps
    NaN."""
    above, at_least, tie_end = trim
    m = min(max(tie_end - s, 0), values.numel())
    for part, bound in ((values[:m], at_least), (values[m:], above)):
        if part.numel() and bound >= 0:  # a negative bound keeps everything
            torch.hardshrink(part, bound, out=part)
    return values


def trim_floats(threshold: int, tie_end: int) -> tuple[float, float, int]:
    """``(above, at_least, tie_end)`` floats for a trim of :func:`trim_thresholds`: an entry is kept when its score
    is ``> above``, or ``> at_least`` (i.e. ``>= above``) before position ``tie_end``."""
    return _threshold_float(threshold), _threshold_float(threshold - 1), tie_end


def importance_maps(importance: Sequence[Tensor] | None, num: int, shape: torch.Size, name: str,
                     device: torch.device) -> list[Tensor]:
    """Flat fp32 importance maps on ``device``, checked: ``num`` of them, of ``shape``'s size, non-negative."""
    if importance is None or len(importance) != num:
        raise ValueError(f"merge_streamed{f' for tensor {name!r}' if name else ''}: trim_by='sensitivity' "
                         f"needs {num} importance maps, got {0 if importance is None else len(importance)}")
    numel = math.prod(shape)
    imps = []
    for k, item in enumerate(importance):
        if item.numel() != numel:
            raise ValueError(f"merge_streamed: importance map {k} of {name!r} has shape {tuple(item.shape)}, "
                             f"expected {tuple(shape)}")
        imp = item.reshape(-1).to(device=device, dtype=torch.float32)
        if bool((imp < 0).any()):
            raise ValueError(f"merge_streamed for tensor {name!r}: importance maps must be non-negative")
        imps.append(imp)
    return imps


def _sampled_trim(flat_base: Tensor, flats: list[Tensor], imps: list[Tensor] | None, k_keep: int, chunk: int,
                  base_f: Tensor, fused: bool | None) -> tuple[list[tuple[int, int] | None], bool, list[Tensor | None]]:
    """:func:`_sampled_thresholds` of the experts' trim scores: their importance maps, else ``|expert - base|``
    (counted by the fused loops when they can take the inputs)."""
    num, numel, device = len(flats), flat_base.numel(), flat_base.device
    if imps is not None:
        counts = None
        if fused is not False and _fused.supports(imps[0], imps, imps[0]) and _fused.available():
            def counts(j: int, band: bool, hi: float, lo: float, cap: int) -> tuple:
                return _fused.count_scores(None, imps[j], chunk=chunk, hi=hi, lo=lo, band=band, cap=cap)

        found, _, ties = _sampled_thresholds(lambda j, s, e, buf: imps[j][s:e],
                                             lambda j, idx: imps[j].index_select(0, idx),
                                             num, numel, k_keep, chunk, device, counts)
        return found, True, ties  # the deltas' finiteness is then checked in the merge pass

    def delta_scores(j: int, s: int, e: int, buf: Tensor) -> Tensor:
        if j == 0:
            base_f[: e - s].copy_(flat_base[s:e])
        return delta_into(buf, flats[j][s:e], None, base_f[: e - s]).abs_()

    sampled_base: list[Tensor] = []

    def delta_sample(j: int, idx: Tensor) -> Tensor:
        if not sampled_base:
            sampled_base.append(flat_base.index_select(0, idx).float())
        return flats[j].index_select(0, idx).float().sub_(sampled_base[0])

    counts = None
    if fused is not False and _fused.supports(flat_base, flats, flat_base) and _fused.available():
        def counts(j: int, band: bool, hi: float, lo: float, cap: int) -> tuple:
            return _fused.count_scores(flat_base, flats[j], chunk=chunk, hi=hi, lo=lo, band=band, cap=cap)

    return _sampled_thresholds(delta_scores, delta_sample, num, numel, k_keep, chunk, device, counts)


def trim_thresholds(base: Tensor, experts: Sequence[Tensor], density: float, *,
                    importance: Sequence[Tensor] | None = None, name: str = "",
                    chunk: int = DEFAULT_CHUNK, fused: bool | None = None) -> tuple[list[tuple[int, int]], bool]:
    """The TIES trim of each expert as ``merge_streamed(method="ties")`` computes it, ahead of the merge.

    Each expert keeps exactly ``int(density * numel)`` entries: those whose score (``|expert - base|``, or the
    expert's ``importance`` map when given) is above a threshold, plus the first ones (in index order) equal to
    it. Selecting the threshold is a pass over every expert (~40 % of a fused TIES merge's CPU time here);
    computing it ahead (e.g. on another thread) and passing it as ``merge_streamed(..., thresholds=...)`` gives
    the same result.

    Returns:
        ``([(threshold, tie_end)] per expert, finite)``: the threshold as the fp32 bit pattern of the score, the
        flat position before which the entries equal to it are kept (after it they are dropped), and False if a
        delta was NaN/Inf (or could not be looked at).

    On the CPU, the counting pass over the deltas runs in the fused loops of :mod:`sens_peft.fused` when they are
    available (``fused=None``; ``False``: the torch ops); the result is the same.
    """
    num = len(experts)
    numel = base.numel()
    device = base.device
    chunk = max(1, min(int(chunk), numel))
    k_keep = int(density * numel)
    if k_keep == 0:
        # keeps nothing; nothing of the deltas is looked at, so finiteness is left to the caller's check
        return [(_INT32_MAX, 0)] * num, False
    flat_base = base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    imps = None
    if importance is not None:
        imps = importance_maps(importance, num, base.shape, name, device)
    f32 = dict(dtype=torch.float32, device=device)
    base_f, tmp = torch.empty(chunk, **f32), torch.empty(chunk, **f32)
    found: list[tuple[int, int] | None] = [None] * num
    ties: list[Tensor | None] = [None] * num
    finite = True
    if numel >= _SAMPLE_MIN_NUMEL:
        found, finite, ties = _sampled_trim(flat_base, flats, imps, k_keep, chunk, base_f, fused)
    bits = torch.empty(chunk, dtype=torch.int32, device=device)
    for k in range(num):
        if found[k] is None:  # small tensor, or the sample's band missed: exact radix selection
            if imps is not None:  # the deltas' finiteness is then checked in the merge pass
                threshold, need, _ = _trim_threshold(None, imps[k], k_keep, chunk, {"tmp": tmp, "bits": bits})
            else:
                threshold, need, ok = _trim_threshold(flats[k], flat_base, k_keep, chunk,
                                                      {"tmp": tmp, "bits": bits, "base": base_f})
                finite = finite and ok
            found[k] = (threshold, need)

    def scores_of(k: int) -> Callable[[int, int], Tensor]:
        if imps is not None:
            return lambda s, e: imps[k][s:e]
        return lambda s, e: delta_into(tmp[: e - s], flats[k][s:e], flat_base[s:e], base_f[: e - s]).abs_()

    trims = [(threshold, _tie_end(scores_of(k), numel, chunk, threshold, need, ties[k]))
             for k, (threshold, need) in enumerate(found)]  # type: ignore[misc]
    return trims, finite

