"""Gram and Fisher capture in the calibration pass, against float64 references built from the same batches."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama, train_args  # noqa: E402

from sens_peft.config import SensitivityConfig  # noqa: E402
from sens_peft.errors import SidecarError  # noqa: E402
from sens_peft.sensitivity.calibrate import (  # noqa: E402
    CalibrationPass,
    compute_sensitivity,
    iter_calibration_batches,
    run_calibration,
)
from sens_peft.sensitivity.callback import SensitivityCallback  # noqa: E402
from sens_peft.store import load_sensitivity, save_sensitivity  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
L0 = "model.layers.0."


class Ragged(torch.utils.data.Dataset):
    """Sequences of different lengths, so batches of 2+ hold padding; the first 2 tokens are an unscored prompt."""

    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(3, 64, (int(torch.randint(4, 11, (1,), generator=g)),), generator=g)
                     for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = self.rows[i]
        labels = ids.clone()
        labels[:2] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _reference_grams(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """sum over batches of X^T X (float64) of each module's input, non-padding rows, from independent hooks."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs[n].append(args[0].detach()))
               for n, m in modules.items()]
    out = {n: 0.0 for n in modules}
    try:
        with torch.no_grad():
            for batch in batches:
                for xs in inputs.values():
                    xs.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                keep = batch["attention_mask"].reshape(-1).bool()
                for n, xs in inputs.items():
                    (x,) = xs
                    rows = x.reshape(-1, x.shape[-1])[keep].double()
                    out[n] = out[n] + rows.T @ rows
    finally:
        for h in handles:
            h.remove()
    return out


def _base_layers(peft_model, names=ALL, layer: int = 0) -> dict[str, nn.Module]:
    block = peft_model.base_model.model.model.layers[layer]
    out = {}
    for n in names:
        parent = block.self_attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
        out[f"model.layers.{layer}.{'self_attn' if parent is block.self_attn else 'mlp'}.{n}.weight"] = (
            getattr(parent, n).get_base_layer())
    return out


@pytest.fixture(scope="module")
def lora_all():
    return lora(tiny_llama(seed=0), targets=ALL)


def test_lora_gram_equals_hooked_inputs_and_aliases(lora_all):
    data = Ragged(n=8)
    cfg = SensitivityConfig(calibration_samples=6, calibration_batch_size=2, gram="full")
    rec = run_calibration(lora_all, data, cfg)
    batches = list(iter_calibration_batches(data, cfg))
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding present, so the mask matters
    ref = _reference_grams(lora_all, _base_layers(lora_all), batches)
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    for name, expected in ref.items():
        got = rec.statistic("gram", name)
        assert got is not None and got.dtype == torch.float32 and got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
        assert rec.statistic_count("gram", name) == tokens
    # q/k/v read one tensor, gate/up another: stored once each, with aliases
    assert rec.gram_aliases[L0 + "self_attn.k_proj.weight"] == L0 + "self_attn.q_proj.weight"
    assert rec.gram_aliases[L0 + "self_attn.v_proj.weight"] == L0 + "self_attn.q_proj.weight"
    assert rec.gram_aliases[L0 + "mlp.up_proj.weight"] == L0 + "mlp.gate_proj.weight"
    assert L0 + "self_attn.o_proj.weight" not in rec.gram_aliases
    assert len(rec.grams) == 2 * 4  # 2 layers x (qkv, o, gate/up, down)
    assert rec.metadata["gram_mode"] == "full"


