"""The calibration ("after") pass and :func:`compute_sensitivity` for experts trained elsewhere.

One implementation serves both the callback's end-of-training pass and the standalone call: forward + backward
over held examples of the expert's own data, one backward per ``calibration_batch_size`` examples (1 by default:
per-sample gradients, the paper's estimator), model in eval mode (no dropout) with gradients enabled, fp32 math,
float64 sums; the model's ``training`` flag, every ``requires_grad`` flag and ``.grad`` (cleared) are restored.

What is scored (``weight_source``):

* full fine-tunes: every trainable tensor (all floating tensors if none is trainable), ``w = theta`` or
  ``w = theta - theta_0`` (``delta``; needs the initial weights);
* LoRA, ``theta`` / ``delta``: the *weights of the adapted modules* (``...q_proj.weight``), with
  ``w = W0 + s*B@A`` or ``w = s*B@A`` and ``G = dL/dW`` formed in a hook as ``delta^T x`` (the frozen base weight
  never gets a ``.grad``, and only one module's ``G`` exists at a time). Frozen non-adapted weights are not scored
  (the merge does not touch them);
* LoRA, ``adapter``: the factors ``lora_A`` / ``lora_B`` (and DoRA magnitudes) themselves.

For LoRA the signed scores are always the module's ``<dW, G>`` (= ``<A, dL/dA>`` = ``<B, dL/dB>``).

What is differentiated: the model's LM loss on the batch's labels, or for TRL's preference data the loss that
:mod:`sens_peft.sensitivity.calibration_loss` picks (DPO loss against the trainer's reference, or the chosen /
desirable completions' LM loss).

The same pass captures the data-aware merge statistics (input Gram matrices per Linear, diagonal Fisher maps
``E[g^2]`` per scored tensor; ``SensitivityConfig.gram`` / ``fisher``): see :mod:`sens_peft.sensitivity.stats`.
The examples, their batches and the probe set come from :mod:`sens_peft.sensitivity.calibration_data`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import SensitivityConfig, wants_element_maps
from ..lora import (
    LoraModuleInfo,
    active_adapter_name,
    adapter_parameters,
    base_model_name,
    clean_param_name,
    detect_expert_type,
    is_lora_layer,
    trainable_parameters,
)
from ..lora import model_device as _model_device
from ..lora import model_dtype as _model_dtype
from ..lora import scorable_lora_modules as lora_modules
from ..lora import unwrap_model as _unwrap
from ..store import SensitivityRecord, save_probe, save_sensitivity
from ..validation import (
    FINGERPRINT_KEY,
    check_sensitivity_inputs,
    check_token_batches,
    model_fingerprint,
    warn_unused_sensitivity_options,
)
from . import estimators as est
from .accumulator import SensitivityAccumulator
from .calibration_data import (
    build_probe,
    collate_examples,
    iter_calibration_batches,
    pad_id_of,
    select_examples,
)
from .calibration_loss import CalibrationLoss, LMLoss, select_calibration_loss
from .stats import CalibrationStats

logger = logging.getLogger(__name__)

__all__ = [
    "compute_sensitivity",
    "CalibrationPass",
    "clean_param_name",
    "detect_expert_type",
    "active_adapter_name",
    "lora_modules",
    "adapter_parameters",
    "trainable_parameters",
    "select_examples",
    "collate_examples",
    "iter_calibration_batches",
    "build_probe",
    "base_model_name",
]


# ---------------------------------------------------------------------------------------------- the pass
@dataclass
class _Scratch:
    abs: Tensor
    signed: Tensor
    elements: dict[str, Tensor] = field(default_factory=dict)
    fired: list[int] = field(default_factory=list)
    fisher: dict[str, Tensor] = field(default_factory=dict)  # g**2 of this backward, for the Fisher maps


class CalibrationPass:
    """Forward + backward over calibration batches, scoring one backward at a time.

    Args:
        model: The expert (PeftModel, PreTrainedModel, or any module whose forward takes ``labels`` and returns
            ``.loss``).
        config: The sensitivity settings (weight source, batch size, loss tokens, element maps).
        expert_type: ``"lora"`` or ``"full"`` (default: detected).
        initial_weights: For full fine-tunes with ``weight_source="delta"``: ``{canonical name: theta_0}``.
        trainable_names: Canonical names to score for a full fine-tune (default: the currently trainable ones).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SensitivityConfig,
        *,
        expert_type: Optional[str] = None,
        initial_weights: Optional[dict[str, Tensor]] = None,
        trainable_names: Optional[Sequence[str]] = None,
    ) -> None:
        self.model = _unwrap(model)
        self.config = config
        self.expert_type = expert_type or detect_expert_type(self.model)
        self.weight_source = config.resolve_weight_source(self.expert_type, "after")
        self.adapter = active_adapter_name(self.model) if self.expert_type == "lora" else None
        self.initial_weights = initial_weights
        self.device = _model_device(self.model)
        self.modules: list[LoraModuleInfo] = []
        self.params: list[tuple[str, nn.Parameter]] = []
        if self.expert_type == "lora" and self.weight_source in ("theta", "delta"):
            self.modules = lora_modules(self.model, self.adapter)
            self.names = [m.name for m in self.modules]
        elif self.expert_type == "lora":
            self.params = adapter_parameters(self.model, self.adapter)
            self.names = [n for n, _ in self.params]
        else:
            params = {clean_param_name(n): p for n, p in self.model.named_parameters()}
            if trainable_names is None:
                trainable_names = [n for n, p in params.items() if p.requires_grad]
                if not trainable_names:
                    trainable_names = [n for n, p in params.items() if p.is_floating_point()]
            missing = [n for n in trainable_names if n not in params]
            if missing:
                raise ValueError(f"tensors {missing[:3]} are not parameters of the model")
            self.params = [(n, params[n]) for n in trainable_names]
            self.names = list(trainable_names)
            if self.weight_source == "delta":
                if initial_weights is None:
                    raise ValueError(
                        "weight_source='delta' for a full fine-tune needs the initial (base) weights: pass "
                        "base_model= to compute_sensitivity, or let the callback snapshot them at train start"
                    )
                absent = [n for n in self.names if n not in initial_weights]
                if absent:
                    raise ValueError(f"base weights lack tensors {absent[:3]} needed for weight_source='delta'")
        self._forward_keys = self._model_input_keys()

    def _model_input_keys(self) -> Optional[set[str]]:
        target = self.model
        getter = getattr(target, "get_base_model", None)
        if callable(getter):
            target = getter()
        try:
            params = inspect.signature(target.forward).parameters
        except (TypeError, ValueError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        return set(params)

    def _scored_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.modules:
            return {m.name: tuple(m.base_weight.shape) for m in self.modules}
        return {n: tuple(p.shape) for n, p in self.params}

    @property
    def element_maps(self) -> bool:
        """Whether this pass keeps per-element maps (resolves ``element_maps="auto"`` by size)."""
        numel = sum(math.prod(shape) for shape in self._scored_shapes().values())
        return wants_element_maps(self.config.element_maps, numel)

    def element_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._scored_shapes() if self.element_maps else {}

    def new_accumulator(self) -> SensitivityAccumulator:
        return SensitivityAccumulator(self.names, device=self.device, element_shapes=self.element_shapes())

    # -- data-aware merge statistics (Gram matrices, Fisher maps; see stats.py) ------------------
    @property
    def fisher(self) -> bool:
        """Whether this pass keeps Fisher maps (``fisher="auto"`` follows the element-map size budget)."""
        numel = sum(math.prod(shape) for shape in self._scored_shapes().values())
        return wants_element_maps(self.config.fisher, numel)

    def gram_targets(self) -> list[tuple[str, nn.Module]]:
        """``(canonical weight name, Linear)`` whose inputs the Grams cover, in model order.

        LoRA: the base layer of every Linear/Conv1D module the adapter adapts (whatever ``weight_source``);
        full fine-tunes: every ``nn.Linear``/``Conv1D`` whose weight is scored.
        """
        out = []
        if self.expert_type == "lora":
            for name, module in self.model.named_modules():
                if is_lora_layer(module) and self.adapter in getattr(module, "lora_A", {}):
                    base = module.get_base_layer()
                    if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":
                        out.append((clean_param_name(f"{name}.weight", self.adapter), base))
            return out
        scored = set(self.names)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                weight = clean_param_name(f"{name}.weight")
                if weight in scored:
                    out.append((weight, module))
        return out

    def new_stats(self) -> CalibrationStats:
        """Empty Gram / Fisher sums for this pass's settings (disabled parts stay empty)."""
        return CalibrationStats(
            self.gram_targets() if self.config.gram != "none" else [],
            gram=self.config.gram, gram_max_bytes=self.config.gram_max_bytes,
            fisher_names=self.names if self.fisher else [], device=self.device,
            gram_rank=self.config.gram_rank, seed=self.config.seed,
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "estimator": "taylor_abs",
            "weight_source": self.weight_source,
            "mode": "after",
            "expert_type": self.expert_type,
            "calibration_batch_size": self.config.calibration_batch_size,
            "loss_tokens": self.config.loss_tokens,
            "signed_estimator": "delta_dot_grad" if self.expert_type == "lora" else f"{self.weight_source}_dot_grad",
            "base_model": base_model_name(self.model),
            "task": self.config.task,
            "torch_dtype": _model_dtype(self.model),
            "adapter_name": self.adapter,
            # architecture/sizes of the base: lets a merge refuse a sidecar computed on another base model
            FINGERPRINT_KEY: model_fingerprint(getattr(_unwrap(self.model), "config", None)) or None,
        }

    # -- hooks ---------------------------------------------------------------------------------
    def _weight_for(self, name: str, param: Tensor) -> Tensor:
        if self.weight_source == "delta":
            return param.detach() - self.initial_weights[name].to(param.device, param.dtype)
        return param.detach()

    def _install(self, scratch: _Scratch) -> list[Any]:
        handles = []
        if self.modules:
            for i, info in enumerate(self.modules):
                handles.append(info.module.register_forward_hook(self._make_forward_hook(i, info, scratch)))
        else:
            for i, (name, param) in enumerate(self.params):
                handles.append(param.register_post_accumulate_grad_hook(self._make_grad_hook(i, name, scratch)))
        return handles

    def _make_forward_hook(self, index: int, info: LoraModuleInfo, scratch: _Scratch):
        element, fisher = self.element_maps, self.fisher

        def on_output_grad(x: Tensor, grad: Tensor) -> None:
            with torch.no_grad():
                dtype = est.compute_dtype(x, grad, info.base_weight)
                g = est.linear_weight_grad(x, grad, dtype)
                delta = est.lora_delta_weight(info.lora_A, info.lora_B, info.scaling, dtype)
                if self.weight_source == "theta":
                    w = est.lora_full_weight(info.base_weight, info.lora_A, info.lora_B, info.scaling,
                                             fan_in_fan_out=info.fan_in_fan_out, dtype=dtype)
                else:
                    w = delta
                a, s, e = est.lora_module_scores(w, g, delta, element_map=element)
                scratch.abs[index] += a.to(scratch.abs.dtype)
                scratch.signed[index] += s.to(scratch.signed.dtype)
                if e is not None:
                    scratch.elements[info.name] = e.T if info.fan_in_fan_out else e
                if fisher:
                    scratch.fisher[info.name] = (g * g).T if info.fan_in_fan_out else g * g
                scratch.fired[index] += 1

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            x = args[0].detach()
            output.register_hook(lambda g, x=x: on_output_grad(x, g))

        return hook

    def _make_grad_hook(self, index: int, name: str, scratch: _Scratch):
        element, fisher = self.element_maps, self.fisher

        def hook(param: Tensor) -> None:
            with torch.no_grad():
                w = self._weight_for(name, param)
                if element:
                    a, s, (scratch.elements[name],) = est.taylor_scores_and_maps([w], [param.grad])
                else:
                    a, s = est.taylor_scores([w], [param.grad])
                scratch.abs[index] += a[0].to(scratch.abs.dtype)
                scratch.signed[index] += s[0].to(scratch.signed.dtype)
                if fisher:
                    scratch.fisher[name] = param.grad.float() ** 2
                scratch.fired[index] += 1
            param.grad = None  # scored: free it now so peak memory stays one tensor's gradient

        return hook

    # -- run -----------------------------------------------------------------------------------
    def run(self, batches: Iterable[dict[str, Tensor]], accumulator: Optional[SensitivityAccumulator] = None,
            stats: Optional[CalibrationStats] = None, loss: Optional[CalibrationLoss] = None
            ) -> SensitivityAccumulator:
        """Score every batch; returns the accumulator (mean over batches = mean over samples at batch size 1).

        ``loss`` says what each batch's scored loss is (default: the model's LM loss on the batch's labels, see
        :mod:`sens_peft.sensitivity.calibration_loss`). The Gram / Fisher sums go to ``stats`` (default: a new
        :meth:`new_stats`), kept as ``self.stats``.
        """
        acc = accumulator or self.new_accumulator()
        self.stats = stats = stats if stats is not None else self.new_stats()
        loss_fn = loss or LMLoss()
        model = self.model
        was_training = model.training
        flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        try:
            model.eval()
            # Only the tensors we need gradients for: LoRA factors (the output-gradient hooks need a graph),
            # or the scored parameters.
            needed = {id(p) for _, p in self.params}
            if self.modules:
                needed = {id(t) for m in self.modules for t in (m.lora_A, m.lora_B)}
            for p, _ in flags.values():
                p.requires_grad_(id(p) in needed)
                p.grad = None
            for batch in batches:
                self._score_batch(batch, loss_fn, acc, stats)
        finally:
            for p, flag in flags.values():
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)
        return acc

    def _score_batch(self, batch: dict[str, Tensor], loss_fn: CalibrationLoss, acc: SensitivityAccumulator,
                     stats: CalibrationStats) -> None:
        """One forward + backward of ``loss_fn`` on ``batch``; its scores, Grams and Fisher maps join the sums."""
        score_dtype = torch.float64
        scratch = _Scratch(
            torch.zeros(len(self.names), dtype=score_dtype, device=self.device),
            torch.zeros(len(self.names), dtype=score_dtype, device=self.device),
            fired=[0] * len(self.names),
        )
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        loss_fn.prepare(self.model, batch)  # gradient-free (reference) forwards, before any hook sees them
        handles = self._install(scratch)
        if stats.targets:
            handles += stats.install(loss_fn.gram_mask(batch))
        try:
            with torch.enable_grad():
                loss = loss_fn.loss(self.model, batch, self._forward_keys)
                stats.after_forward()  # Grams from the stashed inputs, freed before the backward
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        for p in self.model.parameters():
            p.grad = None
        multi = [self.names[i] for i, n in enumerate(scratch.fired) if n > 1]
        if multi:
            raise RuntimeError(
                f"tensors {multi[:3]} received {max(scratch.fired)} gradient contributions in one backward "
                "(a module used several times per forward); the per-call scores would not equal the "
                "score of the summed gradient. Use weight_source='adapter' for this model."
            )
        samples, tokens = loss_fn.counts(batch)
        ok = acc.update(scratch.abs, scratch.signed, elements=scratch.elements or None, samples=float(samples),
                        tokens=tokens.to(self.device, torch.float64) if isinstance(tokens, Tensor) else float(tokens))
        stats.update_fisher(scratch.fisher, ok, int(samples))


