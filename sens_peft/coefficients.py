"""Sens-Merging coefficients: per (expert, group) scalars from sensitivities (α) and transferability (τ).

``c[k][g] = K * softmax_k(arg[k][g] / T) * w_k * λ`` with ``arg = α·τ`` (``sens="task+cross"``), ``α``
(``"task"``), ``τ`` (``"cross"``) or 0 (``None``: the plain method). The softmax runs across experts,
separately per group, and the factor ``K`` makes the mean coefficient 1, so ``T → ∞`` (or equal scores)
gives exactly the plain method.

**Why the normalisations matter.** Only differences of ``α·τ`` between experts at one group reach the
softmax, so their *scale* decides which temperatures do anything (the third-party reading,
L2-normalised α ≈ 1/√G times L1-normalised τ ≈ 1/K, gives arguments ~0.06 and collapses to plain task
arithmetic for every T ≥ 0.1). The paper's reading (``normalization="mean1"``, ``tau_normalization="exp_z"``) keeps
both factors at mean 1 with an O(1) spread; the defaults (:class:`~sens_peft.config.MergeConfig`'s, ``l2`` /
``mean1``) are the readings that hurt least on the quality benchmark. The readings:

* α (``normalization="mean1"``): ``S / mean(S)`` within each expert. Positive, mean 1, and invariant
  to multiplying an expert's raw scores by a constant (raw sensitivities differ ~100× between experts,
  tracking each expert's loss level, which must not decide the merge). Log-normal layer profiles give
  α ≈ 0.2–5. ``"zscore"``: ``max(1 + z, 0)`` with ``z`` the standardised scores: mean ≈ 1, unit spread,
  clipped at 0 so that ``α·τ`` stays monotone in τ (a negative α would turn a larger τ into a smaller
  coefficient). ``"l2"`` (the third-party reading, rows of unit norm) and ``"sum1"`` (rows sum to 1) are
  kept for reproduction; they shrink the argument by ~√G and ~G, so they need T ≈ 0.01–0.1.
* τ (``tau_normalization="exp_z"``): ``r_k`` = mean over ``j ≠ k`` of ``A[k][j]``; ``z`` = ``r``
  standardised across experts; ``τ = exp(z) / mean(exp(z))``. Positive, mean 1, unit-free (cosine and
  negative-L2 alignments live on very different scales) and only the experts' relative standing matters:
  with K = 2, τ ≈ {0.24, 1.76}. ``"zscore"``: ``max(1 + z, 0)``. ``"sum1"``: ``r / Σ r`` (the third-party
  L1 reading, for positive r such as the literal ``l2`` distances). ``"mean1"``: ``r / mean(r)``.

With α and τ of mean 1 and spread ~1, arguments differ by ~0.5–3 between experts, so T = 0.1 gives a near
hard selection, T = 1 clear preferences and T = 10 coefficients within ~10–30% of 1: T ∈ [0.1, 10] spans
sharp to near uniform (tested in ``tests/test_coefficients.py``). Equal scores give ``c ≡ 1`` exactly; so do
arguments that agree to 1e-6 relative (fp32 rounding of rescaled but otherwise equal sensitivities).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import GRANULARITIES, NORMALIZATIONS, SENS_MODES, TAU_NORMALIZATIONS, MergeConfig
from .groups import layer_group, sort_groups
from .store import SensitivityRecord

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_GROUPS",
    "CoefficientTable",
    "compute_coefficients",
    "group_score_matrix",
    "normalize_scores",
    "transfer_scores",
]

ALL_GROUPS = "*"  # the group of coefficients that do not depend on the group (sens="cross"/None, no records)

_REL_TOL = 1e-12  # spreads below this (relative to the values) count as "all equal"
_TIE_RTOL = 1e-6  # softmax arguments of one group closer than this (relative) are treated as equal


# --------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------


def _tensor_to_list(t: Tensor | None) -> Any:
    return None if t is None else t.tolist()


@dataclass
class CoefficientTable:
    """The coefficients of one merge.

    Args:
        experts: Expert names, in merge order (``K``).
        groups: Groups in model order (``G``); ``["*"]`` when the coefficients do not depend on the group.
        values: fp32 ``[K, G]``, the final coefficients ``c`` (Sens factor × user weight × global scale).
        alpha: fp32 ``[K, G]`` normalised task sensitivities, or None when no sensitivities were used.
        tau: fp32 ``[K]`` normalised transferability, or None.
        settings: How the table was computed (sens, temperature, normalization, granularity, weights, scale, ...).
        factors: fp32 ``[K, G]``, the Sens factors ``K * softmax`` alone (mean 1 per group).
    """

    experts: list[str]
    groups: list[str]
    values: Tensor
    alpha: Tensor | None = None
    tau: Tensor | None = None
    settings: dict = field(default_factory=dict)
    factors: Tensor | None = None

    def __post_init__(self) -> None:
        self.experts = list(self.experts)
        self.groups = list(self.groups)
        shape = (len(self.experts), len(self.groups))
        if tuple(self.values.shape) != shape:
            raise ValueError(f"CoefficientTable.values has shape {tuple(self.values.shape)}, expected {shape} "
                             "(experts × groups)")
        self._index = {g: i for i, g in enumerate(self.groups)}

    # -- lookups ------------------------------------------------------------------------------------------

    def default(self) -> Tensor:
        """``[K]`` coefficients of a group the table does not list: user weights × scale."""
        weights = self.settings.get("weights") or [1.0] * len(self.experts)
        return torch.tensor(weights, dtype=torch.float32) * float(self.settings.get("scale", 1.0))

    def for_group(self, group: str) -> Tensor:
        """``[K]`` coefficients of ``group``.

        A group not in the table gets the ``"*"`` row when the table has one (group-independent
        coefficients), else :meth:`default` (user weights × scale, i.e. the plain method there).
        """
        idx = self._index.get(group, self._index.get(ALL_GROUPS))
        if idx is None:
            return self.default()
        return self.values[:, idx].clone()

    def for_name(self, name: str) -> Tensor:
        """``[K]`` coefficients of a parameter or module name (PEFT-wrapped or canonical)."""
        return self.for_group(layer_group(name, self.settings.get("granularity", "layer")))

    # -- reporting ----------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """min/mean/max of ``c`` overall and per expert, and of the Sens factors alone."""

        def stats(t: Tensor) -> dict[str, float]:
            t = t.double()
            return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}

        out: dict[str, Any] = dict(stats(self.values))
        out["per_expert"] = {name: stats(self.values[k]) for k, name in enumerate(self.experts)}
        if self.factors is not None:
            out["factors"] = stats(self.factors)
        if self.tau is not None:
            out["tau"] = {name: float(self.tau[k]) for k, name in enumerate(self.experts)}
        for key in ("sens", "temperature", "normalization", "granularity"):
            if key in self.settings:
                out[key] = self.settings[key]
        out["num_groups"] = len(self.groups)
        return out

    def to_dict(self) -> dict:
        """A JSON-able dict (lists of floats); :meth:`from_dict` restores the table exactly."""
        return {
            "experts": list(self.experts),
            "groups": list(self.groups),
            "values": _tensor_to_list(self.values),
            "alpha": _tensor_to_list(self.alpha),
            "tau": _tensor_to_list(self.tau),
            "factors": _tensor_to_list(self.factors),
            "settings": dict(self.settings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> CoefficientTable:
        def tensor(key: str, shape: tuple[int, ...]) -> Tensor | None:
            raw = data.get(key)
            if raw is None:
                return None
            t = torch.tensor(raw, dtype=torch.float32)
            return t.reshape(shape)

        experts, groups = list(data["experts"]), list(data["groups"])
        kg = (len(experts), len(groups))
        return cls(experts=experts, groups=groups, values=tensor("values", kg), alpha=tensor("alpha", kg),
                   tau=tensor("tau", (len(experts),)), settings=dict(data.get("settings") or {}),
                   factors=tensor("factors", kg))

    @classmethod
    def from_json(cls, text: str) -> CoefficientTable:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        s = self.settings
        if s.get("sens") is None and self.alpha is None and self.tau is None:  # no Sens term: say so, not "T=1"
            head = (f"Coefficients per expert and group (sens=None: no Sens-Merging scaling, the experts' own "
                    f"weights; granularity={s.get('granularity')}, scale={s.get('scale')})")
        else:
            head = (f"Sens-Merging coefficients (sens={s.get('sens')}, T={s.get('temperature')}, "
                    f"normalization={s.get('normalization')}, granularity={s.get('granularity')}, "
                    f"scale={s.get('scale')})")
        gw = max([len("group")] + [len(g) for g in self.groups] + [len("tau")])
        cw = [max(9, len(e)) for e in self.experts]
        lines = [head, "  ".join(["group".ljust(gw)] + [e.rjust(w) for e, w in zip(self.experts, cw)])]
        for gi, group in enumerate(self.groups):
            cells = [f"{float(self.values[k, gi]):.4f}".rjust(w) for k, w in enumerate(cw)]
            lines.append("  ".join([group.ljust(gw)] + cells))
        if self.tau is not None:
            cells = [f"{float(self.tau[k]):.4f}".rjust(w) for k, w in enumerate(cw)]
            lines.append("  ".join(["tau".ljust(gw)] + cells))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# α: group scores and their normalisation
# --------------------------------------------------------------------------------------------------------


def _record_group_scores(record: SensitivityRecord, granularity: str) -> dict[str, float]:
    if granularity == "layer":
        return {g: float(v) for g, v in zip(record.groups, record.group_scores.tolist())}
    scores: dict[str, float] = {}
    for name, value in zip(record.tensor_names, record.tensor_scores.tolist()):
        group = layer_group(name, granularity)
        scores[group] = scores.get(group, 0.0) + float(value)
    return scores


def group_score_matrix(records: Sequence[SensitivityRecord], granularity: str = "layer",
                       expert_names: Sequence[str] | None = None) -> tuple[list[str], Tensor, Tensor]:
    """Raw per-group scores of each expert at a granularity.

    Args:
        records: One record per expert.
        granularity: ``"layer"`` uses ``record.groups``/``group_scores``; finer ones regroup
            ``tensor_names``/``tensor_scores`` (summed) with :func:`sens_peft.groups.layer_group`.
        expert_names: Names for error messages.

    Returns:
        ``(groups, scores, present)``: the union of groups in model order, float64 ``[K, G]`` scores
        (0 where missing) and a boolean ``[K, G]`` mask of the groups each expert has.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    names = list(expert_names) if expert_names is not None else [str(k) for k in range(len(records))]
    per_expert = []
    for k, record in enumerate(records):
        scores = _record_group_scores(record, granularity)
        bad = {g: v for g, v in scores.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"sensitivity of expert {names[k]!r} has negative or non-finite group scores "
                             f"{dict(list(bad.items())[:5])}; expected sums of |w * g| >= 0")
        per_expert.append(scores)
    groups = sort_groups(g for scores in per_expert for g in scores)
    matrix = torch.zeros(len(records), len(groups), dtype=torch.float64)
    present = torch.zeros(len(records), len(groups), dtype=torch.bool)
    for k, scores in enumerate(per_expert):
        for gi, group in enumerate(groups):
            if group in scores:
                matrix[k, gi] = scores[group]
                present[k, gi] = True
    return groups, matrix, present


