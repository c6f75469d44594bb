"""The "counter" DARE keep-masks: a pure-Python reference of the hash, slices and blocks, statistics, and the
streamed merge drawing them chunk by chunk or ahead."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sens_peft.config import MergeConfig
from sens_peft.methods import (
    counter_keep,
    dare_keep_mask,
    dare_masks,
    merge_deltas,
    merge_streamed,
    unpack_bits,
)

M32 = 0xFFFFFFFF


def _reference_keep(position: int, density: float, seed: int, name: str, expert: int) -> bool:
    """Entry ``position``'s keep decision computed with Python integers, from the documented recipe."""
    block, offset = divmod(position, 1 << 24)
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{expert}\x00{block}".encode(), digest_size=8).digest()
    key1, key2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    x = ((offset + key1) * 0x9E3779B9) & M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x ^= key2
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    # the library compares the int32 reading of x with threshold - 2**31: unsigned, that is x with its top bit flipped
    return (x ^ 0x80000000) < min(round(density * 2**32), 2**32 - 1)


@pytest.mark.parametrize("density", [0.5, 0.1, 0.93])
def test_counter_keep_matches_python_reference(density):
    # a few positions in block 0, around the first block border, and far out (a >2**31-entry tensor)
    for start in (0, (1 << 24) - 5, 3 * (1 << 31) + 17):
        out = torch.empty(12)
        counter_keep(out, start, density, 7, "model.embed_tokens.weight", 2)
        expected = [float(_reference_keep(start + i, density, 7, "model.embed_tokens.weight", 2)) for i in range(12)]
        assert out.tolist() == expected, start


def test_counter_masks_do_not_depend_on_slicing_or_chunking():
    n = 50_001
    whole = dare_keep_mask((n,), 0.3, 5, "w", 1, chunk=1 << 20)
    assert torch.equal(whole, dare_keep_mask((n,), 0.3, 5, "w", 1, chunk=999))
    part = torch.empty(1000, dtype=torch.int8)  # any output dtype
    counter_keep(part, 12_345, 0.3, 5, "w", 1)
    assert torch.equal(part.float(), whole[12_345:13_345])
    # packed (drawn ahead) = unpacked
    packed = dare_masks(n, 2, 0.3, 5, "w", chunk=4096)
    assert torch.equal(unpack_bits(packed[1], n, torch.empty(n)), whole)
    # a function of (seed, name, expert): each changes the mask
    for other in (dare_keep_mask((n,), 0.3, 6, "w", 1), dare_keep_mask((n,), 0.3, 5, "v", 1),
                  dare_keep_mask((n,), 0.3, 5, "w", 0)):
        assert not torch.equal(other, whole)


@pytest.mark.parametrize("density", [0.5, 0.05, 0.9])
def test_counter_masks_look_like_independent_bernoulli_draws(density):
    n = 1 << 20
    masks = [dare_keep_mask((n,), density, 3, "layers.0.mlp.down_proj.weight", k) for k in range(2)]
    sd = (density * (1 - density)) ** 0.5
    for mask in masks:
        # keep rate within 5 binomial standard deviations
        assert abs(float(mask.double().mean()) - density) < 5 * sd / n ** 0.5
    z = [(m.double() - density) / sd for m in masks]
    bound = 5 / n ** 0.5  # |correlation| of independent draws: ~N(0, 1/n)
    assert abs(float((z[0] * z[1]).mean())) < bound  # between experts, same entry
    for lag in (1, 2, 1024, 1 << 16):  # between neighbours, and rows apart
        assert abs(float((z[0][lag:] * z[0][:-lag]).mean())) < 5 / (n - lag) ** 0.5


def test_streamed_counter_dare_inline_ahead_and_in_memory_agree():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3001, generator=gen)
    experts = [base + 0.01 * torch.randn(3001, generator=gen) for _ in range(3)]
    coeffs = torch.tensor([0.6, 1.1, 0.8])
    for method in ("dare_linear", "dare_ties"):
        ref = base + merge_deltas(method, [e - base for e in experts], coeffs, density=0.4, seed=9, name="t")
        inline, _ = merge_streamed(method, base, experts, coeffs, density=0.4, seed=9, name="t", chunk=512)
        ahead, _ = merge_streamed(method, base, experts, coeffs, density=0.4, seed=9, name="t", chunk=512,
                                  dare_masks=dare_masks(3001, 3, 0.4, 9, "t"))
        assert torch.equal(inline, ahead)
        torch.testing.assert_close(inline, ref, rtol=0, atol=5e-7)
        if method == "dare_ties":
            assert torch.equal(inline, ref)
        # "torch" masks are other draws: a different result
        other, _ = merge_streamed(method, base, experts, coeffs, density=0.4, seed=9, name="t", dare_rng="torch")
        assert not torch.equal(other, inline)


def test_dare_rng_is_validated():
    with pytest.raises(ValueError, match="dare_rng"):
        MergeConfig(method="dare_ties", dare_rng="philox")
    with pytest.raises(ValueError, match="dare_rng"):
        merge_deltas("dare_linear", [torch.ones(3)], [1.0], density=0.5, dare_rng="mt")
    with pytest.raises(ValueError, match="dare_rng"):
        merge_streamed("dare_linear", torch.zeros(3), [torch.ones(3)], [1.0], density=0.5, dare_rng="mt")


@pytest.mark.parametrize("rng", ["counter", "torch"])
def test_seed_none_follows_the_global_rng_in_every_path(rng):
    """seed=None: the masks come from torch's global RNG, so torch.manual_seed reproduces them, and the streamed
    path (masks drawn ahead or not) draws what merge_deltas draws."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2000, generator=gen)
    experts = [base + 0.01 * torch.randn(2000, generator=gen) for _ in range(2)]
    kw = dict(density=0.5, seed=None, name="t", dare_rng=rng)
    torch.manual_seed(3)
    ref = base + merge_deltas("dare_ties", [e - base for e in experts], [1.0, 0.7], **kw)
    torch.manual_seed(3)
    inline, _ = merge_streamed("dare_ties", base, experts, [1.0, 0.7], **kw)
    torch.manual_seed(3)
    ahead, _ = merge_streamed("dare_ties", base, experts, [1.0, 0.7], dare_masks=dare_masks(2000, 2, 0.5, None, "t",
                                                                                            dare_rng=rng), **kw)
    assert torch.equal(inline, ref) and torch.equal(ahead, ref)
