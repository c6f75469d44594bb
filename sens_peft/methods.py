"""Merge methods: pure tensor math on task vectors (deltas), one small class per method behind a registry.

Every method combines ``K`` deltas of one tensor with per-expert scalar coefficients ``c_k`` (the
Sens-Merging coefficients of that tensor's group, already multiplied by the user weights) and returns
``scale * combined``. The math runs in fp32 (fp64 inputs stay fp64) and the result has the dtype of
``deltas[0]``.

Methods (``c`` = coefficients, ``lambda`` = scale):

* ``task_arithmetic``: ``lambda * sum_k c_k delta_k``.
* ``ties``: trim each delta to its top-``density`` entries (by ``|delta|``, or by ``importance`` with
  ``trim_by="sensitivity"``), scale by ``c_k``, elect a sign per entry (summed mass ``"total"`` or count
  ``"frequency"``), then the mean of the entries that agree with it (the disjoint mean).
* ``dare_linear``: keep each entry with probability ``density`` and rescale by ``1/density``, then TA.
* ``dare_ties``: the same drop and rescale, then sign election and the disjoint mean, without a magnitude
  trim (as ``peft.utils.merge_utils.dare_ties``).
* ``importance``: ``lambda * sum_k c_k I_k delta_k / mean_k I_k`` per element (Fisher-merging style, scaled
  so that equal importance is task arithmetic; see :class:`ImportanceMerge`).

Where the coefficients enter TIES: by default the sign is elected on the *scaled* trimmed deltas
(``c_k * trim(delta_k)``), so that a down-weighted expert also counts less in the election (paper notes
§5.2). PEFT elects on the unscaled trimmed deltas and only weights the disjoint mean; pass
``weighted_election=False`` to get exactly that. The two agree whenever all coefficients are equal and
positive.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from . import fused as _fused

logger = logging.getLogger(__name__)

__all__ = [
    "MergeMethod",
    "available_methods",
    "DARE_RNGS",
    "counter_keep",
    "dare_keep_mask",
    "dare_mask",
    "dare_masks",
    "get_method",
    "merge_deltas",
    "merge_streamed",
    "register_method",
    "stable_seed",
    "trim_thresholds",
]

MAJORITY_SIGN_METHODS = ("total", "frequency")
TRIM_BY = ("magnitude", "sensitivity")

_REGISTRY: dict[str, type[MergeMethod]] = {}


# --------------------------------------------------------------------------------------------------------
# Building blocks (pure functions)
# --------------------------------------------------------------------------------------------------------


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, name)`` that is identical across processes and runs.

    Python's ``hash()`` is salted per process, so a digest is used instead.

    Args:
        seed: The user seed.
        name: The tensor name (any string).

    Returns:
        A non-negative integer below ``2**63``, usable with ``torch.Generator.manual_seed``.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int | None, name: str, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None  # draw from torch's global RNG (not reproducible per tensor)
    generator = torch.Generator(device=device)
    generator.manual_seed(stable_seed(seed, name))
    return generator


def dare_mask(shape: torch.Size | Sequence[int], density: float, generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> Tensor:
    """A Bernoulli keep-mask (1 = keep) with keep probability ``density``, as fp32.

    The probabilities are always fp32, whatever the deltas' dtype: ``torch.bernoulli`` draws different
    streams for fp32 and fp64 probability tensors, and fixing the dtype keeps the mask a function of
    ``(seed, name, shape, device)`` only. For fp32 deltas this is the same draw as PEFT's
    ``random_pruning`` (``torch.bernoulli(torch.full_like(t, density))``) from the same generator state.

    Args:
        shape: Shape of the tensor to mask.
        density: Keep probability in (0, 1].
        generator: Generator to draw from (``None``: the global RNG).
        device: Device of the mask.

    Returns:
        fp32 tensor of zeros and ones.
    """
    probs = torch.full(tuple(shape), float(density), dtype=torch.float32, device=device)
    return torch.bernoulli(probs, generator=generator)


#: How DARE draws its keep-masks. ``"counter"`` (default): a hash of ``(seed, tensor name, expert, position)``;
#: the same masks for any chunking and, by construction, on every device (not yet run on a GPU); any slice of a
#: tensor's mask can be drawn alone (a streamed merge draws only the chunk it is merging); 2-3x cheaper on the CPU
#: than a Mersenne-Twister draw.
#: ``"torch"``: ``torch.bernoulli`` from a ``torch.Generator`` seeded per tensor: the masks of PEFT's
#: ``dare_linear``/``dare_ties`` at the same generator state, but device-dependent (CPU and CUDA streams differ).
DARE_RNGS = ("counter", "torch")

# The counter hash: positions are split into blocks of 2**24 with their own keys, so the int32 counter never
# wraps, whatever the tensor's size. (counter + key1) times a Weyl constant, then the two xorshift-multiply
# rounds of "lowbias32" (C. Wellons' hash) with a second key mixed in between them, so that different keys do
# not give shifted copies of one sequence. Only a comparison of the result's high bits with a threshold is
# used, so lowbias32's last xorshift (which changes the low half only) is left out. All in int32 torch ops,
# whose multiplications wrap the same way on every device.
_COUNTER_BLOCK = 1 << 24
_WEYL = 0x9E3779B9 - (1 << 32)  # as a signed int32
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # as a signed int32
_ARANGE: dict[torch.device, Tensor] = {}


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _counter_keys(seed: int, name: str, expert: int, block: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{expert}\x00{block}".encode(), digest_size=8).digest()
    return _signed32(int.from_bytes(digest[:4], "little")), _signed32(int.from_bytes(digest[4:], "little"))


def _keep_threshold(density: float) -> int:
    """Keep an entry when the int32 reading of its hash is below this (i.e. the hash with its top bit flipped,
    read unsigned, below ``density * 2**32``): probability ``density`` up to 2**-32."""
    return min(int(round(float(density) * 2.0 ** 32)), (1 << 32) - 1) - (1 << 31)


def _arange32(n: int, device: torch.device) -> Tensor:
    cached = _ARANGE.get(device)
    if cached is None or cached.numel() < n:
        cached = torch.arange(max(n, 1 << 16), dtype=torch.int32, device=device)
        _ARANGE[device] = cached
    return cached[:n]


def counter_keep(out: Tensor, start: int, density: float, seed: int, name: str, expert: int,
                 scratch: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The ``"counter"`` DARE keep-mask of entries ``start : start + out.numel()`` of expert ``expert``'s delta of
    tensor ``name`` (flat, row-major), as 0/1 into ``out`` (any dtype; fp32 multiplies fastest).

    Entry ``i`` is kept when a 32-bit hash of ``(seed, name, expert, i)`` falls below ``density * 2**32``: a
    Bernoulli(``density``) draw per entry, independent across entries, experts and tensors for any practical
    purpose, and a pure function of those four values: any slice of a mask can be drawn on its own, on any
    device, with the same result.

    Args:
        out: Contiguous 1-D tensor receiving the mask.
        start: Flat position of ``out[0]`` in the tensor.
        density: Keep probability in (0, 1).
        seed, name, expert: What the mask is a function of (``seed`` any integer).
        scratch: Optional two int32 buffers of at least ``out.numel()`` entries on ``out``'s device.

    Returns:
        ``out``.
    """
    n = out.numel()
    device = out.device
    if scratch is None:
        scratch = (torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int32, device=device))
    threshold = _keep_threshold(density)
    pos, end = int(start), int(start) + n
    while pos < end:
        block, offset = divmod(pos, _COUNTER_BLOCK)
        m = min(end - pos, _COUNTER_BLOCK - offset)
        key1, key2 = _counter_keys(seed, name, expert, block)
        x, t = scratch[0][:m], scratch[1][:m]
        # a Weyl step first: consecutive counters differ in many bits before the rounds (without it, neighbours'
        # keeps correlated measurably, ~3e-4)
        torch.add(_arange32(m, device), _signed32(offset + key1), out=x).mul_(_WEYL)
        for shift, mul, key in ((16, _MUL1, key2), (15, _MUL2, None)):
            # x ^= x >>> shift (int32 shifts are arithmetic: mask the sign copies off), then x *= mul
            torch.bitwise_right_shift(x, shift, out=t)
            x.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1)).mul_(mul)
            if key is not None:
                x.bitwise_xor_(key)
        torch.lt(x, threshold, out=out[pos - start: pos - start + m])
        pos += m
    return out


