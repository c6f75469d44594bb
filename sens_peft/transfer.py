"""Cross-task transferability: how well expert i's logits align with expert j's on expert j's probe data.

``A[i][j]`` = mean over the scored positions of probe j of an alignment score between ``z_i`` (expert i's
logits) and ``z_j`` (expert j's, the reference), over the shared vocabulary slice (the first
``min(V_i, V_j, vocab_size)`` logits; homologous experts sometimes add a pad token). Scores:

* ``cosine``: ``cos(z_i, z_j)``; larger = more aligned.
* ``neg_l2``: ``-||z_i - z_j||_2``; larger = more aligned.
* ``neg_kl``: ``-KL(p_j || p_i)`` with ``p = softmax(z)`` over the slice; larger = more aligned.
* ``l2``: ``+||z_i - z_j||_2``, the literal third-party reading: larger = *less* aligned (kept for
  reproduction; combine it with ``tau_normalization="sum1"``).

Positions follow the causal shift: the logits at position ``t`` predict token ``t + 1``, so ``t`` is scored
when ``labels[t + 1] != -100`` and the attention mask is 1 at ``t`` and ``t + 1``. The diagonal ``A[i][i]``
(self alignment) is computed but τ ignores it.

Memory: logits are processed one batch at a time and reduced to per-(i, j) sums immediately;
:func:`transferability_for_models` additionally caches each expert's own scored logits on its probe (fp32,
CPU): ``num_scored_positions × vocab × 4`` bytes per expert (e.g. 8k positions × 32k vocab ≈ 1 GB), logged
before the pass.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ALIGNMENTS
from .lora import model_device
from .store import ProbeSet

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENTS",
    "adapters_logits_fn",
    "alignment_scores",
    "scored_positions",
    "transferability_for_adapters",
    "transferability_for_models",
    "transferability_matrix",
]

IGNORE_INDEX = -100

LogitsFn = Callable[[int, dict[str, Tensor]], Tensor]


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def scored_positions(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Boolean ``[B, T]`` mask of the logit positions that are scored (causal shift).

    Position ``t`` is scored when ``labels[:, t + 1] != -100`` and ``attention_mask`` is 1 at ``t`` and
    ``t + 1``; the last position never is.

    Args:
        attention_mask: ``[B, T]`` (1 = real token).
        labels: ``[B, T]`` with ``-100`` for tokens that are not scored.

    Returns:
        Boolean ``[B, T]``.
    """
    if attention_mask.shape != labels.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and labels {tuple(labels.shape)} "
                         "must have the same shape")
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    real = attention_mask.bool()
    mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & real[:, 1:] & real[:, :-1]
    return mask


def alignment_scores(z_i: Tensor, z_j: Tensor, alignment: str = "cosine") -> Tensor:
    """Per-position alignment of ``z_i`` with the reference ``z_j`` (both ``[N, V]``), in fp32 or better.

    Args:
        z_i: Logits of the expert being scored.
        z_j: Reference logits (the probe's own expert).
        alignment: ``cosine``, ``neg_l2``, ``neg_kl`` or ``l2``.

    Returns:
        ``[N]`` scores.
    """
    if z_i.shape != z_j.shape:
        raise ValueError(f"logits shapes differ: {tuple(z_i.shape)} vs {tuple(z_j.shape)}")
    dtype = torch.float64 if torch.float64 in (z_i.dtype, z_j.dtype) else torch.float32
    z_i, z_j = z_i.to(dtype), z_j.to(dtype)
    if alignment == "cosine":
        return F.cosine_similarity(z_i, z_j, dim=-1, eps=1e-8)
    if alignment in ("neg_l2", "l2"):
        dist = torch.linalg.vector_norm(z_i - z_j, dim=-1)
        return dist if alignment == "l2" else -dist
    if alignment == "neg_kl":
        log_p_j = F.log_softmax(z_j, dim=-1)
        log_p_i = F.log_softmax(z_i, dim=-1)
        return -(log_p_j.exp() * (log_p_j - log_p_i)).sum(dim=-1)
    raise ValueError(f"alignment={alignment!r} is not one of {list(ALIGNMENTS)}")


# --------------------------------------------------------------------------------------------------------
# Batching helpers
# --------------------------------------------------------------------------------------------------------


def _check_probes(probes: Sequence[ProbeSet]) -> list[ProbeSet]:
    probes = list(probes)
    if not probes:
        raise ValueError("need at least one probe set (one per expert)")
    for j, probe in enumerate(probes):
        shapes = {tuple(probe.input_ids.shape), tuple(probe.attention_mask.shape), tuple(probe.labels.shape)}
        if len(shapes) != 1 or probe.input_ids.dim() != 2:
            raise ValueError(f"probe {j}: input_ids, attention_mask and labels must share one [N, T] shape, "
                             f"got {sorted(shapes)}")
        if len(probe) == 0:
            raise ValueError(f"probe {j} is empty")
    return probes


