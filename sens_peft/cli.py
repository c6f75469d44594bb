"""The ``sens-peft`` command line: ``merge``, ``inspect``, ``plot`` and ``demo``.

A thin layer: every command parses its arguments, calls the library, and prints the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ._version import __version__

logger = logging.getLogger(__name__)


def _expert_label(path: str) -> str:
    return Path(path).resolve().name or str(path)


def _task_table(dirs: Sequence[str], temperature: float, normalization: str, granularity: str):
    from .coefficients import compute_coefficients
    from .config import MergeConfig
    from .store import load_sensitivity

    records = [load_sensitivity(d) for d in dirs]
    config = MergeConfig(sens="task", temperature=temperature, normalization=normalization, granularity=granularity,
                         method="task_arithmetic", scale=1.0)
    return compute_coefficients(records, None, expert_names=[r.task or _expert_label(d) for r, d in zip(records, dirs)],
                                config=config)


def methods_help() -> str:
    """The registered merge methods, their settings and their own parameters (``sens-peft merge --help``)."""
    from .methods import available_methods, get_method

    lines = ["merge methods (recipe `method:`; settings under `parameters:`):"]
    for name in available_methods():
        method = get_method(name)
        lines.append(f"  {name}: {method.description or name}")
        if method.uses:
            lines.append(f"      uses: {', '.join(method.uses)}")
        lines.extend(f"      {p.describe()}" for p in method.parameters)
        if method.needs:
            lines.append(f"      needs: {', '.join(method.needs)} (stored with each expert's sensitivity)")
        if method.needs_probes:
            lines.append("      needs: each expert's probe set (probe.safetensors, stored by the callback)")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, run_recipe

    if args.out and args.output and args.out != args.output:
        raise SystemExit(f"sens-peft merge: two output folders given ({args.output} and --out {args.out})")
    recipe = load_recipe(args.recipe)
    report = run_recipe(recipe, out_dir=args.out or args.output, device=args.device, overwrite=args.overwrite,
                        allow_pickle=args.allow_pickle)
    print(report.coefficients)
    if recipe.config.tensor_settings:
        print("(per-tensor weights/densities of the recipe's gradient lists and filters apply on top of this table; "
              "see merge_config.json)")
    if recipe.recipe_format == "mergekit":
        print(f"mergekit recipe: {recipe.config.origin['merge_method']} run as sens-peft {recipe.config.method}; "
              "the card lists how each field was honoured")
    print(f"merged {len(recipe.experts)} experts with {recipe.config.method} into {report.output_dir} "
          f"in {report.seconds:.1f} s")
    return 0


def describe_expert(directory: str) -> str:
    """A human-readable summary of the sidecars stored with one expert."""
    from .store import PROBE_FILE, SENSITIVITY_FILE, load_probe, load_sensitivity

    lines = [f"== {directory}"]
    path = Path(directory)
    if not (path / SENSITIVITY_FILE).is_file():
        lines.append(f"  no {SENSITIVITY_FILE}")
    else:
        record = load_sensitivity(path)
        meta = record.metadata
        keys = ("task", "expert_type", "mode", "weight_source", "estimator", "num_samples", "num_steps",
                "num_tokens", "base_model", "library_version", "format_version")
        lines.extend(f"  {k}: {meta[k]}" for k in keys if k in meta)
        lines.append(f"  tensors scored: {len(record.tensor_names)}  groups: {len(record.groups)}")
        total = float(record.group_scores.sum()) or 1.0
        for group, score in zip(record.groups, record.group_scores.tolist()):
            lines.append(f"    {group:<24} {score:12.5g}  ({100 * score / total:5.1f}%)")
        lines.append(f"  element maps: {len(record.element_maps)} tensors  Fisher maps: {len(record.fisher)} tensors"
                     f" ({record.metadata.get('fisher_samples', '?')} samples)")
        if record.grams:
            full = sum(1 for n in record.grams if n not in record.gram_factors and
                       len(record.statistic('gram', n).shape) == 2)
            tokens = sorted(set(record.gram_tokens.values()))
            lines.append(f"  input Grams (RegMean): {len(record.grams)} stored ({full} full) for "
                         f"{len(record.grams) + len(record.gram_aliases)} modules, tokens {tokens}")
        else:
            lines.append("  input Grams (RegMean): none")
    if (path / PROBE_FILE).is_file():
        probe = load_probe(path)
        scored = int((probe.labels != -100).sum())
        lines.append(f"  probe: {len(probe)} sequences x {probe.input_ids.shape[1]} tokens, {scored} scored tokens")
    else:
        lines.append(f"  no {PROBE_FILE}")
    return "\n".join(lines)


def describe_merge(directory: str) -> str:
    """A human-readable summary of a merge output folder (its ``merge_config.json``): method, experts, the fit of
    a probe-fitted merge (held-out loss before / after, steps, samples) and the coefficient table."""
    from .card import CONFIG_FILE, fit_lines, table_text
    from .coefficients import CoefficientTable

    record = json.loads((Path(directory) / CONFIG_FILE).read_text())
    cfg = record.get("config") or {}
    lines = [f"== {directory} (merge)", f"  method: {cfg.get('method')}  output: {record.get('kind')}  "
             f"scale: {cfg.get('scale')}",
             "  experts: " + ", ".join(e.get("name", "?") for e in record.get("experts", []))]
    lines.extend("  " + line[2:] for line in fit_lines(record.get("fit")))
    if record.get("coefficients"):
        table = CoefficientTable.from_dict(record["coefficients"])
        lines.extend("  " + line for line in table_text(table).splitlines())
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .card import CONFIG_FILE

    merges = [d for d in args.dirs if (Path(d) / CONFIG_FILE).is_file()]
    experts = [d for d in args.dirs if d not in merges]
    for directory in args.dirs:
        print(describe_merge(directory) if directory in merges else describe_expert(directory))
    if len(experts) > 1:
        table = _task_table(experts, args.temperature, args.normalization, args.granularity)
        print(f"\nTask-specific coefficients a merge with sens='task' would use (normalization={args.normalization}, "
              f"T={args.temperature:g}; the default merge uses no coefficients, and the cross-task factor needs the "
              "models and is computed at merge time):")
        print(table)
    return 0


def plot_coefficients(dirs: Sequence[str], output: str, temperature: float = 1.0,
                      normalization: str = "l2", granularity: str = "layer") -> tuple[int, int]:  # MergeConfig's
    """Draw heatmaps of alpha (per layer, per expert) and the resulting coefficients into ``output``.

    Returns:
        The heatmap shape ``(groups, experts)``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("sens-peft plot needs matplotlib: pip install 'sens-peft[plot]'") from err

    table = _task_table(dirs, temperature, normalization, granularity)
    alpha = table.alpha.detach().float().T.numpy()  # [G, K]
    coeff = table.values.detach().float().T.numpy()
    n_groups, n_experts = alpha.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.2 * n_experts * 2, 1.5 + 0.3 * n_groups), squeeze=False)
    for ax, data, title in ((axes[0][0], alpha, "alpha (task-specific)"), (axes[0][1], coeff, f"c (T={temperature:g})")):
        image = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xticks(range(n_experts), table.experts, rotation=45, ha="right")
        ax.set_yticks(range(n_groups), table.groups)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    # the cell layout travels in the PNG's text chunk so tools (and tests) can read it back
    layout = {"rows": table.groups, "columns": table.experts, "panels": ["alpha", "c"]}
    fig.savefig(output, dpi=100, metadata={"Description": json.dumps(layout)})
    plt.close(fig)
    return n_groups, n_experts