def _standardize(x: Tensor) -> Tensor:
    mean = x.mean()
    std = x.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    if std <= _REL_TOL * max(1.0, float(mean.abs())):
        return torch.zeros_like(x)
    return (x - mean) / std


def normalize_scores(scores: Tensor, method: str = "mean1") -> Tensor:
    """Normalise one expert's group scores (1-D, non-negative) into α.

    ``mean1``: ``S / mean S``; ``l2``: ``S / ||S||_2``; ``sum1``: ``S / Σ S``; ``zscore``: ``max(1 + z, 0)``
    with ``z = (S - mean) / std``. All-zero (or constant, for ``zscore``) scores give the neutral value
    (1, ``1/sqrt(n)``, ``1/n``, 1 respectively).

    Args:
        scores: 1-D tensor of scores.
        method: One of ``mean1``, ``l2``, ``sum1``, ``zscore``.

    Returns:
        float64 tensor with the shape of ``scores``.
    """
    x = scores.double()
    n = x.numel()
    if n == 0:
        return x
    if method == "mean1":
        total = x.mean()
        return x / total if total > 0 else torch.ones_like(x)
    if method == "l2":
        norm = x.norm()
        return x / norm if norm > 0 else torch.full_like(x, 1.0 / math.sqrt(n))
    if method == "sum1":
        total = x.sum()
        return x / total if total > 0 else torch.full_like(x, 1.0 / n)
    if method == "zscore":
        return (1.0 + _standardize(x)).clamp(min=0.0)
    raise ValueError(f"normalization={method!r} is not one of {list(NORMALIZATIONS)}")


