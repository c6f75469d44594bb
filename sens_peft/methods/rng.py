"""DARE's random keep-masks: the per-tensor seed, the ``"torch"`` (Mersenne-Twister) draw and the ``"counter"``
hash, whose masks are a pure function of (seed, tensor name, expert, position)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..config import DARE_RNGS
from .common import chunks

__all__ = ["DARE_RNGS", "counter_keep", "counter_keep_probs", "dare_keep_mask", "dare_mask", "keep_drawer", "resolve_seed", "stable_seed",
           "torch_generator"]


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


def torch_generator(seed: int | None, name: str, device: torch.device) -> torch.Generator | None:
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

# The counter hash: positions are split into blocks of 2**24 with their own keys, so the int32 counter never
# wraps, whatever the tensor's size. (counter + key1) times a Weyl constant, then the two xorshift-multiply
# rounds of "lowbias32" (C. Wellons' hash) with a second key mixed in between them, so that different keys do
# not give shifted copies of one sequence. Only a comparison of the result's high bits with a threshold is
# used, so lowbias32's last xorshift (which changes the low half only) is left out. All in int32 torch ops,
# whose multiplications wrap the same way on every device.
COUNTER_BLOCK = 1 << 24
_WEYL = 0x9E3779B9 - (1 << 32)  # as a signed int32
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # as a signed int32
_ARANGE: dict[torch.device, Tensor] = {}


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def counter_keys(seed: int, name: str, expert: int, block: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{expert}\x00{block}".encode(), digest_size=8).digest()
    return _signed32(int.from_bytes(digest[:4], "little")), _signed32(int.from_bytes(digest[4:], "little"))


def keep_threshold(density: float) -> int:
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
    threshold = keep_threshold(density)
    pos, end = int(start), int(start) + n
    while pos < end:
        block, offset = divmod(pos, COUNTER_BLOCK)
        m = min(end - pos, COUNTER_BLOCK - offset)
        x = _hash_block(scratch[0][:m], scratch[1][:m], seed, name, expert, block, offset)
        torch.lt(x, threshold, out=out[pos - start: pos - start + m])
        pos += m
    return out


def _hash_block(x: Tensor, t: Tensor, seed: int, name: str, expert: int, block: int, offset: int) -> Tensor:
    """The int32 counter hashes of positions ``offset : offset + len(x)`` of ``block`` into ``x`` (``t``: scratch)."""
    key1, key2 = counter_keys(seed, name, expert, block)
    # a Weyl step first: consecutive counters differ in many bits before the rounds (without it, neighbours'
    # keeps correlated measurably, ~3e-4)
    torch.add(_arange32(x.numel(), x.device), _signed32(offset + key1), out=x).mul_(_WEYL)
    for shift, mul, key in ((16, _MUL1, key2), (15, _MUL2, None)):
        # x ^= x >>> shift (int32 shifts are arithmetic: mask the sign copies off), then x *= mul
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1)).mul_(mul)
        if key is not None:
            x.bitwise_xor_(key)
    return x


def counter_keep_probs(probs: Tensor, start: int, seed: int, name: str, expert: int) -> Tensor:
    """A keep-mask (fp32 0/1) with a keep probability per entry: entry ``start + i`` of expert ``expert``'s delta of
    tensor ``name`` is kept when its ``"counter"`` hash falls below ``probs[i] * 2**32`` (``probs`` flat).

    The same hash as :func:`counter_keep`: with every probability equal to ``density`` this is exactly DARE's
    ``"counter"`` mask of that expert and tensor, so a rank-dependent drop (DELLA) with zero spread is DARE.
    """
    flat = probs.reshape(-1)
    n, device = flat.numel(), flat.device
    # the int32 reading of the hash is below this iff the hash, read unsigned, is below p * 2**32 (keep_threshold)
    limit = (flat.to(torch.float64) * 2.0 ** 32).round_().clamp_(max=2.0 ** 32 - 1).to(torch.int64) - (1 << 31)
    out = torch.empty(n, dtype=torch.float32, device=device)
    x, t = torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int32, device=device)
    pos, end = int(start), int(start) + n
    while pos < end:
        block, offset = divmod(pos, COUNTER_BLOCK)
        m = min(end - pos, COUNTER_BLOCK - offset)
        lo = pos - start
        hashed = _hash_block(x[lo: lo + m], t[lo: lo + m], seed, name, expert, block, offset)
        torch.lt(hashed.to(torch.int64), limit[lo: lo + m], out=out[lo: lo + m])
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
    for s, e in chunks(numel, size):
        counter_keep(mask[s:e], s, density, seed, name, expert, scratch)
    return mask.reshape(tuple(shape))


def resolve_seed(seed: int | None) -> int:
    """``seed``, or for None one drawn from torch's global RNG (so ``torch.manual_seed`` still governs it)."""
    return int(seed) if seed is not None else int(torch.randint(0, 1 << 62, (1,)).item())


def keep_drawer(dare_rng: str, seed: int | None, name: str, shape: torch.Size, density: float | Sequence[float],
                 device: torch.device) -> Callable[[int], Tensor]:
    """``draw(k)``: expert ``k``'s whole DARE keep-mask (fp32 0/1, ``shape``); call it for k = 0, 1, ... in order.
    ``density``: one keep probability, or one per expert."""
    def prob(k: int) -> float:
        return float(density) if isinstance(density, (int, float)) else float(density[k])

    if dare_rng == "torch":
        generator = torch_generator(seed, name, device)
        return lambda k: dare_mask(shape, prob(k), generator, device)
    key = resolve_seed(seed)
    return lambda k: dare_keep_mask(shape, prob(k), key, name, k, device)

