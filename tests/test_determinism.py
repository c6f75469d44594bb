"""Same inputs + same seed → bit-identical output folders (every file, card included) on CPU; another seed →
another DARE result.

GPU note: DARE masks come from a torch.Generator on the math device, so a CUDA merge draws other masks than a CPU
merge with the same seed; the same GPU model + seed + software versions reproduces its own output.
"""

from __future__ import annotations

import pytest
from helpers import hash_tree, make_full_expert, make_lora_adapter, save_model, tiny_llama

from sens_peft.merge import merge_adapters, merge_models

KW = dict(method="dare_ties", density=0.5, sens=None, device="cpu", progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    base = tiny_llama(seed=0)
    return {
        "base": save_model(base, root / "base"),
        "full": [make_full_expert(base, root / f"f{k}", seed=40 + k) for k in range(3)],
        "lora": [make_lora_adapter(tiny_llama, root / f"l{k}", seed=50 + k, r=4) for k in range(3)],
    }


def _files(folder):
    return hash_tree(folder)  # sha256 of every file, nothing excluded


def test_merge_models_bit_identical(inputs, tmp_path):
    runs = {}
    for tag, seed, shard in (("a", 7, "8KB"), ("b", 7, "8KB"), ("c", 8, "8KB")):
        merge_models(inputs["base"], inputs["full"], tmp_path / tag, seed=seed, max_shard_size=shard, **KW)
        runs[tag] = _files(tmp_path / tag)
    assert len(runs["a"]) > 4  # several shards + index + config + card
    assert runs["a"] == runs["b"]
    weights = [f for f in runs["a"] if f.endswith(".safetensors")]
    assert all(runs["a"][f] != runs["c"][f] for f in weights)  # another seed drops other entries in every shard


def test_merge_adapters_bit_identical(inputs, tmp_path):
    runs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        merge_adapters(tiny_llama(seed=0), inputs["lora"], save_to=tmp_path / tag, seed=seed, **KW)
        runs[tag] = _files(tmp_path / tag)
    assert set(runs["a"]) >= {"adapter_model.safetensors", "adapter_config.json", "README.md", "merge_config.json"}
    assert runs["a"] == runs["b"]
    assert runs["a"]["adapter_model.safetensors"] != runs["c"]["adapter_model.safetensors"]


def test_full_output_of_adapters_bit_identical(inputs, tmp_path):
    for tag in ("a", "b"):
        merge_adapters(tiny_llama(seed=0), inputs["lora"], save_to=tmp_path / tag, seed=3, output="full", **KW)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