def _alpha(scores: Tensor, present: Tensor, method: str) -> Tensor:
    alpha = torch.zeros_like(scores)
    for k in range(scores.shape[0]):
        mask = present[k]
        if mask.any():
            row = normalize_scores(scores[k][mask], method)
            alpha[k][mask] = row
            # A group the expert was not scored on gets its mean α: neither favoured nor penalised.
            alpha[k][~mask] = row.mean()
        else:
            alpha[k] = normalize_scores(torch.zeros(scores.shape[1], dtype=scores.dtype), method).mean()
    return alpha


# --------------------------------------------------------------------------------------------------------
# τ: transferability
# --------------------------------------------------------------------------------------------------------


def transfer_scores(transfer: Tensor, method: str = "exp_z", expert_names: Sequence[str] | None = None) -> Tensor:
    """τ from a transferability matrix ``A`` (``A[i][j]``: alignment of expert i with expert j on probe j).

    ``r_k`` is the mean of row k over ``j != k`` (the diagonal is ignored); τ normalises ``r`` across
    experts (see the module docstring). ``K = 1`` gives ``τ = [1]``; equal ``r`` give ``τ ≡ 1``.

    Args:
        transfer: ``[K, K]`` matrix.
        method: ``exp_z`` (default), ``zscore``, ``sum1`` or ``mean1``.
        expert_names: Names for error messages.

    Returns:
        float64 ``[K]``.
    """
    a = torch.as_tensor(transfer).double()
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"transferability matrix must be square [K, K], got shape {tuple(a.shape)}")
    num = a.shape[0]
    if not torch.isfinite(a).all():
        raise ValueError("transferability matrix has non-finite entries")
    if method not in TAU_NORMALIZATIONS:
        raise ValueError(f"tau_normalization={method!r} is not one of {list(TAU_NORMALIZATIONS)}")
    if num == 1:
        return torch.ones(1, dtype=torch.float64)
    off = ~torch.eye(num, dtype=torch.bool)
    r = (a * off).sum(dim=1) / (num - 1)
    if method == "exp_z":
        e = torch.exp(_standardize(r))
        return e / e.mean()
    if method == "zscore":
        return (1.0 + _standardize(r)).clamp(min=0.0)
    if (r <= 0).any():
        names = list(expert_names) if expert_names is not None else list(range(num))
        bad = [names[k] for k in range(num) if r[k] <= 0]
        raise ValueError(f"tau_normalization={method!r} needs positive row means (e.g. the literal 'l2' "
                         f"distances); experts {bad} have r <= 0. Use 'exp_z' for signed alignments.")
    return r / r.sum() if method == "sum1" else r / r.mean()


