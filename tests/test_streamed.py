"""methods.merge_streamed (the chunked full-model path of merge_models) against methods.merge_deltas."""

import pytest
import torch

from sens_peft.methods import (
    dare_masks,
    magnitude_trim_mask,
    merge_deltas,
    merge_streamed,
    trim_thresholds,
)


def _trim_mask_streamed(expert, base, density, chunk):
    """Keep-mask of the ``int(density * numel)`` largest ``|expert - base|`` entries (flat), as a whole bool tensor,
    from trim_thresholds as the streamed merge uses it (a test helper: moved here from the library)."""
    from sens_peft.methods.common import chunks, delta_into
    from sens_peft.methods.selection import keep_chunk, trim_floats

    (trim,), finite = trim_thresholds(base, [expert], density, chunk=chunk)
    floats = trim_floats(*trim)
    mask = torch.empty(base.numel(), dtype=torch.bool, device=base.device)
    tmp, base_f, keep = (torch.empty(chunk, device=base.device) for _ in range(3))
    flat_e, flat_b = expert.reshape(-1), base.reshape(-1)
    for s, e in chunks(base.numel(), chunk):
        n = e - s
        scores = delta_into(tmp[:n], flat_e[s:e], flat_b[s:e], base_f[:n]).abs_()
        mask[s:e] = keep_chunk(scores, floats, s, keep[:n]) > 0
    return mask, finite


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    experts = [(base.float() + 0.01 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
    return base, experts


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "ties", "dare_ties"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("coeffs", [[0.9, -0.4, 1.3], [0.0, 1.2, 0.7], [0.0, 0.0, 0.0]])
def test_matches_merge_deltas(method, density, sign, coeffs):
    base, experts = _inputs((37, 101), torch.float32)
    coeffs = torch.tensor(coeffs)
    for weighted in (True, False):
        ref = base + merge_deltas(method, [e - base for e in experts], coeffs, density=density, seed=3, name="w",
                                  majority_sign_method=sign, weighted_election=weighted)
        # chunk 1000 does not divide the 3737 entries: chunk borders and a short last chunk are exercised
        out, finite = merge_streamed(method, base, experts, coeffs, density=density, seed=3, name="w",
                                     majority_sign_method=sign, weighted_election=weighted, chunk=1000)
        assert finite and out.shape == base.shape and out.dtype == base.dtype
        if method in ("ties", "dare_ties"):
            assert torch.equal(out, ref)  # same masks, same order of sums
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=5e-7)  # add(alpha=c) may fuse the multiply-add


@pytest.mark.parametrize("density", [0.5, 0.3, 0.01])
def test_trim_keeps_exactly_k_largest_with_ties(density):
    base, experts = _inputs((3737,), torch.bfloat16, seed=1)  # bf16 deltas: many equal |delta|
    base[::7] = (base[::7].float() * 1e-3).bfloat16()  # deltas not exact in bf16: the trim must subtract in fp32
    delta = experts[0].float() - base.float()
    k = int(density * delta.numel())
    mask, finite = _trim_mask_streamed(experts[0], base, density, 1000)
    ref = magnitude_trim_mask(delta.abs(), density)
    assert finite and int(mask.sum()) == k
    # the same kept values (only which of equal |delta| entries is kept may differ from topk)
    assert torch.equal(delta.abs()[mask].sort().values, delta.abs()[ref].sort().values)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "ties", "dare_ties"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_is_reported(method, bad):
    base, experts = _inputs((50,), torch.float32)
    experts[1] = experts[1].clone()
    experts[1][7] = bad
    assert not merge_streamed(method, base, experts, [1.0, 0.0, 1.0], density=0.5, chunk=16)[1]
    base = base.clone()
    base[3] = bad
    assert not merge_streamed(method, base, _inputs((50,), torch.float32)[1], [1.0, 1.0, 1.0], density=0.5)[1]


def test_streamed_shards_have_save_file_bytes(tmp_path):
    from sens_peft.io import ShardWriter, plan_shards

    gen = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=gen).bfloat16(), "a.weight": torch.randn(7, generator=gen),
               "c": torch.arange(5), "z": torch.randn(2, 2, generator=gen).half(), "e": torch.tensor([True, False]),
               "s": torch.tensor(2.0), "empty": torch.zeros(0, 3), "d": torch.randn(4, generator=gen).double(),
               "u": torch.arange(3, dtype=torch.uint8), "i": torch.arange(3, dtype=torch.int32)}
    for limit in (60, 10**6):  # several shards, and one shard with every dtype
        plan = plan_shards([(n, t.numel() * t.element_size()) for n, t in tensors.items()], limit)
        specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        files = {}
        for mode, kw in (("streamed", {"specs": specs}), ("buffered", {})):
            writer = ShardWriter(tmp_path / f"{mode}{limit}", limit, plan=plan, **kw)
            (tmp_path / f"{mode}{limit}").mkdir()
            assert writer._streamed == (mode == "streamed")
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            files[mode] = {f: (tmp_path / f"{mode}{limit}" / f).read_bytes() for f in writer.close()}
        assert files["streamed"] == files["buffered"]


