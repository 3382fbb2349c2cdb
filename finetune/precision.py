"""Whether bf16 autocast pays on this CPU.

On a GPU bf16 is always the faster choice. On a CPU it depends on the matrix units: an AMD EPYC Zen 4 (AVX512-
BF16) ran bf16 GEMMs of the benchmark model's shapes at 2.2x float32's speed, and its training steps 1.4-1.8x
faster; an Intel Xeon whose AMX is not exposed (a cloud VM with AVX512-BF16 only) ran them at 0.5x, and the same
training steps 1.39x *slower* than float32 (benchmarks/RESULTS.md). Nothing in a recipe can know which, so a CPU
run with `train.mixed_precision: bf16` measures it at start and says so when float32 would be faster.
"""

from __future__ import annotations

import time
from functools import cache

import torch

# Below this bf16 / float32 speed, bf16 autocast makes CPU training slower: a step is mostly matrix products,
# and autocast adds its casts on top (at 0.5x here, steps took 1.39x float32's time).
SLOWER = 0.8


@cache  # a property of the CPU: measured once per process, not at every run of a notebook
def bf16_matmul_speedup(tokens: int = 1024, width: int = 1024, repeats: int = 5) -> float:
    """bf16 / float32 throughput of a (tokens x width) @ (width x width) product on the CPU with torch's threads:
    above 1 bf16 is faster. Each dtype's best of `repeats` after one warm-up, so a busy neighbour moves it little
    (about 0.15 s on 2 cores)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(tokens, width, generator=g), torch.randn(width, width, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def bf16_cpu_advice(speedup: float) -> str | None:
    """The warning for a CPU run under bf16 autocast whose bf16 products run at `speedup` x float32's, or None."""
    if speedup >= SLOWER:
        return None
    return (f"train.mixed_precision: bf16 is slower than float32 on this CPU: its bf16 matrix products ran at "
            f"{speedup:.2f}x float32's speed, so train.mixed_precision=no trains "
            "faster here, at the cost of more activation memory")
