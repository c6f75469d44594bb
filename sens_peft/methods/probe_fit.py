"""Probe-fitted coefficients (AdaMerging's idea, made supervised by the probe sets stored with each expert).

Per coefficient group ``g`` (a block, or a block's attention / MLP, or one projection: ``granularity``) and expert
``k``, a coefficient ``c[k][g]`` scales expert ``k``'s part of a base method's merge (task arithmetic, TIES,
DARE-TIES, DARE-linear or RegMean). The base method's selection is fixed once: TIES's trim, DARE's drop and the sign
election, which is made on the *unscaled* deltas (PEFT's ``weighted_election=False``; with equal coefficients, e.g.
the default ``c ≡ λ``, the same election as the weighted one), so the merge is linear in ``c``. RegMean is linear in
``c`` as it is: ``(Σ_k c_k ΔW_k G_k)(Σ_k G_k)⁻¹`` weights the deltas, not the Grams, so ``part_k`` is expert ``k``'s
share ``ΔW_k G_k (Σ G)⁻¹`` and ``c ≡ 1`` is RegMean itself:
``ΔW_t = Σ_k c[k][g(t)] · part_k(t)`` with ``part_k(t)`` the base merge of tensor ``t`` with coefficient 1 for
expert ``k`` and 0 for the others. ``c`` starts at the plan's coefficients (``λ`` times the weights) and Adam lowers
the merged model's loss on the union of the experts' probe sets (each expert's probe weighs the same); a
``holdout`` fraction of every probe is held out, and the coefficients with the lowest held-out loss are kept. The
pure math is in :mod:`sens_peft.probe_fitting`.

With ``steps=0`` the merge is its base method (with the unweighted election). LoRA experts with
``base_method="task_arithmetic"`` give exact factors (``Σ_k c_k B_k A_k``); the other bases go through the SVD of
the merged ``ΔW``, like the base methods themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import GRANULARITIES
from ..groups import layer_group, sort_groups
from ..probe_fitting import FitPart, ProbeObjective, fit_coefficients
from .base import FitProblem, FitResult, MergeContext, MergeMethod, Param
from .registry import get_method, register_method
from .regmean import SHRINKAGE, RegMean
from .streamed import StreamJob

logger = logging.getLogger(__name__)

#: Base methods whose merge is linear in the coefficients once their selection is fixed.
BASE_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "regmean")


def _base(params: Mapping[str, Any]) -> MergeMethod:
    return get_method(params.get("base_method", "task_arithmetic"))


def _named_result(method: str, job: Callable[[], Any]) -> tuple[str, Any]:
    return method, job()


def _fixed_selection(ctx: MergeContext) -> MergeContext:
    """The context with the sign election on the unscaled deltas: the base merge is then linear in ``c``."""
    return dataclasses.replace(ctx, params={**ctx.params, "weighted_election": False})


@register_method
class ProbeFit(MergeMethod):
    """Layer-wise coefficients of a base method, fitted on the experts' probe sets (held-out early stopping)."""

    name = "probe_fit"
    description = ("Probe-fitted coefficients (AdaMerging-style): c[k][group] on a base method's task vectors "
                   "(selection fixed), fitted by Adam on the experts' probe sets with held-out early stopping")
    reference = ("Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024 "
                 "(arXiv 2310.02575); supervised here by the probe sets stored with each expert")
    uses = ("density", "majority_sign_method", "trim_by", "seed", "dare_rng")
    parameters = (
        Param("base_method", str, "task_arithmetic", "the merge whose per-expert parts are scaled",
              choices=BASE_METHODS),
        Param("steps", int, 30, "Adam steps at most (0: the base method unchanged)", 0, 100000),
        Param("lr", float, 0.05, "Adam learning rate on the coefficients", 0.0, 10.0),
        Param("holdout", float, 0.25, "fraction of each expert's probe rows held out for early stopping", 0.0, 0.9),
        Param("granularity", str, "layer", "one coefficient per expert and: block ('layer'), block attention/MLP "
              "('module_type') or projection", choices=tuple(GRANULARITIES)),
        Param("patience", int, 10, "stop after this many steps without a held-out improvement (0: never)", 0, 100000),
        Param("batch_size", int, 64, "probe rows per forward pass (the experts' rows share batches)", 1, 100000),
        dataclasses.replace(SHRINKAGE, help=f"base_method='regmean' only: {SHRINKAGE.help}"),
    )
    random = True  # a DARE base draws masks (ctx.draw_keep); the other bases ignore them
    needs_probes = True
    optional_statistics = RegMean.optional_statistics  # the RegMean base averages tensors no Linear reads

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        checked = super().check_params(params)
        base = checked.get("base_method", "task_arithmetic")
        # the full parameter set (defaults included) passes through here too: only a changed value is an error
        if checked.get("shrinkage", SHRINKAGE.default) != SHRINKAGE.default and base != "regmean":
            raise ValueError(f"probe_fit: shrinkage={checked['shrinkage']} applies to base_method='regmean' only "
                             f"(base_method={base!r} reads no Grams)")
        return checked

    # -- declarations: the base method's ------------------------------------------------------------------------

    def resolve(self, params: Mapping[str, Any], available: Collection[str]) -> dict[str, Any]:
        return _base(params).resolve(params, available)

    def needed_statistics(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return _base(params).needed_statistics(params)

    def draws_masks(self, params: Mapping[str, Any]) -> bool:
        return _base(params).random

    def default_scale(self, params: Mapping[str, Any]) -> float:
        # the start λ of a sum (task arithmetic, DARE-linear): 0.5 was the best start, or within 6 points of it, on
        # validation in each of the quality benchmark's six quick cells (regime B, LoRA and full; λ ∈ {0.15, 0.3,
        # 0.5, 0.8}); the fit then moves each coefficient. TIES / DARE-TIES average: their own default.
        if params.get("base_method", "task_arithmetic") in ("task_arithmetic", "dare_linear"):
            return 0.5
        return _base(params).default_scale(params)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        return _base(ctx.params).combine(stacked, coefficients, _fixed_selection(ctx))

    def chunked(self, params: Mapping[str, Any]) -> bool:
        return _base(params).chunked(params)  # RegMean has no chunked hook: its merges take combine()

    def stream(self, job: StreamJob) -> bool:
        return _base(job.params).stream(dataclasses.replace(job, params={**job.params, "weighted_election": False}))

    def prepares(self, params: Mapping[str, Any]) -> bool:
        return _base(params).prepares(params)

    def stream_prepare(self, base: Tensor, experts: Sequence[Tensor], params: Mapping[str, Any], name: str,
                       statistics: Mapping[str, Sequence[Tensor]], parts: int, device: torch.device,
                       out_dtype: torch.dtype) -> Optional[list[Callable[[], Any]]]:
        method = params.get("base_method", "task_arithmetic")
        jobs = get_method(method).stream_prepare(base, experts, params, name, statistics, parts, device, out_dtype)
        # each result names the base method, whose prepared() reads it
        return None if jobs is None else [functools.partial(_named_result, method, job) for job in jobs]

    def prepared(self, results: list) -> dict[str, Any]:
        return get_method(results[0][0]).prepared([r for _, r in results]) if results else {}

    def prepare_bytes(self, numel: int, num: int, params: Mapping[str, Any], device: torch.device) -> int:
        return _base(params).prepare_bytes(numel, num, params, device)

    def exact_lora_rank(self, ranks: Sequence[int], params: Mapping[str, Any]) -> Optional[int]:
        return _base(params).exact_lora_rank(ranks, params)

    def lora_factors(self, factors: Sequence[tuple[Tensor, Tensor, float]], coefficients: Sequence[float],
                     rank: int, device: torch.device, ctx: Optional[MergeContext] = None) -> tuple[Tensor, Tensor]:
        base = _base(ctx.params if ctx is not None else {})
        return base.lora_factors(factors, coefficients, rank, device, ctx)

    def fit(self, problem: FitProblem) -> FitResult:
        """Fit ``c[k][g]`` on the probes; the table of the kept coefficients and the fit's report."""
        from ..coefficients import CoefficientTable

        p = problem.params
        names = list(problem.tensors)
        granularity = p["granularity"]
        groups = sort_groups(layer_group(n, granularity) for n in names)
        column = {g: i for i, g in enumerate(groups)}
        start = self._start(problem, names, granularity, column)
        parts = [FitPart(n, column[layer_group(n, granularity)], tuple(problem.tensors[n]), self._parts(problem, n))
                 for n in names]
        seed = int(p.get("seed") or 0)
        objective = ProbeObjective(problem.probes, p["holdout"], seed, problem.device, p["batch_size"])
        outcome = fit_coefficients(start, parts, objective, problem.logits, steps=p["steps"], lr=p["lr"],
                                   patience=p["patience"])
        logger.info("probe_fit: held-out loss %.4f -> %.4f (kept step %d of %d run)", outcome.held_before,
                    outcome.held_after, outcome.best_step, outcome.steps_run)
        settings = {"sens": None, "granularity": granularity, "fitted_by": self.name, "scale": p.get("scale")}
        table = CoefficientTable(experts=problem.experts, groups=groups, values=outcome.values, settings=settings)
        report = {
            "base_method": p["base_method"], "granularity": granularity, "steps": p["steps"], "lr": p["lr"],
            "holdout": p["holdout"], "patience": p["patience"], "steps_run": outcome.steps_run,
            "best_step": outcome.best_step, "held_out_loss_before": outcome.held_before,
            "held_out_loss_after": outcome.held_after, "fit_loss_before": outcome.fit_before,
            "fit_loss_after": outcome.fit_after, "held_out_history": outcome.history,
            "samples": {name: {"fit": objective.rows["fit"][k], "held_out": objective.rows["held"][k],
                               "fit_tokens": objective.counts["fit"][k],
                               "held_out_tokens": objective.counts["held"][k]}
                        for k, name in enumerate(problem.experts)},
            "start": outcome.start.tolist(), "groups": groups,
        }
        return FitResult(table=table, report=report)

    @staticmethod
    def _start(problem: FitProblem, names: list[str], granularity: str, column: dict[str, int]) -> Tensor:
        """``[K, G]``: the plan's coefficients of each group (of its first tensor, warning when the plan's
        coefficients vary inside a group, e.g. Sens coefficients at a finer granularity)."""
        start = torch.full((len(problem.experts), len(column)), float("nan"))
        uneven = set()
        for name in names:
            col = column[layer_group(name, granularity)]
            value = problem.coefficients(name).to(torch.float32)
            if torch.isnan(start[:, col]).all():
                start[:, col] = value
            elif not torch.equal(start[:, col], value):
                uneven.add(layer_group(name, granularity))
        if uneven:
            logger.warning("probe_fit: the planned coefficients vary inside the groups %s at granularity=%r; the fit "
                           "starts from those of each group's first tensor", sorted(uneven)[:5], granularity)
        return start

    @staticmethod
    def _parts(problem: FitProblem, name: str) -> Tensor:
        """``[K_t, ...]``: the base merge of tensor ``name`` with coefficient 1 for one expert, 0 for the others."""
        num = len(problem.tensors[name])
        eye = torch.eye(num, dtype=torch.float32, device=problem.device)
        return torch.stack([problem.merge(name, eye[i]).to(torch.float32) for i in range(num)]).detach()
