"""Optimizer step time and memory: the loop's fused AdamW against torch's defaults and bitsandbytes' optimizers
(`train.optimizer`: adamw_8bit, lion, lion_8bit), at two model sizes, in one invocation.

    python benchmarks/bench_optimizer.py [--sizes 10M] [--steps 10]

On CPU torch's default AdamW runs a chain of elementwise operations per parameter tensor (its multi-tensor
`foreach` path is the default only on GPUs); `fused=True` does the whole update in one kernel. The 8-bit AdamW
keeps both moments quantised block-wise to 8 bits (2 bytes per parameter instead of 8); Lion keeps one moment (4
bytes), in 8 bits 1. Random gradients on every
parameter of bench_lora.py's two Llamas (the benchmark's 10M one and a 100M one); each variant runs in its own
process, warms up for 3 steps, then the mean of 10 steps is printed with the ratio to fused, the bytes of its
state, and the process's peak RSS (weights, gradients and optimizer state: full fine-tuning's fixed memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import SIZES  # noqa: E402
from bench_trl import VOCAB  # noqa: E402

VARIANTS = ("default", "foreach", "fused", "adamw_8bit", "lion", "lion_8bit")


def measure(size: str, variant: str, steps: int) -> dict[str, float]:
    """In this process: build the model and the optimizer, time its steps, report state bytes and peak RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.config import TrainConfig
    from finetune.optimizer import BITSANDBYTES, build_optimizer, state_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **SIZES[size]))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if variant in BITSANDBYTES:  # as the loop builds them
        optimizer = build_optimizer(model, TrainConfig(lr=1e-4, optimizer=variant), "cpu")
    else:
        kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    ms = (time.perf_counter() - start) / steps * 1000
    return {"ms": ms, "state_mb": state_bytes(optimizer) / 2**20,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the ones to run (fused, the reference of the ratios, always runs)")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per optimizer step (mean of "
          f"{args.steps}), each variant in its own process")
    print("| model | variant | ms/step | vs fused | state | peak RSS |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        runs = {}
        for variant in dict.fromkeys(["fused", *args.variants]):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", size, variant],
                                 capture_output=True, text=True, check=True).stdout
            runs[variant] = json.loads(out.strip().splitlines()[-1])
        for variant, r in runs.items():
            print(f"| {size} ({r['params_m']:.0f}M parameters) | {variant} | {r['ms']:.1f} | "
                  f"{r['ms'] / runs['fused']['ms']:.2f}x | {r['state_mb']:.0f} MB | {r['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
