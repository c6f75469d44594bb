import json

import pytest
import torch

from sens_peft.config import MergeConfig, SensitivityConfig
from sens_peft.groups import canonical_name, group_names, layer_group, module_name
from sens_peft.store import (
    ProbeSet,
    SensitivityRecord,
    SidecarError,
    load_probe,
    load_sensitivity,
    save_probe,
    save_sensitivity,
)


def test_canonical_names():
    assert (
        canonical_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        == "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert canonical_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == "model.layers.0.mlp.up_proj.weight"
    assert module_name("model.layers.0.self_attn.q_proj.lora_B.weight") == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "name,layer,mtype",
    [
        ("model.layers.12.self_attn.q_proj.weight", "layers.12", "layers.12.attn"),
        ("model.layers.3.mlp.down_proj.weight", "layers.3", "layers.3.mlp"),
        ("model.layers.3.input_layernorm.weight", "layers.3", "layers.3.other"),
        ("transformer.h.5.attn.c_attn.weight", "layers.5", "layers.5.attn"),
        ("transformer.h.5.mlp.c_fc.weight", "layers.5", "layers.5.mlp"),
        ("model.embed_tokens.weight", "embed", "embed"),
        ("transformer.wte.weight", "embed", "embed"),
        ("model.norm.weight", "norm", "norm"),
        ("transformer.ln_f.weight", "norm", "norm"),
        ("lm_head.weight", "lm_head", "lm_head"),
    ],
)
def test_layer_group(name, layer, mtype):
    assert layer_group(name) == layer
    assert layer_group(name, "module_type") == mtype


def test_group_order():
    groups, idx = group_names(["lm_head.weight", "model.layers.10.x.weight", "model.layers.2.x.weight", "model.embed_tokens.weight"])
    assert groups == ["embed", "layers.2", "layers.10", "lm_head"]
    assert idx == [3, 2, 1, 0]


def test_config_validation():
    with pytest.raises(ValueError, match="density"):
        MergeConfig(density=0.0)
    with pytest.raises(ValueError, match="temperature"):
        MergeConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown merge method"):
        MergeConfig(method="nuslerp")
    with pytest.raises(ValueError, match="unknown MergeConfig keys"):
        MergeConfig.from_dict({"methd": "ties"})
    with pytest.raises(ValueError, match="mode"):
        SensitivityConfig(mode="sometimes")
    assert SensitivityConfig().resolve_weight_source("lora", "during") == "adapter"
    assert SensitivityConfig().resolve_weight_source("lora", "after") == "theta"


def _record():
    return SensitivityRecord(
        groups=["layers.0", "layers.1"],
        group_scores=torch.tensor([1.0, 2.0]),
        tensor_names=["model.layers.0.q.weight", "model.layers.1.q.weight"],
        tensor_scores=torch.tensor([1.0, 2.0]),
        signed_scores=torch.tensor([-0.5, 0.25]),
        metadata={"task": "math", "expert_type": "lora"},
    )


def test_sensitivity_roundtrip(tmp_path):
    save_sensitivity(_record(), tmp_path)
    rec = load_sensitivity(tmp_path)
    assert rec.groups == ["layers.0", "layers.1"]
    assert torch.equal(rec.group_scores, torch.tensor([1.0, 2.0]))
    assert torch.equal(rec.signed_scores, torch.tensor([-0.5, 0.25]))
    assert rec.task == "math" and rec.metadata["format_version"] == "2"


def test_bad_sidecars(tmp_path):
    from safetensors.torch import save_file

    path = save_sensitivity(_record(), tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SidecarError, match="truncated or corrupt"):
        load_sensitivity(tmp_path)
    meta = {"format": "sens-peft/sensitivity", "format_version": "99", "groups": "[]", "tensor_names": "[]"}
    save_file({"group_scores": torch.zeros(0), "tensor_scores": torch.zeros(0)}, str(path), metadata=meta)
    with pytest.raises(SidecarError, match="format_version 99"):
        load_sensitivity(tmp_path)
    meta.update(format_version="1", estimator="x", weight_source="theta", mode="after", groups=json.dumps(["a", "b"]))
    save_file({"group_scores": torch.zeros(3), "tensor_scores": torch.zeros(0)}, str(path), metadata=meta)
    with pytest.raises(SidecarError, match=r"'group_scores' has shape \[3\], expected \[2\]"):
        load_sensitivity(tmp_path)
    save_file({"tensor_scores": torch.zeros(0)}, str(path), metadata=meta)
    with pytest.raises(SidecarError, match="'group_scores' is missing"):
        load_sensitivity(tmp_path)
    save_file({"group_scores": torch.tensor([1.0, float("nan")]), "tensor_scores": torch.zeros(0)}, str(path), metadata=meta)
    with pytest.raises(SidecarError, match="NaN"):
        load_sensitivity(tmp_path)


def test_probe_roundtrip_and_vocab(tmp_path):
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    probe = ProbeSet(ids, torch.ones_like(ids), ids.clone(), {"task": "rev"})
    save_probe(probe, tmp_path)
    loaded = load_probe(tmp_path, vocab_size=10)
    assert torch.equal(loaded.input_ids, ids) and loaded.metadata["task"] == "rev"
    with pytest.raises(SidecarError, match="outside the model's vocabulary of 5"):
        load_probe(tmp_path, vocab_size=5)
