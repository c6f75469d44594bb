"""Bit packing of 0/1 masks (8 entries per byte) and DARE's masks drawn ahead, packed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import DEFAULT_CHUNK, chunks
from .rng import DARE_RNGS, counter_keep, dare_mask, resolve_seed, torch_generator

__all__ = ["dare_masks", "draw_dare_masks", "pack_bits", "unpack_bits"]


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


def draw_dare_masks(numel: int, num: int, density: float | Sequence[float], dare_rng: str, seed: int | None,
                    name: str, device: torch.device, chunk: int, experts: Sequence[int] | None = None
                    ) -> list[Tensor]:
    """The ``num`` DARE keep-masks that :func:`merge_deltas` draws with ``dare_rng``, bit-packed
    (:func:`pack_bits`). Packed, the K masks of a vocabulary-sized tensor take 25 MB instead of 200 MB.

    ``"torch"`` on the CPU: ``bernoulli`` with probability ``p`` draws one ``uniform_real_distribution<float>``
    value per entry, in order, and keeps it when it is below ``p``; ``uniform_`` draws the very same values
    (about 2.5x faster), so ``rand < density`` is the same mask, and drawing it in chunks continues the same
    stream. Other devices keep the reference draw. ``experts`` (``"counter"`` only): the masks of these experts
    alone, in this order. ``density``: one for all, or one per expert (an expert at density 1 keeps everything
    and draws nothing).
    """
    def prob(k: int) -> float:
        return float(density) if isinstance(density, (int, float)) else float(density[k])

    use_torch = dare_rng == "torch"
    if experts is None:
        experts = range(num)
    elif use_torch:
        raise ValueError("dare_masks: experts= needs dare_rng='counter' (the 'torch' masks are one stream)")
    generator = torch_generator(seed, name, device) if use_torch else None  # None with seed=None: the global RNG
    if use_torch and device.type != "cpu":
        return [pack_bits(torch.ones(numel, dtype=torch.int8, device=device) if prob(k) >= 1.0 else
                          dare_mask((numel,), prob(k), generator, device)) for k in range(num)]
    chunk = max(8, min(chunk, numel) - min(chunk, numel) % 8)  # chunk borders on byte borders of the packed mask
    keep = torch.empty(chunk, dtype=torch.int8, device=device)
    if use_torch:
        draws = torch.empty(chunk, dtype=torch.float32, device=device)
    else:
        key = resolve_seed(seed)
        scratch = (torch.empty(chunk, dtype=torch.int32, device=device),
                   torch.empty(chunk, dtype=torch.int32, device=device))
    masks = []
    for k in experts:
        packed = torch.empty((numel + 7) // 8, dtype=torch.uint8, device=device)
        if prob(k) >= 1.0:
            masks.append(pack_bits(torch.ones(numel, dtype=torch.int8, device=device)))
            continue
        for s, e in chunks(numel, chunk):
            if use_torch:
                kept = torch.lt(draws[: e - s].uniform_(0.0, 1.0, generator=generator), prob(k),
                                out=keep[: e - s])
            else:
                kept = counter_keep(keep[: e - s], s, prob(k), key, name, k, scratch)
            packed[s // 8: (e + 7) // 8] = pack_bits(kept)
        masks.append(packed)
    return masks


def dare_masks(numel: int, num: int, density: float | Sequence[float], seed: int | None, name: str,
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
    return draw_dare_masks(numel, num, density, dare_rng, seed, name, torch.device(device), chunk, experts)

