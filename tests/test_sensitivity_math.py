"""Estimator math against hand computations and float64 autograd references."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama  # noqa: E402

from sens_peft.config import SensitivityConfig  # noqa: E402
from sens_peft.groups import layer_group  # noqa: E402
from sens_peft.sensitivity import estimators as est  # noqa: E402
from sens_peft.sensitivity.accumulator import SensitivityAccumulator  # noqa: E402
from sens_peft.sensitivity.calibrate import run_calibration  # noqa: E402


def test_taylor_scores_hand_values():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    g = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    v = torch.tensor([2.0, -3.0])
    h = torch.tensor([-1.0, -1.0])
    abs_s, signed = est.taylor_scores([w, v], [g, h])
    # |1*.5| + |-2*.5| + |3*-1| + |4*2| = 12.5 ; signed .5 - 1 - 3 + 8 = 4.5 ; second: 2 + 3 = 5, signed -2 + 3 = 1
    assert torch.allclose(abs_s, torch.tensor([12.5, 5.0]))
    assert torch.allclose(signed, torch.tensor([4.5, 1.0]))
    assert abs_s.dtype == torch.float32
    # bf16 inputs are multiplied in fp32
    a16, _ = est.taylor_scores([w.bfloat16()], [g.bfloat16()])
    assert a16.dtype == torch.float32 and float(a16[0]) == 12.5
    # chunking does not change the result
    a_c, s_c = est.taylor_scores([w, v], [g, h], chunk_numel=3)
    assert torch.equal(a_c, abs_s) and torch.equal(s_c, signed)
    with pytest.raises(ValueError, match="shape"):
        est.taylor_scores([w], [v])
    # scores and maps from one product: the same values as the two functions, the maps sum to the scores
    a2, s2, maps = est.taylor_scores_and_maps([w, v], [g, h])
    assert torch.equal(a2, abs_s) and torch.equal(s2, signed)
    assert all(torch.equal(m, r) for m, r in zip(maps, est.taylor_element_maps([w, v], [g, h])))
    with pytest.raises(ValueError, match="shape"):
        est.taylor_scores_and_maps([w], [v])


def test_taylor_sums_are_accurate_on_large_tensors():
    """fp32 sums over millions of products stay within 1e-6 of float64 (a foreach 1-norm was 3e-3 off)."""
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(3_000_000, generator=gen), torch.randn(3_000_000, generator=gen)
    ref_abs, ref_signed = (w.double() * g.double()).abs().sum(), (w.double() * g.double()).sum()
    for a, s in (est.taylor_scores([w], [g]), est.taylor_scores_and_maps([w], [g])[:2]):
        assert abs(float(a[0]) - float(ref_abs)) <= 1e-6 * float(ref_abs)
        assert abs(float(s[0]) - float(ref_signed)) <= 1e-6 * float(ref_abs)


def test_accumulator_gates_non_finite_element_maps():
    """An update whose map holds a NaN or Inf is rejected whole (sums, maps and counters untouched)."""
    from sens_peft.sensitivity.accumulator import SensitivityAccumulator

    acc = SensitivityAccumulator(["a"], device=torch.device("cpu"), element_shapes={"a": (3,)})
    assert bool(acc.update(torch.tensor([1.0]), elements={"a": torch.tensor([1.0, 2.0, 3.0])}))
    for bad in (float("nan"), float("inf")):
        assert not bool(acc.update(torch.tensor([1.0]), elements={"a": torch.tensor([1.0, bad, 3.0])}))
    assert torch.equal(acc.elements["a"], torch.tensor([1.0, 2.0, 3.0]))
    assert int(acc.count) == 1 and int(acc.seen) == 3 and float(acc.abs_sum[0]) == 1.0


class TwoLayer(nn.Module):
    """Embedding -> Linear -> tanh -> Linear -> token cross-entropy; forward(input_ids, labels) -> .loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed_tokens = nn.Embedding(11, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 11)])

    def forward(self, input_ids, labels=None, attention_mask=None):
        h = torch.tanh(self.layers[0](self.embed_tokens(input_ids)))
        logits = self.layers[1](h)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
        return SimpleNamespace(loss=loss)


