"""Calibration data: the seeded examples of a calibration pass, padded into batches, and the probe set.

Examples are drawn without replacement by a seeded permutation (:func:`select_examples`), right-padded
(:func:`collate_examples`), truncated to ``max_length`` and labelled as ``loss_tokens`` says; the probe set of the
cross term is built from the same data (:func:`build_probe`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import SensitivityConfig
from ..errors import DataError
from ..lora import unwrap_model as _unwrap
from ..store import ProbeSet

logger = logging.getLogger(__name__)


_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


def pad_id_of(model: Optional[nn.Module], tokenizer: Any = None) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and model is not None:
        pad = getattr(getattr(_unwrap(model), "config", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def collate_examples(examples: Sequence[dict], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad a list of tokenised examples (``input_ids`` [+ ``attention_mask``, ``labels``]) into a batch."""
    length = max(len(ex["input_ids"]) for ex in examples)
    n = len(examples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    has_labels = all("labels" in ex for ex in examples)
    for i, ex in enumerate(examples):
        row = torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1)
        t = row.shape[0]
        ids[i, :t] = row
        am = ex.get("attention_mask")
        mask[i, :t] = torch.as_tensor(am, dtype=torch.long).reshape(-1) if am is not None else 1
        if has_labels:
            labels[i, :t] = torch.as_tensor(ex["labels"], dtype=torch.long).reshape(-1)
    batch = {"input_ids": ids, "attention_mask": mask}
    if has_labels:
        batch["labels"] = labels
    return batch


def select_examples(dataset: Any, count: int, seed: int) -> list[int]:
    """``count`` example indices of ``dataset`` drawn without replacement by a seeded permutation."""
    try:
        size = len(dataset)
    except TypeError as err:
        raise TypeError(
            "calibration data must be a sized dataset (a datasets.Dataset, a list of dicts, a torch Dataset) or a "
            "DataLoader over one"
        ) from err
    if size == 0:
        raise ValueError("calibration data is empty")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(size, generator=gen)[: min(count, size)].tolist()


def _row_keys(example: Any) -> str:
    if isinstance(example, Mapping):
        return f"rows with keys {sorted(map(str, example))}"
    return f"rows of type {type(example).__name__}"


def _checked_collate(collate: Callable, pad_id: int) -> Callable:
    """``collate`` that always returns a dict with a 2-D ``input_ids`` tensor, or raises :class:`DataError`.

    Trainers' own collators differ: TRL's DPO collator builds ``input_ids`` from prompt/chosen/rejected ids (kept),
    GRPO's is the identity (a list of untokenised prompt rows, which the model cannot score). Tokenised rows that
    the collator does not turn into a batch are padded by :func:`collate_examples` instead.
    """

    def run(examples: Sequence[Any]) -> dict[str, Tensor]:
        error: Optional[Exception] = None
        try:
            batch = collate(examples)
        except Exception as err:  # a trainer's collator may refuse rows it does not expect; say why below
            batch, error = None, err
        if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor) and batch["input_ids"].dim() == 2:
            return dict(batch)
        if examples and all(isinstance(ex, Mapping) and "input_ids" in ex for ex in examples):
            return collate_examples(examples, pad_id)
        reason = f"; the collator raised {type(error).__name__}: {error}" if error is not None else ""
        raise DataError(
            f"calibration/probe data has {_row_keys(examples[0]) if examples else 'no rows'} and its collator "
            f"gives no 'input_ids' tensor{reason}. The sensitivity pass and the probe need tokenised examples "
            "(input_ids [+ attention_mask, labels]); prompt-only data (e.g. TRL's GRPOTrainer) has no completions "
            "to score"
        ) from error

    return run


