"""Time and peak memory of merging 3 LoRA or 3 full experts of a small Llama (hidden 256, 4 layers) on CPU.

    for a in "lora task_arithmetic" "lora ties" "full task_arithmetic" "full dare_ties"; do
        python benchmarks/tiny_merge_cost.py $a; done

One merge per process, so peak RSS (ru_maxrss) is that merge's; most of it is the torch/transformers imports.
"""
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sens_peft import merge_adapters, merge_models

kind, method = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
root = Path(tempfile.mkdtemp())
base = LlamaForCausalLM(cfg)
base.save_pretrained(root / "base")
experts = []
for k in range(3):
    if kind == "lora":
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    else:
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(root / f"e{k}")
    experts.append(root / f"e{k}")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
if kind == "lora":
    r = merge_adapters(LlamaForCausalLM.from_pretrained(root / "base"), experts, method=method, density=0.5,
                       save_to=root / "out", device="cpu")
else:
    r = merge_models(root / "base", experts, root / "out", method=method, density=0.5, device="cpu")
dt = time.perf_counter() - t
print(f"{kind} {method}: {dt:.2f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB "
      f"(before merge {rss0:.0f} MB); params/expert {sum(p.numel() for p in base.parameters())/1e6:.1f}M")
