"""What the calibration ("after") pass differentiates: a loss chosen from the trainer and the data's columns.

The pass scores ``|w * dL/dw|`` per held example; ``L`` should be the loss the expert was trained on. One small
object per kind of loss says how examples become batches, what the loss of a batch is, which rows the input Grams
cover and which sequences form the probe set. :func:`select_calibration_loss` picks it from the data's columns
(the tokenised rows TRL's trainers hand their dataloaders) and, for the preference loss, from the trainer's settings:

* :class:`LMLoss` (rows with ``input_ids``, Trainer / SFTTrainer): the model's own LM loss on the batch's labels,
  exactly the pass the library always ran.
* :class:`PreferenceLoss` (rows with ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, TRL's ``DPOTrainer``): per
  pair the DPO loss ``-log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log
  pi_ref(y_l|x))])`` (or the trainer's hinge / IPO / SFT terms, with its ``loss_weights``), with the reference the
  trainer uses: its ``ref_model``; for a PEFT model without one, the same model with the adapter disabled (or its
  ``"ref"`` adapter, like TRL); or the ``ref_*_logps`` columns TRL precomputed. Chosen and rejected sequences go
  through one forward (a LoRA module is used once per backward); the input Grams cover the chosen sequences only
  (prompt + chosen completion, padding excluded).
* :class:`CompletionLMLoss` (the fallback for preference pairs, KTO's unpaired rows with a ``label``, and the
  whole-sequence pairs ``chosen_input_ids`` / ``chosen_labels`` of TRL's experimental ORPO / CPO trainers): the LM
  loss of the chosen (KTO: desirable) completions, prompt tokens masked. KTO's own loss compares each completion
  with a batch-level KL baseline, so it has no per-example form; ORPO's odds-ratio term is not implemented.

The probe set of the cross-task factor is always the chosen / desirable completions (prompt masked) for preference
data. Pure tensor functions (:func:`completion_logps`, :func:`preference_loss`) hold the math.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SensitivityConfig
from ..errors import UnsupportedSetupError
from ..lora import unwrap_model as _unwrap
from .calibration_data import iter_calibration_batches, select_examples, unusable_data_reason

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_LOSSES",
    "CalibrationLoss",
    "LMLoss",
    "CompletionLMLoss",
    "PreferenceLoss",
    "PreferenceSpec",
    "completion_logps",
    "preference_loss",
    "collate_pairs",
    "select_calibration_loss",
]

#: Values of ``SensitivityCallback(calibration_loss=...)``.
CALIBRATION_LOSSES = ("auto", "preference", "completion")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")
CONCATENATED_PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids")
#: DPO loss types :func:`preference_loss` implements (TRL's formulas); others fall back to the chosen LM loss.
PREFERENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft")


# ---------------------------------------------------------------------------------------------- pure math
def completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """``sum_t log p(input_ids[t] | input_ids[<t])`` over the completion tokens of each row (``[rows]``).

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; half-precision logits are summed in fp32.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logp * completion_mask[:, 1:].to(dtype)).sum(dim=1)


@dataclass(frozen=True)
class PreferenceSpec:
    """The trainer's preference loss: ``sum_k weight_k * mean_pairs(loss_type_k)``."""

    beta: float
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)

    def describe(self) -> str:
        terms = [f"{w:g}*{t}" if w != 1.0 else t for t, w in zip(self.loss_types, self.loss_weights)]
        return f"{' + '.join(terms)} (beta={self.beta:g})"