def test_full_model_scores_equal_hand_computation():
    model = TwoLayer().double()
    data = [{"input_ids": torch.tensor([1, 4, 2, 7, 3]), "labels": torch.tensor([-100, 4, 2, 7, 3])},
            {"input_ids": torch.tensor([5, 5, 9, 0, 1]), "labels": torch.tensor([-100, 5, 9, 0, 1])},
            {"input_ids": torch.tensor([2, 8, 6, 10, 4]), "labels": torch.tensor([-100, 8, 6, 10, 4])}]
    cfg = SensitivityConfig(calibration_samples=3, seed=0)
    model.train()
    rec = run_calibration(model, data, cfg)
    # grads cleared, flags and train mode restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and model.training
    names = dict(model.named_parameters())
    ref = {n: 0.0 for n in names}
    ref_signed = {n: 0.0 for n in names}
    for ex in data:
        model.zero_grad()
        model(ex["input_ids"][None], labels=ex["labels"][None]).loss.backward()
        for n, p in names.items():
            ref[n] += float((p.detach() * p.grad).abs().sum()) / 3
            ref_signed[n] += float((p.detach() * p.grad).sum()) / 3
    got = rec.tensor_dict()
    assert set(got) == set(ref)
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=1e-5), n
        assert float(rec.signed_scores[rec.tensor_names.index(n)]) == pytest.approx(ref_signed[n], rel=1e-4, abs=1e-7)
    groups = rec.group_dict()
    assert groups["layers.0"] == pytest.approx(ref["layers.0.weight"] + ref["layers.0.bias"], rel=1e-5)
    assert groups["embed"] == pytest.approx(ref["embed_tokens.weight"], rel=1e-5)
    assert rec.metadata["num_samples"] == "3" and rec.metadata["num_tokens"] == "12"


def test_accumulator_skips_non_finite_updates():
    acc = SensitivityAccumulator(["a.weight", "layers.0.b.weight"])
    acc.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, -2.0]), samples=4)
    ok = acc.update(torch.tensor([float("inf"), 2.0]), torch.tensor([1.0, 1.0]), samples=4)
    assert not bool(ok)
    acc.update(torch.tensor([3.0, 4.0]), torch.tensor([float("nan"), 0.0]), samples=4)  # nan in signed: skipped
    acc.update(torch.tensor([3.0, 6.0]), torch.tensor([-1.0, 0.0]), samples=4)
    assert acc.num_updates == 2 and int(acc.seen) == 4
    assert torch.isfinite(acc.abs_sum).all() and torch.isfinite(acc.signed_sum).all()
    rec = acc.to_record(metadata={"mode": "during"})
    assert torch.allclose(rec.tensor_scores, torch.tensor([2.0, 4.0]))
    assert torch.allclose(rec.signed_scores, torch.tensor([0.0, -1.0]))
    assert rec.metadata["num_steps"] == "2" and rec.metadata["num_skipped"] == "2"
    assert rec.metadata["num_samples"] == "8"
    # state round trip
    other = SensitivityAccumulator(acc.names)
    other.load_state_dict(acc.state_dict(), acc.state_metadata())
    assert torch.equal(other.abs_sum, acc.abs_sum) and other.num_updates == 2
    with pytest.raises(ValueError, match="do not match|does not match"):
        SensitivityAccumulator(["x"]).load_state_dict(acc.state_dict(), acc.state_metadata())


def test_accumulator_ema_bias_corrected():
    acc = SensitivityAccumulator(["w"], ema=0.5)
    for v in (2.0, 4.0):
        acc.update(torch.tensor([v]))
    # ema: 0.5*0 + 0.5*2 = 1; 0.5*1 + 0.5*4 = 2.5; bias correction / (1 - 0.25) = 3.333
    rec = acc.to_record()
    assert float(rec.tensor_scores[0]) == pytest.approx(2.5 / 0.75)
    assert float(rec.extra["mean.tensor_scores"][0]) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def lora64():
    model = lora(tiny_llama(seed=3).double(), init_random=True)
    batch = TokenData(n=3, length=10, seed=5)
    return model, batch


def _merged_reference(model, module_name, x):
    """Autograd of the merged weight W = W0 + s*B@A of one module (float64), with hooks off."""
    layer = model.get_submodule(module_name)
    base = layer.get_base_layer()
    delta = layer.get_delta_weight("default").detach()
    w0 = base.weight.detach().clone()
    w = (w0 + delta).clone().requires_grad_(True)
    handle = base.register_forward_hook(lambda mod, args, out: nn.functional.linear(args[0], w, mod.bias))
    layer.enable_adapters(False)  # this module only: the others keep their adapters
    try:
        loss = model(**x).loss
        (g,) = torch.autograd.grad(loss, [w])
    finally:
        layer.enable_adapters(True)
        handle.remove()
    return w.detach(), delta, g


def test_lora_identity_float64(lora64):
    model, data = lora64
    x = {k: v[None] for k, v in data[0].items()}
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    layer = model.get_submodule(name)
    model.zero_grad()
    model(**x).loss.backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dot_a = float((a.detach() * a.grad).sum())
    dot_b = float((b.detach() * b.grad).sum())
    _, delta, g = _merged_reference(model, name, x)
    dot_w = float((delta * g).sum())
    model.zero_grad()
    assert abs(dot_a) > 1e-8
    assert dot_a == pytest.approx(dot_b, rel=1e-6)
    assert dot_a == pytest.approx(dot_w, rel=1e-6)


