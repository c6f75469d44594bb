"""A built-in toy suite: a character tokenizer, a tiny Llama, synthetic tasks, training and evaluation.

The suite is the project's scientific instrument: it must reproduce the regime in which merging real LLMs is
meaningful, i.e. a base model that already half-knows every task and experts whose task vectors are small.
Every task is a per-position symbol map over 4-symbol strings (``inc``: digit + 1 mod 10, ``cipher``: a letter
substitution, ``rcipher``: rotate then another substitution, ``d2l``: digit -> letter table). :func:`pretrain_base`
trains on generic text plus each task restricted to a fixed subset of its input symbols
(``ToySettings.known``), so the base knows the format and the known map entries and fails on inputs with an
unknown symbol: its accuracy is ~ ``(known / alphabet) ** 4`` per task (20-40% by default), graded by
construction rather than a knife edge of pre-training steps. :func:`train_expert` then fine-tunes lightly (LoRA,
~150 steps) on the full-alphabet train split to >= 90% on one task, learning only the missing entries.

Everything is built in memory from fixed seeds (no downloads)::

    from sens_peft.testing import toy
    tok = toy.build_tokenizer()
    base = toy.pretrain_base()                      # cached under ~/.cache/sens_peft/toy/<hash>
    expert = toy.train_expert(base, "cipher", steps=150, output_dir="out/cipher")
    print(toy.evaluate(expert, ["cipher", "inc"], n=100))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

TOY_VERSION = "3"  # bump when the data, model or pre-training changes, so cached bases are not reused

# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = " +-=>,.:;|"


@dataclass(frozen=True)
class Task:
    """A synthetic task: a tag token and a generator of ``(input, answer)`` string pairs.

    Args:
        name: Short name (``"cipher"``).
        tag: Tag token that prefixes every prompt (``"<map>"``); one token of the toy vocabulary.
        generate: ``rng -> (input, answer)``; must be deterministic given the ``random.Random`` state.
        solve: Independent reference solver ``input -> answer`` (used by tests and as a check).
        description: One line for tables and docs.
    """

    name: str
    tag: str
    generate: Callable[[random.Random], tuple[str, str]]
    solve: Callable[[str], str]
    description: str = ""

    def prompt(self, x: str) -> str:
        """The prompt text (without BOS) for an input: ``<tag>input=``."""
        return f"{self.tag}{x}="


# Every task is a per-position symbol map over fixed-length strings. That makes accuracy graded by construction:
# the base is pre-trained on each task restricted to a subset of the input symbols (see ``ToySettings.known``),
# so it knows the format and the known map entries and fails exactly on inputs that contain an unknown symbol;
# its test accuracy is ~ (known / alphabet) ** STR_LEN, and an expert only has to learn the missing entries
# (a small task vector), as with a real pre-trained LLM.
STR_LEN = 4
WORD_ALPHABET = "abcdefgh"
WORD_LEN = STR_LEN
NUM_LEN = STR_LEN


def _rand_word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _perm(alphabet: str, seed: int, image: str | None = None) -> dict[str, str]:
    """A fixed map ``alphabet -> image`` (a permutation of ``image`` or of ``alphabet``) drawn from ``seed``."""
    image = image if image is not None else alphabet
    return dict(zip(alphabet, random.Random(seed).sample(image, len(alphabet))))


CIPHER = _perm(WORD_ALPHABET, 1234)  # cipher: letter substitution sigma1
RCIPHER = _perm(WORD_ALPHABET, 4321)  # rcipher: rotate left by one, then substitution sigma2
D2L = _perm(DIGITS, 2024, image="ijklmnopqrst")  # d2l: digit -> letter table


def _solve_inc(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


def _solve_cipher(x: str) -> str:
    return "".join(CIPHER[c] for c in x)


def _solve_rcipher(x: str) -> str:
    return "".join(RCIPHER[c] for c in x[1:] + x[:1])


def _solve_d2l(x: str) -> str:
    return "".join(D2L[c] for c in x)


def _generator(alphabet: str, solve: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    def generate(rng: random.Random) -> tuple[str, str]:
        x = "".join(rng.choice(alphabet) for _ in range(STR_LEN))
        return x, solve(x)

    return generate


@dataclass(frozen=True)
class _Spec:
    name: str
    tag: str
    alphabet: str
    solve: Callable[[str], str]
    description: str


_SPECS = (
    _Spec("inc", "<inc>", DIGITS, _solve_inc, f"add 1 (mod 10) to each of {STR_LEN} digits"),
    _Spec("cipher", "<map>", WORD_ALPHABET, _solve_cipher, f"fixed substitution of {STR_LEN} letters a-h"),
    _Spec("rcipher", "<rot>", WORD_ALPHABET, _solve_rcipher,
          f"rotate {STR_LEN} letters a-h left by one, then a second fixed substitution"),
    _Spec("d2l", "<d2l>", DIGITS, _solve_d2l, f"map each of {STR_LEN} digits to a letter by a fixed table"),
)
TASKS: dict[str, Task] = {
    s.name: Task(s.name, s.tag, _generator(s.alphabet, s.solve), s.solve, s.description) for s in _SPECS
}
TASK_ALPHABETS: dict[str, str] = {s.name: s.alphabet for s in _SPECS}
TASK_NAMES: list[str] = list(TASKS)
TAG_TOKENS = [t.tag for t in TASKS.values()] + ["<txt>"]
MAX_ANSWER_TOKENS = STR_LEN + 1  # answer + EOS


def known_symbols(task: str, k: int) -> str:
    """The ``k`` input symbols of ``task`` the base is pre-trained on (a fixed, per-task subset of its alphabet).

    Args:
        task: Task name.
        k: How many symbols of the task's input alphabet are known (``len(alphabet)`` = all).

    Returns:
        The known symbols as a string, in alphabet order.
    """
    alphabet = TASK_ALPHABETS[get_task(task).name]
    if not 0 < k <= len(alphabet):
        raise ValueError(f"known_symbols({task!r}): k must be in 1..{len(alphabet)}, got {k}")
    # A per-task order, so different tasks miss different symbols.
    order = random.Random(_task_seed(task, 99)).sample(alphabet, len(alphabet))
    return "".join(sorted(order[:k]))


def vocabulary() -> list[str]:
    """The fixed toy vocabulary, in id order."""
    return SPECIAL_TOKENS + TAG_TOKENS + list(DIGITS) + list(LETTERS) + list(SYMBOLS)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (built in memory).

    Every character is one token; tag tokens (``<map>`` ...) and ``<pad>/<bos>/<eos>/<unk>`` are special
    tokens. ``encode`` adds no BOS/EOS by itself (the dataset code adds them explicitly), and ``decode``
    joins characters without spaces.

    Returns:
        `transformers.PreTrainedTokenizerFast` with ``padding_side="left"`` (for batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIAL_TOKENS + TAG_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=TAG_TOKENS,
        padding_side="left",
        model_max_length=64,
    )
    tok.name_or_path = "sens-peft-toy-char"
    return tok


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------

SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 300}
DATA_SEED = 20250217


def _task_seed(task: str, seed: int) -> int:
    # Stable across processes (unlike hash()).
    return int.from_bytes(hashlib.sha256(f"{task}:{seed}".encode()).digest()[:8], "little")


def task_splits(task: str, seed: int = DATA_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[tuple[str, str]]]:
    """Deterministic, disjoint ``train`` / ``validation`` / ``test`` splits of one task.

    Examples are drawn from a generator seeded by ``(task, seed)``; duplicates of an input are dropped, so
    no input appears in two splits.

    Args:
        task: A name in :data:`TASKS`.
        seed: Data seed.
        sizes: Examples per split (default :data:`SPLIT_SIZES`).

    Returns:
        ``{"train": [(input, answer), ...], "validation": [...], "test": [...]}``
    """
    return _task_splits_cached(task, seed, tuple(sorted((sizes or SPLIT_SIZES).items())))


_SPLIT_CACHE: dict[tuple, dict[str, list[tuple[str, str]]]] = {}


def _task_splits_cached(task: str, seed: int, sizes: tuple) -> dict[str, list[tuple[str, str]]]:
    key = (task, seed, sizes)
    if key not in _SPLIT_CACHE:
        spec = get_task(task)
        size = dict(sizes)
        total = sum(size.values())
        rng = random.Random(_task_seed(task, seed))
        seen: dict[str, str] = {}
        attempts = 0
        while len(seen) < total:
            x, y = spec.generate(rng)
            seen.setdefault(x, y)
            attempts += 1
            if attempts > 50 * total:
                raise RuntimeError(f"task {task!r}: could only draw {len(seen)} distinct inputs of {total}")
        items = list(seen.items())
        # Test and validation come first so that enlarging the train split never changes them.
        out, start = {}, 0
        for split in ("test", "validation", "train"):
            n = size.get(split, 0)
            out[split] = items[start : start + n]
            start += n
        _SPLIT_CACHE[key] = out
    return {k: list(v) for k, v in _SPLIT_CACHE[key].items()}


# Tasks of other families (sens_peft.testing.families) register here, so that splits, datasets, training and
# evaluation below serve every family through one name lookup.
EXTRA_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known to :func:`get_task` (and so to splits, datasets, training and evaluation).

    Raises:
        ValueError: if another task already uses the name.
    """
    known = TASKS.get(task.name) or EXTRA_TASKS.get(task.name)
    if known is not None and known is not task:
        raise ValueError(f"register_task: a toy task named {task.name!r} already exists")
    EXTRA_TASKS[task.name] = task
    return task