def _as_dataset_and_collate(data: Any, pad_id: int) -> tuple[Any, Callable]:
    if isinstance(data, torch.utils.data.DataLoader):
        collate = data.collate_fn
        dataset = data.dataset
        # torch's default collate cannot pad ragged sequences; use ours then.
        if collate is None or getattr(collate, "__name__", "") == "default_collate":
            collate = lambda exs: collate_examples(exs, pad_id)  # noqa: E731
        return dataset, _checked_collate(collate, pad_id)
    return data, _checked_collate(lambda exs: collate_examples(exs, pad_id), pad_id)


def unusable_data_reason(data: Any, config: SensitivityConfig, *, pad_id: int = 0) -> Optional[str]:
    """Why ``data`` cannot feed the calibration pass or the probe (``None`` when it can).

    Collates the first seeded example only, so that a trainer can refuse a setup at train start instead of
    failing at the end of training or inside ``save_model``.
    """
    try:
        dataset, collate = _as_dataset_and_collate(data, pad_id)
        index = select_examples(dataset, 1, config.seed)
        collate([dataset[index[0]]])
    except (DataError, TypeError, ValueError, KeyError, IndexError) as err:
        return str(err)
    return None


def _loss_labels(batch: dict[str, Tensor], loss_tokens: str, pad_id: int) -> Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if loss_tokens == "labels" and batch.get("labels") is not None:
        return batch["labels"]
    labels = ids.clone()
    if mask is not None:
        labels[mask == 0] = -100
    return labels


def _truncate(batch: dict[str, Any], max_length: int) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 2 and key in _MODEL_INPUT_KEYS:
            value = value[:, :max_length]
        out[key] = value
    return out


def iter_calibration_batches(
    data: Any, config: SensitivityConfig, *, pad_id: int = 0
) -> Iterable[dict[str, Tensor]]:
    """Seeded batches of ``config.calibration_batch_size`` examples (``calibration_samples`` in total)."""
    dataset, collate = _as_dataset_and_collate(data, pad_id)
    index = select_examples(dataset, config.calibration_samples, config.seed)
    if len(index) < config.calibration_samples:
        logger.warning(
            "calibration data has %d examples, fewer than calibration_samples=%d", len(index), config.calibration_samples
        )
    bs = config.calibration_batch_size
    for start in range(0, len(index), bs):
        batch = collate([dataset[i] for i in index[start : start + bs]])
        batch = _truncate(batch, config.max_length)
        batch["labels"] = _loss_labels(batch, config.loss_tokens, pad_id)
        yield batch


def build_probe(
    data: Any,
    config: SensitivityConfig,
    *,
    pad_id: int = 0,
    vocab_size: Optional[int] = None,
    tokenizer_name: Optional[str] = None,
) -> ProbeSet:
    """``config.probe_samples`` sequences of the expert's data padded to one length (labels -100 where unscored).

    Labels follow the Hugging Face causal-LM convention (unshifted: ``labels[t]`` scores the prediction made at
    position ``t-1``), with ``loss_tokens`` deciding which tokens count like in the calibration pass.

    Raises:
        DataError: the data has no tokenised examples (e.g. the prompt-only rows of TRL's ``GRPOTrainer``).
    """
    dataset, collate = _as_dataset_and_collate(data, pad_id)
    index = select_examples(dataset, config.probe_samples, config.seed)
    rows = []
    for i in index:
        batch = _truncate(collate([dataset[i]]), config.max_length)
        labels = _loss_labels(batch, config.loss_tokens, pad_id)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        rows.append((batch["input_ids"][0], mask[0], labels[0]))
    length = max(r[0].shape[0] for r in rows)
    n = len(rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    att = torch.zeros((n, length), dtype=torch.long)
    lab = torch.full((n, length), -100, dtype=torch.long)
    for j, (a, b, c) in enumerate(rows):
        t = a.shape[0]
        ids[j, :t], att[j, :t], lab[j, :t] = a, b, c
    lab[att == 0] = -100
    metadata = {"task": config.task, "vocab_size": vocab_size, "tokenizer": tokenizer_name,
                "loss_tokens": config.loss_tokens, "seed": config.seed}
    return ProbeSet(ids, att, lab, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()
                                    if v is not None})
