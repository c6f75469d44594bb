"""A built-in toy suite: a character tokenizer, a tiny Llama, synthetic tasks, training and evaluation.

This module builds and trains the models (tiny Llama base, pre-training, LoRA/full experts); the tokenizer,
tasks and data are in :mod:`sens_peft.testing.toy_tasks` and evaluation in :mod:`sens_peft.testing.toy_eval`,
both re-exported here so ``toy.X`` reaches every name of the suite.

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
    base = toy.pretrain_base()                      # shipped with the package, cached under ~/.cache/sens_peft/toy/<hash>
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Re-exported, the private helpers included (toy._name worked when the suite was one module).
from .toy_eval import (
    _left_pad,  # noqa: F401
    _model_device,  # noqa: F401
    answer_loglik,
    decode_answer,
    evaluate,
    format_table,
    normalized_accuracy,
    predict,
)
from .toy_tasks import (
    _SPECS,  # noqa: F401
    _SPLIT_CACHE,
    BOS,
    CIPHER,
    D2L,
    DATA_SEED,
    DIGITS,
    EOS,
    EXTRA_TASKS,
    LETTERS,
    MAX_ANSWER_TOKENS,
    NUM_LEN,
    PAD,
    RCIPHER,
    SPECIAL_TOKENS,
    SPLIT_SIZES,
    STR_LEN,
    SYMBOLS,
    TAG_TOKENS,
    TASK_ALPHABETS,
    TASK_NAMES,
    TASKS,
    UNK,
    WORD_ALPHABET,
    WORD_LEN,
    ListDataset,
    Task,
    ToyCollator,
    _generator,  # noqa: F401
    _perm,  # noqa: F401
    _rand_word,
    _solve_cipher,  # noqa: F401
    _solve_d2l,  # noqa: F401
    _solve_inc,  # noqa: F401
    _solve_rcipher,  # noqa: F401
    _Spec,  # noqa: F401
    _task_seed,  # noqa: F401
    _task_splits_cached,  # noqa: F401
    build_tokenizer,
    encode_example,
    get_task,
    known_symbols,
    register_task,
    sft_rows,
    task_dataset,
    task_splits,
    text_rows,
    vocabulary,
)

logger = logging.getLogger(__name__)

TOY_VERSION = "3"  # bump when the data, model or pre-training changes, so cached bases are not reused

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "CIPHER",
    "D2L",
    "DATA_SEED",
    "DIGITS",
    "EXTRA_TASKS",
    "LETTERS",
    "LORA_TARGETS",
    "ListDataset",
    "MAX_ANSWER_TOKENS",
    "NUM_LEN",
    "RCIPHER",
    "SPECIAL_TOKENS",
    "SHIPPED_BASE_DIR",
    "SPLIT_SIZES",
    "STR_LEN",
    "SYMBOLS",
    "TAG_TOKENS",
    "TASKS",
    "TASK_ALPHABETS",
    "TASK_NAMES",
    "TOY_VERSION",
    "Task",
    "ToyCollator",
    "ToySettings",
    "WORD_ALPHABET",
    "WORD_LEN",
    "_SPLIT_CACHE",
    "_generic_text",
    "answer_loglik",
    "base_path",
    "build_model",
    "build_tokenizer",
    "decode_answer",
    "default_cache_dir",
    "encode_example",
    "evaluate",
    "format_table",
    "get_task",
    "known_symbols",
    "lora_config",
    "normalized_accuracy",
    "predict",
    "pretrain_base",
    "pretrain_loop",
    "pretraining_fingerprint",
    "pretraining_rows",
    "rebuild_shipped_base",
    "register_task",
    "restricted_train",
    "save_base",
    "shipped_base_manifest",
    "sft_rows",
    "task_dataset",
    "task_splits",
    "text_rows",
    "train_expert",
    "training_args",
    "vocabulary",
    "write_shipped_base",
]

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


# The default base, pre-trained once by recipes/pretrain_toy_base.py and shipped as package data, so that a first run
# (the quick start, a test) loads it instead of pre-training for one to three minutes on a laptop's CPU.
SHIPPED_BASE_DIR = Path(__file__).parent / "data" / "toy_base"
SHIPPED_MANIFEST = "shipped.json"
SHIPPED_FILES = ("model.safetensors", "toy_settings.json")  # + the manifest; config and tokenizer are rebuilt


def pretraining_fingerprint(settings: ToySettings | None = None) -> str:
    """A hash of the exact pre-training data of ``settings`` (every row's token ids, in order).

    :meth:`ToySettings.digest` hashes the settings only; this also changes when a task generator, the split
    seed, the tokenizer or the generic text changes, so a shipped base built from other data is detected.
    """
    settings = settings or ToySettings()
    tokenizer = build_tokenizer()
    h = hashlib.sha256(json.dumps(vocabulary()).encode())
    for row in pretraining_rows(tokenizer, settings, settings.steps * settings.batch_size):
        h.update(",".join(map(str, row)).encode() + b";")
    return h.hexdigest()[:16]


def shipped_base_manifest(folder: str | os.PathLike = SHIPPED_BASE_DIR) -> dict[str, Any] | None:
    """The manifest of the shipped base (``digest``, ``data_fingerprint``, versions it was built with), or None
    when the package has no shipped base (e.g. a source tree without its data files)."""
    manifest = Path(folder) / SHIPPED_MANIFEST
    if not manifest.is_file() or not all((Path(folder) / f).is_file() for f in SHIPPED_FILES):
        return None
    return json.loads(manifest.read_text())


def _load_shipped_base(settings: ToySettings, path: Path):
    """The shipped base if it was built from ``settings`` (else None), also saved to the cache folder ``path``.

    Only the weights are shipped: the model is built from ``settings`` and the config and tokenizer files are
    written by the installed transformers, so the cached folder is in that version's format.
    """
    from safetensors.torch import load_file

    manifest = shipped_base_manifest()
    if manifest is None or manifest.get("digest") != settings.digest():
        return None
    tokenizer = build_tokenizer()
    # build_model seeds and draws from the global RNG; loading must leave it as loading the cached folder does
    # (from_pretrained draws nothing), or a caller's next random draws (LoRA init) differ between runs
    with torch.random.fork_rng(devices=[]):
        model = build_model(settings, tokenizer)
    model.load_state_dict(load_file(SHIPPED_BASE_DIR / "model.safetensors"), strict=True)
    model.eval()
    try:
        save_base(model, tokenizer, path, dataclasses.asdict(settings))
    except OSError as exc:  # a read-only cache: the model is usable, only not cached as a folder
        logger.warning("toy base: cannot cache the shipped base at %s (%s)", path, exc)
    logger.info("toy base: loaded the pre-trained base shipped with the package (%s)", settings.digest())
    return model


def pretrain_base(
    settings: ToySettings | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    **overrides: Any,
):
    """Pre-train (or load the cached or shipped) toy base model.

    The default settings' base ships with the package (:data:`SHIPPED_BASE_DIR`, rebuilt by
    ``recipes/pretrain_toy_base.py``): when ``settings`` hash to its digest it is loaded (and cached) instead
    of being pre-trained. Otherwise the base is trained with a plain AdamW loop on generic text plus
    ``task_share`` of restricted task examples (full next-token loss). Either way it is saved with its tokenizer
    under ``cache_dir/<hash of settings>``; a later call with the same settings loads it from there. ``model.name_or_path`` is that folder, so it can be passed as
    ``base=`` to :func:`sens_peft.merge_models`.

    Args:
        settings: `ToySettings` (defaults if None).
        cache_dir: Cache root (default :func:`default_cache_dir`).
        force: Retrain even if a cached or shipped copy exists.
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
        return LlamaForCausalLM.from_pretrained(path).eval()
    shipped = None if force else _load_shipped_base(settings, path)
    if shipped is not None:
        return shipped

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