def get_task(task: str | Task) -> Task:
    """Look up a task by name (or pass a :class:`Task` through)."""
    if isinstance(task, Task):
        return task
    found = TASKS.get(task) or EXTRA_TASKS.get(task)
    if found is None and not EXTRA_TASKS:
        from . import families  # noqa: F401  (importing it registers the other families' tasks)

        found = EXTRA_TASKS.get(task)
    if found is None:
        raise KeyError(f"unknown toy task {task!r}; available: {TASK_NAMES + list(EXTRA_TASKS)}")
    return found


# ----------------------------------------------------------------------------------------------------------
# Datasets and collator
# ----------------------------------------------------------------------------------------------------------


def encode_example(tokenizer, task: str | Task, x: str, y: str) -> dict[str, list[int]]:
    """Token ids of one example: ``<bos><tag>x=`` (prompt, labels -100) then ``y<eos>`` (scored)."""
    spec = get_task(task)
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(spec.prompt(x), add_special_tokens=False)
    answer = tokenizer.encode(y, add_special_tokens=False) + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [-100] * len(prompt) + answer,
    }


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a map-style dataset (what ``Trainer`` needs; no ``datasets`` dependency)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def task_dataset(task: str, split: str = "train", tokenizer=None, n: int | None = None) -> ListDataset:
    """Tokenised examples of a task split with the prompt masked out of ``labels``.

    Args:
        task: Task name.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        tokenizer: Toy tokenizer (built if None).
        n: Keep only the first ``n`` examples.

    Returns:
        `ListDataset` of dicts with ``input_ids``, ``attention_mask``, ``labels`` (lists of ints).
    """
    tokenizer = tokenizer or build_tokenizer()
    pairs = task_splits(task)[split][:n]
    return ListDataset([encode_example(tokenizer, task, x, y) for x, y in pairs])


