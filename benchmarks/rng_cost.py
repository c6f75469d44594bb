"""Cost of drawing DARE keep-masks on the CPU, per entry of one expert's mask, in 256K-entry chunks as
``merge_streamed`` draws them: the default ``dare_rng="counter"`` hash (``sens_peft.methods.counter_keep``, int32
torch ops) against the ``"torch"`` Mersenne-Twister draw (``uniform_`` + ``lt``, bit-identical to
``torch.bernoulli`` and so to PEFT's masks at the same generator state).

    OMP_NUM_THREADS=1 python benchmarks/rng_cost.py

Also prints each generator's kept fraction at density 0.5 as a sanity check.
"""

from __future__ import annotations

import time

import torch

from sens_peft.methods import counter_keep

N = 1 << 18
REPEAT = 100
DENSITY = 0.5


def main() -> None:
    torch.set_num_threads(1)
    keep = torch.empty(N)
    draw = torch.empty(N)
    scratch = (torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32))
    gen = torch.Generator().manual_seed(0)
    calls = [0]

    def mersenne() -> torch.Tensor:
        draw.uniform_(0.0, 1.0, generator=gen)
        return torch.lt(draw, DENSITY, out=keep)

    def counter() -> torch.Tensor:
        calls[0] += 1  # consecutive chunks of one tensor, as a merge draws them
        return counter_keep(keep, calls[0] * N, DENSITY, 0, "model.layers.0.mlp.up_proj.weight", 0, scratch)

    timings = {}
    for label, fn in (("Mersenne Twister (uniform_ + lt)", mersenne), ("counter hash (counter_keep)", counter)):
        fn()
        t0 = time.perf_counter()
        for _ in range(REPEAT):
            fn()
        timings[label] = (time.perf_counter() - t0) / REPEAT / N * 1e9
        print(f"{label:34s} {timings[label]:5.2f} ns per entry, kept fraction {float(fn().mean()):.4f}")
    mt, ctr = timings.values()
    print(f"counter / Mersenne Twister: {ctr / mt:.2f}x the time")


if __name__ == "__main__":
    main()
