"""The LoRA output path of merge_adapters (issue 18): the new adapter is created without random init and filled
directly, and the factors must be exactly the hand-computed concatenation, in the dtype and on the device that
PEFT's own ``add_adapter`` gives; the fused finiteness check must still name a broken factor."""

from __future__ import annotations

import pytest
import torch
from helpers import make_lora_adapter, tiny_llama

from sens_peft.io import MergeError
from sens_peft.merge import merge_adapters

WEIGHTS = [0.7, 0.3, 1.25]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters_fast")
    return [
        make_lora_adapter(tiny_llama, root / "a", r=4, alpha=8, seed=1, target_modules=("q_proj", "v_proj",
                                                                                       "embed_tokens")),
        make_lora_adapter(tiny_llama, root / "b", r=8, alpha=16, seed=2, use_rslora=True),
        make_lora_adapter(tiny_llama, root / "c", r=2, alpha=6, seed=3, target_modules=("v_proj", "up_proj")),
    ]


def _loaded(dirs, dtype=torch.float32):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(dtype=dtype), str(dirs[0]), adapter_name="e0")
    for k, folder in enumerate(dirs[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"e{k}")
    return model


def _hand_factors(model, layer, names, weights, rank):
    """``A = [c_k s_k A_k]``, ``B = [B_k]`` in fp32, zero-padded to ``rank``: the exact concatenation."""
    embedding = "e0" in getattr(layer, "lora_embedding_A", {})
    parts_a, parts_b = [], []
    for name, c in zip(names, weights):
        if embedding and name in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        elif not embedding and name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        else:
            continue
        parts_a.append(a.detach().float() * (c * float(layer.scaling[name])))
        parts_b.append(b.detach().float())
    A, B = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
    A_out = torch.zeros(rank, A.shape[1])
    B_out = torch.zeros(B.shape[0], rank)
    A_out[: A.shape[0]], B_out[:, : B.shape[1]] = A, B
    return A_out, B_out


def _new_factors(layer, adapter):
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_factors_are_the_exact_concatenation(adapter_dirs, dtype):
    from peft.tuners.lora import LoraLayer

    model = _loaded(adapter_dirs, dtype)
    names = ["e0", "e1", "e2"]
    report = merge_adapters(model, names, method="task_arithmetic", sens=None, weights=WEIGHTS, adapter_name="m",
                            device="cpu", progress=False)
    rank = report.details["rank"]
    # what PEFT's add_adapter (with its random init) gives for the same config: the reference dtype and device
    model.add_adapter("ref", model.peft_config["m"])
    layers = [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)
              and ("m" in m.lora_A or "m" in m.lora_embedding_A)]
    assert len(layers) == 2 * 3 + 1  # q, v, up in each of the 2 layers, and the embedding
    for name, layer in layers:
        A, B = _new_factors(layer, "m")
        ref_A, ref_B = _new_factors(layer, "ref")
        assert (A.dtype, A.device, B.dtype, B.device) == (ref_A.dtype, ref_A.device, ref_B.dtype, ref_B.device)
        assert not A.requires_grad and not B.requires_grad and not A.is_meta
        hand_A, hand_B = _hand_factors(model, layer, names, WEIGHTS, rank)
        assert torch.equal(A.detach(), hand_A.to(A.dtype)), name
        assert torch.equal(B.detach(), hand_B.to(B.dtype)), name


def test_fast_path_leaves_nothing_on_meta_and_saves(adapter_dirs, tmp_path):
    from peft import PeftModel

    model = _loaded(adapter_dirs)
    merge_adapters(model, ["e0", "e1", "e2"], method="task_arithmetic", sens=None, adapter_name="m", device="cpu",
                   progress=False, save_to=tmp_path / "out")
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"), adapter_name="m")
    mine = {n: p for n, p in model.named_parameters() if ".m." in n}
    theirs = {n: p for n, p in reloaded.named_parameters() if ".m." in n}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor_is_named(adapter_dirs, bad):
    model = _loaded(adapter_dirs)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["e1"].weight[3, 1] = bad
    with pytest.raises(MergeError, match=r"expert 'e1'.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        merge_adapters(model, ["e0", "e1", "e2"], method="task_arithmetic", sens=None, adapter_name="m",
                       device="cpu", progress=False)
    assert "m" not in model.peft_config


def test_huge_finite_factors_are_not_refused(adapter_dirs):
    """The cheap check sums each factor; a sum that overflows while every value is finite must not refuse."""
    model = _loaded(adapter_dirs)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["e0"].weight.fill_(1e38)  # its sum overflows fp32; 0.1 * scaling 2 * 1e38 does not
    merge_adapters(model, ["e0", "e1"], method="task_arithmetic", sens=None, weights=[0.1, 1.0], adapter_name="m",
                   device="cpu", progress=False)
    hand_A, _ = _hand_factors(model, layer, ["e0", "e1"], [0.1, 1.0], layer.lora_A["m"].weight.shape[0])
    assert torch.isfinite(hand_A).all() and torch.equal(layer.lora_A["m"].weight.detach(), hand_A)
