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

def _method_lines(cfg: dict[str, Any]) -> list[str]:
    """The method's description, reference and parameters, as its registry entry declares them."""
    from .methods import available_methods, get_method

    name = cfg.get("method", "task_arithmetic")
    if name not in available_methods():  # a card of a method not registered in this process
        return [f"- Method: {name}"]
    method = get_method(name)
    lines = [f"- Method: {method.description or name}"]
    if method.reference:
        lines.append(f"- Reference: {method.reference}")
    shown = [(key, cfg.get(key)) for key in method.uses if key not in ("density", "densities") and key in cfg]
    shown += [(p.name, (cfg.get("params") or {}).get(p.name, p.default)) for p in method.parameters]
    if shown:
        lines.append("- Method parameters: " + ", ".join(f"{key} `{value}`" for key, value in shown))
    return lines


def _dare_note(cfg: dict[str, Any]) -> str:
    """The DARE mask generator, for methods that draw masks."""
    from .methods import available_methods, get_method

    name = cfg.get("method")
    random = name in available_methods() and get_method(name).draws_masks(cfg.get("params") or {})
    return f" (DARE masks: `{cfg.get('dare_rng')}`)" if random and cfg.get("dare_rng") else ""


def _statistics_lines(statistics: Optional[dict[str, Any]]) -> list[str]:
    """What captured statistics a data-aware method read, and from how many samples/tokens per expert."""
    if not statistics:
        return []
    return [f"- Captured statistics used: `{kind}` ("
            + ", ".join(f"{name}: {count if count is not None else '?'} {unit}" for name, count in per.items()) + ")"
            for kind, (unit, per) in statistics.items()]


def fit_lines(fit: Optional[dict[str, Any]]) -> list[str]:
    """What a model-in-the-loop fit (``probe_fit``) did: held-out loss before and after, steps, samples used.
    Also printed by ``sens-peft inspect`` on a merge folder."""
    if not fit:
        return []
    samples = fit.get("samples") or {}
    return [
        f"- Probe fit on `{fit.get('base_method')}` parts (one coefficient per expert and {fit.get('granularity')} "
        f"group): held-out loss {fit.get('held_out_loss_before', float('nan')):.4f} -> "
        f"{fit.get('held_out_loss_after', float('nan')):.4f} (fit rows "
        f"{fit.get('fit_loss_before', float('nan')):.4f} -> {fit.get('fit_loss_after', float('nan')):.4f})",
        f"- Probe fit steps: {fit.get('steps_run')} of {fit.get('steps')} run (Adam lr {fit.get('lr')}, patience "
        f"{fit.get('patience')}), coefficients of step {fit.get('best_step')} kept (0: the start)",
        "- Probe samples used (fit / held-out rows, scored tokens): " + ", ".join(
            f"{name}: {s.get('fit')} / {s.get('held_out')} rows, {s.get('fit_tokens')} / {s.get('held_out_tokens')} "
            "tokens" for name, s in samples.items()),
    ]


def table_text(coefficients: Any) -> str:
    """The coefficient table as text; a fitted table (``settings["fitted_by"]``) says so in its first line."""
    if coefficients is None:
        return "(none)"
    text = str(coefficients)
    fitted = (getattr(coefficients, "settings", None) or {}).get("fitted_by")
    if fitted and "\n" in text:
        settings = coefficients.settings
        text = (f"Coefficients fitted by {fitted} (granularity={settings.get('granularity')}, start "
                f"λ={settings.get('scale')})\n" + text.split("\n", 1)[1])
    return text


def _spread_lines(coefficients: Any) -> list[str]:
    """The spread of the final coefficients, and the Sens temperature used when the bound raised it."""
    if coefficients is None or not hasattr(coefficients, "summary"):
        return []
    stats, settings = coefficients.summary(), getattr(coefficients, "settings", {}) or {}
    line = f"- Coefficient spread: min {stats['min']:.4g}, mean {stats['mean']:.4g}, max {stats['max']:.4g}"
    used = settings.get("temperature_used")
    if used is not None and settings.get("sens") and used != settings.get("temperature"):
        line += f" (temperature raised to {used:.4g} by max_ratio={settings.get('max_ratio')})"
    return [line]


def _origin_lines(cfg: dict[str, Any]) -> list[str]:
    """Where the settings came from when a recipe of another tool gave them (a mergekit recipe), field by field."""
    origin = cfg.get("origin")
    if not origin:
        return []
    lines = ["## Recipe", "", f"From a {origin.get('format')} recipe (merge_method `{origin.get('merge_method')}`), "
             "copied as `mergekit_config.yml`. Its fields, and how this merge honoured them:", ""]
    lines += [f"- `{key}`: {how}" for key, how in (origin.get("fields") or {}).items()]
    return lines + [""]


def _per_expert_lines(cfg: dict[str, Any]) -> list[str]:
    """Per-expert densities, and per-tensor weights/densities (gradient lists, filters) when set."""
    lines = []
    if cfg.get("densities"):
        lines.append(f"- Per-expert density: {cfg['densities']}")
    settings = cfg.get("tensor_settings") or {}
    keys = [key for key in ("weight", "density") if key in settings]
    if keys:
        lines.append(f"- Per-tensor {' and '.join(keys)} (gradient lists over {settings.get('num_layers')} layers "
                     f"and filters; see merge_config.json)" + (", weights normalised per tensor"
                                                                if settings.get("normalize") else ""))
    return lines


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
        *_method_lines(cfg),
        f"- Sensitivity scaling: `{sens}`" + (
            f" (temperature {cfg.get('temperature')}, normalization {cfg.get('normalization')}, "
            f"alignment {cfg.get('alignment')}, granularity {cfg.get('granularity')})" if sens else ""),
        f"- Scale λ: {cfg.get('scale')}, density: {cfg.get('density')}, seed: {cfg.get('seed')}" + _dare_note(cfg),
        *_per_expert_lines(cfg),
        f"- Output: {record['kind']}",
        *_statistics_lines(record.get("statistics")),
        *fit_lines(record.get("fit")),
        *_spread_lines(coefficients),
        "",
        *_origin_lines(cfg),
        "## Experts",
        "",
    ]
    weights = cfg.get("weights")
    for i, expert in enumerate(record["experts"]):
        w = f" (weight {weights[i]})" if weights else ""
        lines.append(f"- `{expert['name']}`: {expert['source']}{w}")
    lines += ["", "## Coefficients", "", "Final coefficient c per expert and layer group (includes weights and λ):",
              "", "```", table_text(coefficients), "```", "",
              "## Merge parameters", "", "```json", json.dumps(record, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, record: dict[str, Any], coefficients: Any, *, library_name: str) -> None:
    """Write ``README.md`` and ``merge_config.json`` (``record``, from :func:`merge_record`) into ``folder``
    (replacing a README PEFT may have written)."""
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    (Path(folder) / CARD_FILE).write_text(render_card(record, coefficients, library_name=library_name))