def dare_keep_mask(shape: torch.Size | Sequence[int], density: float, seed: int, name: str, expert: int,
                   device: torch.device | str = "cpu", chunk: int = 1 << 20) -> Tensor:
    """The whole ``"counter"`` DARE keep-mask (fp32 0/1) of expert ``expert``'s delta of tensor ``name``; see
    :func:`counter_keep`. Drawn ``chunk`` entries at a time (the scratch memory stays small)."""
    device = torch.device(device)
    numel = math.prod(shape)
    mask = torch.empty(numel, dtype=torch.float32, device=device)
    size = max(1, min(int(chunk), numel))
    scratch = (torch.empty(size, dtype=torch.int32, device=device), torch.empty(size, dtype=torch.int32, device=device))
    for s, e in _chunks(numel, size):
        counter_keep(mask[s:e], s, density, seed, name, expert, scratch)
    return mask.reshape(tuple(shape))


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


def disjoint_mean(values: Tensor, agree: Tensor) -> Tensor:
    """Mean over dim 0 of the entries where ``agree`` is True (0 where no entry agrees).

    Args:
        values: ``[K, ...]`` values to average.
        agree: ``[K, ...]`` boolean mask of the entries that take part.

    Returns:
        ``[...]`` tensor.
    """
    total = (values * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def _weights_view(coefficients: Tensor, ndim: int) -> Tensor:
    return coefficients.reshape(coefficients.shape + (1,) * ndim)


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


class MergeMethod:
    """One merge method. Subclasses set ``name`` and implement :meth:`combine`.

    ``combine`` receives the deltas already stacked into one fp32/fp64 tensor ``[K, ...]`` and the
    coefficients ``[K]`` in the same dtype and device, and returns the combined ``[...]`` tensor *before*
    the global scale (which :func:`merge_deltas` applies). A method with ``random = True`` gets
    ``draw_keep(k)``, expert ``k``'s DARE keep-mask (0/1, the shape of one delta; call it for k = 0, 1, ... in
    order), else None.
    """

    name: ClassVar[str] = ""
    uses_density: ClassVar[bool] = False
    uses_sign: ClassVar[bool] = False
    random: ClassVar[bool] = False

    def combine(self, stacked: Tensor, coefficients: Tensor, *, density: float, majority_sign_method: str,
                draw_keep: Callable[[int], Tensor] | None, importance: Tensor | None, trim_by: str,
                weighted_election: bool) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_method(cls_or_name: type[MergeMethod] | str):
    """Register a :class:`MergeMethod` subclass under its ``name`` (or under an explicit name).

    Use as ``@register_method`` or ``@register_method("my_name")``. Re-registering a name replaces it.

    Args:
        cls_or_name: The class to register, or the name to register the decorated class under.

    Returns:
        The class (decorator form), or a decorator.
    """

    def _register(cls: type[MergeMethod], name: str | None = None) -> type[MergeMethod]:
        if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
            raise TypeError(f"register_method expects a MergeMethod subclass, got {cls!r}")
        key = name or cls.name
        if not key:
            raise ValueError(f"{cls.__name__} has no name; set the class attribute `name`")
        if name is not None:
            cls.name = name
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            logger.info("merge method %r re-registered (%s replaces %s)", key, cls.__name__,
                        _REGISTRY[key].__name__)
        _REGISTRY[key] = cls
        return cls

    if isinstance(cls_or_name, str):
        return lambda cls: _register(cls, cls_or_name)
    return _register(cls_or_name)


def get_method(name: str) -> MergeMethod:
    """An instance of the registered method ``name``.

    Raises:
        ValueError: if no method has that name.
    """
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; available: {available_methods()}") from None


def available_methods() -> list[str]:
    """Names of the registered merge methods."""
    return list(_REGISTRY)


# --------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------


@register_method
class TaskArithmetic(MergeMethod):
    """``sum_k c_k delta_k``."""

    name = "task_arithmetic"

    def combine(self, stacked, coefficients, **_):
        return (stacked * _weights_view(coefficients, stacked.dim() - 1)).sum(dim=0)


def _ties_combine(kept: Tensor, coefficients: Tensor, majority_sign_method: str,
                  weighted_election: bool) -> Tensor:
    weighted = kept * _weights_view(coefficients, kept.dim() - 1)
    voters = weighted if weighted_election else kept
    sign = elect_sign(voters, majority_sign_method)
    # An entry takes part when its (nonzero) sign matches the elected one; trimmed/dropped zeros never do.
    agree = voters.sign() == sign
    return disjoint_mean(weighted, agree)


@register_method
class Ties(MergeMethod):
    """TIES: per-tensor top-``density`` trim, coefficient scaling, sign election, disjoint mean."""

    name = "ties"
    uses_density = True
    uses_sign = True

    def combine(self, stacked, coefficients, *, density, majority_sign_method, importance, trim_by,
                weighted_election, **_):
        if density < 1.0:
            scores = stacked.abs() if trim_by == "magnitude" else importance
            keep = torch.stack([magnitude_trim_mask(scores[k], density) for k in range(stacked.shape[0])])
            stacked = stacked * keep
        return _ties_combine(stacked, coefficients, majority_sign_method, weighted_election)


def _dare(stacked: Tensor, density: float, draw_keep: Callable[[int], Tensor] | None) -> Tensor:
    if density >= 1.0 or draw_keep is None:
        return stacked  # nothing dropped; no draw, like PEFT's prune()
    # expert after expert: with the "torch" generator this is the stream PEFT consumes when the global RNG is
    # seeded, so the masks coincide with PEFT's for fp32 inputs
    return torch.stack([stacked[k] * draw_keep(k).to(stacked.dtype) / density for k in range(stacked.shape[0])])


def _resolve_seed(seed: int | None) -> int:
    """``seed``, or for None one drawn from torch's global RNG (so ``torch.manual_seed`` still governs it)."""
    return int(seed) if seed is not None else int(torch.randint(0, 1 << 62, (1,)).item())


def _keep_drawer(dare_rng: str, seed: int | None, name: str, shape: torch.Size, density: float,
                 device: torch.device) -> Callable[[int], Tensor]:
    """``draw(k)``: expert ``k``'s whole DARE keep-mask (fp32 0/1, ``shape``); call it for k = 0, 1, ... in order."""
    if dare_rng == "torch":
        generator = _generator(seed, name, device)
        return lambda k: dare_mask(shape, density, generator, device)
    key = _resolve_seed(seed)
    return lambda k: dare_keep_mask(shape, density, key, name, k, device)


@register_method
class DareLinear(MergeMethod):
    """DARE: Bernoulli keep with probability ``density``, rescale by ``1/density``, then task arithmetic."""

    name = "dare_linear"
    uses_density = True
    random = True

    def combine(self, stacked, coefficients, *, density, draw_keep, **_):
        return TaskArithmetic().combine(_dare(stacked, density, draw_keep), coefficients)


@register_method
class DareTies(MergeMethod):
    """DARE drop and rescale, then TIES sign election and disjoint mean (no magnitude trim, as PEFT)."""

    name = "dare_ties"
    uses_density = True
    uses_sign = True
    random = True

    def combine(self, stacked, coefficients, *, density, majority_sign_method, draw_keep, weighted_election,
                **_):
        return _ties_combine(_dare(stacked, density, draw_keep), coefficients, majority_sign_method,
                             weighted_election)


@register_method
class ImportanceMerge(MergeMethod):
    """Importance-weighted merge: ``sum_k c_k I_k delta_k / mean_k I_k`` per element.

    Fisher merging on task vectors, rescaled by ``K`` so that it is continuous with task arithmetic: equal
    importance (or no importance maps at all) gives exactly ``sum_k c_k delta_k``, so ``scale`` means the same
    as for TA and one lambda grid serves both. An expert that matters more for an entry takes a larger share
    of it. Entries where every expert's importance is 0 use that equal-importance limit.
    """

    name = "importance"

    def combine(self, stacked, coefficients, *, importance, **_):
        weighted = stacked * _weights_view(coefficients, stacked.dim() - 1)
        if importance is None:
            return weighted.sum(dim=0)
        mean = importance.mean(dim=0)
        merged = (importance * weighted).sum(dim=0) / torch.where(mean > 0, mean, torch.ones_like(mean))
        return torch.where(mean > 0, merged, weighted.sum(dim=0))


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_deltas(method: str, deltas: Sequence[Tensor], coefficients: Tensor | Sequence[float], *,
                 density: float = 1.0, majority_sign_method: str = "total", scale: float = 1.0,
                 seed: int | None = 0, name: str = "", importance: Sequence[Tensor] | None = None,
                 trim_by: str = "magnitude", weighted_election: bool = True, dare_rng: str = "counter") -> Tensor:
    """Merge the task vectors of one tensor.

    Args:
        method: A registered method name (see :func:`available_methods`).
        deltas: ``K >= 1`` task vectors of the same shape (any float dtype; all on one device).
        coefficients: ``[K]`` per-expert scalars for this tensor (Sens-Merging ``c_k`` times user weights).
        density: Fraction kept by TIES trimming / DARE's keep probability, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES / DARE-TIES sign election).
        scale: Global coefficient ``lambda`` applied to the combined delta.
        seed: DARE seed: each tensor's masks are a function of ``(seed, name)`` (and the expert's index), so they
            are reproducible and independent of merge order. ``None`` takes them from torch's global RNG
            instead (PEFT's behaviour).
        name: Tensor name (seeds DARE; used in error messages).
        importance: Optional ``K`` non-negative element maps with the deltas' shape: the weights of the
            ``importance`` method, and the trim scores of ``ties`` with ``trim_by="sensitivity"``.
        trim_by: ``"magnitude"`` (``|delta|``) or ``"sensitivity"`` (``importance``) for TIES trimming.
        weighted_election: Elect TIES signs on the coefficient-scaled deltas (default) or, as PEFT does,
            on the unscaled ones.
        dare_rng: How DARE draws its masks (:data:`DARE_RNGS`): ``"counter"`` (default; the same masks on every
            device, see :func:`counter_keep`) or ``"torch"`` (``torch.bernoulli`` from a generator seeded with
            :func:`stable_seed` of ``(seed, name)`` on the deltas' device: PEFT's masks at that generator state).

    Returns:
        The merged delta, ``scale * combined``, with the shape and dtype of ``deltas[0]``, on its device.

    Raises:
        ValueError: on an unknown method, no deltas, mismatched shapes/devices, a wrong number of
            coefficients or importance maps, or an out-of-range option.
    """
    impl = get_method(method)
    where = f" for tensor {name!r}" if name else ""
    deltas = list(deltas)
    if not deltas:
        raise ValueError(f"merge_deltas{where}: need at least one delta, got none")
    first = deltas[0]
    for k, delta in enumerate(deltas):
        if not isinstance(delta, Tensor):
            raise TypeError(f"merge_deltas{where}: delta {k} is {type(delta).__name__}, expected a Tensor")
        if delta.shape != first.shape:
            raise ValueError(f"merge_deltas{where}: delta {k} has shape {tuple(delta.shape)}, "
                             f"expected {tuple(first.shape)} (the shape of delta 0)")
        if delta.device != first.device:
            raise ValueError(f"merge_deltas{where}: delta {k} is on {delta.device}, delta 0 on {first.device}")
        if not delta.is_floating_point():
            raise ValueError(f"merge_deltas{where}: delta {k} has dtype {delta.dtype}, expected a float dtype")
    num = len(deltas)
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"merge_deltas{where}: density must be in (0, 1], got {density!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"merge_deltas{where}: majority_sign_method={majority_sign_method!r} is not one of "
                         f"{list(MAJORITY_SIGN_METHODS)}")
    if trim_by not in TRIM_BY:
        raise ValueError(f"merge_deltas{where}: trim_by={trim_by!r} is not one of {list(TRIM_BY)}")
    if dare_rng not in DARE_RNGS:
        raise ValueError(f"merge_deltas{where}: dare_rng={dare_rng!r} is not one of {list(DARE_RNGS)}")

    dtype = _compute_dtype(first.dtype)
    device = first.device
    coeffs = torch.as_tensor(coefficients).to(device=device, dtype=dtype).reshape(-1)
    if coeffs.numel() != num:
        raise ValueError(f"merge_deltas{where}: got {coeffs.numel()} coefficients for {num} deltas "
                         "(expected one scalar per expert)")
    if not torch.isfinite(coeffs).all():
        raise ValueError(f"merge_deltas{where}: coefficients must be finite, got {coeffs.tolist()}")

    imp = None
    if importance is not None:
        importance = list(importance)
        if len(importance) != num:
            raise ValueError(f"merge_deltas{where}: got {len(importance)} importance maps for {num} deltas")
        for k, item in enumerate(importance):
            if tuple(item.shape) != tuple(first.shape):
                raise ValueError(f"merge_deltas{where}: importance map {k} has shape {tuple(item.shape)}, "
                                 f"expected {tuple(first.shape)}")
        imp = torch.stack([item.to(device=device, dtype=dtype) for item in importance])
        if (imp < 0).any():
            raise ValueError(f"merge_deltas{where}: importance maps must be non-negative")
    if method == "ties" and trim_by == "sensitivity" and density < 1.0 and imp is None:
        raise ValueError(f"merge_deltas{where}: trim_by='sensitivity' needs importance maps "
                         "(element maps stored with the experts' sensitivity)")

    stacked = torch.stack([delta.to(dtype) for delta in deltas])
    draw_keep = _keep_drawer(dare_rng, seed, name, first.shape, density, device) \
        if impl.random and density < 1.0 else None
    combined = impl.combine(stacked, coeffs, density=float(density), majority_sign_method=majority_sign_method,
                            draw_keep=draw_keep, importance=imp, trim_by=trim_by,
                            weighted_election=weighted_election)
    if scale != 1.0:
        combined = combined * scale
    return combined.to(first.dtype)


