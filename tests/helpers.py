"""Tiny model and adapter builders shared by tests (no downloads: everything is built from configs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

HIDDEN = 32
VOCAB = 96


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised LlamaForCausalLM (same seed → same weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    """A tiny GPT-2 (its attention/MLP use Conv1D, so LoRA needs fan_in_fan_out=True)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def make_lora_adapter(base_factory, folder: Path, *, r: int = 4, alpha: float = 8, seed: int = 1,
                      target_modules=("q_proj", "v_proj"), **lora_kwargs) -> Path:
    """Save a LoRA adapter with random, non-zero A and B (``init_lora_weights=False`` plus seeded refills)."""
    from peft import LoraConfig, get_peft_model

    base = base_factory()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False,
                     lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(str(folder))
    return Path(folder)


def lora_delta(peft_model, adapter: str, module_name: str) -> torch.Tensor:
    """PEFT's own ``get_delta_weight`` of ``adapter`` on a module (fp64 for comparisons)."""
    layer = peft_model.base_model.model.get_submodule(module_name)
    return layer.get_delta_weight(adapter).detach().double()


def adapted_modules(peft_model, adapter: str) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in peft_model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)]


def save_model(model, folder: Path, max_shard_size: Optional[str] = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kw)
    return Path(folder)


def make_full_expert(base_model, folder: Path, *, seed: int, sigma: float = 0.02, skip: tuple[str, ...] = (),
                     max_shard_size: Optional[str] = None) -> Path:
    """A 'fine-tune' of ``base_model``: every weight plus seeded noise (tensors whose name contains one of
    ``skip`` are left equal to the base)."""
    import copy

    model = copy.deepcopy(base_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(s in name for s in skip):
                continue
            noise = torch.randn(param.shape, generator=gen) * sigma
            param.add_(noise.to(param.dtype))
    return save_model(model, folder, max_shard_size)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors model folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (to check inputs are never modified)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_sidecars(folder: Path, scores: list[float], *, num_layers: int = 2, probe_seed: int = 0,
                   vocab: int = VOCAB) -> None:
    """Write a sensitivity.safetensors (per-layer scores) and a probe.safetensors into an expert folder."""
    from sens_peft.store import ProbeSet, SensitivityRecord, save_probe, save_sensitivity

    groups = [f"layers.{i}" for i in range(num_layers)]
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(num_layers)]
    record = SensitivityRecord(groups=groups, group_scores=torch.tensor(scores[:num_layers]),
                               tensor_names=names, tensor_scores=torch.tensor(scores[:num_layers]),
                               metadata={"estimator": "taylor_abs", "weight_source": "theta", "mode": "after"})
    save_sensitivity(record, folder)
    gen = torch.Generator().manual_seed(probe_seed)
    ids = torch.randint(0, vocab, (4, 8), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    save_probe(ProbeSet(ids, torch.ones_like(ids), labels, {"task": f"t{probe_seed}"}), folder)
