"""Merge card (README.md with model-card front matter) and ``merge_config.json`` for a merge's output folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from ._version import __version__

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CONFIG_FILE = "merge_config.json"

_METHOD_TEXT = {
    "task_arithmetic": "Task Arithmetic (Ilharco et al., 2023): θ = θ₀ + λ Σ_k c_k δ_k",
    "ties": "TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean",
    "dare_linear": "DARE (Yu et al., 2024): random drop with rescale, then task arithmetic",
    "dare_ties": "DARE (Yu et al., 2024): random drop with rescale, then TIES sign election",
    "importance": "Importance-weighted (Fisher-style) merge: Σ_k c_k I_k δ_k / mean_k I_k per element",
}


def merge_record(
    config_dict: dict[str, Any],
    experts: list[str],
    sources: list[str],
    coefficients: Any,
    *,
    kind: str,
    base_model: Optional[str],
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON content of ``merge_config.json``."""
    table = None
    if coefficients is not None:
        table = json.loads(coefficients.to_json()) if hasattr(coefficients, "to_json") else coefficients
    return {
        "library": "sens-peft",
        "library_version": __version__,
        "kind": kind,
        "base_model": base_model,
        "experts": [{"name": n, "source": s} for n, s in zip(experts, sources)],
        "config": config_dict,
        "coefficients": table,
        **(extra or {}),
    }


def render_card(record: dict[str, Any], coefficients: Any, *, library_name: str) -> str:
    """README.md text: front matter, a short description, the coefficient table and the full parameters."""
    cfg = record["config"]
    method = cfg.get("method", "task_arithmetic")
    front = ["---"]
    if record.get("base_model"):
        front.append(f"base_model: {json.dumps(str(record['base_model']))}")
    front.append(f"library_name: {library_name}")
    front.append("tags:")
    for tag in ("sens-peft", "merge", method):
        front.append(f"- {tag}")
    front.append("---")
    sens = cfg.get("sens")
    lines = [
        "\n".join(front),
        "",
        f"# Merged {'LoRA adapter' if library_name == 'peft' else 'model'} ({method})",
        "",
        f"Made with [sens-peft](https://github.com/sens-peft/sens-peft) {record['library_version']} "
        "(Sens-Merging, arXiv 2502.12420)." if sens else
        f"Made with sens-peft {record['library_version']} (plain {method}, no sensitivity scaling).",
        "",
        "## Method",
        "",
        f"- Method: {_METHOD_TEXT.get(method, method)}",
        f"- Sensitivity scaling: `{sens}`" + (
            f" (temperature {cfg.get('temperature')}, normalization {cfg.get('normalization')}, "
            f"alignment {cfg.get('alignment')}, granularity {cfg.get('granularity')})" if sens else ""),
        f"- Scale λ: {cfg.get('scale')}, density: {cfg.get('density')}, seed: {cfg.get('seed')}"
        + (f" (DARE masks: `{cfg.get('dare_rng')}`)" if "dare" in str(method) and cfg.get("dare_rng") else ""),
        f"- Output: {record['kind']}",
        "",
        "## Experts",
        "",
    ]
    weights = cfg.get("weights")
    for i, expert in enumerate(record["experts"]):
        w = f" (weight {weights[i]})" if weights else ""
        lines.append(f"- `{expert['name']}`: {expert['source']}{w}")
    lines += ["", "## Coefficients", "", "Final coefficient c per expert and layer group (includes weights and λ):",
              "", "```", str(coefficients) if coefficients is not None else "(none)", "```", "",
              "## Merge parameters", "", "```json", json.dumps(record, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_card(
    folder: Path,
    config_dict: dict[str, Any],
    experts: list[str],
    sources: list[str],
    coefficients: Any,
    *,
    kind: str,
    base_model: Optional[str],
    library_name: str,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    """Write ``README.md`` and ``merge_config.json`` into ``folder`` (replacing a README PEFT may have written)."""
    record = merge_record(config_dict, experts, sources, coefficients, kind=kind, base_model=base_model, extra=extra)
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    (Path(folder) / CARD_FILE).write_text(render_card(record, coefficients, library_name=library_name))
