"""Synthetic Llama-shaped inputs for the speed benchmark (no hub downloads, no model instantiation).

``make_full_experts`` writes a base model and K full fine-tunes (base + small random deltas) as sharded
bf16 safetensors folders, exactly like ``save_pretrained`` lays them out (``model-0000i-of-0000n.safetensors``
+ ``model.safetensors.index.json`` + ``config.json``), tensor by tensor so generation needs one shard of
memory. Each expert folder also gets a synthetic ``sensitivity.safetensors`` sidecar.

``make_lora_experts`` writes K rank-r LoRA adapters (``adapter_model.safetensors`` + ``adapter_config.json``)
on all projections of a Llama shape, plus sidecars, and the base model folder.

``generator="tiled"`` (the scale test's 3B inputs, the scaling curves) makes every 2-D tensor a window into one
random block per model instead of drawing every element: see :class:`TiledValues` for what it keeps realistic.

Everything is cached: a folder whose ``synthetic.json`` matches the requested spec is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sens_peft.io import ShardWriter, parse_size  # noqa: F401  (parse_size: used by speed.py)
from sens_peft.io import plan_shards as _library_plan

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="bfloat16",
        )

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter, in the order save_pretrained writes a Llama."""
        h, i, head_dim = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())


# ≥ 1 GB per expert in bf16 (541M parameters): a merge takes seconds even at memory bandwidth.
FULL_SHAPE = ModelShape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=32000)
SMALL_SHAPE = ModelShape(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=4, vocab=16000)
# LoRA part: PEFT's ties_svd runs one SVD per module on 2 CPU cores, so this part uses a smaller shape.
LORA_SHAPE = ModelShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32000)
LORA_SMALL_SHAPE = ModelShape(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=4, vocab=1000)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _sizes(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> list[tuple[str, int]]:
    return [(name, math.prod(shape) * dtype.itemsize) for name, shape, dtype in entries]


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Tensor indices per shard, grouped as ``merge_models`` groups its output (``sens_peft.io.plan_shards``)."""
    position = {name: i for i, (name, _, _) in enumerate(entries)}
    return [[position[n] for n in shard] for shard in _library_plan(_sizes(entries), max_bytes).shards]


class StreamedShardWriter:
    """The library's planned :class:`sens_peft.io.ShardWriter` (headers known up front, each tensor written at its
    offset, no shard held in memory) behind the benchmark's interface: write tensors in ``order``, then ``close``."""

    def __init__(self, out_dir: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int,
                 background: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plan = _library_plan(_sizes(entries), max_bytes)
        position = {name: i for i, (name, _, _) in enumerate(entries)}
        self.order = [position[n] for shard in self.plan.shards for n in shard]
        specs = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        self._writer = ShardWriter(self.out_dir, max_bytes, plan=self.plan, specs=specs)
        if background:  # writes on the library's writer thread, overlapping with the caller's reads
            from sens_peft.io import BackgroundWriter

            self._writer = BackgroundWriter(self._writer)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.add(name, tensor)

    def close(self) -> None:
        self._writer.close()
        self.plan.write_index(self.out_dir)


def input_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    return [folder / "model.safetensors"]


def weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name → file, from the index (or the single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {k: folder / "model.safetensors" for k in handle.keys()}


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed("base", name))
    if len(shape) == 1:  # norms
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def _write_sidecar(folder: Path, names: list[str], expert: int, expert_type: str, task: str) -> None:
    from sens_peft.groups import group_names
    from sens_peft.store import SensitivityRecord, save_sensitivity

    gen = torch.Generator().manual_seed(_seed("sens", expert))
    groups, index = group_names(names, "layer")
    tensor_scores = torch.rand(len(names), generator=gen) + 0.1
    group_scores = torch.zeros(len(groups)).index_add_(0, torch.tensor(index), tensor_scores)
    record = SensitivityRecord(
        groups=groups, group_scores=group_scores, tensor_names=names, tensor_scores=tensor_scores,
        metadata={"task": task, "expert_type": expert_type, "weight_source": "theta" if expert_type == "full"
                  else "adapter", "mode": "after", "estimator": "taylor_abs", "num_samples": "32",
                  "synthetic": "true"},
    )
    save_sensitivity(record, folder)


def _spec_matches(folder: Path, spec: dict) -> bool:
    marker = folder / "synthetic.json"
    return marker.exists() and json.loads(marker.read_text()) == spec


# Tile length of the "tiled" generator: odd and not a divisor of any hidden size, so that consecutive rows of a
# tensor start at different places in the block (no column sees one value repeated down the rows).
TILE = (1 << 20) + 7
# Per (expert, tensor) scale of the delta, picked by a hash: tensors differ in how far they moved.
TILE_DELTA_SCALES = (0.5, 1.0, 2.0)


class TiledValues:
    """Cheap synthetic weights: every 2-D tensor is a window into a random block of ``TILE`` values.

    The base block is ``0.02·N(0,1)``; expert k's blocks are ``bf16(base_block + s·delta_std·N_k(0,1))`` for each
    ``s`` in ``TILE_DELTA_SCALES``, with an independent ``N_k`` per expert. A tensor starts at an offset given by a
    hash of its name (the same in every model), so ``expert − base`` at each position is that expert's own
    independent draw (TIES sign election sees independent signs; top-k thresholds see the full spread of a
    Gaussian, rounded through bf16 as a real fine-tune is), and which scale a tensor gets is hashed per (expert,
    tensor). Generating a tensor is one memory copy, not ``numel`` Gaussian draws: ~50x cheaper, so 24 GB of
    inputs cost the disk's write time. 1-D tensors (norms) are drawn in full (they are tiny).
    """

    def __init__(self, num_experts: int, delta_std: float, scales: tuple[float, ...] = TILE_DELTA_SCALES):
        gen = torch.Generator().manual_seed(_seed("tile", "base"))
        base = 0.02 * torch.randn(TILE, generator=gen)
        self.delta_std = delta_std
        self.blocks = [[base.to(torch.bfloat16)]]
        for k in range(1, num_experts + 1):
            noise = torch.randn(TILE, generator=torch.Generator().manual_seed(_seed("tile", "delta", k)))
            self.blocks.append([(base + s * delta_std * noise).to(torch.bfloat16) for s in scales])

    def tensor(self, model: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name`` of model ``model`` (0: the base, k ≥ 1: expert k)."""
        if len(shape) == 1:
            tensor = _base_tensor(name, shape)
            if model:
                gen = torch.Generator().manual_seed(_seed("delta", model, name))
                tensor = (tensor.float() + self.delta_std * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            return tensor
        numel = math.prod(shape)
        offset = _seed("offset", name) % TILE
        block = self.blocks[model][_seed("scale", model, name) % len(self.blocks[model]) if model else 0]
        return block.repeat(-(-(offset + numel) // TILE))[offset: offset + numel].view(shape)


def make_full_experts(root: Path, shape: ModelShape, num_experts: int = 3, shard_size: str = "500MB",
                      delta_std: float = 0.002, generator: str = "randn",
                      tile_scales: tuple[float, ...] = TILE_DELTA_SCALES) -> tuple[Path, list[Path]]:
    """Base + ``num_experts`` full fine-tunes under ``root`` (cached). Returns (base_dir, expert_dirs).

    ``generator``: ``"randn"`` draws every element (base N(0, 0.02²), deltas N(0, delta_std²)); ``"tiled"`` uses
    :class:`TiledValues` (one memory copy per tensor; ``tile_scales``: the delta scales hashed per tensor).
    """
    if generator not in ("randn", "tiled"):
        raise ValueError(f"generator must be 'randn' or 'tiled', not {generator!r}")
    root = Path(root)
    spec = {"kind": "full", "shape": asdict(shape), "num_experts": num_experts, "shard_size": shard_size,
            "delta_std": delta_std, "version": 2}
    if generator != "randn":  # (the randn spec is unchanged, so existing caches stay valid)
        spec.update(generator=generator, tile=TILE, tile_scales=list(tile_scales))
    base = root / "base"
    experts = [root / f"expert{k}" for k in range(num_experts)]
    if _spec_matches(root, spec):
        return base, experts
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    entries = [(n, s, torch.bfloat16) for n, s in shape.tensors()]
    max_bytes = parse_size(shard_size)
    config = shape.config()
    config.architectures = ["LlamaForCausalLM"]
    tiled = TiledValues(num_experts, delta_std, tuple(tile_scales)) if generator == "tiled" else None
    for k, folder in enumerate([base, *experts]):
        writer = StreamedShardWriter(folder, entries, max_bytes)
        for idx in writer.order:
            name, tshape, _ = entries[idx]
            if tiled is not None:
                writer.write(name, tiled.tensor(k, name, tshape))
                continue
            tensor = _base_tensor(name, tshape)
            if k > 0:
                gen = torch.Generator().manual_seed(_seed("delta", k, name))
                tensor = (tensor.float() + delta_std * torch.randn(tshape, generator=gen)).to(torch.bfloat16)
            writer.write(name, tensor)
        writer.close()
        config.save_pretrained(folder)
        if k > 0:
            _write_sidecar(folder, [e[0] for e in entries], k, "full", f"task{k}")
    (root / "synthetic.json").write_text(json.dumps(spec))
    return base, experts


def make_lora_experts(root: Path, shape: ModelShape, num_experts: int = 3, rank: int = 16,
                      alpha: int = 32) -> tuple[Path, list[Path]]:
    """A base model folder (fp32, save_pretrained) and ``num_experts`` LoRA adapter folders (cached)."""
    root = Path(root)
    spec = {"kind": "lora", "shape": asdict(shape), "num_experts": num_experts, "rank": rank, "alpha": alpha,
            "version": 2}
    base = root / "base"
    experts = [root / f"lora{k}" for k in range(num_experts)]
    if _spec_matches(root, spec):
        return base, experts
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = shape.config()
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    modules = [(n, s) for n, s in shape.tensors() if n.rsplit(".", 2)[-2] in LORA_TARGETS]
    for k, folder in enumerate(experts):
        folder.mkdir(parents=True)
        tensors = {}
        for name, (out_f, in_f) in modules:
            gen = torch.Generator().manual_seed(_seed("lora", k, name))
            mod = name[: -len(".weight")]
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = 0.01 * torch.randn(out_f, rank, generator=gen)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "base_model_name_or_path": str(base), "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None,
        }
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        canon = [n.replace("base_model.model.", "") for n in tensors]
        _write_sidecar(folder, canon, k + 1, "lora", f"task{k + 1}")
    (root / "synthetic.json").write_text(json.dumps(spec))
    return base, experts


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in input_files(folder))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=os.environ.get("SENS_PEFT_SPEED_DIR", "/tmp/sens_peft_speed"))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    b, e = make_full_experts(Path(args.workdir) / ("full_small" if args.small else "full"), shape)
    print(b, e, f"{folder_bytes(b) / 1e9:.2f} GB per model")