def run_calibration(
    model: nn.Module,
    data: Any,
    config: SensitivityConfig,
    *,
    expert_type: Optional[str] = None,
    initial_weights: Optional[dict[str, Tensor]] = None,
    trainable_names: Optional[Sequence[str]] = None,
    pad_id: Optional[int] = None,
    loss: Optional[CalibrationLoss] = None,
) -> SensitivityRecord:
    """The "after" pass shared by the callback and :func:`compute_sensitivity`; returns the record.

    ``loss``: what the pass differentiates (default: chosen from the data's columns by
    :func:`~sens_peft.sensitivity.calibration_loss.select_calibration_loss`, without a trainer).
    """
    cal = CalibrationPass(model, config, expert_type=expert_type, initial_weights=initial_weights,
                          trainable_names=trainable_names)
    pad = pad_id_of(model) if pad_id is None else pad_id
    if loss is None:
        loss = select_calibration_loss(data, model=model, expert_type=cal.expert_type)
        if loss.reason:
            logger.warning("the calibration pass scores the %s loss: %s", loss.name, loss.reason)
    acc = cal.run(check_token_batches(loss.batches(data, config, pad), model), loss=loss)
    metadata = {**cal.metadata(), **loss.metadata()}
    return cal.stats.attach(acc.to_record(metadata=metadata), config.gram_dtype)