# --------------------------------------------------------------------------------------------------------
# Streamed variant for full-model merges
# --------------------------------------------------------------------------------------------------------

#: Methods :func:`merge_streamed` implements (``ties`` trimmed by magnitude or by importance maps).
STREAMED_METHODS = ("task_arithmetic", "dare_linear", "ties", "dare_ties")
DARE_METHODS = ("dare_linear", "dare_ties")

# Flat chunk processed at a time: a few fp32 buffers of this size stay in cache and bound the scratch memory,
# whatever the tensor's size (a 65M-entry embedding is not materialised as K fp32 copies).
DEFAULT_CHUNK = 1 << 18

# fp32 bit patterns of |x| compare like the values (non-negative floats); NaN (0x7fc...) sorts above Inf.
_INF_HI = 0x7F80
_INF_BITS = 0x7F800000


# Bit packing of 0/1 masks, 8 entries per byte (entry i of a group -> bit i): multiplying 8 bytes of 0/1 (one
# int64) by _PACK gathers them into its top byte without carries.
_PACK = 0x0102040810204080


def pack_bits(mask: Tensor) -> Tensor:
    """uint8 ``[ceil(n / 8)]`` holding the flat 0/1 ``mask`` (any integer or bool dtype) 8 entries per byte."""
    flat = mask.reshape(-1).to(torch.int8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    return torch.bitwise_right_shift(words * _PACK, 56).bitwise_and_(0xFF).to(torch.uint8)


_UNPACK: dict[torch.device, Tensor] = {}


def _unpack_table(device: torch.device) -> Tensor:
    """int64 ``[256]``: entry ``b`` has byte ``i`` equal to bit ``i`` of ``b`` (a byte of 8 mask entries)."""
    if device not in _UNPACK:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [256, 8]
        _UNPACK[device] = bits.to(torch.uint8).contiguous().view(torch.int64).reshape(256).to(device)
    return _UNPACK[device]


def unpack_bits(packed: Tensor, numel: int, out: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Entries ``0:numel`` of a :func:`pack_bits` mask as 0/1 into ``out`` (any dtype; fp32 masks multiply fastest).

    A table lookup per byte (an int64 multiply per byte is not vectorised on x86). ``scratch`` is an optional
    int64 buffer of at least ``2 * len(packed)`` entries.
    """
    words = packed.numel()
    if scratch is None:
        scratch = torch.empty(2 * words, dtype=torch.int64, device=packed.device)
    index, lanes = scratch[:words], scratch[words: 2 * words]
    torch.index_select(_unpack_table(packed.device), 0, index.copy_(packed), out=lanes)
    return out.copy_(lanes.view(torch.uint8)[:numel])


def _dare_masks(numel: int, num: int, density: float, dare_rng: str, seed: int | None, name: str,
                device: torch.device, chunk: int, experts: Sequence[int] | None = None) -> list[Tensor]:
    """The ``num`` DARE keep-masks that :func:`merge_deltas` draws with ``dare_rng``, bit-packed
    (:func:`pack_bits`). Packed, the K masks of a vocabulary-sized tensor take 25 MB instead of 200 MB.

    ``"torch"`` on the CPU: ``bernoulli`` with probability ``p`` draws one ``uniform_real_distribution<float>``
    value per entry, in order, and keeps it when it is below ``p``; ``uniform_`` draws the very same values
    (about 2.5x faster), so ``rand < density`` is the same mask, and drawing it in chunks continues the same
    stream. Other devices keep the reference draw. ``experts`` (``"counter"`` only): the masks of these experts
    alone, in this order.
    """
    use_torch = dare_rng == "torch"
    if experts is None:
        experts = range(num)
    elif use_torch:
        raise ValueError("dare_masks: experts= needs dare_rng='counter' (the 'torch' masks are one stream)")
    generator = _generator(seed, name, device) if use_torch else None  # None with seed=None: the global RNG
    if use_torch and device.type != "cpu":
        return [pack_bits(dare_mask((numel,), density, generator, device)) for _ in range(num)]
    chunk = max(8, min(chunk, numel) - min(chunk, numel) % 8)  # chunk borders on byte borders of the packed mask
    keep = torch.empty(chunk, dtype=torch.int8, device=device)
    if use_torch:
        draws = torch.empty(chunk, dtype=torch.float32, device=device)
    else:
        key = _resolve_seed(seed)
        scratch = (torch.empty(chunk, dtype=torch.int32, device=device),
                   torch.empty(chunk, dtype=torch.int32, device=device))
    masks = []
    for k in experts:
        packed = torch.empty((numel + 7) // 8, dtype=torch.uint8, device=device)
        for s, e in _chunks(numel, chunk):
            if use_torch:
                kept = torch.lt(draws[: e - s].uniform_(0.0, 1.0, generator=generator), float(density),
                                out=keep[: e - s])
            else:
                kept = counter_keep(keep[: e - s], s, density, key, name, k, scratch)
            packed[s // 8: (e + 7) // 8] = pack_bits(kept)
        masks.append(packed)
    return masks


def dare_masks(numel: int, num: int, density: float, seed: int | None, name: str,
               device: torch.device | str = "cpu", chunk: int = DEFAULT_CHUNK,
               dare_rng: str = "counter", experts: Sequence[int] | None = None) -> list[Tensor]:
    """The ``num`` DARE keep-masks (bit-packed, see :func:`pack_bits`) that :func:`merge_streamed` draws for
    tensor ``name``.

    On the torch path, drawing them is the slowest step of a DARE merge on the CPU (the fused loops of
    :mod:`sens_peft.fused` hash counter masks inline instead); computing them ahead (e.g. on another thread)
    and passing them as ``merge_streamed(..., dare_masks=...)`` gives the same result. With ``dare_rng="counter"``
    each expert's mask depends on nothing else: ``experts`` (indices into ``range(num)``) draws only those, so
    the masks of one tensor can be drawn on several threads (give them one integer ``seed``).
    """
    if dare_rng not in DARE_RNGS:
        raise ValueError(f"dare_masks: dare_rng={dare_rng!r} is not one of {list(DARE_RNGS)}")
    if experts is not None and any(not 0 <= int(k) < num for k in experts):
        raise ValueError(f"dare_masks: experts={list(experts)} must be indices below num={num}")
    return _dare_masks(numel, num, density, dare_rng, seed, name, torch.device(device), chunk, experts)


def _chunks(numel: int, chunk: int, start: int = 0):
    for s in range(start, numel, chunk):
        yield s, min(numel, s + chunk)


def _delta(out: Tensor, expert: Tensor, base: Tensor | None, base_f: Tensor) -> Tensor:
    """``out = fp32(expert) - fp32(base)``. ``base`` (if given) is first converted into ``base_f``.

    A plain ``torch.sub(bf16, bf16, out=fp32)`` would subtract in bf16; converting first keeps the fp32 math of
    :func:`merge_deltas`, and a dtype-converting ``copy_`` plus a same-dtype ``sub_`` is also ~2x faster than a
    mixed-dtype ``sub``.
    """
    if base is not None:
        base_f.copy_(base)
    out.copy_(expert)
    return out.sub_(base_f)


def _scores(out: Tensor, expert: Tensor | None, base: Tensor, s: int, e: int, bufs: dict) -> Tensor:
    """Trim scores of entries ``s:e``: ``|expert - base|``, or ``base`` itself (an importance map) without expert."""
    if expert is None:
        return out.copy_(base[s:e])
    return _delta(out, expert[s:e], base[s:e], bufs["base"][: e - s])


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
    for s, e in _chunks(numel, chunk):
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
    for s, e in _chunks(numel, chunk):
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
                        ) -> tuple[list[tuple[int, int] | None], bool]:
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
    floats = [(_bits(hi), _bits(lo) if lo >= 0 else -1.0) for _, hi, lo in plans]
    # gathering stops past ~8x the expected band (+ a chunk): a band this much wider than planned is a miss anyway
    cap = 8 * int(2 * (_BAND_SIGMAS * math.sqrt(m * 0.25) + 8) / m * numel) + chunk
    upper = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(num)]  # >= hi (band), > v (tie)
    lower = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(num)]  # >= v (tie)
    inside: list[list[Tensor] | None] = [[] for _ in range(num)]
    tied: list[list[Tensor]] = [[] for _ in range(num)]  # per chunk: scores == v (tie)
    gathered = [0] * num
    top = torch.zeros((), dtype=torch.int32, device=device)
    buf = torch.empty(chunk, dtype=torch.float32, device=device)
    mask = torch.empty(chunk, dtype=torch.float32, device=device)
    over = torch.empty(chunk, dtype=torch.int8, device=device)
    within = torch.empty(chunk, dtype=torch.int8, device=device)
    for j in range(num if counts is not None else 0):  # the fused loops: one pass per expert
        (mode, _, _), (hi, lo) = plans[j], floats[j]
        upper[j], lower[j], per_chunk, picked, top_j = counts(j, mode == "band", hi, lo, cap)
        top = torch.maximum(top, torch.tensor(top_j, dtype=torch.int32))
        if mode == "tie":
            tied[j] = list(per_chunk)
        elif picked is None:
            inside[j] = None
        else:
            inside[j] = list(torch.split(picked, per_chunk.tolist()))
    for s, e in _chunks(numel, chunk) if counts is None else ():
        n = e - s
        for j in range(num):
            values = scores(j, s, e, buf[:n])
            top = torch.maximum(top, values.view(torch.int32).max())
            mode, _, _ = plans[j]
            hi, lo = floats[j]
            # comparisons into fp32 (to count) or int8 (to select) are several times faster than into bool here
            if mode == "tie":
                above = torch.gt(values, hi, out=mask[:n]).sum()
                at_least = torch.ge(values, hi, out=mask[:n]).sum()
                upper[j] += above
                lower[j] += at_least
                tied[j].append(at_least - above)
                continue
            torch.ge(values, hi, out=over[:n])
            upper[j] += over[:n].sum(dtype=torch.int32)
            if inside[j] is None:
                continue
            band = torch.gt(values, lo, out=within[:n]).sub_(over[:n]).view(torch.bool)
            picked = values.view(torch.int32)[band]
            gathered[j] += picked.numel()
            if gathered[j] > cap:
                inside[j] = None
            else:
                inside[j].append(picked)
    finite = int(top) < _INF_BITS
    results: list[tuple[int, int] | None] = []
    ties: list[Tensor | None] = [None] * num
    for j in range(num):
        mode, hi, lo = plans[j]
        if mode == "tie":
            counted = _threshold_from_counts(k, int(upper[j]), int(lower[j]))
            if counted is None:
                results.append(None)
            else:
                need, all_kept = counted
                results.append((hi - 1, 0) if all_kept else (hi, need))
                if not all_kept:
                    ties[j] = torch.stack(tied[j]).to(torch.int64).cpu()
            continue
        if inside[j] is None:
            results.append(None)
            continue
        band = torch.cat(inside[j]).cpu() if inside[j] else torch.empty(0, dtype=torch.int32)
        wanted = k - int(upper[j])  # rank of the k-th largest among the band's entries, from the top
        if not 0 < wanted <= band.numel():
            results.append(None)
            continue
        threshold = int(torch.kthvalue(band, band.numel() - wanted + 1).values)
        need = wanted - int((band > threshold).sum())
        if need == int((band == threshold).sum()):
            results.append((threshold - 1, 0))
        else:
            results.append((threshold, need))
            ties[j] = torch.stack([(picked == threshold).sum() for picked in inside[j]]).to(torch.int64).cpu()
    return results, finite, ties


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
        for s, e in _chunks(numel, chunk):
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


def _keep_chunk(scores: Tensor, trim: tuple[float, float, int], s: int, out: Tensor) -> Tensor:
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


def _shrink_chunk(values: Tensor, trim: tuple[float, float, int], s: int) -> Tensor:
    """Zero, in place, the entries of ``values`` (entries ``s : s + len(values)``) that a trim by ``|values|``
    drops (see :func:`_keep_chunk`); ``hardshrink`` does the comparison and the product in one pass, and keeps
    NaN."""
    above, at_least, tie_end = trim
    m = min(max(tie_end - s, 0), values.numel())
    for part, bound in ((values[:m], at_least), (values[m:], above)):
        if part.numel() and bound >= 0:  # a negative bound keeps everything
            torch.hardshrink(part, bound, out=part)
    return values


def _trim_floats(threshold: int, tie_end: int) -> tuple[float, float, int]:
    """``(above, at_least, tie_end)`` floats for a trim of :func:`trim_thresholds`: an entry is kept when its score
    is ``> above``, or ``> at_least`` (i.e. ``>= above``) before position ``tie_end``."""
    return _threshold_float(threshold), _threshold_float(threshold - 1), tie_end


def _trim_mask_streamed(expert: Tensor, base: Tensor, density: float, chunk: int) -> tuple[Tensor, bool]:
    """Keep-mask of the ``int(density * numel)`` largest ``|expert - base|`` entries (flat), as a whole bool
    tensor, from :func:`trim_thresholds` as the streamed merge uses it."""
    (trim,), finite = trim_thresholds(base, [expert], density, chunk=chunk)
    floats = _trim_floats(*trim)
    mask = torch.empty(base.numel(), dtype=torch.bool, device=base.device)
    tmp, base_f, keep = (torch.empty(chunk, device=base.device) for _ in range(3))
    flat_e, flat_b = expert.reshape(-1), base.reshape(-1)
    for s, e in _chunks(base.numel(), chunk):
        n = e - s
        scores = _delta(tmp[:n], flat_e[s:e], flat_b[s:e], base_f[:n]).abs_()
        mask[s:e] = _keep_chunk(scores, floats, s, keep[:n]) > 0
    return mask, finite


def _importance_maps(importance: Sequence[Tensor] | None, num: int, shape: torch.Size, name: str,
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
        imps = _importance_maps(importance, num, base.shape, name, device)
    f32 = dict(dtype=torch.float32, device=device)
    base_f, tmp = torch.empty(chunk, **f32), torch.empty(chunk, **f32)
    found: list[tuple[int, int] | None] = [None] * num
    ties: list[Tensor | None] = [None] * num
    finite = True
    if numel >= _SAMPLE_MIN_NUMEL:
        if imps is not None:
            counts = None
            if fused is not False and _fused.supports(imps[0], imps, imps[0]) and _fused.available():
                def counts(j: int, band: bool, hi: float, lo: float, cap: int) -> tuple:
                    return _fused.count_scores(None, imps[j], chunk=chunk, hi=hi, lo=lo, band=band, cap=cap)

            found, _, ties = _sampled_thresholds(lambda j, s, e, buf: imps[j][s:e],
                                                 lambda j, idx: imps[j].index_select(0, idx),
                                                 num, numel, k_keep, chunk, device, counts)
        else:
            def delta_scores(j: int, s: int, e: int, buf: Tensor) -> Tensor:
                if j == 0:
                    base_f[: e - s].copy_(flat_base[s:e])
                return _delta(buf, flats[j][s:e], None, base_f[: e - s]).abs_()

            sampled_base: list[Tensor] = []

            def delta_sample(j: int, idx: Tensor) -> Tensor:
                if not sampled_base:
                    sampled_base.append(flat_base.index_select(0, idx).float())
                return flats[j].index_select(0, idx).float().sub_(sampled_base[0])

            counts = None
            if fused is not False and _fused.supports(flat_base, flats, flat_base) and _fused.available():
                def counts(j: int, band: bool, hi: float, lo: float, cap: int) -> tuple:
                    return _fused.count_scores(flat_base, flats[j], chunk=chunk, hi=hi, lo=lo, band=band, cap=cap)

            found, finite, ties = _sampled_thresholds(delta_scores, delta_sample, num, numel, k_keep, chunk,
                                                      device, counts)
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
        return lambda s, e: _delta(tmp[: e - s], flats[k][s:e], flat_base[s:e], base_f[: e - s]).abs_()

    trims = [(threshold, _tie_end(scores_of(k), numel, chunk, threshold, need, ties[k]))
             for k, (threshold, need) in enumerate(found)]  # type: ignore[misc]
    return trims, finite


def merge_streamed(method: str, base: Tensor, experts: Sequence[Tensor], coefficients: Tensor | Sequence[float],
                   *, density: float = 1.0, majority_sign_method: str = "total", seed: int | None = 0,
                   name: str = "", weighted_election: bool = True, out_dtype: torch.dtype | None = None,
                   importance: Sequence[Tensor] | None = None, trim_by: str = "magnitude",
                   chunk: int = DEFAULT_CHUNK, out: Tensor | None = None,
                   dare_masks: Sequence[Tensor] | None = None,
                   thresholds: tuple[list[tuple[int, int]], bool] | None = None,
                   dare_rng: str = "counter", span: tuple[int, int] | None = None,
                   fused: bool | None = None) -> tuple[Tensor, bool]:
    """``base + merge_deltas(method, [e - base for e in experts], coefficients, ...)`` without the deltas.

    The same math as :func:`merge_deltas` (fp32, coefficients already including the global scale) for the
    methods in :data:`STREAMED_METHODS`, computed chunk by chunk over the flattened tensor with in-place
    accumulation into a few reused fp32 buffers: memory is the inputs, the output and a few chunks (plus ``K``
    bit-packed masks for DARE with ``dare_rng="torch"`` or ``dare_masks``), whatever the tensor's size. Results agree with
    :func:`merge_deltas` to fp32 rounding (the order of the per-expert sums is the same; ``add(alpha=c)`` may
    fuse a multiply-add). DARE masks are the same as :func:`merge_deltas` draws for the same ``dare_rng``,
    ``seed`` and ``name``; with ``"counter"`` each chunk's masks are drawn as the chunk is merged. TIES keeps exactly ``int(density * numel)`` entries per
    expert like :func:`magnitude_trim_mask`; where entries tie at the threshold this keeps the first ones in
    index order (``topk``'s choice among ties is unspecified).

    Args:
        method: One of :data:`STREAMED_METHODS`.
        base: Base tensor (any float dtype).
        experts: ``K`` expert tensors with the shape of ``base``, on its device.
        coefficients: ``[K]`` per-expert scalars (including the global scale).
        density, majority_sign_method, seed, name, weighted_election, importance, trim_by: As for
            :func:`merge_deltas` (``importance`` is used only by ``ties`` with ``trim_by="sensitivity"``).
        out_dtype: dtype of the result (default: the base's).
        chunk: Entries processed at a time.
        out: Optional preallocated result (``out_dtype``, the base's number of entries, contiguous, on its device).
        dare_masks: The DARE masks drawn ahead with :func:`dare_masks` (same ``density``, ``seed``, ``name``,
            ``dare_rng``).
        thresholds: The TIES trim computed ahead with :func:`trim_thresholds` (same inputs and ``density``).
        dare_rng: How DARE draws its masks (:data:`DARE_RNGS`), as for :func:`merge_deltas`.
        span: ``(start, stop)``: merge only the flat entries ``start:stop`` into ``out`` (``start`` a multiple
            of 8), leaving the others as they are. Every entry's result depends only on the inputs, the
            coefficients, the trim/masks and its position, so merging the spans of a partition (e.g. on two
            threads, into one ``out``) gives the same tensor as one call. Pass TIES ``thresholds`` then, or each
            span selects them again.
        fused: TIES / DARE-TIES on the CPU: ``None`` (default) runs the fused C loops of :mod:`sens_peft.fused`
            when they are available and can take the inputs (contiguous fp32/bf16 tensors, at most
            :data:`sens_peft.fused.MAX_EXPERTS` experts), else the torch ops;
            ``False`` always the torch ops; ``True`` the fused loops or an error. Both give the same bits.

    Returns:
        ``(merged, finite)``: the merged tensor with the base's shape, and False when a non-finite value was seen
        in a delta or the result, or could not be ruled out (TIES keeping nothing); the caller then checks the
        inputs and names the offending one. A False can also come from a finite sum overflowing; the caller's
        check then passes and the result stands.
    """
    if method not in STREAMED_METHODS:
        raise ValueError(f"merge_streamed handles {list(STREAMED_METHODS)}, not {method!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"merge_streamed: majority_sign_method={majority_sign_method!r} is not one of "
                         f"{list(MAJORITY_SIGN_METHODS)}")
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"merge_streamed: density must be in (0, 1], got {density!r}")
    num = len(experts)
    device = base.device
    coeffs = [float(c) for c in torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1).tolist()]
    if len(coeffs) != num or num == 0:
        raise ValueError(f"merge_streamed: got {len(coeffs)} coefficients for {num} experts")
    shape = base.shape
    numel = base.numel()
    flat_base = base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    for k, e in enumerate(flats):
        if e.numel() != numel:
            raise ValueError(f"merge_streamed: expert {k} of {name!r} has shape {tuple(experts[k].shape)}, "
                             f"expected {tuple(shape)}")
    if out is None:
        out = torch.empty(numel, dtype=out_dtype or base.dtype, device=device)
    else:
        if out.numel() != numel or out.dtype != (out_dtype or base.dtype) or out.device != device \
                or not out.is_contiguous():
            raise ValueError(f"merge_streamed: out is {out.dtype} {tuple(out.shape)} on {out.device}, expected "
                             f"{out_dtype or base.dtype} with {numel} contiguous entries on {device}")
        out = out.reshape(-1)
    dare = method in ("dare_linear", "dare_ties") and density < 1.0
    first, stop = (0, numel) if span is None else (int(span[0]), int(span[1]))
    if not (0 <= first <= stop <= numel and first % 8 == 0):
        raise ValueError(f"merge_streamed: span={span!r} must be (start, stop) with 0 <= start <= stop <= "
                         f"{numel} and start a multiple of 8")
    chunk = max(1, min(int(chunk), numel))
    if dare:
        chunk = max(8, chunk - chunk % 8)  # chunk borders on byte borders of the packed masks
    f32 = dict(dtype=torch.float32, device=device)
    base_f = torch.empty(chunk, **f32)
    acc = torch.empty(chunk, **f32)
    tmp = torch.empty(chunk, **f32)
    keep = torch.empty(chunk, **f32)
    lanes = torch.empty(2 * (chunk // 8 + 1), dtype=torch.int64, device=device)
    check = torch.zeros((), **f32)

    if dare_rng not in DARE_RNGS:
        raise ValueError(f"merge_streamed: dare_rng={dare_rng!r} is not one of {list(DARE_RNGS)}")
    masks: list[Tensor | None] = [None] * num
    finite = True
    counter = dare and dare_rng == "counter" and dare_masks is None  # drawn chunk by chunk below
    if counter:
        key = _resolve_seed(seed)
        counter_scratch = (torch.empty(chunk, dtype=torch.int32, device=device),
                           torch.empty(chunk, dtype=torch.int32, device=device))
    elif dare and dare_masks is not None:
        if len(dare_masks) != num or any(m.numel() != (numel + 7) // 8 or m.device != device for m in dare_masks):
            raise ValueError(f"merge_streamed: dare_masks must be {num} packed masks of {numel} entries on "
                             f"{device}")
        masks = list(dare_masks)
    elif dare:
        masks = _dare_masks(numel, num, density, dare_rng, seed, name, device, chunk)

    def keep_of(k: int, s: int, e: int, into: Tensor) -> Tensor:
        """Expert ``k``'s DARE keep-mask of entries ``s:e`` as fp32 0/1 in ``into``."""
        if counter:
            return counter_keep(into, s, density, key, name, k, counter_scratch)
        return unpack_bits(masks[k][s // 8: (e + 7) // 8], e - s, into, lanes)

    if trim_by not in TRIM_BY:
        raise ValueError(f"merge_streamed: trim_by={trim_by!r} is not one of {list(TRIM_BY)}")
    by_importance = method == "ties" and trim_by == "sensitivity" and density < 1.0
    imps = _importance_maps(importance, num, shape, name, device) if by_importance else []
    trims: list[tuple[float, float, int] | None] = [None] * num
    if method == "ties" and density < 1.0:
        if thresholds is None:
            thresholds = trim_thresholds(base, experts, density, importance=imps if by_importance else None,
                                         chunk=chunk, fused=fused)
        found, ok = thresholds
        if len(found) != num:
            raise ValueError(f"merge_streamed: thresholds for {len(found)} experts, expected {num}")
        finite = finite and ok
        for k, (threshold, tie_end) in enumerate(found):
            trims[k] = _trim_floats(threshold, tie_end)

    if method == "task_arithmetic":
        # base + sum_k c_k (e_k - base) == (1 - sum_k c_k) base + sum_k c_k e_k: no delta is formed, one pass
        # per input (a bf16->fp32 copy and a multiply-add), the same fp32 math up to rounding
        base_weight = 1.0 - math.fsum(coeffs)
        for s, e in _chunks(stop, chunk, first):
            n = e - s
            ac, tm = acc[:n], tmp[:n]
            ac.copy_(flat_base[s:e]).mul_(base_weight)
            for k in range(num):
                ac.add_(tm.copy_(flats[k][s:e]), alpha=coeffs[k])
            check += ac.sum()
            out[s:e].copy_(ac)
        return out.reshape(shape), finite and bool(torch.isfinite(check))

    if method == "dare_linear":
        for s, e in _chunks(stop, chunk, first):
            n = e - s
            bf, ac, tm, kp = base_f[:n], acc[:n], tmp[:n], keep[:n]
            bf.copy_(flat_base[s:e])
            ac.zero_()
            for k in range(num):
                _delta(tm, flats[k][s:e], None, bf)
                if dare:
                    check += tm.sum()  # dropped entries must not hide a NaN/Inf
                    tm.mul_(keep_of(k, s, e, kp)).div_(density)
                ac.add_(tm, alpha=coeffs[k])
            bf.add_(ac)
            check += bf.sum()
            out[s:e].copy_(bf)
        return out.reshape(shape), finite and bool(torch.isfinite(check))

    # the sign each expert's vote has relative to its delta, and the weight of its vote
    vote_sign = [(c > 0) - (c < 0) if weighted_election else 1 for c in coeffs]
    vote_weight = coeffs if weighted_election else [1.0] * num
    if fused is not False and _fused.supports(flat_base, flats, out) \
            and (not imps or _fused.supports(imps[0], imps, imps[0])) and _fused.available():  # imps: fp32
        if dare and counter:
            blocks = range(first // _COUNTER_BLOCK, max(first, stop - 1) // _COUNTER_BLOCK + 1)
            keys = torch.tensor([[_counter_keys(key, name, k, b) for b in blocks] for k in range(num)],
                                dtype=torch.int32).reshape(num, len(blocks), 2)
            drop = dict(drop="counter", density=density, keys=keys, first_block=blocks[0],
                        block_size=_COUNTER_BLOCK, keep_threshold=_keep_threshold(density))
        elif dare:
            drop = dict(drop="packed", density=density, masks=masks)
        elif by_importance:
            drop = dict(drop="importance", trims=trims, importance=imps)
        elif any(t is not None for t in trims):
            drop = dict(drop="trim", trims=[t if t is not None else (-1.0, -1.0, 0) for t in trims])
        else:
            drop = dict(drop="none")
        bad = _fused.ties_merge(first, stop, flat_base, flats, out, coefficients=coeffs, vote_weight=vote_weight,
                                vote_sign=vote_sign, count_votes=majority_sign_method != "total", **drop)
        return out.reshape(shape), finite and bad == 0
    elif fused is True:
        raise RuntimeError(f"merge_streamed: fused=True, but the fused loops cannot take this merge (method "
                           f"{method!r}, device {device}, dtypes "
                           f"{sorted({str(t.dtype) for t in (flat_base, out, *flats)})}; available: "
                           f"{_fused.available()})")

    # ties / dare_ties: per chunk, the K kept (trimmed/dropped) deltas, the elected sign, then the disjoint mean
    # over the entries that agree with it. The deltas are kept unscaled and each coefficient enters through the
    # ``value`` of an ``addcmul``, which rounds like the separate product and sum of merge_deltas (``add`` with
    # ``alpha`` fuses a multiply-add and would not); sign(c * d) = sign(c) * sign(d) gives the scaled votes' signs.
    # Masks are fp32 0/1: on the CPU, comparisons into and products with bool tensors are several times slower.
    kept = [torch.empty(chunk, **f32) for _ in range(num)]
    ones = torch.ones(chunk, **f32)
    count = torch.empty(chunk, **f32)
    sign = torch.empty(chunk, **f32)
    agree = torch.empty(chunk, **f32)
    for s, e in _chunks(stop, chunk, first):
        n = e - s
        bf, mass, cnt, ag, sg, kp, one = base_f[:n], acc[:n], count[:n], agree[:n], sign[:n], keep[:n], ones[:n]
        bf.copy_(flat_base[s:e])
        for k in range(num):
            d = kept[k][:n]
            _delta(d, flats[k][s:e], None, bf)
            if dare:
                check += d.sum()  # dropped entries must not hide a NaN/Inf
                d.mul_(keep_of(k, s, e, kp)).div_(density)
            elif trims[k] is not None:
                if by_importance:
                    check += d.sum()  # trimmed entries must not hide a NaN/Inf
                    d.mul_(_keep_chunk(imps[k][s:e], trims[k], s, kp))
                else:
                    _shrink_chunk(d, trims[k], s)
            if majority_sign_method == "total":
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
        first = True
        for k in range(num):
            if vote_sign[k] == 0:
                continue  # a zero coefficient: its votes are zeros, which never agree
            # sign(vote) == elected  <=>  vote * elected > 0 (zeros, i.e. trimmed/dropped entries, never agree)
            torch.mul(kept[k][:n], sg, out=ag)
            (torch.gt if vote_sign[k] > 0 else torch.lt)(ag, 0, out=ag)
            if first:
                torch.mul(kept[k][:n], ag, out=total).mul_(coeffs[k])  # (d * a) * c == (d * c) * a for a in {0, 1}
                cnt.copy_(ag)
                first = False
            else:
                total.addcmul_(kept[k][:n], ag, value=coeffs[k])
                cnt.add_(ag)
        if first:  # every coefficient is zero: nothing agrees
            total.zero_()
            cnt.zero_()
        bf.addcdiv_(total, cnt.clamp_(min=1))  # base + total / count, rounded as the two steps would be
        check += bf.sum()
        out[s:e].copy_(bf)
    return out.reshape(shape), finite and bool(torch.isfinite(check))