def preference_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    spec: PreferenceSpec,
    chosen_tokens: Optional[Tensor] = None,
    rejected_tokens: Optional[Tensor] = None,
) -> Tensor:
    """The preference loss of a batch of pairs (a scalar: each term averaged over the pairs, then weighted).

    ``chosen`` / ``rejected``: summed completion log-probs under the policy, ``ref_*`` under the reference
    (``[pairs]``); ``*_tokens``: scored completion lengths (IPO's and SFT's per-token normalisation; TRL's IPO
    counts the completion mask before the shift, the same number unless the prompt is empty). Formulas as TRL's
    ``DPOTrainer`` (``f_divergence_type="reverse_kl"``): ``d = (chosen - ref_chosen) - (rejected - ref_rejected)``;
    sigmoid ``-log sigmoid(beta d)``, hinge ``relu(1 - beta d)``, IPO ``(d_per_token - 1/(2 beta))^2``, SFT the
    chosen tokens' mean negative log-likelihood.
    """
    chosen_ratio = chosen - ref_chosen.to(chosen)
    rejected_ratio = rejected - ref_rejected.to(rejected)
    delta = chosen_ratio - rejected_ratio
    total = chosen.new_zeros(())
    for loss_type, weight in zip(spec.loss_types, spec.loss_weights):
        if loss_type == "sigmoid":
            term = -F.logsigmoid(spec.beta * delta)
        elif loss_type == "hinge":
            term = torch.relu(1 - spec.beta * delta)
        elif loss_type in ("ipo", "sft") and (chosen_tokens is None or rejected_tokens is None):
            raise ValueError(f"loss type {loss_type!r} needs the completion lengths (chosen_tokens, rejected_tokens)")
        elif loss_type == "ipo":
            per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            term = (per_token - 1 / (2 * spec.beta)) ** 2
        elif loss_type == "sft":
            term = (-chosen.sum() / chosen_tokens.sum().clamp(min=1)).expand_as(chosen)
        else:
            raise ValueError(f"preference loss type {loss_type!r} is not one of {list(PREFERENCE_LOSS_TYPES)}")
        total = total + term.mean() * weight
    return total


