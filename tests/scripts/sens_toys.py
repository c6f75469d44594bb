"""Tiny models and data shared by the sensitivity tests and the DDP worker (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0)
    return LlamaForCausalLM(cfg).to(dtype)


def lora(model, *, init_random: bool = True, targets=("q_proj", "v_proj"), **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                     init_lora_weights=not init_random, task_type="CAUSAL_LM", **kw)
    return get_peft_model(model, cfg)


class TokenData(torch.utils.data.Dataset):
    """Fixed-length random token sequences; labels mask the first 3 tokens (a 'prompt')."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        labels = ids.clone()
        labels[:3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_args(out, **overrides):
    """CPU-friendly, deterministic `TrainingArguments` for the tiny test runs (no checkpoints, logging or tqdm)."""
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
              lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True,
              disable_tqdm=True, logging_steps=1000, seed=0, dataloader_pin_memory=False)
    kw.update(overrides)
    return TrainingArguments(**kw)


def char_llama(seed: int = 0):
    """A tiny Llama and a character-level tokenizer for TRL trainers that tokenise text themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=2))
    return model, tok