@pytest.mark.parametrize("density", [0.5, 0.2])
def test_ties_trim_by_sensitivity_matches_merge_deltas(density):
    base, experts = _inputs((37, 101), torch.float32, seed=2)
    gen = torch.Generator().manual_seed(5)
    imp = [torch.rand((37, 101), generator=gen) for _ in experts]  # continuous: no ties at the threshold
    coeffs = torch.tensor([1.0, 0.5, 2.0])
    ref = base + merge_deltas("ties", [e - base for e in experts], coeffs, density=density, importance=imp,
                              trim_by="sensitivity")
    out, finite = merge_streamed("ties", base, experts, coeffs, density=density, importance=imp,
                                 trim_by="sensitivity", chunk=1000)
    assert finite and torch.equal(out, ref)
    with pytest.raises(ValueError, match="non-negative"):
        merge_streamed("ties", base, experts, coeffs, density=density, trim_by="sensitivity",
                       importance=[-m for m in imp])
    with pytest.raises(ValueError, match="importance maps"):
        merge_streamed("ties", base, experts, coeffs, density=density, trim_by="sensitivity")


def _score_cases():
    gen = torch.Generator().manual_seed(5)
    n = (1 << 20) + 4099  # above the sampling size limit, not a multiple of the chunk
    base = torch.randn(n, generator=gen)
    yield "fp32", base, base + 0.01 * torch.randn(n, generator=gen)
    b16 = base.bfloat16()
    yield "bf16-ties", b16, (b16.float() + 0.002 * torch.randn(n, generator=gen)).bfloat16()
    few = base.clone()
    few[::3] += 0.5  # one big run of equal |delta|, the rest exactly zero
    yield "runs", base, few
    yield "zeros", base, base.clone()
    heavy = base + torch.distributions.StudentT(1.0).sample((n,)) * 1e-3
    yield "heavy-tail", base, heavy


@pytest.mark.parametrize("case", ["fp32", "bf16-ties", "runs", "zeros", "heavy-tail"])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.01, 0.97, 0.0003, 0.9997])
def test_sampled_threshold_equals_radix(case, density):
    """The one-pass sampled selection gives the radix selection's (threshold, need), whatever the ties."""
    from sens_peft.methods.selection import _sampled_thresholds, _trim_threshold

    base, expert = next((b, e) for name, b, e in _score_cases() if name == case)
    numel, chunk = base.numel(), 1 << 16
    k = int(density * numel)
    bufs = {"tmp": torch.empty(chunk), "bits": torch.empty(chunk, dtype=torch.int32), "base": torch.empty(chunk)}
    ref = _trim_threshold(expert, base, k, chunk, bufs)[:2]
    base_f = torch.empty(chunk)

    def scores(j, s, e, buf):
        base_f[: e - s].copy_(base[s:e])
        return buf.copy_(expert[s:e]).sub_(base_f[: e - s]).abs_()

    got, finite, _ = _sampled_thresholds(scores, lambda j, idx: expert[idx].float() - base[idx].float(), 1, numel,
                                      k, chunk, torch.device("cpu"))
    assert finite
    assert got[0] == ref  # the sample never misled on these inputs, so the fast path was the one tested


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_matches_merge_deltas(method, dtype, monkeypatch):
    """Above the sampling limit (one-pass threshold) the merge equals the radix selection's bit for bit, and
    merge_deltas up to which of the entries tied at the threshold are kept (topk's choice among ties is
    unspecified; a million fp32 deltas have a few)."""
    import sens_peft.methods.selection as methods

    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1 << 20, generator=gen).to(dtype)
    experts = [(base.float() + 0.003 * torch.randn(base.shape, generator=gen)).to(dtype) for _ in range(3)]
    coeffs = torch.tensor([0.7, 1.1, -0.3])
    fast, finite = merge_streamed(method, base, experts, coeffs, density=0.3, seed=1, name="big")
    assert finite
    if dtype == torch.float32:
        ref = base + merge_deltas(method, [e - base for e in experts], coeffs, density=0.3, seed=1, name="big")
        assert int((fast != ref).sum()) <= (0 if method == "dare_ties" else 20)
    monkeypatch.setattr(methods, "_SAMPLE_MIN_NUMEL", 1 << 40)
    slow, _ = merge_streamed(method, base, experts, coeffs, density=0.3, seed=1, name="big")
    assert torch.equal(slow.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_round_trip(n):
    from sens_peft.methods import pack_bits, unpack_bits

    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=gen) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    # bit i of byte j is entry 8j + i
    assert [int(packed[j]) >> i & 1 for j in range(packed.numel()) for i in range(8)][:n] == mask.int().tolist()
    out = torch.empty(n)
    assert torch.equal(unpack_bits(packed, n, out), mask.float())
    for k in (1, 3):  # slices on byte borders unpack their own entries
        if 8 * k < n:
            assert torch.equal(unpack_bits(packed[k:], n - 8 * k, torch.empty(n - 8 * k)), mask[8 * k:].float())