def test_full_model_grams_fisher_and_diag():
    model = tiny_llama(seed=1)
    data = TokenData(n=6, length=8, seed=2)
    cfg = SensitivityConfig(calibration_samples=4, gram="full", fisher=True)
    rec = run_calibration(model, data, cfg)
    batches = list(iter_calibration_batches(data, cfg))
    mods = {"lm_head.weight": model.lm_head, L0 + "mlp.down_proj.weight": model.model.layers[0].mlp.down_proj,
            L0 + "self_attn.v_proj.weight": model.model.layers[0].self_attn.v_proj}
    ref = _reference_grams(model, mods, batches)
    for name, expected in ref.items():
        torch.testing.assert_close(rec.statistic("gram", name).double(), expected, rtol=1e-5, atol=1e-4)
    assert rec.gram_owner(L0 + "self_attn.v_proj.weight") == L0 + "self_attn.q_proj.weight"
    # embeddings and norms are not Linear: no Gram
    assert rec.statistic("gram", "model.embed_tokens.weight") is None
    # Fisher: mean over samples of the squared per-sample gradient (batch size 1), from a plain loop
    fisher_ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            fisher_ref[n] += p.grad.double() ** 2 / len(batches)
    model.zero_grad()
    assert set(rec.fisher) == set(rec.tensor_names)
    for n in ("lm_head.weight", L0 + "mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(rec.statistic("fisher", n).double(), fisher_ref[n], rtol=1e-4, atol=1e-12)
    assert rec.metadata["fisher_estimator"] == "per_sample_grad_sq" and rec.statistic_count("fisher") == 4
    # diagonal mode stores the diagonals of the same sums; "auto" over budget falls back to it
    for diag_cfg in (SensitivityConfig(calibration_samples=4, gram="diag", fisher=False),
                     SensitivityConfig(calibration_samples=4, gram="auto", gram_max_bytes=1000, fisher=False)):
        diag = run_calibration(model, data, diag_cfg)
        assert diag.metadata["gram_mode"] == "diag" and not diag.fisher
        for name in ref:
            torch.testing.assert_close(diag.statistic("gram", name), torch.diagonal(rec.statistic("gram", name)),
                                       rtol=1e-5, atol=1e-5)


def test_auto_budget_keeps_narrow_inputs_full(lora_all):
    """gram="auto" over budget for the 64-wide down_proj input: hidden-width Grams full, down_proj diagonal."""
    data = TokenData(n=4, length=8, seed=8)
    full = run_calibration(lora_all, data, SensitivityConfig(calibration_samples=2, gram="full", fisher=False))
    # 2 layers x 3 distinct 32-wide inputs x 32*32*4 bytes = 24576 fit; the 64-wide down_proj Grams (32768) do not
    mixed = run_calibration(lora_all, data, SensitivityConfig(calibration_samples=2, gram="auto",
                                                              gram_max_bytes=30000, fisher=False))
    assert mixed.metadata["gram_mode"] == "mixed"
    for name in full.grams:
        got, ref = mixed.statistic("gram", name), full.statistic("gram", name)
        if "down_proj" in name:
            assert got.dim() == 1
            torch.testing.assert_close(got, torch.diagonal(ref), rtol=1e-5, atol=1e-5)
        else:
            assert got.dim() == 2
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # with a rank below the 64-wide input, the rest of the budget holds a sketch of down_proj instead of its diagonal
    sketched = run_calibration(lora_all, data, SensitivityConfig(calibration_samples=2, gram="auto", gram_rank=8,
                                                                 gram_max_bytes=30000, fisher=False))
    name = L0 + "mlp.down_proj.weight"
    assert sketched.statistic("gram_factor", name).shape == (64, 8)
    assert sketched.statistic("gram", L0 + "self_attn.q_proj.weight").dim() == 2
    assert sketched.statistic("gram_factor", L0 + "self_attn.q_proj.weight") is None
    # no room for the sketch either (24576 + 2 * 64 * 9 * 4 bytes > 25000): diagonal
    tight = run_calibration(lora_all, data, SensitivityConfig(calibration_samples=2, gram="auto", gram_rank=8,
                                                              gram_max_bytes=25000, fisher=False))
    assert tight.statistic("gram", name).dim() == 1 and tight.statistic("gram_factor", name) is None


def test_lora_fisher_is_squared_weight_gradient(lora_all):
    """theta source: the Fisher map is E[(dL/dW)^2] of the adapted weight, checked on a merged dense copy."""
    data = TokenData(n=6, length=8, seed=5)
    for bs in (1, 3):
        cfg = SensitivityConfig(calibration_samples=6, calibration_batch_size=bs, fisher=True, gram="none")
        rec = run_calibration(lora_all, data, cfg)
        assert not rec.grams
        dense = copy.deepcopy(lora_all).merge_and_unload()
        batches = list(iter_calibration_batches(data, cfg))
        w = dense.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
        ref = torch.zeros_like(w, dtype=torch.float64)
        for batch in batches:
            dense.zero_grad()
            dense(**batch).loss.backward()
            ref += bs * w.grad.double() ** 2 / len(batches)
        got = rec.statistic("fisher", "model.layers.1.mlp.down_proj.weight")
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-12)
        expected = "per_sample_grad_sq" if bs == 1 else "batch_grad_sq_times_batch_size"
        assert rec.metadata["fisher_estimator"] == expected