def rebuild_shipped_base(dest: str | os.PathLike = SHIPPED_BASE_DIR, *, progress: bool = False) -> dict[str, Any]:
    """Pre-train the default base from scratch and write it, with its manifest, to ``dest`` (the package data).

    Run after a change of the toy data, model or pre-training (``recipes/pretrain_toy_base.py``);
    ``tests/test_shipped_base.py`` fails until then. Pre-training runs on one thread: on CPU it is then
    bit-for-bit reproducible, which that test checks.

    Returns:
        The manifest written to ``dest/shipped.json``.
    """
    import tempfile

    settings = ToySettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as cache:
            pretrain_base(settings, cache_dir=cache, force=True, progress=progress)
            return write_shipped_base(base_path(settings, cache), dest, settings)
    finally:
        torch.set_num_threads(threads)


def write_shipped_base(source: str | os.PathLike, dest: str | os.PathLike = SHIPPED_BASE_DIR,
                       settings: ToySettings | None = None) -> dict[str, Any]:
    """Copy a pre-trained base folder (as :func:`pretrain_base` caches it) to ``dest`` and write its manifest.

    Args:
        source: The cached base of ``settings`` (``base_path(settings)``).
        dest: Where to write it (default: the package data folder).
        settings: The settings it was trained with (default `ToySettings()`); checked against the folder's
            ``toy_settings.json``.

    Returns:
        The manifest written to ``dest/shipped.json``.
    """
    import transformers

    settings = settings or ToySettings()
    source, dest = Path(source), Path(dest)
    recorded = json.loads((source / "toy_settings.json").read_text())
    if recorded != json.loads(json.dumps(dataclasses.asdict(settings))):
        raise ValueError(f"write_shipped_base: {source / 'toy_settings.json'} records settings {recorded}, "
                         f"expected {dataclasses.asdict(settings)} (digest {settings.digest()})")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        (dest / name).write_bytes((source / name).read_bytes())
    manifest = {"digest": settings.digest(), "data_fingerprint": pretraining_fingerprint(settings),
                "toy_version": TOY_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
                "model_sha256": hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()}
    (dest / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


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
