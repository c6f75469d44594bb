"""What a merge method is: its declarations (name, parameters, needed statistics, default scale, description,
reference) and the hooks the engines call. One subclass per method, one file per method, in this package.

The engines (:func:`~sens_peft.methods.merge_deltas` for whole tensors, :func:`~sens_peft.methods.merge_streamed`
for chunked full-model merges, :mod:`sens_peft.merging` for LoRA output) ask the method, never its name:

* :meth:`MergeMethod.combine` (required): the dense hook. Stacked deltas ``[K, ...]``, coefficients ``[K]``, a
  :class:`MergeContext`; returns the combined ``[...]`` tensor before the global scale.
* :meth:`MergeMethod.stream` (optional): the chunked hook of :func:`~sens_peft.methods.merge_streamed`. Without
  it, a full-model merge loads the whole tensor and calls :meth:`combine`.
* :meth:`MergeMethod.stream_prepare` / :meth:`prepared` / :meth:`prepare_bytes` (optional): work a streamed merge
  can do ahead on worker threads (TIES thresholds, DARE masks).
* :meth:`MergeMethod.exact_lora_rank` / :meth:`lora_factors` (optional): exact LoRA factors of the merge (task
  arithmetic's concatenation); otherwise the merged ``ΔW`` is factorised by a truncated SVD.
* :meth:`MergeMethod.fit` (optional, with ``needs_probes = True``): the model-in-the-loop hook. Called once after the
  plan, before any tensor is merged, with a :class:`FitProblem` (the experts' deltas, their probe sets and a forward
  pass of the base model with deltas added); its :class:`FitResult` replaces the plan's coefficient table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

__all__ = ["FitProblem", "FitResult", "MergeContext", "MergeMethod", "Param"]


@dataclass(frozen=True)
class Param:
    """A parameter a method declares for itself (set through ``MergeConfig.params`` / a recipe's ``parameters:``).

    Args:
        name: Key in ``MergeConfig.params`` and in a recipe's ``parameters:``.
        kind: ``float``, ``int``, ``bool`` or ``str``.
        default: Value when unset.
        help: One line for the card and ``sens-peft merge --help``.
        low, high: Inclusive bounds of a number (None: unbounded).
        choices: Allowed values of a string.
    """

    name: str
    kind: type
    default: Any
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple] = None

    def check(self, value: Any) -> Any:
        """``value`` converted to ``kind``; ValueError naming the parameter when it does not fit."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float) if self.kind is float else self.kind) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}")
        value = self.kind(value)
        if self.kind in (int, float) and not (math.isfinite(value) and (self.low is None or value >= self.low)
                                              and (self.high is None or value <= self.high)):
            raise ValueError(f"parameter {self.name!r} must be in [{self.low}, {self.high}], got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {self.name!r}={value!r} is not one of {list(self.choices)}")
        return value

    def describe(self) -> str:
        """``name (float in [0, 1], default 0.5): help``."""
        where = f" in [{self.low}, {self.high}]" if self.low is not None or self.high is not None else ""
        where = f" one of {list(self.choices)}" if self.choices else where
        return f"{self.name} ({self.kind.__name__}{where}, default {self.default!r}): {self.help}"


@dataclass
class MergeContext:
    """What the dense hook gets besides the deltas and coefficients.

    Attributes:
        name: Tensor name (canonical weight name; seeds DARE, names errors).
        params: Every parameter the method sees (``MergeConfig.method_params()``).
        statistics: Captured statistics of this tensor by kind (e.g. ``"element_maps"``), each stacked
            ``[K, ...]`` in the math dtype on ``device``; a kind is absent when not provided.
        draw_keep: ``draw_keep(k)``: expert ``k``'s DARE keep-mask (methods with ``random = True`` and density
            < 1; call for k = 0, 1, ... in order), else None.
        device: The math device.
    """

    name: str
    params: Mapping[str, Any]
    statistics: Mapping[str, Tensor] = field(default_factory=dict)
    draw_keep: Optional[Callable[[int], Tensor]] = None
    device: torch.device = torch.device("cpu")

    def statistic(self, kind: str) -> Optional[Tensor]:
        """The stacked ``[K, ...]`` statistic ``kind``, or None."""
        return self.statistics.get(kind)


