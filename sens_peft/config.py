"""Configuration objects: one dataclass per job, validated in ``__post_init__``.

``SensitivityConfig`` drives the capture side (the training callback and the post-hoc calibration pass);
``MergeConfig`` drives the merge side. Both serialise to plain dicts (``to_dict``) so they can be written
into sidecar metadata, merge cards and YAML recipes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

Mode = Literal["after", "during", "both"]
WeightSource = Literal["auto", "theta", "delta", "adapter"]
LossTokens = Literal["labels", "full"]
SensMode = Optional[Literal["task+cross", "task", "cross"]]
Normalization = Literal["mean1", "l2", "sum1", "zscore"]
TauNormalization = Literal["exp_z", "zscore", "sum1", "mean1"]
Alignment = Literal["neg_l2", "cosine", "neg_kl", "l2"]
Granularity = Literal["layer", "module_type", "projection"]
OutputKind = Literal["lora", "full"]
MajoritySign = Literal["total", "frequency"]
TrimBy = Literal["auto", "magnitude", "sensitivity"]
DareRng = Literal["counter", "torch"]
Factorization = Literal["randomized", "exact"]


def choices(kind: Any) -> tuple:
    """The allowed values of a ``Literal`` type above (``Optional[Literal[...]]`` adds None): the one list of them."""
    values: list = []
    for arg in get_args(kind):
        values.extend(get_args(arg) if get_args(arg) else [arg])
    return tuple(None if v is type(None) else v for v in values)


MODES = choices(Mode)
WEIGHT_SOURCES = choices(WeightSource)
LOSS_TOKENS = choices(LossTokens)
SENS_MODES = choices(SensMode)
NORMALIZATIONS = choices(Normalization)
TAU_NORMALIZATIONS = choices(TauNormalization)
ALIGNMENTS = choices(Alignment)
GRANULARITIES = choices(Granularity)
MAJORITY_SIGN_METHODS = choices(MajoritySign)
TRIM_BY = choices(TrimBy)
DARE_RNGS = choices(DareRng)
FACTORIZATIONS = choices(Factorization)


# "auto" element maps are kept when the scored tensors hold at most this many elements (256 MB in fp32): always
# for LoRA experts of small and mid-size models, not for multi-billion-parameter full weights.
ELEMENT_MAP_BUDGET = 2**26


def wants_element_maps(setting: Any, numel: int) -> bool:
    """Resolve ``SensitivityConfig.element_maps`` (True / False / ``"auto"``) for ``numel`` scored elements."""
    if setting == "auto":
        return numel <= ELEMENT_MAP_BUDGET
    return bool(setting)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


@dataclass
class SensitivityConfig(_ConfigMixin):
    """How an expert's sensitivity is measured and stored.

    Args:
        task: Name of the expert's task, stored in the sidecar metadata (e.g. ``"math"``).
        mode: ``"after"`` runs a calibration pass with per-sample gradients at the end of training
            (the paper's estimator); ``"during"`` accumulates ``|w * g|`` once per optimizer step from the
            gradients the optimizer consumes; ``"both"`` does both and stores the ``after`` scores as the
            primary ones (the ``during`` ones under ``during.*`` keys).
        weight_source: The ``w`` in ``|w * g|``. ``"theta"``: the expert's full weights (for LoRA
            ``W0 + s*B@A``; needs the ``after`` pass). ``"delta"``: the task vector (for LoRA ``s*B@A``).
            ``"adapter"``: the LoRA factors ``A`` and ``B`` themselves. ``"auto"`` picks the library default
            for the expert type and mode (see ``resolve_weight_source``).
        calibration_samples: Number of held examples of the expert's own training data for the ``after``
            pass (the paper used 100).
        calibration_batch_size: Examples per backward pass in the ``after`` pass. 1 gives exact per-sample
            gradients (the paper's estimator); larger is faster and estimates ``|w * mean g|`` per batch.
        max_length: Truncation length for calibration and probe sequences.
        loss_tokens: ``"labels"`` scores the tokens the training labels score (response-only when the data
            masks the prompt); ``"full"`` scores every non-padding token.
        store_probe: Keep ``probe_samples`` token sequences of the training data in ``probe.safetensors``
            for the cross-task (transferability) score. On by default because the paper's cross-task factor
            needs each expert's own data at merge time, which the person merging often no longer has; a few
            sequences next to the expert make ``sens="task+cross"`` work out of the box. These are training
            text: :func:`sens_peft.hub.push_to_hub` warns when it uploads a probe (``include_probe=False``
            leaves it out). Turn this off for private data and pass ``probes=`` at merge time instead.
        probe_samples: Number of probe sequences to keep.
        element_maps: Also store per-element importance maps ``mean |w * g|`` (``element.<name>``, the shape of
            each scored weight). They drive the default merge's sensitivity-guided TIES trimming, which beat
            every coefficient reading on the quality benchmark (benchmarks/README.md). ``"auto"`` (default)
            keeps them when the scored tensors hold at most ``ELEMENT_MAP_BUDGET`` (2**26) elements; ``True``
            always (for a 7B model with LoRA on every projection that is the size of the model, in fp32).
        gram: Input Gram matrices ``G = sum x x^T`` of each Linear the merge touches, for RegMean (captured in the
            calibration pass: ``mode="after"``/``"both"`` and :func:`~sens_peft.compute_sensitivity`; not in
            ``"during"``, whose activations come from weights that are still changing). ``"full"``: ``[in, in]``
            per stored Gram; ``"diag"``: its diagonal ``[in]`` only; ``"lowrank"``: the exact diagonal plus a
            rank-``gram_rank`` Nystrom factor of the rest, from a streamed sketch (``in * (gram_rank + 1)``
            numbers per Gram; 7B with LoRA on all projections at rank 256: 0.71 GiB fp32 instead of 20 GiB);
            ``"none"``: off. ``"auto"`` (default): full for whole input-width classes, narrowest first, while the
            fp32 sums of the full Grams (one per distinct input: q/k/v and gate/up share) fit in
            ``gram_max_bytes``; the rest low-rank when the sketches fit in the remaining budget, else diagonal
            (so a 1B-class Llama gets full hidden-width Grams and a sketched ``down_proj`` input, a 7B sketches
            everything). :meth:`~sens_peft.store.SensitivityRecord.statistic` returns an ``[in, in]`` matrix for
            full and low-rank Grams, ``[in]`` for diagonals. On the toy base's activations (benchmarks/
            stats_cost.py), against full Grams on RegMean's objective, a diagonal lost ~90% of RegMean's gain
            over averaging and a rank-32 sketch of 128/256-wide inputs 5% (alpha=1) or 0.1% (alpha=0.9); not yet
            compared on the quality benchmark. Inputs are the expert's own activations over non-padding tokens.
        gram_dtype: Storage dtype of the Grams in the sidecar (sums are accumulated in fp32 either way).
            ``"float32"`` (default) is lossless; ``"bfloat16"`` halves the file but, at shrinkage ``alpha=1``
            (plain RegMean, the best setting measured so far), lost a median 12% (up to 68% on one module) of
            RegMean's gain over averaging on its regression objective with the toy base's own activations, and
            2-9% on synthetic ones; <0.1% at ``alpha<=0.9`` (``benchmarks/stats_cost.py``). fp16 is not
            offered: token sums overflow it.
        gram_max_bytes: Budget of ``gram="auto"`` in bytes of fp32 sums on the model's device (default 1 GiB).
            With LoRA on all seven projections of a Llama that is everything full for small models (the toy:
            3.5 MiB), the hidden-width inputs full and ``down_proj`` sketched for 0.5B-1B-class models (hidden
            2048, 16 layers: 0.75 GiB + 0.13 GiB), all sketched for 7B (0.71 GiB; full would be 20 GiB fp32,
            10 GiB bf16; per-shape sizes in ``benchmarks/stats_cost.py``).
        gram_rank: Rank ``k`` of ``gram="lowrank"`` (inputs no wider than ``k`` are stored full).
        fisher: Also store the diagonal empirical Fisher ``E[g^2]`` per element of each scored tensor
            (``fisher.<name>``) for Fisher merging. ``"auto"`` (default) follows the ``element_maps`` size budget.
        ema: Optional EMA factor for ``during`` mode (``None``: plain mean over steps).
        every_n_steps: In ``during`` mode, measure every n-th optimizer step.
        seed: Seed for picking calibration and probe examples.
        log_scores: Add the per-group scores to the Trainer's logs as ``sensitivity/<group>`` (e.g.
            ``sensitivity/layers.3``), so every ``report_to`` integration (TensorBoard, W&B, MLflow, ...) shows
            them (TensorBoard and W&B show ``train/sensitivity/<group>``: they prefix non-eval keys with
            ``train/``): in ``during``/``both`` mode the running values at each logging step (``sensitivity/during/<group>``
            in ``both`` mode), and the final scores once at the end of training, after the calibration pass. The
            callback places itself before the integrations' callbacks so that they see the added entries. With
            ``report_to="tensorboard"`` (and matplotlib installed) the final alpha per group, normalised as the
            merge's default ``normalization``, is also drawn as an image (``sensitivity/alpha``).
            ``False`` leaves the logs untouched.
    """

    task: Optional[str] = None
    mode: Mode = "after"
    weight_source: WeightSource = "auto"
    calibration_samples: int = 32
    calibration_batch_size: int = 1
    max_length: int = 512
    loss_tokens: LossTokens = "labels"
    store_probe: bool = True
    probe_samples: int = 16
    element_maps: Union[bool, Literal["auto"]] = "auto"
    gram: Literal["auto", "full", "diag", "lowrank", "none"] = "auto"
    gram_dtype: Literal["float32", "bfloat16"] = "float32"
    gram_max_bytes: int = 2**30
    gram_rank: int = 256
    fisher: Union[bool, Literal["auto"]] = "auto"
    ema: Optional[float] = None
    every_n_steps: int = 1
    seed: int = 0
    log_scores: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("weight_source", self.weight_source, WEIGHT_SOURCES)
        _check_choice("loss_tokens", self.loss_tokens, LOSS_TOKENS)
        for name in ("calibration_samples", "calibration_batch_size", "max_length", "every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.probe_samples, int) or self.probe_samples < 0:
            raise ValueError(f"probe_samples must be a non-negative integer, got {self.probe_samples!r}")
        if self.element_maps not in (True, False, "auto"):
            raise ValueError(f"element_maps must be True, False or 'auto', got {self.element_maps!r}")
        _check_choice("gram", self.gram, ("auto", "full", "diag", "lowrank", "none"))
        _check_choice("gram_dtype", self.gram_dtype, ("float32", "bfloat16"))
        if not isinstance(self.gram_rank, int) or self.gram_rank < 1:
            raise ValueError(f"gram_rank must be a positive integer, got {self.gram_rank!r}")
        if not isinstance(self.gram_max_bytes, int) or self.gram_max_bytes < 0:
            raise ValueError(f"gram_max_bytes must be a non-negative integer, got {self.gram_max_bytes!r}")
        if self.fisher not in (True, False, "auto"):
            raise ValueError(f"fisher must be True, False or 'auto', got {self.fisher!r}")
        if self.ema is not None and not (0.0 < float(self.ema) < 1.0):
            raise ValueError(f"ema must be in (0, 1) or None, got {self.ema!r}")
        if not isinstance(self.log_scores, bool):
            raise ValueError(f"log_scores must be True or False, got {self.log_scores!r}")

    def resolve_weight_source(self, expert_type: str, mode: str) -> str:
        """The concrete weight source for an expert type (``"lora"``/``"full"``) and mode.

        ``theta`` on a LoRA expert needs ``dL/dW`` of the frozen base weight, which training never forms,
        so in ``during`` mode a LoRA expert can only use ``adapter``.
        """
        source = self.weight_source
        if source == "auto":
            source = "theta" if (mode == "after" or expert_type == "full") else "adapter"
        if expert_type == "full" and source == "adapter":
            raise ValueError("weight_source='adapter' needs a LoRA expert; use 'theta' or 'delta'")
        if expert_type == "lora" and mode == "during" and source in ("theta", "delta"):
            source = "adapter"
        return source


def _recipe(section: str, key: str) -> dict[str, Any]:
    """Field metadata: where the field sits in a YAML recipe (see :mod:`sens_peft.recipe`)."""
    return {"recipe": (section, key)}


#: The MergeConfig fields every method may read (its "shared" parameters); the rest of a method's parameters
#: are its own, declared by the method and set through ``MergeConfig.params``.
SHARED_METHOD_FIELDS = ("density", "densities", "majority_sign_method", "trim_by", "weighted_election", "seed",
                        "dare_rng")

#: The pseudo statistic kind of :func:`choose_method`: every expert has a probe set and the merge can fit on them
#: (within ``merging.fitting.MAX_FULL_FIT_BYTES``; ``merge_models`` also needs one process).
PROBES = "probes"

#: What ``method=None`` (the default) merges with: the first ``(method, params)`` whose inputs every expert has
#: (its captured statistics, and the probe sets for a method fitted on them). Probe-fitted RegMean had the best mean
#: on ``benchmarks/quality.py`` (30 suites, one family held out from it) and is not significantly below tuned task
#: arithmetic on any suite; RegMean without the probes had the best mean of the merges that do not run the model; without Grams
#: the fallback is task arithmetic itself (at λ 1 unless ``scale`` is given: a warning says so). See
#: benchmarks/README.md, Quality.
AUTO_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("probe_fit", {"base_method": "regmean"}),
    ("regmean", {}),
    ("task_arithmetic", {}),
)


def auto_requirements(method: str, params: Mapping[str, Any]) -> set[str]:
    """What an :data:`AUTO_METHODS` entry needs from every expert: statistic kinds, and :data:`PROBES`."""
    from .methods import get_method

    merge = get_method(method)
    full = {**{p.name: p.default for p in merge.parameters}, **params}
    return set(merge.needed_statistics(full)) | ({PROBES} if merge.needs_probes else set())


def choose_method(available: Any) -> tuple[str, dict[str, Any]]:
    """The ``(method, params)`` ``method=None`` resolves to, given what every expert has (statistic kinds, and
    :data:`PROBES` when the merge can fit on the probe sets)."""
    for name, params in AUTO_METHODS:
        if auto_requirements(name, params) <= set(available):
            return name, dict(params)
    name, params = AUTO_METHODS[-1]
    return name, dict(params)


@dataclass
class MergeConfig(_ConfigMixin):
    """How experts are combined.

    The default method (``method=None``) is chosen on ``benchmarks/quality.py``: task families × 3 regimes ×
    LoRA/full experts × 3 seeds, validation-tuned baselines with one grid budget, paired intervals,
    information-free controls (see benchmarks/README.md). ``None`` resolves per merge to the first of
    :data:`AUTO_METHODS` whose inputs every expert has:

    1. **Probe-fitted RegMean** (``method="probe_fit", params={"base_method": "regmean"}``) when every expert's
       sidecar holds input Grams and a probe set (the callback stores both by default) and the fit's memory fits
       (``sens_peft.merging.fitting.MAX_FULL_FIT_BYTES``, 4 GiB of fp32 parts; fixed, so that the choice does not
       depend on the machine): RegMean's per-expert shares ``ΔW_k G_k (Σ G)⁻¹``, scaled per expert and block by
       coefficients that Adam fits on the probes' loss from ``c ≡ 1`` (RegMean itself), held-out early stopping.
       It runs the model on the probes (forward and backward passes). Untuned, on the first 24 suites: 39.2 % mean
       normalised test accuracy against tuned task arithmetic's 20.2 % and RegMean's 29.8 %, at or above RegMean
       on every suite, below tuned TA only where tuned TA keeps < 3 % (by at most 0.2 points). It was then checked
       on a fifth family built before it was run there (``scan``, 6 suites): above tuned TA on all 6 (each cell's
       seed for the probes' held-out split), where RegMean alone is below tuned TA on both regime-A suites.
    2. **RegMean** (λ 1, off-diagonal shrinkage 0.99) when the experts have Grams but the fit cannot run (no probe
       sets, a distributed merge, parts above the limit); a warning says why. It had the best mean of the merges
       that do not run the model (+9.7 [95% CI +9.3, +10.1] over tuned TA on 24 suites) but is below tuned TA on
       the regime-A suites of conflict, perm and scan, where the base knows none of the tasks and four experts
       learned whole tasks.
    3. **Task arithmetic** without Grams (at λ 1, the sum of the task vectors, unless ``scale`` is given: a
       warning says so).

    Through the public API (seed 0) on all 30 suites: 40.5 % mean normalised test accuracy against tuned TA's
    22.2 % (+18.3 [+18.0, +18.6]). The benchmark's rule (a default may not be below tuned TA on any suite) is met
    within noise, not strictly: it is below on 2 regime-A LoRA suites by point estimate, neither significant
    (perm/A/lora -0.6 [-1.3, +0.2], scan/A/lora -0.1 [-1.7, +1.5]); every other candidate is below on more
    suites (benchmarks/README.md, "Session 24").
    The former default, TIES trimmed by sensitivity, gained +0.4 over tuned TA, and the paper's layer-wise
    coefficients (``sens=...``) +0.2, as much as random coefficients with the same grid, so they stay off by
    default; when on, they are bounded by ``max_ratio``.

    Args:
        method: A registered merge method (:func:`sens_peft.methods.available_methods`), or None (default):
            probe-fitted RegMean when every expert has input Grams and a probe set, else ``"regmean"`` with Grams,
            else ``"task_arithmetic"`` (see above; decided when the merge reads the sidecars; the report, card and
            ``merge_config.json`` name the method and parameters used).
        weights: Per-expert user weights ``w_k`` (default 1 each).
        scale: Global coefficient ``lambda`` of the base method. ``None`` (default): the method's default for
            these settings (:meth:`resolved_scale`; 1.5 for TIES trimmed by sensitivity, else 1.0).
        density: Fraction kept by TIES trimming / DARE's Bernoulli keep probability, in (0, 1].
        densities: Per-expert ``density`` (one per expert, each in (0, 1]; a recipe's ``experts[i].density``),
            replacing ``density`` for the methods that honour it (``ties``, ``dare_linear``, ``dare_ties``; as
            mergekit's per-model ``density``). None (default): ``density`` for every expert.
        majority_sign_method: TIES sign election by summed mass (``"total"``) or by count (``"frequency"``).
        sens: Which Sens-Merging factors scale the experts: ``"task+cross"``, ``"task"``, ``"cross"``, or
            ``None`` for the plain method.
        temperature: Softmax temperature ``T`` of ``c = K * softmax_k(alpha * tau / T)``.
        max_ratio: Safety bound of the Sens coefficients: within any group, the largest ``c`` is at most
            ``max_ratio`` times the smallest (``T`` is raised per merge as needed; the table records the ``T``
            used). Default 2. None gives the paper's unbounded softmax, which collapses merges at some readings.
        normalization: How per-layer scores become ``alpha`` within an expert.
        tau_normalization: How the transferability row means become ``tau`` across experts (``exp_z``:
            standardised then exponentiated, mean 1; ``sum1``: the third-party L1 reading; see
            :mod:`sens_peft.coefficients`).
        alignment: Logit alignment score for the transferability matrix.
        granularity: Coefficient granularity: per transformer block (``"layer"``, the paper), per block and
            module type (attention / MLP), or per projection.
        trim_by: TIES trimming by ``|delta|`` (``"magnitude"``), by the stored per-element sensitivity
            (``"sensitivity"``, needs element maps), or ``"auto"``: the method decides from what every expert
            has stored (TIES: sensitivity when every expert has element maps).
        weighted_election: Elect TIES signs on the coefficient-scaled deltas (default) or, as PEFT does, on the
            unscaled ones (False).
        seed: Seed of DARE's random drop (per tensor, derived from this and the tensor name). Same inputs and
            seed give bit-identical files on CPU.
        dare_rng: How DARE draws its keep-masks. ``"counter"`` (default): a hash of (seed, tensor name, expert,
            position), device-independent by construction (int32 arithmetic) and 2-3x cheaper to draw on the CPU
            than a Mersenne Twister. ``"torch"``: ``torch.bernoulli`` from a ``torch.Generator`` seeded per
            tensor, the masks PEFT's ``dare_linear``/``dare_ties`` draw at the same generator state; those are
            drawn on the math device, so a CUDA merge draws other masks than a CPU merge with the same seed.
        params: The method's own parameters (those it declares beyond the fields above), checked against its
            declaration; unset ones take their declared defaults.
        output: ``"lora"`` (a new adapter) or ``"full"`` (merged weights).
        rank: Rank of the SVD-compressed LoRA output for TIES/DARE (default: max expert rank).
        factorization: How a merged ΔW without exact factors becomes a rank-``rank`` adapter: ``"randomized"``
            (default; a seeded randomized range finder, :mod:`sens_peft.lowrank`, within 0.2-1% of the exact
            truncation's Frobenius error and 10x+ faster) or ``"exact"`` (the truncated SVD).
        dtype: Output dtype (default: the base's).
        device: Device for the math (default: CUDA when available, else CPU).
        tensor_settings: Per-tensor values of the per-expert weight and density (what a mergekit recipe's
            per-layer gradient lists and ``filter:`` conditions give; :mod:`sens_peft.tensor_settings`), or None.
            Its weights multiply the coefficients; its densities replace ``density``/``densities`` per tensor.
        origin: Where the settings came from when not from this class's own fields (a mergekit recipe: its method
            and how each of its fields was honoured); shown on the merge card. Informative only.
    """

    method: Optional[str] = field(default=None, metadata=_recipe("", "method"))
    weights: Optional[list[float]] = field(default=None, metadata=_recipe("experts", "weight"))
    scale: Optional[float] = field(default=None, metadata=_recipe("parameters", "scale"))
    density: float = field(default=0.4, metadata=_recipe("parameters", "density"))
    densities: Optional[list[float]] = field(default=None, metadata=_recipe("experts", "density"))
    majority_sign_method: MajoritySign = field(default="total", metadata=_recipe("parameters", "majority_sign_method"))
    sens: SensMode = field(default=None, metadata=_recipe("sens", "mode"))
    temperature: float = field(default=1.0, metadata=_recipe("sens", "temperature"))
    max_ratio: Optional[float] = field(default=2.0, metadata=_recipe("sens", "max_ratio"))
    normalization: Normalization = field(default="l2", metadata=_recipe("sens", "normalization"))
    tau_normalization: TauNormalization = field(default="mean1", metadata=_recipe("sens", "tau_normalization"))
    alignment: Alignment = field(default="cosine", metadata=_recipe("sens", "alignment"))
    granularity: Granularity = field(default="layer", metadata=_recipe("sens", "granularity"))
    trim_by: TrimBy = field(default="auto", metadata=_recipe("parameters", "trim_by"))
    weighted_election: bool = field(default=True, metadata=_recipe("parameters", "weighted_election"))
    seed: Optional[int] = field(default=0, metadata=_recipe("parameters", "seed"))
    dare_rng: DareRng = field(default="counter", metadata=_recipe("parameters", "dare_rng"))
    params: dict[str, Any] = field(default_factory=dict, metadata=_recipe("parameters", "*"))
    output: OutputKind = field(default="lora", metadata=_recipe("output", "type"))
    rank: Optional[int] = field(default=None, metadata=_recipe("output", "rank"))
    factorization: Factorization = field(default="randomized", metadata=_recipe("output", "factorization"))
    dtype: Optional[str] = field(default=None, metadata=_recipe("output", "dtype"))
    device: Optional[str] = field(default=None, metadata=_recipe("", "device"))
    tensor_settings: Optional[dict[str, Any]] = field(default=None, metadata=_recipe("experts", "tensor_settings"))
    origin: Optional[dict[str, Any]] = field(default=None, metadata=_recipe("experts", "origin"))

    def method_params(self, **overrides: Any) -> dict[str, Any]:
        """Every parameter the method sees: the shared fields, then its own (declared defaults, then ``params``)."""
        from .methods import get_method  # local import: the methods package imports this module

        values = {name: getattr(self, name) for name in SHARED_METHOD_FIELDS}
        if self.method is not None:  # None: the method is picked per merge, and has no own parameters yet
            values.update({p.name: p.default for p in get_method(self.method).parameters})
        values.update(self.params)
        values.update(overrides)
        return values

    def resolved_scale(self, trim_by: Optional[str] = None) -> float:
        """The global ``lambda`` this merge uses (``scale``, or the method's default for these settings)."""
        from .methods import get_method

        if self.scale is not None:
            return float(self.scale)
        params = self.method_params(trim_by=trim_by or self.trim_by)
        candidates = [(self.method, {})] if self.method is not None else AUTO_METHODS
        scales = {float(get_method(name).default_scale({**params, **own})) for name, own in candidates}
        if len(scales) > 1:
            raise ValueError("method=None has no scale before the merge picks its method; pass scale= or a method")
        return scales.pop()

    def _check_per_expert(self) -> None:
        """Per-expert densities and per-tensor settings: valid values, and a method that honours them."""
        from .methods import get_method
        from .tensor_settings import check_tensor_settings

        if self.densities is not None:
            if isinstance(self.densities, (str, bytes)) or not hasattr(self.densities, "__iter__"):
                raise ValueError(f"densities must be a list of numbers (one per expert), got {self.densities!r}")
            values = list(self.densities)
            for k, d in enumerate(values):
                if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
                    raise ValueError(f"densities[{k}] must be a number in (0, 1], got {d!r}")
            self.densities = [float(d) for d in values]
        if self.tensor_settings is not None:
            self.tensor_settings = check_tensor_settings(self.tensor_settings)
        wants = self.densities is not None or "density" in (self.tensor_settings or {})
        if wants and (self.method is None or not getattr(get_method(self.method), "per_expert_density", False)):
            raise ValueError(f"per-expert densities are honoured by ties, dare_linear and dare_ties; method "
                             f"{self.method!r} would ignore them")

    def __post_init__(self) -> None:
        from .methods import available_methods, get_method

        if self.method is not None and self.method not in available_methods():
            raise ValueError(f"unknown merge method {self.method!r}; available: {available_methods()} (or None: "
                             "probe-fitted RegMean, RegMean or task arithmetic, from what every expert has stored)")
        if not (0.0 < float(self.density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not float(self.temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_ratio is not None and not float(self.max_ratio) > 1.0:
            raise ValueError(f"max_ratio must be > 1 or None, got {self.max_ratio!r}")
        for name, kind in (("majority_sign_method", MajoritySign), ("sens", SensMode),
                           ("normalization", Normalization), ("alignment", Alignment),
                           ("tau_normalization", TauNormalization), ("granularity", Granularity),
                           ("trim_by", TrimBy), ("dare_rng", DareRng), ("output", OutputKind),
                           ("factorization", Factorization)):
            _check_choice(name, getattr(self, name), choices(kind))
        if not isinstance(self.weighted_election, bool):
            raise ValueError(f"weighted_election must be True or False, got {self.weighted_election!r}")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
        self._check_per_expert()
        if self.scale is not None:
            self.scale = float(self.scale)
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")
        if self.method is None:
            if self.params:
                raise ValueError(f"params={self.params!r} need an explicit method (method=None picks one per merge)")
            self.params = {}
        else:
            self.params = get_method(self.method).check_params(dict(self.params or {}))
        if self.params.get("divisor") == "weights" and self.scale not in (None, 1.0):
            raise ValueError(f"scale={self.scale} has no effect with divisor='weights' (the weighted mean of the "
                             "agreeing entries cancels any common factor of the coefficients); leave scale unset")
