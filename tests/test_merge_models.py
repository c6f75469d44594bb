"""merge_models: streamed full-model merges vs float64 references, sharding, atomicity, determinism, dtypes,
and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import hash_tree, make_full_expert, read_state, save_model, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from sens_peft.io import MergeError, ShardWriter
from sens_peft.merge import merge_models

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = tiny_llama(seed=0)
    folders = {"base": save_model(base, root / "base")}
    for k in range(3):
        # norms stay equal to the base in every expert: they must be copied, not merged
        folders[f"e{k}"] = make_full_expert(base, root / f"e{k}", seed=10 + k, skip=("norm",))
    folders["base_sharded"] = save_model(base, root / "base_sharded", max_shard_size="20KB")
    folders["e0_sharded"] = make_full_expert(base, root / "e0_sharded", seed=10, skip=("norm",),
                                             max_shard_size="20KB")
    bf16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    folders["base_bf16"] = save_model(bf16, root / "base_bf16")
    for k in range(2):
        folders[f"bf16_{k}"] = make_full_expert(bf16, root / f"bf16_{k}", seed=20 + k)
    (folders["base"] / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    folders["root"] = root
    return folders


def _experts(models, n=3):
    return [models[f"e{k}"] for k in range(n)]


def _states(models, n=3):
    base = {k: v.double() for k, v in read_state(models["base"]).items()}
    experts = [{k: v.double() for k, v in read_state(models[f"e{k}"]).items()} for k in range(n)]
    return base, experts


def _ties_ref(deltas, coeffs, density):
    kept = []
    for d in deltas:
        k = int(density * d.numel())
        thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values if k > 0 else float("inf")
        kept.append(d * (d.abs() >= thresh))
    return _disjoint(torch.stack(kept), coeffs)


def _disjoint(stacked, coeffs):
    weighted = stacked * coeffs.view(-1, *([1] * (stacked.dim() - 1)))
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def _dare_ties_ref(deltas, coeffs, density, seed, name, rng):
    from sens_peft.methods import dare_keep_mask, stable_seed

    gen = torch.Generator().manual_seed(stable_seed(seed, name))
    masked = []
    for k, d in enumerate(deltas):
        if rng == "torch":
            mask = torch.bernoulli(torch.full(d.shape, density, dtype=torch.float32), generator=gen).double()
        else:  # the hash itself is checked against a pure-Python reference in test_dare_rng.py
            mask = dare_keep_mask(d.shape, density, seed, name, k).double()
        masked.append(d * mask / density)
    return _disjoint(torch.stack(masked), coeffs)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_ties-torch"])
def test_matches_float64_reference(models, tmp_path, method):
    method, _, rng = method.partition("-")
    weights = WEIGHTS if method == "task_arithmetic" else [1.0, 1.0, 1.0]
    report = merge_models(models["base"], _experts(models), tmp_path / "out", method=method, density=0.5, seed=3,
                          weights=weights, scale=0.9, sens=None, device="cpu", progress=False,
                          dare_rng=rng or "counter")
    base, experts = _states(models)
    out = read_state(tmp_path / "out")
    assert set(out) == set(base)
    coeffs = torch.tensor(weights, dtype=torch.float64) * 0.9
    for name, b in base.items():
        deltas = [e[name] - b for e in experts]
        if "norm" in name:
            assert torch.equal(out[name].double(), b), name  # identical everywhere: copied bit for bit
            continue
        if method == "task_arithmetic":
            ref = b + sum(c * d for c, d in zip(coeffs, deltas))
        elif method == "ties":
            ref = b + _ties_ref(deltas, coeffs, 0.5)
        else:
            ref = b + _dare_ties_ref(deltas, coeffs, 0.5, 3, name, rng or "counter")
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=1e-6, msg=name)
    assert report.details["copied_tensors"] == sum("norm" in n for n in base)
    assert report.details["merged_tensors"] == sum("norm" not in n for n in base)
    # side files
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md", "merge_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: transformers" in card and f"- {method}" in card
    assert (f"(DARE masks: `{rng or 'counter'}`)" in card) == (method == "dare_ties")


def test_sharded_input_and_output_identical(models, tmp_path):
    kw = dict(method="dare_ties", density=0.7, seed=1, sens=None, device="cpu", progress=False)
    merge_models(models["base"], [models["e0"], models["e1"]], tmp_path / "plain", **kw)
    report = merge_models(models["base_sharded"], [models["e0_sharded"], models["e1"]], tmp_path / "sharded",
                          max_shard_size="16KB", **kw)
    assert (models["base_sharded"] / "model.safetensors.index.json").is_file()
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(report.details["shards"])
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    a, b = read_state(tmp_path / "plain"), read_state(tmp_path / "sharded")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for shard in shards:  # every shard respects the limit (each tensor here is below it)
        assert sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "sharded" / shard)).values()) \
            <= 16_000


def test_inputs_unchanged_and_deterministic(models, tmp_path):
    before = {k: hash_tree(models[k]) for k in ("base", "e0", "e1", "e2")}
    kw = dict(method="dare_ties", density=0.5, seed=11, sens=None, device="cpu", progress=False)
    merge_models(models["base"], _experts(models), tmp_path / "a", **kw)
    merge_models(models["base"], _experts(models), tmp_path / "b", **kw)
    merge_models(models["base"], _experts(models), tmp_path / "c", **{**kw, "seed": 12})
    assert {k: hash_tree(models[k]) for k in before} == before
    fa, fb = hash_tree(tmp_path / "a"), hash_tree(tmp_path / "b")
    assert fa["model.safetensors"] == fb["model.safetensors"]
    assert hash_tree(tmp_path / "c")["model.safetensors"] != fa["model.safetensors"]


def test_failure_mid_merge_leaves_no_output(models, tmp_path, monkeypatch):
    calls = []

    def failing(self, tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        save_file(tensors, str(path), metadata=self.metadata)

    monkeypatch.setattr(ShardWriter, "write_shard", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_models(models["base"], _experts(models), tmp_path / "out", max_shard_size="16KB", sens=None,
                     device="cpu", progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_dtype_preserved_and_overridden(models, tmp_path):
    from transformers import AutoModelForCausalLM

    experts = [models["bf16_0"], models["bf16_1"]]
    merge_models(models["base_bf16"], experts, tmp_path / "bf16", method="task_arithmetic", sens=None, device="cpu",
                 progress=False)
    out = read_state(tmp_path / "bf16")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    base = read_state(models["base_bf16"])
    ex = [read_state(e) for e in experts]
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = base[name].float() + sum(e[name].float() - base[name].float() for e in ex)
    assert torch.equal(out[name], ref.to(torch.bfloat16))  # fp32 math, one rounding at the end
    merge_models(models["base_bf16"], experts, tmp_path / "fp32", dtype="float32", sens=None, device="cpu",
                 progress=False)
    assert {t.dtype for t in read_state(tmp_path / "fp32").values()} == {torch.float32}
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_errors(models, tmp_path):
    root = models["root"]
    with pytest.raises(MergeError, match="no experts"):
        merge_models(models["base"], [], tmp_path / "o", sens=None)
    with pytest.raises(MergeError, match="more than once"):
        merge_models(models["base"], [models["e0"], models["e0"]], tmp_path / "o", sens=None)
    (tmp_path / "exists").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_models(models["base"], _experts(models), tmp_path / "exists", sens=None)
    with pytest.raises(MergeError, match="overlaps the input"):
        merge_models(models["base"], _experts(models), models["e0"] / "merged", sens=None)
    # sens requested, no sidecars
    with pytest.raises(MergeError, match=r"expert 'e0'.*sensitivity\.safetensors is missing"):
        merge_models(models["base"], _experts(models), tmp_path / "o", sens="task")
    # vocabulary size (like 32000 vs 32001 after adding a token)
    vocab = save_model(tiny_llama(seed=0, vocab_size=97), root / "vocab97")
    with pytest.raises(MergeError, match=r"vocab_size: base.*=96.*=97"):
        merge_models(models["base"], [models["e0"], vocab], tmp_path / "o", sens=None)
    # architecture
    gpt = save_model(tiny_gpt2(), root / "gpt2")
    with pytest.raises(MergeError, match="architectures"):
        merge_models(models["base"], [gpt], tmp_path / "o", sens=None)
    # same config, one tensor reshaped / one missing: name expert, file, tensor, shapes
    bad = root / "bad_shape"
    shutil.copytree(models["e1"], bad, dirs_exist_ok=True)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"expert 'bad_shape'.*model\.layers\.1\.mlp\.up_proj\.weight.*"
                                         r"model\.safetensors.*\[63, 32\].*\[64, 32\]"):
        merge_models(models["base"], [models["e0"], bad], tmp_path / "o", sens=None)
    missing = root / "missing"
    shutil.copytree(models["e1"], missing, dirs_exist_ok=True)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"expert 'missing'.*lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        merge_models(models["base"], [missing], tmp_path / "o", sens=None)
    # pickle checkpoints refused without allow_pickle
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(models["e1"] / "config.json", pickled / "config.json")
    torch.save(load_file(str(models["e1"] / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(MergeError, match="allow_pickle=True"):
        merge_models(models["base"], [pickled], tmp_path / "o", sens=None)
    report = merge_models(models["base"], [pickled], tmp_path / "pk", sens=None, allow_pickle=True, device="cpu",
                          progress=False)
    assert report.details["merged_tensors"] > 0
    assert not (tmp_path / "o").exists()


def test_sens_task_cross_full_experts(models, tmp_path):
    """Sidecars in expert folders; transferability computed by loading one expert at a time; every tensor is
    base + Σ_k c_k[group] δ_k with the report's table."""
    from helpers import write_sidecars

    experts = []
    for k, scores in enumerate([[3.0, 1.0], [1.0, 2.0], [0.5, 4.0]]):
        folder = tmp_path / f"s{k}"
        shutil.copytree(models[f"e{k}"], folder)
        write_sidecars(folder, scores, probe_seed=k)
        experts.append(folder)
    report = merge_models(models["base"], experts, tmp_path / "out", method="task_arithmetic", sens="task+cross",
                          temperature=0.5, normalization="mean1", tau_normalization="exp_z", max_ratio=None, device="cpu",
                          progress=False)
    assert report.transfer is not None and tuple(report.transfer.shape) == (3, 3)
    table = report.coefficients
    assert not torch.allclose(table.for_group("layers.0"), table.for_group("layers.1"))
    base, ex = _states(models)
    out = read_state(tmp_path / "out")
    for name, b in base.items():
        c = table.for_name(name).double()
        ref = b + sum(c[k] * (ex[k][name] - b) for k in range(3))
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "out" / "merge_config.json").read_text())
    assert record["config"]["sens"] == "task+cross" and record["coefficients"]["experts"] == ["s0", "s1", "s2"]
