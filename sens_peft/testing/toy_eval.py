"""The toy suite's evaluation: greedy answers, answer log-likelihoods, accuracies and their tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .toy_tasks import (
    MAX_ANSWER_TOKENS,
    TASK_NAMES,
    ToyCollator,
    build_tokenizer,
    encode_example,
    get_task,
    task_splits,
)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def decode_answer(tokenizer, new_tokens: Sequence[int]) -> str:
    """The answer text in generated tokens: everything before the first EOS (or pad), specials dropped."""
    out = []
    for t in new_tokens:
        t = int(t)
        if t in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True)


@torch.no_grad()
def predict(model, task: str, inputs: Sequence[str], *, tokenizer=None, batch_size: int = 256) -> list[str]:
    """Greedy answers of ``model`` for task inputs (batched, left padded, via ``model.generate``)."""
    tokenizer = tokenizer or build_tokenizer()
    spec = get_task(task)
    device = _model_device(model)
    answers: list[str] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        prompts = [[tokenizer.bos_token_id] + tokenizer.encode(spec.prompt(x), add_special_tokens=False)
                   for x in chunk]
        ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.extend(decode_answer(tokenizer, row[ids.shape[1] :].tolist()) for row in out)
    return answers


@torch.no_grad()
def answer_loglik(model, task: str, pairs: Sequence[tuple[str, str]], *, tokenizer=None,
                  batch_size: int = 256) -> float:
    """Mean per-token log-likelihood of the true answers (answer tokens + EOS) under ``model``."""
    tokenizer = tokenizer or build_tokenizer()
    device = _model_device(model)
    collate = ToyCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        rows = [encode_example(tokenizer, task, x, y) for x, y in pairs[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:]
        scored = target != -100
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(picked[scored].sum())
        count += int(scored.sum())
    return total / max(count, 1)


def evaluate(
    model,
    tasks: Sequence[str] | str | None = None,
    split: str = "test",
    n: int | None = None,
    batch_size: int = 256,
    *,
    tokenizer=None,
    loglik: bool = False,
) -> dict[str, float]:
    """Per-task exact-match accuracy by batched greedy decoding.

    Args:
        model: Anything with ``generate(input_ids=, attention_mask=, max_new_tokens=, ...)`` returning the
            prompt followed by new tokens (a HF model or a `PeftModel` with the adapter to test active).
        tasks: Task names (default: all).
        split: Which split to score.
        n: Score only the first ``n`` examples of the split.
        batch_size: Prompts per ``generate`` call.
        tokenizer: Toy tokenizer (built if None).
        loglik: Also report ``"<task>/loglik"``: mean per-token log-likelihood of the true answer.

    Returns:
        ``{task: accuracy in [0, 1]}`` (plus ``"<task>/loglik"`` entries when asked).
    """
    tokenizer = tokenizer or build_tokenizer()
    if tasks is None:
        tasks = TASK_NAMES
    elif isinstance(tasks, str):
        tasks = [tasks]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results: dict[str, float] = {}
    try:
        for task in tasks:
            pairs = task_splits(task)[split][:n]
            preds = predict(model, task, [x for x, _ in pairs], tokenizer=tokenizer, batch_size=batch_size)
            results[task] = sum(p == y for p, (_, y) in zip(preds, pairs)) / max(len(pairs), 1)
            if loglik:
                results[f"{task}/loglik"] = answer_loglik(model, task, pairs, tokenizer=tokenizer,
                                                          batch_size=batch_size)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return results


def normalized_accuracy(merged: dict[str, float], experts: dict[str, float]) -> dict[str, float]:
    """Merged accuracy divided by each task's own expert accuracy, plus their ``"avg"``.

    Args:
        merged: ``{task: acc}`` of the merged model.
        experts: ``{task: acc of that task's own expert}``.

    Returns:
        ``{task: merged/expert, ..., "avg": mean over tasks}`` (a task whose expert scores 0 gives 0).
    """
    out = {}
    for task, ref in experts.items():
        if task not in merged:
            raise KeyError(f"normalized_accuracy: merged results have no task {task!r} (have {sorted(merged)})")
        out[task] = merged[task] / ref if ref > 0 else 0.0
    out["avg"] = sum(out.values()) / max(len(out), 1)
    return out


def format_table(rows: dict[str, dict[str, float]], tasks: Sequence[str], *, percent: bool = True,
                 extra: Optional[Sequence[str]] = ("avg",)) -> str:
    """A fixed-width text table: one row per entry of ``rows``, one column per task (+ ``extra``)."""
    cols = list(tasks) + [c for c in (extra or []) if any(c in r for r in rows.values())]
    width = max(12, *(len(k) for k in rows)) + 2
    head = "".ljust(width) + "".join(c[:9].rjust(10) for c in cols)
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        cells = []
        for c in cols:
            v = vals.get(c)
            cells.append("".rjust(10) if v is None else (f"{100 * v:9.1f}%" if percent else f"{v:10.3f}"))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
