"""Data-aware merges and the randomized rank-r factorisation on a device, against the CPU (gpu_check.sh, step 3).

    python benchmarks/device_checks.py cuda      # 4096-wide tensors; on the CPU ("cpu") small ones, as a dry run

Prints, for RegMean (fp64 Cholesky solve) and Fisher merges of one tensor of 3 experts, the device time and the
relative difference to the CPU's result; for ``merge_adapters`` RegMean of 3 LoRA adapters (exact factors), the
largest difference of ``B @ A`` to the CPU's; and for the randomized rank-16 factorisation of a merged delta, its
time against the exact truncation's, its error relative to the exact truncation's (goal ≤ 1.01), and whether the
same seed gives the same factors on the device.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sens_peft.lora import svd_factors  # noqa: E402
from sens_peft.lowrank import randomized_factors, truncation_error  # noqa: E402
from sens_peft.methods import merge_deltas  # noqa: E402


def timed(fn, device: str):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def gram(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, 32, generator=gen)
    return u @ u.T / 32 + torch.diag(0.05 + torch.rand(n, generator=gen))


def dense_methods(device: str, big: bool, gen: torch.Generator) -> None:
    rows, cols = (4096, 4096) if big else (256, 320)
    deltas = [0.002 * torch.randn(rows, cols, generator=gen) for _ in range(3)]
    stats = {"regmean": {"gram": [gram(cols, gen) for _ in range(3)]},
             "fisher": {"fisher": [torch.rand(rows, cols, generator=gen) + 0.01 for _ in range(3)]}}
    coeffs = torch.tensor([1.0, 0.8, 1.2])
    for method, stat in stats.items():
        ref = merge_deltas(method, deltas, coeffs, statistics=stat)
        moved = {k: [t.to(device) for t in v] for k, v in stat.items()}
        out, sec = timed(lambda m=method, s=moved: merge_deltas(m, [d.to(device) for d in deltas], coeffs,
                                                                  statistics=s), device)
        rel = float((out.cpu().double() - ref.double()).norm() / ref.double().norm())
        print(f"{method} [{rows}, {cols}] x3 on {device}: {sec:.3f} s, relative difference to the CPU {rel:.2e}")


def lora_regmean(device: str) -> None:
    """merge_adapters RegMean (exact factors) of 3 LoRA adapters of the quick start's shape, device vs CPU."""
    import dataclasses
    import tempfile

    from data_aware_cost import QUICKSTART, add_grams
    from make_synthetic import make_lora_experts
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from sens_peft import merge_adapters

    with tempfile.TemporaryDirectory() as tmp:
        shape = dataclasses.replace(QUICKSTART, layers=2)
        base, experts = make_lora_experts(Path(tmp), shape, num_experts=3, rank=8, alpha=16)
        sidecars = [add_grams(e / "sensitivity.safetensors", Path(tmp) / "grams" / e.name, dict(shape.tensors()),
                              k + 1) for k, e in enumerate(experts)]
        products = {}
        for dev in ("cpu", device):
            model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)).to(dev), str(experts[0]),
                                              adapter_name="e0")
            for k, e in enumerate(experts[1:], start=1):
                model.load_adapter(str(e), adapter_name=f"e{k}")
            report, sec = timed(lambda m=model, d=dev: merge_adapters(
                m, ["e0", "e1", "e2"], method="regmean", sens=None, sensitivities=sidecars, adapter_name="m",
                device=d, progress=False), dev)
            layer = model.base_model.model.model.layers[1].mlp.down_proj
            products[dev] = (layer.lora_B["m"].weight @ layer.lora_A["m"].weight).detach().cpu()
            print(f"merge_adapters regmean (3 LoRA r8, 2 layers) on {dev}: {sec:.3f} s")
        diff = float((products[device] - products["cpu"]).abs().max() / products["cpu"].abs().max())
        print(f"merge_adapters regmean: max |B@A {device} - B@A cpu| / max |B@A cpu| = {diff:.2e}")


def factorisation(device: str, big: bool, gen: torch.Generator) -> None:
    rows, cols = (4096, 11008) if big else (512, 1376)
    d = sum(torch.randn(rows, 16, generator=gen) @ torch.randn(16, cols, generator=gen) for _ in range(3))
    d = d + 0.01 * torch.randn(rows, cols, generator=gen)
    (a1, b1), sec = timed(lambda: randomized_factors(d.to(device), 16, seed=0, name="w"), device)
    a2, b2 = randomized_factors(d.to(device), 16, seed=0, name="w")
    ac, bc = randomized_factors(d, 16, seed=0, name="w")
    (ae, be), sec_exact = timed(lambda: svd_factors(d.to(device), 16), device)
    ratio = truncation_error(d, a1.cpu(), b1.cpu()) / truncation_error(d, ae.cpu(), be.cpu())
    same = torch.equal(a1, a2) and torch.equal(b1, b2)
    gap = float((b1.cpu() @ a1.cpu() - bc @ ac).abs().max())
    print(f"randomized rank 16 of [{rows}, {cols}] on {device}: {sec:.3f} s (exact truncation {sec_exact:.3f} s), "
          f"error / exact truncation's {ratio:.5f} (goal <= 1.01), same seed -> same factors: {same}, "
          f"max |B@A {device} - B@A cpu| {gap:.2e}")


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    big = device.startswith("cuda")
    gen = torch.Generator().manual_seed(0)
    dense_methods(device, big, gen)
    factorisation(device, big, gen)
    lora_regmean(device)


if __name__ == "__main__":
    main()