def test_two_halves_sum_to_the_whole(lora_all):
    """Sums are additive: what ranks with halves of the data all-reduce (or a resumed pass adds) is the whole."""
    data = Ragged(n=8, seed=1)
    cfg = SensitivityConfig(calibration_samples=8, calibration_batch_size=2, gram="full", fisher=True)
    batches = list(iter_calibration_batches(data, cfg))
    whole = CalibrationPass(lora_all, cfg)
    whole.run(batches)
    first, second = CalibrationPass(lora_all, cfg), CalibrationPass(lora_all, cfg)
    first.run(batches[:1])
    second.run(batches[1:])
    first.stats.merge_(second.stats)
    assert first.stats.aliases == whole.stats.aliases
    for name, value in whole.stats.grams.items():
        torch.testing.assert_close(first.stats.grams[name], value, rtol=1e-5, atol=1e-5)
        assert int(first.stats.gram_tokens[name]) == int(whole.stats.gram_tokens[name])
    for name, value in whole.stats.fisher.items():
        torch.testing.assert_close(first.stats.fisher[name], value, rtol=1e-5, atol=1e-12)
    assert int(first.stats.fisher_batches) == int(whole.stats.fisher_batches) == 4


def _rewrite(path: Path, drop=(), **meta_changes):
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in drop}
    meta.update(meta_changes)
    return tensors, meta


def test_sidecar_roundtrip_bf16_and_old_version(lora_all, tmp_path):
    data = TokenData(n=4, length=8, seed=6)
    rec = compute_sensitivity(lora_all, data, calibration_samples=3, gram="full", gram_dtype="bfloat16", fisher=True,
                              save_to=tmp_path / "x", store_probe=False)
    loaded = load_sensitivity(tmp_path / "x")
    assert loaded.metadata["format_version"] == "2" and loaded.metadata["gram_dtype"] == "bfloat16"
    assert loaded.gram_aliases == rec.gram_aliases and loaded.gram_tokens == rec.gram_tokens
    assert set(loaded.grams) == set(rec.grams) and all(g.dtype == torch.bfloat16 for g in loaded.grams.values())
    assert "LazyTensors" in repr(loaded.grams)  # read from the file on access, not held in memory
    save_sensitivity(loaded, tmp_path / "copy")  # a loaded record saves again (format 2, statistics included)
    again = load_sensitivity(tmp_path / "copy")
    assert again.gram_aliases == rec.gram_aliases and set(again.fisher) == set(rec.fisher)
    torch.testing.assert_close(again.statistic("gram", L0 + "mlp.down_proj.weight"),
                               loaded.statistic("gram", L0 + "mlp.down_proj.weight"), rtol=0, atol=0)
    peft_name = "base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight"
    got = loaded.statistic("gram", peft_name)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rec.statistic("gram", L0 + "self_attn.q_proj.weight"), rtol=0, atol=0)
    torch.testing.assert_close(got, torch.triu(got) + torch.triu(got, 1).T)  # stored exactly symmetric
    for name in rec.fisher:
        torch.testing.assert_close(loaded.statistic("fisher", name), rec.statistic("fisher", name))
        torch.testing.assert_close(loaded.statistic("element_maps", name), rec.element_maps[name])
    with pytest.raises(ValueError, match="unknown statistic kind"):
        loaded.statistic("hessian", peft_name)
    # a version-1 file (no statistics) still loads
    file = tmp_path / "x" / "sensitivity.safetensors"
    keys = [k for k in safe_open(str(file), framework="pt").keys() if k.startswith(("gram.", "fisher."))]
    tensors, meta = _rewrite(file, drop=keys, format_version="1")
    meta.pop("gram_aliases")
    meta.pop("gram_tokens")
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    old = load_sensitivity(tmp_path / "v1.safetensors")
    assert old.statistic("gram", peft_name) is None and old.statistic("fisher", L0 + "self_attn.q_proj.weight") is None
    torch.testing.assert_close(old.tensor_scores, rec.tensor_scores)