# ---------------------------------------------------------------------------------------------- public entry
def _load_model(model: Any, base_model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    path = Path(os.fspath(model))
    if not path.is_dir():
        raise FileNotFoundError(f"compute_sensitivity: {path} is not a folder with an adapter or a model")
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").is_file():
        if base_model is None:
            raise ValueError(f"{path} holds a PEFT adapter: pass base_model= (a model or a folder) to load it onto")
        from peft import PeftModel

        base = base_model if isinstance(base_model, nn.Module) else AutoModelForCausalLM.from_pretrained(base_model)
        return PeftModel.from_pretrained(base, str(path), is_trainable=False)
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(path))
    raise FileNotFoundError(f"{path} has neither adapter_config.json nor config.json")


def _base_weights(base_model: Any) -> dict[str, Tensor]:
    if isinstance(base_model, nn.Module):
        return {clean_param_name(n): p.detach() for n, p in _unwrap(base_model).named_parameters()}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(os.fspath(base_model))
    return {clean_param_name(n): p.detach() for n, p in base.named_parameters()}


def compute_sensitivity(
    model: Any,
    data: Any,
    config: Optional[SensitivityConfig] = None,
    *,
    save_to: Any = None,
    base_model: Any = None,
    tokenizer: Any = None,
    allow_pickle: bool = False,
    **config_kwargs: Any,
) -> SensitivityRecord:
    """Sensitivity of an expert trained elsewhere (the callback's "after" pass, standalone).

    Args:
        model: A PeftModel, a PreTrainedModel, or a folder holding an adapter (needs ``base_model``) or a model.
        data: The expert's own data: a dataset of dicts with ``input_ids`` (+ ``labels``, ``attention_mask``), or
            a DataLoader (its dataset and collate function are used, re-batched to ``calibration_batch_size``).
        config: Sensitivity settings (``mode`` is ignored: this is always the calibration pass).
        save_to: Folder to write ``sensitivity.safetensors`` (and ``probe.safetensors`` unless
            ``store_probe=False``) into.
        base_model: For an adapter folder, the base model (module or folder) to load it onto; for a full
            fine-tune with ``weight_source="delta"``, the base model whose weights are ``theta_0``.
        tokenizer: Optional tokenizer (pad id and name in the probe metadata).
        allow_pickle: Accept folders holding only pickle weights (``adapter_model.bin``, ``pytorch_model.bin``);
            refused by default (unpickling an untrusted file can run code).
        **config_kwargs: Fields of :class:`SensitivityConfig` overriding ``config``.

    Returns:
        The :class:`SensitivityRecord` (also written when ``save_to`` is given).
    """
    import dataclasses

    config = config or SensitivityConfig()
    if config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    check_sensitivity_inputs(model, base_model, allow_pickle)
    warn_unused_sensitivity_options(config)
    loaded = _load_model(model, base_model if not isinstance(model, nn.Module) else None)
    expert_type = detect_expert_type(loaded)
    initial = None
    if expert_type == "full" and config.resolve_weight_source("full", "after") == "delta":
        if base_model is None:
            raise ValueError("weight_source='delta' for a full model needs base_model= (the pre-fine-tuning model)")
        initial = _base_weights(base_model)
    pad = pad_id_of(loaded, tokenizer)
    loss = select_calibration_loss(data, model=loaded, expert_type=expert_type)
    if loss.reason:
        logger.warning("compute_sensitivity scores the %s loss: %s", loss.name, loss.reason)
    record = run_calibration(loaded, data, config, expert_type=expert_type, initial_weights=initial, pad_id=pad,
                             loss=loss)
    if save_to is not None:
        save_sensitivity(record, save_to)
        if config.store_probe and config.probe_samples > 0:
            vocab = getattr(getattr(_unwrap(loaded), "config", None), "vocab_size", None)
            probe = build_probe(loss.probe_data(data), config, pad_id=pad, vocab_size=vocab,
                                tokenizer_name=getattr(tokenizer, "name_or_path", None) or None)
            save_probe(probe, save_to)
    return record
