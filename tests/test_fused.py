"""sens_peft.fused: the C loops of the streamed TIES / DARE-TIES merge give the torch path's bits."""

import logging
import os

import pytest
import torch
from helpers import hash_tree, make_full_expert, read_state, save_model, tiny_llama

import sens_peft.fused as fused
from sens_peft.merge import merge_models
from sens_peft.methods import dare_masks, merge_streamed, trim_thresholds
from sens_peft.store import SensitivityRecord, save_sensitivity

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused loops could not be built here")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _inputs(numel, dtype, seed=0, num=3):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    experts = [(base.float() + 0.01 * torch.randn(numel, generator=gen)).to(dtype) for _ in range(num)]
    if dtype == torch.bfloat16:  # bf16 deltas tie a lot: the trim's tie handling gets exercised
        experts[0][: numel // 3] = base[: numel // 3]
    return base, experts


def _both(method, base, experts, coeffs, **kw):
    eager, eager_finite = merge_streamed(method, base, experts, coeffs, fused=False, **kw)
    fast, fast_finite = merge_streamed(method, base, experts, coeffs, fused=True, **kw)
    return eager, fast, eager_finite, fast_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("numel", [1, 9, 255, 257, 70_001, (1 << 20) + 13])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_same_bits_as_the_torch_ops(dtype, numel, method):
    base, experts = _inputs(numel, dtype, seed=numel)
    for density in (1.0, 0.5, 0.07):
        for sign in ("total", "frequency"):
            for coeffs in ([0.5, 0.3, 0.9], [0.7, -0.4, 0.0]):
                for weighted in (True, False):
                    eager, fast, ok_e, ok_f = _both(method, base, experts, coeffs, density=density, seed=11,
                                                    majority_sign_method=sign, weighted_election=weighted,
                                                    name="layers.0.mlp")
                    assert torch.equal(_bits(eager), _bits(fast)), (density, sign, coeffs, weighted)
                    # TIES keeping nothing reports "not ruled out" (False) either way
                    assert ok_e == ok_f == (method == "dare_ties" or int(density * numel) > 0)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_same_bits_for_fp32_output_spans_and_work_done_ahead(method):
    base, experts = _inputs(50_003, torch.bfloat16, seed=5)
    kw = dict(density=0.3, seed=2, name="w", out_dtype=torch.float32)
    eager, fast, _, _ = _both(method, base, experts, [0.4, 0.6, 0.5], **kw)
    assert fast.dtype == torch.float32 and torch.equal(_bits(eager), _bits(fast))
    if method == "ties":
        kw["thresholds"] = trim_thresholds(base, experts, 0.3)
    else:
        kw["dare_masks"] = dare_masks(base.numel(), 3, 0.3, 2, "w")  # packed masks, unpacked by the C loop
    out = torch.full((base.numel(),), float("nan"))
    for span in ((0, 8_000), (8_000, 8_008), (8_008, 50_003)):
        merge_streamed(method, base, experts, [0.4, 0.6, 0.5], fused=True, out=out, span=span, **kw)
    assert torch.equal(_bits(out), _bits(eager))


@pytest.mark.parametrize("numel", [3_001, (1 << 20) + 9])  # radix and sampled selection of the thresholds
def test_same_bits_for_the_trim_by_importance(numel):
    base, experts = _inputs(numel, torch.bfloat16, seed=12)
    gen = torch.Generator().manual_seed(1)
    maps = [torch.rand(numel, generator=gen) for _ in experts]
    maps[1] = maps[1].to(torch.bfloat16).float()  # ties among the scores
    maps[2][::7] = 0.0
    for density in (0.5, 0.05):
        kw = dict(density=density, importance=maps, trim_by="sensitivity", name="w")
        assert trim_thresholds(base, experts, density, importance=maps, fused=True) == \
            trim_thresholds(base, experts, density, importance=maps, fused=False)
        eager, fast, ok_e, ok_f = _both("ties", base, experts, [0.8, 1.1, 0.6], **kw)
        assert torch.equal(_bits(eager), _bits(fast)) and ok_e and ok_f
    experts[0][5] = float("nan")  # trimmed away by the importance trim, still reported
    assert not _both("ties", base, experts, [0.8, 1.1, 0.6], **kw)[3]


def test_dare_masks_of_the_torch_generator_go_through_the_packed_path():
    base, experts = _inputs(30_001, torch.float32, seed=3)
    eager, fast, _, _ = _both("dare_ties", base, experts, [1.0, 1.0, 1.0], density=0.4, seed=9, name="x",
                              dare_rng="torch")
    assert torch.equal(_bits(eager), _bits(fast))


def test_counter_masks_across_counter_blocks(monkeypatch):
    """Each block of counter positions has its own keys (2**24 positions; 2**12 here, so that a test-sized tensor
    spans several), also for a span that starts inside a later block."""
    import sens_peft.methods.rng as methods

    monkeypatch.setattr(methods, "COUNTER_BLOCK", 1 << 12)
    base, experts = _inputs(40_000, torch.float32, seed=4)
    kw = dict(density=0.5, seed=1, name="b")
    eager, fast, _, _ = _both("dare_ties", base, experts, [1.0, 0.5, 0.8], **kw)
    assert torch.equal(eager, fast)
    out = torch.zeros(40_000)
    merge_streamed("dare_ties", base, experts, [1.0, 0.5, 0.8], fused=True, out=out, span=(9_000, 40_000), **kw)
    assert torch.equal(out[9_000:], eager[9_000:]) and not out[:9_000].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # bf16: a run of tied scores; fp32: a band
def test_trim_thresholds_count_the_same(dtype):
    numel = (1 << 20) + 77
    base, experts = _inputs(numel, dtype, seed=8)
    for density in (0.5, 0.013, 0.999):
        eager = trim_thresholds(base, experts, density, fused=False)
        assert trim_thresholds(base, experts, density, fused=True) == eager
    experts[2][99] = float("inf")
    assert trim_thresholds(base, experts, 0.5, fused=True) == trim_thresholds(base, experts, 0.5, fused=False)
    assert trim_thresholds(base, experts, 0.5, fused=True)[1] is False


def test_a_missed_band_falls_back_the_same_way(monkeypatch):
    """A band far too narrow (so the k-th largest score is outside it) sends both paths to the radix selection."""
    import sens_peft.methods.selection as methods

    base, experts = _inputs((1 << 20) + 5, torch.float32, seed=9)
    monkeypatch.setattr(methods, "_BAND_SIGMAS", 0.0)  # +-8 sample ranks: misses most of the time
    radix = []
    original = methods._trim_threshold
    monkeypatch.setattr(methods, "_trim_threshold", lambda *a, **k: radix.append(1) or original(*a, **k))
    eager = trim_thresholds(base, experts, 0.3, fused=False)
    misses = len(radix)
    assert trim_thresholds(base, experts, 0.3, fused=True) == eager
    assert misses > 0 and len(radix) == 2 * misses
    monkeypatch.setattr(methods, "_BAND_SIGMAS", 5.0)
    assert trim_thresholds(base, experts, 0.3, fused=True) == eager


def test_non_finite_deltas_and_results_are_reported():
    base, experts = _inputs(10_000, torch.float32, seed=6)
    experts[1][1234] = float("nan")
    for method in ("ties", "dare_ties"):
        _, fast, _, ok = _both(method, base, experts, [1.0, 1.0, 1.0], density=0.5, seed=0, name="n")
        assert not ok
    base, experts = _inputs(10_000, torch.float32, seed=6)
    experts[0][7] = 3e38  # finite inputs whose merged value overflows
    experts[1][7] = 3e38
    _, fast, _, ok = _both("ties", base, experts, [2.0, 2.0, 1.0], density=1.0, name="o")
    assert not ok and torch.isinf(fast[7])


def test_inputs_it_cannot_take_fall_back_or_raise():
    base, experts = _inputs(1_000, torch.float16, seed=1)
    with pytest.raises(RuntimeError, match="fused=True"):
        merge_streamed("ties", base, experts, [1.0, 1.0, 1.0], density=0.5, fused=True)
    merged, ok = merge_streamed("ties", base, experts, [1.0, 1.0, 1.0], density=0.5)  # torch ops
    assert ok and merged.dtype == torch.float16
    assert not fused.supports(base.float(), [e.float()[::2] for e in experts], base.float())  # strided
    assert not fused.supports(base.float(), [base.float()] * (fused.MAX_EXPERTS + 1), base.float())


def test_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SENS_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(fused, "_loaded", [])
    assert fused.available()
    (built,) = (tmp_path / "kernels").glob("ties_merge-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(fused, "_loaded", [])
    assert fused.available() and built.stat().st_mtime_ns == stamp
    assert not list((tmp_path / "kernels").glob("*.tmp"))


def test_without_a_compiler_the_torch_ops_run_and_it_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SENS_PEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", os.path.join(str(tmp_path), "no-such-compiler"))
    monkeypatch.setattr(fused, "_loaded", [])
    with caplog.at_level(logging.WARNING, logger="sens_peft.fused"):
        assert not fused.available()
    assert "torch ops" in caplog.text
    base, experts = _inputs(5_000, torch.bfloat16, seed=2)
    with pytest.raises(RuntimeError, match="fused=True"):
        merge_streamed("ties", base, experts, [1.0, 1.0, 1.0], density=0.5, fused=True)
    merged, ok = merge_streamed("ties", base, experts, [1.0, 1.0, 1.0], density=0.5)
    monkeypatch.setattr(fused, "_loaded", [])
    monkeypatch.delenv("CC")
    assert ok and torch.equal(_bits(merged), _bits(merge_streamed("ties", base, experts, [1.0, 1.0, 1.0],
                                                                  density=0.5, fused=True)[0]))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SENS_PEFT_FUSED", "0")
    monkeypatch.setattr(fused, "_loaded", [])
    assert not fused.available()


def _element_maps(folder, seed):
    """A sidecar with an importance map for every tensor of the expert in ``folder``."""
    state = read_state(folder)
    gen = torch.Generator().manual_seed(seed)
    maps = {name: torch.rand(t.shape, generator=gen) for name, t in state.items()}
    names = sorted(state)
    save_sensitivity(SensitivityRecord(groups=["all"], group_scores=torch.ones(1), tensor_names=names,
                                       tensor_scores=torch.ones(len(names)), element_maps=maps,
                                       metadata={"estimator": "taylor_abs", "weight_source": "theta",
                                                 "mode": "after"}), folder)


@pytest.mark.parametrize("method,trim_by", [("ties", "magnitude"), ("dare_ties", "magnitude"),
                                            ("ties", "sensitivity")])
def test_merge_models_writes_the_same_bytes_with_and_without_the_fused_loops(tmp_path, monkeypatch, method,
                                                                            trim_by):
    base = tiny_llama(seed=0, dtype=torch.bfloat16)
    base_dir = save_model(base, tmp_path / "base")
    experts = [make_full_expert(base, tmp_path / f"e{k}", seed=k + 1) for k in range(3)]
    if trim_by == "sensitivity":
        for k, folder in enumerate(experts):
            _element_maps(folder, k)
    kw = dict(method=method, density=0.4, seed=5, sens=None, device="cpu", progress=False, trim_by=trim_by)
    original, drops = fused.ties_merge, []

    def spy(*args, **kwargs):
        drops.append(kwargs["drop"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "ties_merge", spy)
    merge_models(base_dir, experts, tmp_path / "fast", **kw)
    assert set(drops) == {{"ties": "trim", "dare_ties": "counter"}[method] if trim_by == "magnitude" else "importance"}
    monkeypatch.setattr(fused, "_loaded", [None])
    merge_models(base_dir, experts, tmp_path / "eager", **kw)
    assert hash_tree(tmp_path / "fast") == hash_tree(tmp_path / "eager")