@pytest.mark.parametrize("case,pattern", [
    ("negative", "negative diagonal"), ("asymmetric", "not symmetric"), ("nan", "NaN or Inf"),
    ("alias", "gram_aliases"), ("tokens", "no token count"), ("fisher", "negative entries"),
    ("shape", r"expected \[in, in\]"),
])
def test_bad_statistics_name_file_and_tensor(lora_all, tmp_path, case, pattern):
    data = TokenData(n=3, length=6, seed=7)
    compute_sensitivity(lora_all, data, calibration_samples=2, gram="full", fisher=True, save_to=tmp_path,
                        store_probe=False)
    file = tmp_path / "sensitivity.safetensors"
    tensors, meta = _rewrite(file)
    gram_key = "gram." + L0 + "self_attn.q_proj.weight"
    g = tensors[gram_key]
    if case == "negative":
        g[0, 0] = -1.0
    elif case == "asymmetric":
        g[0, 1] += 10.0 * float(torch.diagonal(g).max())
    elif case == "nan":
        g[1, 1] = float("nan")
    elif case == "alias":
        meta["gram_aliases"] = json.dumps({"a.weight": "missing.weight"})
    elif case == "tokens":
        meta["gram_tokens"] = json.dumps({})
    elif case == "fisher":
        next(v for k, v in tensors.items() if k.startswith("fisher."))[0] = -1.0
    elif case == "shape":
        tensors[gram_key] = g[:, :3].contiguous()
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(SidecarError, match=pattern) as info:
        # names, shapes, aliases and counts are checked at load; values when a tensor is read (lazily)
        load_sensitivity(tmp_path).check_statistics()
    assert str(file) in str(info.value)
    if case in ("negative", "asymmetric", "nan"):
        record = load_sensitivity(tmp_path)
        with pytest.raises(SidecarError, match=pattern):
            record.statistic("gram", L0 + "self_attn.k_proj.weight")  # an alias of the bad tensor
    if case not in ("alias", "tokens", "fisher"):
        assert gram_key in str(info.value)


def test_callback_after_mode_stores_statistics(tmp_path):
    cb = SensitivityCallback(task="toy", calibration_samples=3, store_probe=False, gram="full", fisher=True)
    model = lora(tiny_llama(seed=0), init_random=False, targets=("q_proj", "v_proj", "down_proj"))
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2), train_dataset=TokenData(n=8),
                      callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    cb.detach()
    loaded = load_sensitivity(tmp_path / "final")
    assert loaded.gram_aliases == {L0 + "self_attn.v_proj.weight": L0 + "self_attn.q_proj.weight",
                                   "model.layers.1.self_attn.v_proj.weight": "model.layers.1.self_attn.q_proj.weight"}
    assert loaded.statistic("gram", L0 + "mlp.down_proj.weight").shape == (64, 64)
    assert set(loaded.fisher) == set(loaded.tensor_names)
    assert loaded.statistic_count("gram", L0 + "self_attn.v_proj.weight") == 3 * 12


def test_during_mode_captures_no_grams(tmp_path):
    cb = SensitivityCallback(mode="during", store_probe=False)
    trainer = Trainer(model=lora(tiny_llama(seed=0), init_random=False), args=train_args(tmp_path, max_steps=2),
                      train_dataset=TokenData(n=8), callbacks=[cb])
    trainer.train()
    cb.detach()
    assert not cb.record.grams and not cb.record.fisher


@pytest.mark.distributed
def test_ddp_all_reduce_of_rank_shares_equals_one_pass(tmp_path):
    """Two gloo ranks with alternate batches, all-reduced, equal one process over all batches."""
    import os
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    worker = Path(__file__).parent / "scripts" / "stats_ddp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    for cmd in ([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(worker), str(tmp_path)],
                [sys.executable, str(worker), str(tmp_path)]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reduced, whole = torch.load(tmp_path / "reduced.pt"), torch.load(tmp_path / "whole.pt")
    assert reduced["aliases"] == whole["aliases"] and len(whole["aliases"]) == 4
    assert int(reduced["batches"]) == int(whole["batches"]) == 3
    for key in ("grams", "fisher"):
        assert set(reduced[key]) == set(whole[key])
        for name, value in whole[key].items():
            torch.testing.assert_close(reduced[key][name], value, rtol=1e-5, atol=1e-10)
    assert {k: int(v) for k, v in reduced["tokens"].items()} == {k: int(v) for k, v in whole["tokens"].items()}


