"""Token data checks: ids are integers inside the model's vocabulary (a clear error instead of an ``IndexError``
from deep inside the embedding)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch

from ..errors import DataError, SidecarError


def _check_ids(ids: torch.Tensor, vocab_size: Optional[int], where: str, error: type = SidecarError) -> None:
    if ids.numel() == 0:
        return
    if ids.is_floating_point():
        raise error(f"{where} has dtype {ids.dtype}; token ids must be integers")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise error(f"{where} has token id {low}; ids must be >= 0")
    if vocab_size is not None and high >= vocab_size:
        raise error(f"{where} has token id {high}, outside the model's vocabulary of {vocab_size} "
                           "(another tokenizer, or added tokens without resized embeddings?)")


def vocab_size_of(model: Any) -> Optional[int]:
    """Rows of a model's input embedding (the ids it accepts), else ``config.vocab_size``."""
    try:
        emb = model.get_input_embeddings()
        return int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])
    except Exception:  # not a transformers model: fall back to its config
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(size) if isinstance(size, int) else None


def check_token_batches(batches: Iterable[Mapping[str, Any]], model: Any, where: str = "calibration data"
                        ) -> Iterable[Mapping[str, Any]]:
    """Yield ``batches`` after checking their token ids against the model's vocabulary (a clear error instead of
    ``IndexError: index out of range in self`` from deep inside the embedding)."""
    vocab = vocab_size_of(model)
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if isinstance(ids, torch.Tensor):
            _check_ids(ids, vocab, f"{where}: batch {i}: 'input_ids'", DataError)
        yield batch
