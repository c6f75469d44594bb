"""The toy suite's data: a character tokenizer, the synthetic tasks, their splits, datasets and collator.

Every task is a per-position symbol map over 4-symbol strings (``inc``: digit + 1 mod 10, ``cipher``: a letter
substitution, ``rcipher``: rotate then another substitution, ``d2l``: digit -> letter table); tasks of other
families register through :func:`register_task`. Model, pre-training and experts are in
:mod:`sens_peft.testing.toy`, evaluation in :mod:`sens_peft.testing.toy_eval`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