def _batches(probe: ProbeSet, batch_size: int, device: torch.device) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    for start in range(0, len(probe), batch_size):
        batch = {
            "input_ids": probe.input_ids[start : start + batch_size].to(device),
            "attention_mask": probe.attention_mask[start : start + batch_size].to(device),
            "labels": probe.labels[start : start + batch_size].to(device),
        }
        yield batch, scored_positions(batch["attention_mask"], batch["labels"])


def _default_device(probes: Sequence[ProbeSet], device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return probes[0].input_ids.device


def _select(logits: Tensor, mask: Tensor, device: torch.device, expert: int, probe: int) -> Tensor:
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"logits of expert {expert} on probe {probe} have shape {tuple(logits.shape)}, "
                         f"expected [batch, seq, vocab] with [batch, seq] = {tuple(mask.shape)}")
    return logits.to(device)[mask.to(device)].float()


def _check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment={alignment!r} is not one of {list(ALIGNMENTS)}")


def _finish(sums: Tensor, counts: list[int], probes: Sequence[ProbeSet]) -> Tensor:
    for j, n in enumerate(counts):
        if n == 0:
            raise ValueError(f"probe {j} has no scored positions (labels all -100 or masked out)")
    return (sums / torch.tensor(counts, dtype=torch.float64)[None, :]).float()


def _vocab(n_i: int, n_j: int, vocab_size: int | None) -> int:
    v = min(n_i, n_j)
    return v if vocab_size is None else min(v, int(vocab_size))


# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def transferability_matrix(logits_fn: LogitsFn, probes: Sequence[ProbeSet], *, alignment: str = "cosine",
                           batch_size: int = 8, device: Any = None, vocab_size: int | None = None) -> Tensor:
    """The ``[K, K]`` transferability matrix from a logits function.

    Loops probe j → batch → expert i; the reference is expert j's logits on the same batch. Only per-(i, j)
    sums are kept (float64), so memory is one batch of logits per expert.

    Args:
        logits_fn: ``logits_fn(i, batch) -> [B, T, V]`` logits of expert ``i`` on ``batch`` (a dict with
            ``input_ids``, ``attention_mask``, ``labels`` on ``device``).
        probes: One :class:`ProbeSet` per expert (probe j = expert j's data).
        alignment: ``cosine`` (default), ``neg_l2``, ``neg_kl`` or ``l2``.
        batch_size: Sequences per forward pass.
        device: Where the batches go and the scores are computed (default CUDA when available, else the
            probes' device).
        vocab_size: Compare only the first ``vocab_size`` logits (also capped by the smallest vocabulary).

    Returns:
        fp32 ``[K, K]`` on CPU, ``A[i][j]`` = mean alignment of expert i with expert j on probe j.
    """
    _check_alignment(alignment)
    probes = _check_probes(probes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _default_device(probes, device)
    num = len(probes)
    sums = torch.zeros(num, num, dtype=torch.float64)
    counts = [0] * num
    for j, probe in enumerate(probes):
        for batch, mask in _batches(probe, batch_size, device):
            n = int(mask.sum())
            if n == 0:
                continue
            ref = _select(logits_fn(j, batch), mask, device, j, j)
            for i in range(num):
                z_i = ref if i == j else _select(logits_fn(i, batch), mask, device, i, j)
                v = _vocab(z_i.shape[-1], ref.shape[-1], vocab_size)
                sums[i, j] += alignment_scores(z_i[:, :v], ref[:, :v], alignment).double().sum().cpu()
            counts[j] += n
    matrix = _finish(sums, counts, probes)
    logger.info("transferability (%s) over %s scored positions:\n%s", alignment, counts, matrix)
    return matrix


def _forward_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    device = model_device(model)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits if hasattr(out, "logits") else out[0]


def adapters_logits_fn(peft_model, adapter_names: Sequence[str]) -> LogitsFn:
    """A logits function that switches the active adapter of one PeftModel.

    Args:
        peft_model: A ``peft.PeftModel`` holding all the adapters.
        adapter_names: Adapter name of expert ``i`` at index ``i``.

    Returns:
        ``fn(i, batch) -> logits``; it activates ``adapter_names[i]`` (``inference_mode=True``) when needed.
        Use :func:`transferability_for_adapters` to also restore the model's state afterwards.
    """
    names = list(adapter_names)
    known = set(getattr(peft_model, "peft_config", {}) or {})
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded in the model (loaded: {sorted(known)})")

    def logits_fn(i: int, batch: dict[str, Tensor]) -> Tensor:
        name = names[i]
        if peft_model.active_adapter != name:
            peft_model.set_adapter(name, inference_mode=True)
        return _forward_logits(peft_model, batch)

    return logits_fn


@contextmanager
def _preserved_state(peft_model):
    """Restore the active adapter(s), train/eval mode and every requires_grad flag on exit."""
    previous = peft_model.active_adapter
    training = peft_model.training
    grads = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    try:
        peft_model.eval()
        yield
    finally:
        if isinstance(previous, str):
            peft_model.set_adapter(previous, inference_mode=True)
        else:
            peft_model.base_model.set_adapter(list(previous), inference_mode=True)
        for name, p in peft_model.named_parameters():
            if name in grads:
                p.requires_grad_(grads[name])
        peft_model.train(training)


def transferability_for_adapters(peft_model, adapter_names: Sequence[str], probes: Sequence[ProbeSet],
                                 **kw) -> Tensor:
    """Transferability between adapters loaded in one PeftModel (eval mode, no dropout).

    The previously active adapter, the train/eval mode and ``requires_grad`` flags are restored afterwards.

    Args:
        peft_model: The PeftModel.
        adapter_names: One adapter per expert, in the order of ``probes``.
        probes: One probe set per adapter.
        **kw: Passed to :func:`transferability_matrix` (``alignment``, ``batch_size``, ``device``,
            ``vocab_size``).

    Returns:
        fp32 ``[K, K]``.
    """
    if len(adapter_names) != len(probes):
        raise ValueError(f"got {len(adapter_names)} adapters and {len(probes)} probe sets; need one probe per adapter")
    fn = adapters_logits_fn(peft_model, adapter_names)
    with _preserved_state(peft_model):
        return transferability_matrix(fn, probes, **kw)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def transferability_for_models(load_model: Callable[[int], torch.nn.Module], num_experts: int,
                               probes: Sequence[ProbeSet], *, alignment: str = "cosine", batch_size: int = 8,
                               device: Any = None, vocab_size: int | None = None) -> Tensor:
    """Transferability between full models, keeping one model in memory at a time.

    Pass 1 loads each expert j and caches its logits on its own probe j (scored positions only, fp32, CPU).
    Pass 2 loads each expert i and compares its logits on every probe j with the cache. Each model is loaded
    twice; the models are put in eval mode and released (``gc`` + CUDA cache) after use.

    Args:
        load_model: ``load_model(i)`` returns expert i's model (on the device it should run on).
        num_experts: ``K``; must equal ``len(probes)``.
        probes: One probe set per expert.
        alignment, batch_size, device, vocab_size: As in :func:`transferability_matrix`.

    Returns:
        fp32 ``[K, K]``, identical (up to float rounding) to :func:`transferability_matrix` with the same
        models.
    """
    _check_alignment(alignment)
    probes = _check_probes(probes)
    if num_experts != len(probes):
        raise ValueError(f"num_experts={num_experts} but {len(probes)} probe sets were given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _default_device(probes, device)
    num = num_experts

    cache: list[list[Tensor]] = []
    for j in range(num):
        model = load_model(j)
        model.eval()
        chunks = []
        for batch, mask in _batches(probes[j], batch_size, device):
            z = _select(_forward_logits(model, batch), mask, device, j, j)
            if vocab_size is not None:
                z = z[:, : int(vocab_size)]
            chunks.append(z.cpu())
        cache.append(chunks)
        nbytes = sum(c.numel() * 4 for c in chunks)
        logger.info("cached reference logits of expert %d on its probe: %.1f MB", j, nbytes / 2**20)
        del model
        _free_memory()

    sums = torch.zeros(num, num, dtype=torch.float64)
    counts = [sum(int(c.shape[0]) for c in cache[j]) for j in range(num)]
    for i in range(num):
        model = load_model(i)
        model.eval()
        for j in range(num):
            refs = iter(cache[j])
            for batch, mask in _batches(probes[j], batch_size, device):
                ref = next(refs).to(device)
                z_i = _select(_forward_logits(model, batch), mask, device, i, j)
                v = _vocab(z_i.shape[-1], ref.shape[-1], vocab_size)
                sums[i, j] += alignment_scores(z_i[:, :v], ref[:, :v], alignment).double().sum().cpu()
        del model
        _free_memory()
    matrix = _finish(sums, counts, probes)
    logger.info("transferability (%s, one model at a time) over %s scored positions:\n%s", alignment, counts,
                matrix)
    return matrix