# --------------------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------------------


def _k_softmax(arg: Tensor) -> Tensor:
    """``K * softmax`` over dim 0, exactly 1 where a column is constant."""
    num = arg.shape[0]
    e = torch.exp(arg - arg.max(dim=0, keepdim=True).values)
    # (K * e) / Σe rather than K * (e / Σe): a constant column gives K / K == 1 with no rounding.
    return (num * e) / e.sum(dim=0, keepdim=True)


def _checked_inputs(records, transfer, expert_names, sens, temperature, normalization, granularity, weights,
                    scale) -> tuple[list[str], Tensor, list | None]:
    """The expert names, the fp64 user weights and the records, after checking every setting and input."""
    names = [str(n) for n in expert_names]
    num = len(names)
    if num < 1:
        raise ValueError("compute_coefficients needs at least one expert name")
    if len(set(names)) != num:
        raise ValueError(f"expert names must be unique, got {names}")
    for key, value, allowed in (("sens", sens, SENS_MODES), ("normalization", normalization, NORMALIZATIONS),
                                ("granularity", granularity, GRANULARITIES)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    w = torch.ones(num, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double().reshape(-1)
    if w.numel() != num:
        raise ValueError(f"got {w.numel()} weights for {num} experts {names}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if records is not None:
        records = list(records)
        if len(records) != num:
            raise ValueError(f"got {len(records)} sensitivity records for {num} experts {names}")
    have_all_records = records is not None and all(r is not None for r in records)
    if sens in ("task", "task+cross") and not have_all_records:
        missing = names if records is None else [n for n, r in zip(names, records) if r is None]
        raise ValueError(f"sens={sens!r} needs a sensitivity record for every expert; missing for {missing} "
                         "(train with SensitivityCallback or run compute_sensitivity, or use sens='cross'/None)")
    if sens in ("cross", "task+cross") and transfer is None:
        raise ValueError(f"sens={sens!r} needs a transferability matrix (see sens_peft.transfer), got None")
    return names, w, records


def _softmax_arguments(sens, alpha: Tensor | None, tau: Tensor | None, num: int, num_groups: int) -> Tensor:
    """``[K, G]`` arguments of the softmax (``α·τ``, ``α``, ``τ`` or zeros), with near-equal columns made equal."""
    if sens == "task+cross":
        arg = alpha * tau[:, None]  # type: ignore[index,operator]
    elif sens == "task":
        arg = alpha
    elif sens == "cross":
        arg = tau[:, None].expand(num, num_groups)  # type: ignore[index]
    else:
        arg = torch.zeros(num, num_groups, dtype=torch.float64)
    # Columns whose arguments agree to 1e-6 (relative) count as equal: sidecars store fp32, so two experts
    # with the same profile at different loss levels agree only to rounding, and must still give c == 1.
    spread = arg.max(dim=0).values - arg.min(dim=0).values  # type: ignore[union-attr]
    tied = spread <= _TIE_RTOL * arg.abs().max(dim=0).values  # type: ignore[union-attr]
    return torch.where(tied[None, :], torch.zeros_like(arg), arg)  # type: ignore[arg-type]


def safe_temperature(arguments: Tensor, temperature: float, max_ratio: float | None) -> float:
    """The smallest ``T' >= temperature`` at which ``K·softmax_k(arg / T')`` keeps ``max_k c / min_k c <= max_ratio``
    in every group (column of ``arguments``).

    The ratio of two softmax entries is ``exp(Δarg / T)``, so ``T' = max(T, max_g spread_g / ln max_ratio)``.
    Why: the paper's arguments ``α·τ`` have no fixed scale, and at some normalisations ``T = 1`` hands a whole layer
    to one expert (the quick start's Sens-TA fell below the base model that way); the bound keeps the paper's
    ordering of the experts while capping how far any one of them is pushed.
    """
    if max_ratio is None:
        return float(temperature)
    if not max_ratio > 1.0:
        raise ValueError(f"max_ratio must be > 1 (or None), got {max_ratio!r}")
    spread = float((arguments.max(dim=0).values - arguments.min(dim=0).values).max()) if arguments.numel() else 0.0
    return max(float(temperature), spread / math.log(max_ratio))


def compute_coefficients(records: Sequence[SensitivityRecord | None] | None, transfer: Tensor | None, *,
                         expert_names: Sequence[str], sens: str | None = MergeConfig.sens,
                         temperature: float = MergeConfig.temperature, normalization: str = MergeConfig.normalization,
                         granularity: str = MergeConfig.granularity,
                         weights: Sequence[float] | Tensor | None = None, scale: float = 1.0,
                         tau_normalization: str = MergeConfig.tau_normalization,
                         max_ratio: float | None = MergeConfig.max_ratio,
                         config: MergeConfig | None = None) -> CoefficientTable:
    """Sens-Merging coefficients ``c[k][g] = K * softmax_k(arg[k][g] / T) * w_k * λ``.

    A merge passes its :class:`~sens_peft.config.MergeConfig` (``config=``), whose fields then give every setting
    (``sens``, ``temperature``, ``normalization``, ``tau_normalization``, ``granularity``, ``weights`` and the
    resolved ``scale``). The keyword settings are for direct use; their defaults are MergeConfig's (the one source
    of defaults), so the paper's reading needs ``sens="task+cross", normalization="mean1",
    tau_normalization="exp_z"``.

    Args:
        records: One :class:`SensitivityRecord` per expert (needed for ``sens`` ``"task"``/``"task+cross"``;
            when given otherwise it only fixes the groups and α is reported).
        transfer: ``[K, K]`` transferability matrix (needed for ``"cross"``/``"task+cross"``).
        expert_names: Expert names (``K``), in merge order.
        sens: ``"task+cross"`` (``arg = α·τ``), ``"task"`` (α), ``"cross"`` (τ) or None (all ones; default).
        temperature: Softmax temperature ``T > 0``; larger is closer to uniform.
        normalization: α normalisation within each expert: ``mean1``, ``l2`` (default), ``sum1``, ``zscore``.
        granularity: ``layer``, ``module_type`` or ``projection``.
        weights: Per-expert user weights ``w_k`` (default 1).
        scale: Global coefficient λ.
        tau_normalization: τ normalisation across experts: ``exp_z``, ``zscore``, ``sum1``, ``mean1`` (default).
        max_ratio: Bound on ``max_k c / min_k c`` within any group: the temperature actually used is raised to
            :func:`safe_temperature` when ``T`` would exceed it (None: ``T`` as given, the paper's behaviour).
        config: Take every setting above from this merge configuration instead.

    Returns:
        A :class:`CoefficientTable`. Its summary is logged at INFO level.

    Raises:
        ValueError: on inconsistent lengths, unknown options, or a missing input the chosen ``sens`` needs.
    """
    if config is not None:
        sens, temperature, normalization = config.sens, config.temperature, config.normalization
        tau_normalization, granularity = config.tau_normalization, config.granularity
        weights, scale, max_ratio = config.weights, config.resolved_scale(), config.max_ratio
    names, w, records = _checked_inputs(records, transfer, expert_names, sens, temperature, normalization,
                                        granularity, weights, scale)
    num = len(names)
    alpha = tau = None
    if records is not None and all(r is not None for r in records):
        groups, raw, present = group_score_matrix(records, granularity, names)  # type: ignore[arg-type]
        alpha = _alpha(raw, present, normalization)
    else:
        groups = [ALL_GROUPS]
    if transfer is not None:
        t = torch.as_tensor(transfer)
        if tuple(t.shape) != (num, num):
            raise ValueError(f"transferability matrix has shape {tuple(t.shape)}, expected ({num}, {num}) "
                             f"for experts {names}")
        tau = transfer_scores(t, tau_normalization, names)
    arguments = _softmax_arguments(sens, alpha, tau, num, len(groups))
    used_t = safe_temperature(arguments, float(temperature), max_ratio)
    if used_t != float(temperature):
        logger.info("Sens-Merging temperature raised from %g to %.4g so that no group's coefficients differ by more "
                    "than max_ratio=%g", temperature, used_t, max_ratio)
    factors = _k_softmax(arguments / used_t)
    values = factors * w[:, None] * float(scale)

    settings = {
        "sens": sens,
        "temperature": float(temperature),
        "temperature_used": used_t,
        "max_ratio": max_ratio,
        "normalization": normalization,
        "tau_normalization": tau_normalization,
        "granularity": granularity,
        "weights": [float(x) for x in w.tolist()],
        "scale": float(scale),
    }
    table = CoefficientTable(
        experts=names,
        groups=list(groups),
        values=values.float(),
        alpha=None if alpha is None else alpha.float(),
        tau=None if tau is None else tau.float(),
        settings=settings,
        factors=factors.float(),
    )
    stats = table.summary()
    logger.info(
        "Sens-Merging coefficients (sens=%s, T=%g, normalization=%s, granularity=%s, %d groups): "
        "c min %.4f / mean %.4f / max %.4f; per expert %s",
        sens, temperature, normalization, granularity, len(groups), stats["min"], stats["mean"], stats["max"],
        ", ".join(f"{n}: {v['min']:.3f}/{v['mean']:.3f}/{v['max']:.3f}" for n, v in stats["per_expert"].items()),
    )
    return table