@pytest.mark.parametrize("case", ["bf16-ties", "runs", "fp32"])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.97])
@pytest.mark.parametrize("sampled", [True, False])
def test_trim_keeps_first_ties_in_index_order(case, density, sampled, monkeypatch):
    """Exactly k kept; the kept entries are everything above the threshold and, of the entries equal to it, a
    prefix in index order: the one-pass (per-chunk tie counts) and the radix (scan) paths give the same mask."""
    import sens_peft.methods.selection as methods

    if not sampled:
        monkeypatch.setattr(methods, "_SAMPLE_MIN_NUMEL", 1 << 40)
    base, expert = next((b, e) for name, b, e in _score_cases() if name == case)
    scores = (expert.float() - base.float()).abs()
    k = int(density * scores.numel())
    mask, finite = _trim_mask_streamed(expert, base, density, 1 << 16)
    assert finite and int(mask.sum()) == k
    threshold = scores[mask].min()
    assert bool((scores[~mask] <= threshold).all()) and bool(mask[scores > threshold].all())
    tied = torch.nonzero(scores == threshold).reshape(-1)
    kept = mask[tied]
    assert 0 < int(kept.sum()) <= tied.numel()
    assert bool(kept[: int(kept.sum())].all())  # a prefix of the ties, in index order


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spans_of_a_partition_give_the_whole_merge(method, dtype):
    """Merging the spans of a partition into one ``out`` gives the one-call tensor bit for bit, whatever the span
    borders (multiples of 8, not of the chunk), with thresholds selected ahead or masks drawn inline or ahead."""
    base, experts = _inputs((61, 97), dtype, seed=2)
    coeffs = [0.9, -0.4, 1.3]
    kw = dict(density=0.4, seed=5, name="w", chunk=1000)
    ahead = {}
    if method == "ties":
        ahead = {"thresholds": trim_thresholds(base, experts, 0.4)}
    whole, _ = merge_streamed(method, base, experts, coeffs, **kw, **ahead)
    variants = [ahead]
    if method.startswith("dare"):
        variants.append({"dare_masks": dare_masks(base.numel(), 3, 0.4, 5, "w")})
    for extra in variants:
        out = torch.full_like(base, float("nan"))  # an entry no span writes would stay NaN
        finite = True
        for span in [(0, 1608), (1608, 1616), (1616, 4000), (4000, base.numel())]:
            _, ok = merge_streamed(method, base, experts, coeffs, **kw, **extra, out=out, span=span)
            finite = finite and ok
        assert finite and torch.equal(out, whole)


def test_span_is_validated():
    base, experts = _inputs((100,), torch.float32)
    for span in [(4, 50), (0, 101), (60, 50), (-8, 50)]:
        with pytest.raises(ValueError, match="span"):
            merge_streamed("ties", base, experts, [1.0, 1.0, 1.0], density=0.5, span=span)


def test_thresholds_and_masks_of_expert_groups_equal_those_of_all_experts():
    """Each expert's trim and counter mask depend on nothing else: groups of experts give the same values."""
    base, experts = _inputs((2 ** 21,), torch.bfloat16, seed=4)  # above the sampled selection's minimum size
    found, finite = trim_thresholds(base, experts, 0.3)
    first, ok1 = trim_thresholds(base, experts[:2], 0.3)
    last, ok2 = trim_thresholds(base, experts[2:], 0.3)
    assert first + last == found and finite and ok1 and ok2
    masks = dare_masks(5000, 3, 0.3, 11, "w")
    for group in ([0, 1], [2], [2, 0]):
        got = dare_masks(5000, 3, 0.3, 11, "w", experts=group)
        assert all(torch.equal(g, masks[k]) for g, k in zip(got, group))
    with pytest.raises(ValueError, match="counter"):
        dare_masks(5000, 3, 0.3, 11, "w", dare_rng="torch", experts=[0])
    with pytest.raises(ValueError, match="indices"):
        dare_masks(5000, 3, 0.3, 11, "w", experts=[3])