@dataclass
class FitProblem:
    """What :meth:`MergeMethod.fit` gets: the planned merge, the probes, and the base model as a function.

    Attributes:
        experts: Expert names (``K``).
        tensors: Merged tensor (canonical weight name) → the indices of the experts that have a delta for it.
        deltas: ``deltas(name)``: those experts' deltas of the tensor (fp32 on ``device``, the weight's layout).
        merge: ``merge(name, coefficients)``: the method's dense merge of the tensor (``merge_deltas`` with the plan's
            settings and statistics) with ``coefficients`` (one per expert in ``tensors[name]``).
        coefficients: ``coefficients(name)``: the plan's ``[K]`` coefficients of the tensor (weights and λ included).
        logits: ``logits(deltas, batch)``: the base model's logits with ``deltas`` (name → tensor) added to its
            weights, differentiable in the deltas (the base weights are not copied).
        probes: One :class:`~sens_peft.store.ProbeSet` per expert.
        params: The method's parameters, and the merge's ``scale`` (λ). device: Where the deltas live and the model
            runs.
    """

    experts: list[str]
    tensors: dict[str, list[int]]
    deltas: Callable[[str], list[Tensor]]
    merge: Callable[[str, Tensor], Tensor]
    coefficients: Callable[[str], Tensor]
    logits: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]
    probes: list
    params: Mapping[str, Any]
    device: torch.device = torch.device("cpu")