def collate_pairs(rows: Sequence[Mapping[str, Any]], pad_id: int, max_length: int) -> dict[str, Tensor]:
    """Right-padded ``[chosen rows; rejected rows]`` (TRL's preference layout) from tokenised pairs.

    Each sequence is ``prompt_ids + <completion>_ids`` cut to its first ``max_length`` tokens; ``completion_mask``
    marks the completion tokens. ``ref_chosen_logps`` / ``ref_rejected_logps`` columns are passed through.
    """
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for row in rows:
            prompt, completion = list(row["prompt_ids"]), list(row[key])
            seqs.append((prompt + completion)[:max_length])
            masks.append(([0] * len(prompt) + [1] * len(completion))[:max_length])
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    completion = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, : len(mask)] = torch.as_tensor(mask, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if all(key in row for row in rows):
            batch[key] = torch.as_tensor([float(row[key]) for row in rows], dtype=torch.float64)
    return batch


# ---------------------------------------------------------------------------------------------- row views
def _dataset_of(data: Any) -> Any:
    """The rows behind ``data`` (a DataLoader's dataset; the trainer's collator is not used for these losses)."""
    return data.dataset if isinstance(data, torch.utils.data.DataLoader) else data


def row_columns(data: Any) -> set[str]:
    """The keys of the first row of ``data`` (empty when it has no mapping rows)."""
    try:
        first = _dataset_of(data)[0]
    except Exception:  # unsized, empty, or not indexable: no columns to dispatch on
        return set()
    return set(map(str, first)) if isinstance(first, Mapping) else set()


def prompt_completion_example(completion_key: str) -> Callable[[Mapping[str, Any]], dict[str, list[int]]]:
    """Row -> example for rows of ``prompt_ids`` + ``<completion_key>`` (TRL 1.x DPO / KTO): prompt labelled -100."""

    def to_example(row: Mapping[str, Any]) -> dict[str, list[int]]:
        prompt, completion = list(row["prompt_ids"]), list(row[completion_key])
        return {"input_ids": prompt + completion, "attention_mask": [1] * (len(prompt) + len(completion)),
                "labels": [-100] * len(prompt) + completion}

    return to_example


def concatenated_chosen_example(row: Mapping[str, Any]) -> dict[str, list[int]]:
    """Row -> example for rows holding the whole chosen sequence (``chosen_input_ids`` / ``chosen_labels``, prompt
    already labelled -100: TRL's experimental ORPO / CPO trainers)."""
    ids = list(row["chosen_input_ids"])
    mask = list(row.get("chosen_attention_mask") or [1] * len(ids))
    return {"input_ids": ids, "attention_mask": mask, "labels": list(row["chosen_labels"])}


class CompletionRows(torch.utils.data.Dataset):
    """A view of tokenised preference rows as ``input_ids`` / ``attention_mask`` / ``labels`` examples.

    Args:
        rows: The dataset.
        to_example: Row -> example (prompt tokens labelled -100).
        keep_desirable: Only the rows whose ``label`` is truthy (KTO's desirable completions).
    """

    def __init__(self, rows: Any, to_example: Callable[[Mapping[str, Any]], dict[str, list[int]]],
                 keep_desirable: bool = False) -> None:
        self.rows, self.to_example = rows, to_example
        self.index = [i for i in range(len(rows)) if not keep_desirable or bool(rows[i]["label"])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.to_example(self.rows[self.index[i]])


# ---------------------------------------------------------------------------------------------- the losses
class CalibrationLoss:
    """How the calibration pass turns data into batches and batches into the loss it differentiates.

    The pass calls, per batch: :meth:`prepare` (gradient-free work such as reference log-probs, before any hook
    is installed), :meth:`loss` (the forward whose backward is scored; Gram hooks see it with :meth:`gram_mask`)
    and :meth:`counts`.
    """

    name = "lm"
    #: Why this loss stands in for the trainer's own (None when it is the trainer's loss).
    reason: Optional[str] = None

    def batches(self, data: Any, config: SensitivityConfig, pad_id: int) -> Iterable[dict[str, Tensor]]:
        return iter_calibration_batches(data, config, pad_id=pad_id)

    def probe_data(self, data: Any) -> Any:
        """The data the probe set is drawn from."""
        return data

    def unusable_reason(self, data: Any, config: SensitivityConfig, pad_id: int) -> Optional[str]:
        """Why ``data`` cannot feed this loss's pass (None when it can); checked at train start."""
        return unusable_data_reason(data, config, pad_id=pad_id)

    def prepare(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        """Gradient-free work on a batch before the scored forward (default: none)."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor], forward_keys: Optional[set[str]]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        if forward_keys is not None:
            inputs = {k: v for k, v in inputs.items() if k in forward_keys}
        out = model(**inputs)
        loss = out.loss if hasattr(out, "loss") else out["loss"]
        if loss is None:
            raise ValueError("the model returned no loss for a calibration batch (labels missing?)")
        return loss

    def gram_mask(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        """Which token rows of the scored forward the input Grams count (``[rows, T]``, or None for all)."""
        return batch.get("attention_mask")

    def counts(self, batch: dict[str, Tensor]) -> tuple[int, Any]:
        """``(samples, scored tokens)`` behind one batch."""
        labels = batch["labels"]
        tokens = (labels[..., 1:] != -100).sum() if labels.dim() >= 2 else labels.numel()
        return int(labels.shape[0]), tokens

    def metadata(self) -> dict[str, str]:
        """Sidecar metadata saying which loss was scored (none for the plain LM loss, the library's default)."""
        return {}


class LMLoss(CalibrationLoss):
    """The model's own LM loss on the data's labels (Trainer / SFTTrainer data; the library's original pass)."""


class CompletionLMLoss(CalibrationLoss):
    """The LM loss of tokenised completions after their prompt (prompt tokens masked), one completion per example.

    Args:
        to_example: Row -> example (:func:`prompt_completion_example`, :func:`concatenated_chosen_example`).
        keep_desirable: Keep only rows with a truthy ``label`` (KTO's desirable completions).
        reason: Why this loss stands in for the trainer's own (stored as ``calibration_loss_reason``).
    """

    def __init__(self, to_example: Callable[[Mapping[str, Any]], dict[str, list[int]]], keep_desirable: bool = False,
                 reason: Optional[str] = None) -> None:
        self.to_example, self.keep_desirable, self.reason = to_example, keep_desirable, reason
        self.name = "desirable_lm" if keep_desirable else "chosen_lm"

    def _view(self, data: Any) -> CompletionRows:
        return CompletionRows(_dataset_of(data), self.to_example, self.keep_desirable)

    def batches(self, data: Any, config: SensitivityConfig, pad_id: int) -> Iterable[dict[str, Tensor]]:
        return iter_calibration_batches(self._view(data), config, pad_id=pad_id)

    def probe_data(self, data: Any) -> Any:
        return self._view(data)

    def unusable_reason(self, data: Any, config: SensitivityConfig, pad_id: int) -> Optional[str]:
        if len(self._view(data)) == 0:
            what = "desirable (label=True) completion" if self.keep_desirable else "pair"
            return f"the data has no {what} to score"
        return None

    def metadata(self) -> dict[str, str]:
        what = "desirable completions (label=True)" if self.keep_desirable else "chosen completions"
        meta = {"calibration_loss": self.name, "calibration_loss_detail": f"LM loss of the {what}, prompt masked"}
        if self.reason:
            meta["calibration_loss_reason"] = self.reason
        return meta


class PreferenceLoss(CalibrationLoss):
    """The trainer's preference (DPO) loss per pair, against its reference model.

    Args:
        spec: Beta, loss types and weights.
        reference: ``"precomputed"`` (``ref_*_logps`` columns), ``"adapter_disabled"`` (PEFT model, adapter off),
            ``"ref_adapter"`` (PEFT model, its ``"ref"`` adapter) or ``"model"`` (``ref_model``).
        ref_model: The reference model for ``reference="model"``.
    """

    name = "dpo"

    def __init__(self, spec: PreferenceSpec, reference: str, ref_model: Optional[nn.Module] = None) -> None:
        self.spec, self.reference, self.ref_model = spec, reference, ref_model

    def batches(self, data: Any, config: SensitivityConfig, pad_id: int) -> Iterator[dict[str, Tensor]]:
        rows = _dataset_of(data)
        index = select_examples(rows, config.calibration_samples, config.seed)
        if len(index) < config.calibration_samples:
            logger.warning("calibration data has %d pairs, fewer than calibration_samples=%d", len(index),
                           config.calibration_samples)
        size = config.calibration_batch_size
        for start in range(0, len(index), size):
            yield collate_pairs([rows[i] for i in index[start : start + size]], pad_id, config.max_length)

    def probe_data(self, data: Any) -> Any:
        return CompletionRows(_dataset_of(data), prompt_completion_example("chosen_ids"))

    def unusable_reason(self, data: Any, config: SensitivityConfig, pad_id: int) -> Optional[str]:
        rows = _dataset_of(data)
        if len(rows) == 0:
            return "the data has no preference pair to score"
        if self.reference == "precomputed" and not {"ref_chosen_logps", "ref_rejected_logps"} <= set(rows[0]):
            return "precompute_ref_log_probs is set but the pairs have no ref_chosen_logps/ref_rejected_logps"
        return None

    @staticmethod
    def _logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out["logits"]
        return completion_logps(logits, batch["input_ids"], batch["completion_mask"])

    def prepare(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        if self.reference == "precomputed":
            if "ref_chosen_logps" not in batch:
                raise ValueError("the calibration pairs have no ref_chosen_logps/ref_rejected_logps columns")
            return
        with torch.no_grad(), self._reference_context(model):
            target = self.ref_model if self.reference == "model" else model
            ref = self._logps(target, batch)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)

    @contextlib.contextmanager
    def _reference_context(self, model: nn.Module) -> Iterator[None]:
        peft = _unwrap(model)
        if self.reference == "adapter_disabled":
            with peft.disable_adapter():
                yield
        elif self.reference == "ref_adapter":
            active = peft.active_adapter
            flags = [(p, p.requires_grad) for p in peft.parameters()]  # set_adapter marks the adapter trainable
            peft.set_adapter("ref")
            try:
                yield
            finally:
                peft.set_adapter(active)
                for p, flag in flags:
                    p.requires_grad_(flag)
        else:
            yield

    def loss(self, model: nn.Module, batch: dict[str, Tensor], forward_keys: Optional[set[str]]) -> Tensor:
        chosen, rejected = self._logps(model, batch).chunk(2)
        chosen_tokens, rejected_tokens = batch["completion_mask"][:, 1:].sum(dim=1).chunk(2)
        return preference_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], self.spec,
                               chosen_tokens.to(chosen.dtype), rejected_tokens.to(chosen.dtype))

    def gram_mask(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        mask = batch["attention_mask"].clone()
        mask[mask.shape[0] // 2 :] = 0  # the input Grams are of the chosen sequences (prompt + chosen completion)
        return mask

    def counts(self, batch: dict[str, Tensor]) -> tuple[int, Any]:
        return batch["input_ids"].shape[0] // 2, batch["completion_mask"][:, 1:].sum()

    def metadata(self) -> dict[str, str]:
        return {"calibration_loss": self.name,
                "calibration_loss_detail": f"{self.spec.describe()}, reference={self.reference}",
                "gram_sequences": "chosen (prompt + chosen completion)"}


# ---------------------------------------------------------------------------------------------- selection
def preference_setup(trainer: Any, model: Optional[nn.Module], expert_type: Optional[str]
                     ) -> tuple[Optional[PreferenceLoss], Optional[str]]:
    """The trainer's preference loss as a :class:`PreferenceLoss`, or ``(None, why not)``.

    Reads TRL ``DPOTrainer`` attributes (``beta``, ``loss_types``, ``loss_weights``, ``f_divergence_type``,
    ``ld_alpha``, ``use_weighting``, ``aux_loss_enabled``, ``ref_model``, ``precompute_ref_logps``).
    """
    if trainer is None or getattr(trainer, "beta", None) is None:
        return None, "the trainer's preference settings (beta, reference model) are not available to the callback"
    types = getattr(trainer, "loss_types", None) or getattr(trainer, "loss_type", "sigmoid")
    types = tuple([types] if isinstance(types, str) else types)
    weights = tuple(float(w) for w in (getattr(trainer, "loss_weights", None) or [1.0] * len(types)))
    unsupported = [t for t in types if t not in PREFERENCE_LOSS_TYPES]
    if unsupported:
        return None, f"loss_type {unsupported} is not implemented in the calibration pass ({PREFERENCE_LOSS_TYPES})"
    for attr, default in (("f_divergence_type", "reverse_kl"), ("ld_alpha", None), ("use_weighting", False),
                          ("aux_loss_enabled", False)):
        value = getattr(trainer, attr, default)
        value = getattr(value, "value", value)  # enums in older TRL
        if value != default:
            return None, f"{attr}={value!r} is not implemented in the calibration pass (only {default!r})"
    spec = PreferenceSpec(float(trainer.beta), types, weights)
    ref_model = getattr(trainer, "ref_model", None)
    peft = _unwrap(model) if model is not None else None
    if getattr(trainer, "precompute_ref_logps", False):
        return PreferenceLoss(spec, "precomputed"), None
    if ref_model is not None:
        return PreferenceLoss(spec, "model", ref_model), None
    if expert_type == "lora" and hasattr(peft, "disable_adapter"):
        has_ref = "ref" in getattr(peft, "peft_config", {})
        return PreferenceLoss(spec, "ref_adapter" if has_ref else "adapter_disabled"), None
    return None, "the trainer has no reference model and the expert is not a PEFT adapter"


def select_calibration_loss(
    data: Any,
    *,
    trainer: Any = None,
    model: Optional[nn.Module] = None,
    expert_type: Optional[str] = None,
    choice: str = "auto",
) -> CalibrationLoss:
    """The calibration loss for ``data`` (its columns) and ``trainer`` (its preference settings).

    Args:
        data: The calibration data (a dataset or a DataLoader).
        trainer: The trainer (only its preference attributes are read), if known.
        model: The expert (to tell a PEFT adapter whose reference is the adapter-disabled model).
        expert_type: ``"lora"`` or ``"full"``.
        choice: ``"auto"`` (the trainer's preference loss where it can be computed, else the chosen LM loss),
            ``"preference"`` (the preference loss or an error) or ``"completion"`` (chosen / desirable LM loss).

    Raises:
        UnsupportedSetupError: ``choice="preference"`` where the preference loss cannot be computed, or an unknown
            choice.
    """
    if choice not in CALIBRATION_LOSSES:
        raise UnsupportedSetupError(f"calibration_loss={choice!r} is not one of {list(CALIBRATION_LOSSES)}")
    columns = row_columns(data)
    if set(PAIR_COLUMNS) <= columns:
        found, reason = (None, "calibration_loss='completion' was asked for")
        if choice != "completion":
            found, reason = preference_setup(trainer, model, expert_type)
        if found is not None:
            return found
        if choice == "preference":
            raise UnsupportedSetupError(
                f"calibration_loss='preference': the preference loss cannot be computed ({reason}). Use "
                "calibration_loss='completion' (LM loss of the chosen completions) or mode='during' (scores the "
                "gradients of the trainer's own loss)."
            )
        return CompletionLMLoss(prompt_completion_example("chosen_ids"), reason=reason)
    if set(UNPAIRED_COLUMNS) <= columns:
        reason = "KTO's loss compares each completion with a batch-level KL baseline; no per-example loss"
        if choice == "preference":
            raise UnsupportedSetupError(
                f"calibration_loss='preference' is not available for unpaired (KTO) data: {reason}. Use "
                "calibration_loss='auto' (LM loss of the desirable completions) or mode='during'."
            )
        return CompletionLMLoss(prompt_completion_example("completion_ids"), keep_desirable=True, reason=reason)
    if set(CONCATENATED_PAIR_COLUMNS) <= columns:
        reason = ("pairs stored as whole chosen/rejected sequences (TRL's experimental ORPO / CPO trainers): their "
                  "preference terms are not implemented in the calibration pass")
        if choice == "preference":
            raise UnsupportedSetupError(
                f"calibration_loss='preference' is not available for these pairs: {reason}. Use "
                "calibration_loss='auto' (LM loss of the chosen completions) or mode='during'."
            )
        return CompletionLMLoss(concatenated_chosen_example, reason=reason)
    if choice == "preference":
        raise UnsupportedSetupError(
            f"calibration_loss='preference' needs tokenised preference pairs ({', '.join(PAIR_COLUMNS)}); the data "
            f"has columns {sorted(columns)}"
        )
    return LMLoss()
