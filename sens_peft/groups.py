"""Parameter names → layer groups, and PEFT names → canonical base-model names.

Coefficients are per (expert, group). A group is a transformer block (``"layers.7"``, whatever the
architecture calls its block list: ``layers.N``, ``h.N``, ``blocks.N``, ``layer.N``), or one of the
non-block groups ``"embed"``, ``"norm"``, ``"lm_head"`` and ``"other"``. Finer granularities split a block
by module type (``"layers.7.attn"`` / ``"layers.7.mlp"``) or by projection (``"layers.7.self_attn.q_proj"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .config import GRANULARITIES  # the one list of them (a Literal in config.py)

# "layers.3.", ".h.3.", "blocks.3.", "block.3.", "layer.3." anywhere in a dotted name.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.(.+)$")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|embeddings|embed_in|tok_embeddings)(?:\.|$)")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)(?:\.|$)")
_NORM_RE = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm|final_norm)(?:\.|$)")
_ATTN_RE = re.compile(r"(?:attn|attention|q_proj|k_proj|v_proj|o_proj|c_attn|qkv|query|key|value|dense\b)")
_MLP_RE = re.compile(r"(?:mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|c_fc|fc1|fc2|w1|w2|w3)")

_PEFT_PREFIX = "base_model.model."
_LORA_PARAM_RE = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?(\.weight)?$")


def canonical_name(name: str, adapter_name: str | None = None) -> str:
    """Strip PEFT wrappers from a parameter name.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` →
    ``model.layers.0.self_attn.q_proj.lora_A.weight``; ``...q_proj.base_layer.weight`` →
    ``...q_proj.weight``. Names without PEFT parts are returned unchanged.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    name = name.replace(".base_layer.", ".")
    if adapter_name is not None:
        name = name.replace(f".{adapter_name}.", ".")
    else:
        match = _LORA_PARAM_RE.search(name)
        if match:
            name = name[: match.start()] + f".{match.group(1)}" + (match.group(2) or "")
    return name


def module_name(name: str) -> str:
    """The module a (canonical) parameter name belongs to: drops ``.weight``/``.bias`` and LoRA parts."""
    name = _LORA_PARAM_RE.sub("", name)
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def layer_group(name: str, granularity: str = "layer") -> str:
    """The coefficient group of a parameter or module name.

    Args:
        name: Parameter or module name, PEFT-wrapped or canonical.
        granularity: ``"layer"`` (one group per block), ``"module_type"`` (attention / MLP / other per
            block) or ``"projection"`` (one group per module inside a block).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    name = canonical_name(name)
    match = _BLOCK_RE.search(name)
    if match:
        group = f"layers.{match.group(1)}"
        if granularity == "layer":
            return group
        rest = module_name(match.group(2))
        if granularity == "projection":
            return f"{group}.{rest}"
        if _ATTN_RE.search(rest):
            return f"{group}.attn"
        if _MLP_RE.search(rest):
            return f"{group}.mlp"
        return f"{group}.other"
    if _EMBED_RE.search(name):
        return "embed"
    if _HEAD_RE.search(name):
        return "lm_head"
    if _NORM_RE.search(name):
        return "norm"
    return "other"


def _sort_key(group: str) -> tuple:
    order = {"embed": 0, "norm": 2, "lm_head": 3, "other": 4}
    if group.startswith("layers."):
        parts = group.split(".", 2)
        return (1, int(parts[1]), parts[2] if len(parts) > 2 else "")
    return (order.get(group, 5), 0, group)


def sort_groups(groups: Iterable[str]) -> list[str]:
    """Unique groups in model order: embed, blocks by index, norm, lm_head, other."""
    return sorted(set(groups), key=_sort_key)


def group_names(names: Iterable[str], granularity: str = "layer") -> tuple[list[str], list[int]]:
    """Groups of a list of names in model order, and each name's index into that list."""
    names = list(names)
    per_name = [layer_group(n, granularity) for n in names]
    groups = sort_groups(per_name)
    index = {g: i for i, g in enumerate(groups)}
    return groups, [index[g] for g in per_name]