@pytest.mark.parametrize("source", ["theta", "delta"])
def test_lora_theta_delta_equal_merged_autograd(lora64, source):
    model, data = lora64
    cfg = SensitivityConfig(weight_source=source, calibration_samples=3, seed=0)
    rec = run_calibration(model, data, cfg)
    assert rec.metadata["weight_source"] == source and rec.metadata["expert_type"] == "lora"
    from sens_peft.sensitivity.calibrate import select_examples

    order = select_examples(data, 3, 0)
    got = rec.tensor_dict()
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            ref = 0.0
            ref_signed = 0.0
            for i in order:
                x = {k: v[None] for k, v in data[i].items()}
                w, delta, g = _merged_reference(model, name, x)
                target = w if source == "theta" else delta
                ref += float((target * g).abs().sum()) / 3
                ref_signed += float((delta * g).sum()) / 3
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert got[key] == pytest.approx(ref, rel=1e-5), key
            assert float(rec.signed_scores[rec.tensor_names.index(key)]) == pytest.approx(ref_signed, rel=1e-4)


def test_lora_fan_in_fan_out_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).double()
    model = lora(base, targets=("c_attn",), fan_in_fan_out=True)
    data = TokenData(n=2, length=8, seed=2)
    rec = run_calibration(model, data, SensitivityConfig(weight_source="theta", calibration_samples=2,
                                                         element_maps=True))
    name = "base_model.model.transformer.h.0.attn.c_attn"
    layer = model.get_submodule(name)
    conv = layer.get_base_layer()
    ref = 0.0
    for i in (0, 1):
        x = {k: v[None] for k, v in data[i].items()}
        w = (conv.weight.detach() + layer.get_delta_weight("default").detach()).requires_grad_(True)
        handle = conv.register_forward_hook(
            lambda mod, args, out, w=w: torch.addmm(mod.bias, args[0].reshape(-1, args[0].shape[-1]), w).reshape(
                *args[0].shape[:-1], -1))
        layer.enable_adapters(False)
        try:
            (g,) = torch.autograd.grad(model(**x).loss, [w])
        finally:
            layer.enable_adapters(True)
            handle.remove()
        ref += float((w.detach() * g).abs().sum()) / 2
    key = "transformer.h.0.attn.c_attn.weight"
    assert rec.tensor_dict()[key] == pytest.approx(ref, rel=1e-5)
    emap = rec.element_maps[key]
    assert tuple(emap.shape) == tuple(conv.weight.shape)  # stored layout of the base weight
    assert float(emap.sum()) == pytest.approx(ref, rel=1e-5)
    assert rec.groups == ["layers.0", "layers.1"]


def _configs():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=None)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_layer_groups_per_architecture(arch):
    torch.manual_seed(0)
    model = _configs()[arch]()
    data = TokenData(n=2, length=8, seed=1)
    rec = run_calibration(model, data, SensitivityConfig(calibration_samples=2))
    expected = ["embed", "layers.0", "layers.1", "norm"] + ([] if arch == "gpt2" else ["lm_head"])
    assert rec.groups == expected  # GPT-2 ties lm_head to wte: scored once, as "embed"
    sums = {g: 0.0 for g in rec.groups}
    for n, s in rec.tensor_dict().items():
        sums[layer_group(n)] += s
    for g, s in rec.group_dict().items():
        assert s == pytest.approx(sums[g], rel=1e-5) and s > 0
    assert rec.metadata["expert_type"] == "full" and rec.metadata["weight_source"] == "theta"
    # the same groups for LoRA adapter factors
    peft_model = lora(_configs()[arch](), targets=("c_attn",) if arch == "gpt2" else ("q_proj", "v_proj"),
                      **({"fan_in_fan_out": True} if arch == "gpt2" else {}))
    rec_l = run_calibration(peft_model, data, SensitivityConfig(weight_source="adapter", calibration_samples=2))
    assert rec_l.groups == ["layers.0", "layers.1"]
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in rec_l.tensor_names)


def test_multi_use_module_raises():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(11, 6)
            self.proj = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 11)

        def forward(self, input_ids, labels=None, attention_mask=None):
            h = self.proj(self.proj(self.embed_tokens(input_ids)))
            loss = nn.functional.cross_entropy(self.lm_head(h)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
            return SimpleNamespace(loss=loss)

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Twice(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    data = [{"input_ids": torch.tensor([1, 2, 3, 4])}]
    with pytest.raises(RuntimeError, match="gradient contributions"):
        run_calibration(model, data, SensitivityConfig(weight_source="theta", calibration_samples=1))
    # adapter scores are exact for shared modules
    rec = run_calibration(model, data, SensitivityConfig(weight_source="adapter", calibration_samples=1))
    assert len(rec.tensor_names) == 2