def text_rows(task: str, split: str = "train", n: int | None = None) -> list[dict[str, str]]:
    """Plain-text ``{"prompt", "completion"}`` rows (for TRL's ``SFTTrainer``); BOS/EOS are left to TRL."""
    spec = get_task(task)
    return [{"prompt": spec.prompt(x), "completion": y} for x, y in task_splits(task)[split][:n]]


def sft_rows(task: str, split: str = "train", tokenizer=None, n: int | None = None) -> list[dict[str, list[int]]]:
    """Pre-tokenised rows for TRL's ``SFTTrainer``: ``input_ids`` and ``completion_mask`` (1 on the answer).

    TRL treats a dataset with an ``input_ids`` column as already tokenised, so the prompt keeps its BOS exactly
    as :func:`evaluate` builds it, and ``completion_only_loss`` scores the answer (+ EOS) only.
    """
    tokenizer = tokenizer or build_tokenizer()
    out = []
    for x, y in task_splits(task)[split][:n]:
        ex = encode_example(tokenizer, task, x, y)
        out.append({"input_ids": ex["input_ids"], "completion_mask": [int(v != -100) for v in ex["labels"]]})
    return out


@dataclass
class ToyCollator:
    """Right-pads ``input_ids``/``attention_mask`` with the pad id and ``labels`` with -100."""

    pad_token_id: int = 0

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(r.get("labels", r["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------------
# Model and pre-training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ToySettings:
    """Everything that determines the pre-trained toy base (its hash names the cache folder).

    Args:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads:
            `LlamaConfig` sizes (>= 8 layers so that per-layer coefficients have room).
        steps: Pre-training optimizer steps.
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (cosine decay, 5% warm-up).
        task_share: Fraction of pre-training sequences drawn from the tasks' train splits; the rest is
            generic text.
        task_weights: Relative share of each task within ``task_share``.
        known: Per task, how many input symbols the base sees the task on (:func:`known_symbols`); only train
            examples whose input uses known symbols alone enter pre-training, which sets the base's accuracy to
            about ``(known / alphabet size) ** STR_LEN`` (not a knife-edge function of steps or shares).
        seed: Initialisation and data-order seed.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    task_share: float = 0.7
    task_weights: dict = dataclasses.field(default_factory=lambda: {t: 1.0 for t in TASK_NAMES})
    known: dict = dataclasses.field(default_factory=lambda: {"inc": 8, "cipher": 6, "rcipher": 6, "d2l": 7})
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({"v": TOY_VERSION, **dataclasses.asdict(self), "tasks": TASK_NAMES}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_model(settings: ToySettings | None = None, tokenizer=None, seed: int | None = None):
    """A randomly initialised tiny `LlamaForCausalLM` sized by ``settings`` over the toy vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = settings or ToySettings()
    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed if seed is None else seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _generic_text(rng: random.Random) -> str:
    """One line of generic pre-training text: words, numbers and light punctuation, no task tags."""
    parts = []
    while sum(len(p) + 1 for p in parts) < rng.randint(10, 22):
        r = rng.random()
        if r < 0.6:
            parts.append(_rand_word(rng, 1, 6))
        elif r < 0.85:
            parts.append(str(rng.randint(0, 999)))
        else:
            parts.append(rng.choice(["+", "-", "=", ",", ".", ":", "|", ">"]))
    return "<txt>" + " ".join(parts)


def restricted_train(task: str, k: int) -> list[tuple[str, str]]:
    """Train-split examples of ``task`` whose input uses only the ``k`` :func:`known_symbols` of the task."""
    known = set(known_symbols(task, k))
    return [(x, y) for x, y in task_splits(task)["train"] if set(x) <= known]


def pretraining_rows(tokenizer, settings: ToySettings, n: int) -> list[list[int]]:
    """``n`` pre-training sequences (token ids): generic text plus ``task_share`` of restricted task examples."""
    rng = random.Random(settings.seed + 7)
    train = {t: restricted_train(t, settings.known.get(t, len(TASK_ALPHABETS[t]))) for t in TASK_NAMES}
    rows = []
    names = [t for t in TASK_NAMES if settings.task_weights.get(t, 1.0) > 0]
    weights = [settings.task_weights.get(t, 1.0) for t in names]
    for _ in range(n):
        if rng.random() < settings.task_share:
            task = rng.choices(names, weights)[0]
            x, y = rng.choice(train[task])
            rows.append(encode_example(tokenizer, task, x, y)["input_ids"])
        else:
            text = _generic_text(rng)
            rows.append([tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
                        + [tokenizer.eos_token_id])
    return rows


def default_cache_dir() -> Path:
    """``$SENS_PEFT_CACHE/toy`` or ``~/.cache/sens_peft/toy``."""
    root = os.environ.get("SENS_PEFT_CACHE")
    return Path(root) / "toy" if root else Path.home() / ".cache" / "sens_peft" / "toy"


def base_path(settings: ToySettings | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where the base for ``settings`` is (or would be) cached."""
    settings = settings or ToySettings()
    return Path(cache_dir or default_cache_dir()) / settings.digest()


def pretrain_base(
    settings: ToySettings | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    **overrides: Any,
):
    """Pre-train (or load the cached) toy base model.

    The base is trained with a plain AdamW loop on generic text plus ``task_share`` of restricted task examples
    (full next-token loss) and saved with its tokenizer under ``cache_dir/<hash of settings>``; a later call with the
    same settings loads it from there. ``model.name_or_path`` is that folder, so it can be passed as
    ``base=`` to :func:`sens_peft.merge_models`.

    Args:
        settings: `ToySettings` (defaults if None).
        cache_dir: Cache root (default :func:`default_cache_dir`).
        force: Retrain even if a cached copy exists.
        progress: Log the loss every 100 steps at INFO level.
        **overrides: Fields of `ToySettings` to override (``steps=600``).

    Returns:
        `LlamaForCausalLM` in eval mode, fp32, on CPU.
    """
    from transformers import LlamaForCausalLM

    settings = dataclasses.replace(settings or ToySettings(), **overrides)
    path = base_path(settings, cache_dir)
    if not force and (path / "config.json").exists():
        logger.info("toy base: loading cached %s", path)
        model = LlamaForCausalLM.from_pretrained(path)
        return model.eval()

    tokenizer = build_tokenizer()
    model = build_model(settings, tokenizer)
    rows = pretraining_rows(tokenizer, settings, settings.steps * settings.batch_size)
    start = time.perf_counter()
    pretrain_loop(model, rows, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                  pad_id=tokenizer.pad_token_id, progress=progress)
    save_base(model, tokenizer, path, dataclasses.asdict(settings))
    logger.info("toy base: pre-trained in %.1f s, cached at %s", time.perf_counter() - start, path)
    return model


def pretrain_loop(model, rows: list[list[int]], *, steps: int, batch_size: int, lr: float, pad_id: int,
                  progress: bool = False) -> None:
    """Plain AdamW pre-training (full next-token loss, cosine schedule, 5% warm-up) over ``rows`` in order.

    Shared by every toy family's base; ``rows`` holds ``steps * batch_size`` token-id sequences.
    """
    collate = ToyCollator(pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = rows[step * batch_size : (step + 1) * batch_size]
        batch = collate([{"input_ids": r} for r in chunk])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress and (step + 1) % 100 == 0:
            logger.info("toy base: step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                        time.perf_counter() - start)
    model.eval()


def save_base(model, tokenizer, path: Path, settings: dict[str, Any]) -> None:
    """Write a pre-trained base atomically to ``path`` (a concurrent writer's copy wins); sets its name_or_path."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "toy_settings.json").write_text(json.dumps(settings, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached the same base meanwhile; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)


# ----------------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(r: int = 8, alpha: int = 16, targets: Sequence[str] = LORA_TARGETS):
    """The default `peft.LoraConfig` of toy experts."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def training_args(output_dir: str | os.PathLike, *, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
                  **kwargs: Any):
    """`TrainingArguments` for a toy expert: CPU-friendly, fp32, no checkpoints or logging unless asked."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, seed=seed,
        data_seed=seed, save_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def train_expert(
    base,
    task: str,
    *,
    steps: int = 150,
    callbacks: Sequence[Any] | None = None,
    output_dir: str | os.PathLike = "toy_expert",
    lora: bool = True,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int = 32,
    lora_r: int = 8,
    save: bool = False,
    tokenizer=None,
    **training_kwargs: Any,
):
    """Fine-tune one expert on a task's train split with `transformers.Trainer`.

    The base is deep-copied first, so one base object can serve several experts.

    Args:
        base: The toy base (`LlamaForCausalLM`).
        task: Task name.
        steps: Optimizer steps.
        callbacks: Trainer callbacks (e.g. `SensitivityCallback`).
        output_dir: Trainer output folder (also where ``save=True`` writes the expert).
        lora: LoRA (PEFT, ``r=lora_r`` on every linear layer) or full fine-tuning.
        seed: Trainer seed (init of LoRA A, data order).
        lr: Learning rate (default 1e-3 for LoRA, 5e-4 for full fine-tuning).
        batch_size: Sequences per step.
        lora_r: LoRA rank (alpha = 2r).
        save: Call ``trainer.save_model(output_dir)`` at the end (callbacks then write their sidecars there).
        tokenizer: Toy tokenizer (built if None); saved with the expert when ``save``.
        **training_kwargs: Extra `TrainingArguments` fields.

    Returns:
        The trained model (`PeftModel` for LoRA, `LlamaForCausalLM` otherwise) in eval mode.
    """
    from transformers import Trainer

    tokenizer = tokenizer or build_tokenizer()
    model = copy.deepcopy(base)
    if lora:
        from peft import get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, lora_config(r=lora_r, alpha=2 * lora_r))
    # 1e-3 keeps LoRA task vectors small (3e-3 made them destroy the other tasks, 5e-4 left d2l at ~60%).
    lr = lr if lr is not None else (1e-3 if lora else 5e-4)
    args = training_args(output_dir, steps=steps, lr=lr, batch_size=batch_size, seed=seed, **training_kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=task_dataset(task, "train", tokenizer),
                      data_collator=ToyCollator(tokenizer.pad_token_id), callbacks=list(callbacks or []))
    trainer.train()
    if save:
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    return trainer.model.eval()


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


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