def cmd_plot(args: argparse.Namespace) -> int:
    shape = plot_coefficients(args.dirs, args.output, args.temperature, args.normalization, args.granularity)
    print(f"wrote {args.output} ({shape[0]} groups x {shape[1]} experts)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import GRANULARITIES, NORMALIZATIONS, MergeConfig
    from .mergekit_recipe import MERGEKIT_METHODS

    parser = argparse.ArgumentParser(prog="sens-peft", description="Sensitivity-guided merging of fine-tuned experts.")
    parser.add_argument("--version", action="version", version=f"sens-peft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge experts as described by a YAML recipe (sens-peft's or mergekit's)",
                       description="Merge experts as described by a YAML recipe: sens-peft's schema (see "
                                   "sens_peft.recipe) or a mergekit recipe (merge_method: "
                                   f"{', '.join(MERGEKIT_METHODS)}; see sens_peft.mergekit_recipe), recognised by "
                                   "its keys.",
                       epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to the YAML recipe")
    p.add_argument("output", nargs="?", default=None,
                   help="output folder (as mergekit-yaml takes it; same as --out)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="device for the math (default: CUDA if available)")
    p.add_argument("--out", default=None, help="output folder (overrides output.path)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin (pickle) weight files; unpickling an untrusted file can run code")
    p.set_defaults(func=cmd_merge)

    def add_coefficient_options(p: argparse.ArgumentParser) -> None:
        defaults = MergeConfig()
        p.add_argument("--temperature", type=float, default=defaults.temperature, help="softmax temperature T")
        p.add_argument("--normalization", default=defaults.normalization, choices=list(NORMALIZATIONS),
                       help=f"alpha normalisation (default: the library default, {defaults.normalization})")
        p.add_argument("--granularity", default=defaults.granularity, choices=list(GRANULARITIES))

    p = sub.add_parser("inspect", help="show what is stored with experts",
                       description="Show the sidecars stored with each expert and, for several experts, the "
                                   "task-specific coefficient table a merge would use.")
    p.add_argument("dirs", nargs="+", help="expert folders (adapter or model folders with sensitivity.safetensors), "
                                          "or merge output folders (with merge_config.json)")
    add_coefficient_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plot", help="heatmap of alpha and coefficients per layer and expert",
                       description="Heatmaps of alpha per layer per expert and of the resulting coefficients.")
    p.add_argument("dirs", nargs="+", help="expert folders")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    add_coefficient_options(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="run the quick start on the built-in tiny model",
                       description="Train toy experts with the callback, merge them with and without "
                                   "Sens-Merging, and print the score table.")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import SensPeftError

    try:
        return int(args.func(args) or 0)
    except (SensPeftError, FileNotFoundError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"sens-peft {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