@dataclass
class FitResult:
    """What :meth:`MergeMethod.fit` returns.

    Attributes:
        table: The coefficient table the merge uses instead of the plan's (a
            :class:`~sens_peft.coefficients.CoefficientTable`).
        report: JSON-able facts for the merge card and ``sens-peft inspect`` (losses, steps, samples...).
    """

    table: Any
    report: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """One merge method. Subclasses set the class attributes and implement :meth:`combine`.

    Attributes:
        name: Registry key (``MergeConfig.method``).
        description: One line for the merge card and ``sens-peft merge --help``.
        reference: Paper or source of the method.
        uses: The shared ``MergeConfig`` fields it reads (``density``, ``majority_sign_method``, ``trim_by``,
            ``weighted_election``, ``seed``, ``dare_rng``): shown in the card and the CLI help.
        parameters: Its own parameters (:class:`Param`), set through ``MergeConfig.params``.
        needs: The captured statistics it always needs (e.g. ``("element_maps",)``); see
            :meth:`needed_statistics` for needs that depend on the settings.
        optional_statistics: Needed kinds that a whole tensor may lack in every expert (RegMean's Grams exist for
            Linear weights only); the method then gets no such statistic for that tensor and must say in its
            docstring what it does. A tensor that some experts have it for and others not is still an error.
        random: Whether it draws DARE masks (gets ``ctx.draw_keep``).
        full_weights: Whether it combines the experts' full weights rather than their deltas (SLERP): it merges
            full models only (``merge_models``), and ``merge_adapters`` refuses it.
        needs_probes: Whether it fits on the experts' probe sets with the base model in the loop (:meth:`fit`).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    uses: ClassVar[tuple[str, ...]] = ()
    parameters: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    optional_statistics: ClassVar[tuple[str, ...]] = ()
    random: ClassVar[bool] = False
    full_weights: ClassVar[bool] = False
    needs_probes: ClassVar[bool] = False

    # -- declarations that depend on the settings -------------------------------------------------------------

    def resolve(self, params: Mapping[str, Any], available: Collection[str]) -> dict[str, Any]:
        """Settings left to the method (``trim_by="auto"``), given the statistic kinds every expert has."""
        return {"trim_by": "magnitude"} if params.get("trim_by") == "auto" else {}

    def needed_statistics(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The statistic kinds this merge needs with these (resolved) settings."""
        return tuple(self.needs)

    def default_scale(self, params: Mapping[str, Any]) -> float:
        """``lambda`` when ``MergeConfig.scale`` is None."""
        return 1.0

    def draws_masks(self, params: Mapping[str, Any]) -> bool:
        """Whether this merge, with these settings, draws DARE masks (what the merge card reports)."""
        return self.random

    def model_settings(self, params: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict[str, Any]:
        """Own parameters a full-model merge takes from the base model's ``config.json`` where the user left them
        unset (SLERP's ``num_layers``); ValueError when the config lacks what these settings need."""
        return {}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` checked against :attr:`parameters` (unknown keys and bad values raise ValueError)."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {unknown}; its parameters: "
                             f"{sorted(declared) or 'none'}")
        return {key: declared[key].check(value) for key, value in params.items()}

    # -- hooks -----------------------------------------------------------------------------------------------

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        """The dense hook: the combined ``[...]`` delta before the global scale."""
        raise NotImplementedError

    def stream(self, job: Any) -> bool:
        """The chunked hook: merge ``job`` (a :class:`~sens_peft.methods.streamed.StreamJob`) into ``job.out``;
        returns False when a non-finite value was seen (or not ruled out)."""
        raise NotImplementedError

    @property
    def streams(self) -> bool:
        """Whether the method has a chunked hook (else a full-model merge uses :meth:`combine`)."""
        return type(self).stream is not MergeMethod.stream

    def chunked(self, params: Mapping[str, Any]) -> bool:
        """Whether a merge with these settings runs the chunked hook (:meth:`stream`), else :meth:`combine`;
        :attr:`streams` unless the method delegates to another (``probe_fit`` to its base method)."""
        return self.streams

    def prepares(self, params: Mapping[str, Any]) -> bool:
        """Whether :meth:`stream_prepare` has work for these settings (else no worker threads are started)."""
        return False

    def stream_prepare(self, base: Tensor, experts: Sequence[Tensor], params: Mapping[str, Any], name: str,
                       statistics: Mapping[str, Sequence[Tensor]], parts: int, device: torch.device,
                       out_dtype: torch.dtype) -> Optional[list[Callable[[], Any]]]:
        """Jobs (about ``parts`` of them) that prepare a streamed merge of one tensor on worker threads, or None."""
        return None

    def prepared(self, results: list) -> dict[str, Any]:
        """The keyword arguments of :func:`~sens_peft.methods.merge_streamed` from the prepared jobs' results."""
        return {}

    def prepare_bytes(self, numel: int, num: int, params: Mapping[str, Any], device: torch.device) -> int:
        """Bytes the prepared results of a tensor of ``numel`` entries hold in memory."""
        return 0

    def exact_lora_rank(self, ranks: Sequence[int], params: Mapping[str, Any]) -> Optional[int]:
        """Rank of the exact LoRA output from experts of ``ranks`` (one module), or None (SVD of ΔW instead)."""
        return None

    def lora_factors(self, factors: Sequence[tuple[Tensor, Tensor, float]], coefficients: Sequence[float],
                     rank: int, device: torch.device, ctx: Optional[MergeContext] = None) -> tuple[Tensor, Tensor]:
        """Exact ``(A, B)`` (``B @ A`` the merged ΔW, zero-padded to ``rank``) from the experts' ``(A, B, scaling)``;
        ``ctx`` carries the module's statistics (stacked ``[K, ...]``) and the method's parameters."""
        raise NotImplementedError

    def fit(self, problem: FitProblem) -> FitResult:
        """The model-in-the-loop hook (methods with ``needs_probes = True``): the coefficient table to merge with."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