def test_captured_grams_drive_regmean_to_the_least_squares_merge():
    """Capture + math end to end: LoRA experts' captured Grams (by base weight name) give the delta that fits
    every expert's outputs on its own calibration inputs best (float64 least squares on independently hooked
    inputs), through the exact LoRA factor form."""
    from sens_peft.regmean import regmean_lora_factors

    name = L0 + "self_attn.q_proj.weight"
    experts, records, xs = [], [], []
    for k in range(2):
        base = tiny_llama(seed=0)
        torch.manual_seed(100 + k)
        expert = lora(base, init_random=True)
        data = TokenData(n=6, length=9, seed=20 + k)
        cfg = SensitivityConfig(calibration_samples=5, gram="full", fisher=False)
        records.append(run_calibration(expert, data, cfg))
        layer = expert.base_model.model.model.layers[0].self_attn.q_proj
        hooked: list[torch.Tensor] = []
        handle = layer.get_base_layer().register_forward_hook(lambda m, a, o, h=hooked: h.append(a[0].detach()))
        with torch.no_grad():
            for batch in iter_calibration_batches(data, cfg):
                expert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        xs.append(torch.cat([h.reshape(-1, h.shape[-1]) for h in hooked]).double())
        experts.append(layer)
    As = [m.lora_A["default"].weight.detach() for m in experts]
    Bs = [m.lora_B["default"].weight.detach() for m in experts]
    scalings = [float(m.scaling["default"]) for m in experts]
    grams = [r.statistic("gram", name) for r in records]
    a, b = regmean_lora_factors(As, Bs, scalings, grams, alpha=1.0)
    deltas = [s * bb.double() @ aa.double() for aa, bb, s in zip(As, Bs, scalings)]
    x = torch.cat(xs)
    y = torch.cat([xk @ d.T for xk, d in zip(xs, deltas)])
    reference = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close((b.double() @ a.double()), reference, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(reference, (deltas[0] + deltas[1]) / 2, rtol=1e-2, atol=1e-4)  # not a plain average


def test_lowrank_grams(lora_all, tmp_path):
    """gram="lowrank": exact when the tokens span fewer than k directions; exact diagonal and better than the
    diagonal alone otherwise; inputs no wider than k kept full; saved and loaded."""
    short = TokenData(n=2, length=8, seed=11)  # one sample: 8 tokens, so every Gram has rank <= 8 < k = 16
    full = run_calibration(lora_all, short, SensitivityConfig(calibration_samples=1, gram="full", fisher=False))
    low = run_calibration(lora_all, short, SensitivityConfig(calibration_samples=1, gram="lowrank", gram_rank=16,
                                                             fisher=False))
    assert low.metadata["gram_mode"] == "lowrank" and low.metadata["gram_rank"] == "16"
    for name in full.grams:
        assert low.statistic("gram_factor", name).shape == (full.grams[name].shape[0], 16)
        ref = full.statistic("gram", name)
        torch.testing.assert_close(low.statistic("gram", name), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    save_sensitivity(low, tmp_path)
    loaded = load_sensitivity(tmp_path)
    name = L0 + "self_attn.v_proj.weight"  # an alias of q_proj
    torch.testing.assert_close(loaded.statistic("gram", name), low.statistic("gram", name))
    assert loaded.statistic("gram_factor", name).shape == (32, 16)
    # more tokens than k: approximate, diagonal exact; a k as wide as the hidden size keeps those inputs full
    long = TokenData(n=6, length=12, seed=12)
    cfg = dict(calibration_samples=6, fisher=False)
    full = run_calibration(lora_all, long, SensitivityConfig(gram="full", **cfg))
    low = run_calibration(lora_all, long, SensitivityConfig(gram="lowrank", gram_rank=32, **cfg))
    for name in full.grams:
        ref, got = full.statistic("gram", name), low.statistic("gram", name)
        if "down_proj" in name:
            assert low.statistic("gram_factor", name).shape == (64, 32)
            torch.testing.assert_close(torch.diagonal(got), torch.diagonal(ref), rtol=1e-4, atol=1e-4)
            assert float((got - ref).norm()) < 0.5 * float((torch.diag(torch.diagonal(ref)) - ref).norm())
        else:
            assert low.statistic("gram_factor", name) is None
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_alias_that_stops_sharing_gets_its_own_sums():
    """Sharing is decided on the first batch; a module that later reads another tensor is split off with a copy
    of the sums so far, so both Grams stay exact."""
    from sens_peft.sensitivity.stats import CalibrationStats

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.share = nn.Linear(4, 3), nn.Linear(4, 3), True

        def forward(self, x: torch.Tensor) -> None:
            self.a(x)
            self.b(x if self.share else 2.0 * x)

    model = Two()
    stats = CalibrationStats([("a.weight", model.a), ("b.weight", model.b)], gram="full")
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    for share, x in ((True, x1), (False, x2)):
        model.share = share
        handles = stats.install(None)
        model(x)
        stats.after_forward()
        for h in handles:
            h.remove()
        if share:
            assert stats.aliases == {"b.weight": "a.weight"}
    assert stats.aliases == {}
    r1, r2 = x1.reshape(-1, 4).double(), x2.reshape(-1, 4).double()
    torch.testing.assert_close(stats.grams["a.weight"].double(), r1.T @ r1 + r2.T @ r2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.grams["b.weight"].double(), r1.T @ r1 + 4 * r2.T @ r2, rtol=1e-5, atol=1e-5)
    assert int(stats.gram_tokens["b.weight"]) == 20
