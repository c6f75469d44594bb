"""Cost of drawing DARE keep-masks on the CPU: the Mersenne-Twister draw sens-peft uses (bit-identical to
``torch.bernoulli`` and so to PEFT's masks at the same seed) against a counter-based hash written in torch int32
ops (a candidate replacement: chunkable, identical on every device, but different masks).

    OMP_NUM_THREADS=1 python benchmarks/rng_cost.py

Prints ns per entry for one expert's mask (a 256K-entry chunk, as in ``merge_streamed``), and the hash's kept
fraction at density 0.5 as a sanity check.
"""

from __future__ import annotations

import time

import torch

N = 1 << 18
REPEAT = 100
DENSITY = 0.5


def main() -> None:
    torch.set_num_threads(1)
    index = torch.arange(N, dtype=torch.int32)
    x = torch.empty(N, dtype=torch.int32)
    t = torch.empty(N, dtype=torch.int32)
    keep = torch.empty(N)
    draw = torch.empty(N)
    gen = torch.Generator().manual_seed(0)

    def xorshift(shift: int) -> None:  # x ^= x >>> shift (logical shift: arithmetic shift, then mask)
        torch.bitwise_right_shift(x, shift, out=t)
        t.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(t)

    def hashed(start: int, key: int) -> torch.Tensor:
        # "lowbias32" (C. Wellons) of a per-(seed, tensor, expert) offset counter; the top 24 bits vs density
        torch.add(index, (start ^ key) & 0x7FFFFFFF, out=x)
        xorshift(16)
        x.mul_(0x7FEB352D)
        xorshift(15)
        x.mul_(0x846CA68B - (1 << 32))
        xorshift(16)
        torch.bitwise_right_shift(x, 8, out=t)
        t.bitwise_and_(0xFFFFFF)
        return torch.lt(t, int(DENSITY * (1 << 24)), out=keep)

    def mersenne() -> torch.Tensor:
        draw.uniform_(0.0, 1.0, generator=gen)
        return torch.lt(draw, DENSITY, out=keep)

    for label, fn in (("Mersenne Twister (uniform_ + lt)", mersenne),
                      ("counter hash in int32 torch ops", lambda: hashed(12345, 0x9E3779B9))):
        fn()
        t0 = time.perf_counter()
        for _ in range(REPEAT):
            fn()
        seconds = (time.perf_counter() - t0) / REPEAT
        print(f"{label:34s} {seconds / N * 1e9:5.2f} ns per entry")
    print(f"hash kept fraction at density {DENSITY}: {float(hashed(0, 0x9E3779B9).mean()):.4f}")


if __name__ == "__main__":
    main()
