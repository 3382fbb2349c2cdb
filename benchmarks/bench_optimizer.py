"""AdamW step time: the fused implementation the loop uses against torch's defaults, at two model sizes.

    python benchmarks/bench_optimizer.py

On CPU torch's default AdamW runs a chain of elementwise operations per parameter tensor (its multi-tensor
`foreach` path is the default only on GPUs); `fused=True` does the whole update in one kernel. Random gradients
on every parameter of bench_lora.py's two Llamas (the benchmark's 10M one and a 100M one); each
variant warms up for 3 steps, then the mean of 10 steps is printed with the ratio to fused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import SIZES  # noqa: E402
from bench_trl import VOCAB  # noqa: E402


def step_ms(model: torch.nn.Module, steps: int, **kwargs) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per AdamW step (mean of {args.steps})")
    print("| model | default | foreach | fused | default / fused |\n|---|---|---|---|---|")
    for name, shape in SIZES.items():  # bench_lora's two sizes: the benchmark model and a 100M one
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **shape))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        ms = {kind: step_ms(model, args.steps, **kwargs) for kind, kwargs in
              (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} ({n:.0f}M parameters) | {ms['default']:.1f} | {ms['foreach']:.1f} | {ms['fused']:.1f} | "
              f"{ms['default'] / ms['fused']:.1f}x |")


if __name__ == "__main__":
    main()
