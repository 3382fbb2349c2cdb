"""finetune LoRA vs finetune full fine-tuning, per token, at two model sizes, in one invocation.

    python benchmarks/bench_lora.py --steps 4

LoRA skips the frozen weights' gradients (one of the three GEMMs of every linear layer) and their optimizer
state; attention, norms, the loss and LoRA's own rank-r products cost it as much as full fine-tuning. How much
the skipped part weighs depends on the model's size, so both runs are made on the benchmark's 10M-parameter
Llama (bench_trl.py) and on a 100M-parameter one (hidden 1024, 8 layers), same data, packed, BF16, LoRA r=16
on all linear layers. LoRA runs twice: with finetune's fused LoRA forward (the default, `lora.fused`) and with
peft's own. Each run is its own process, A B C C B A per size; printed: non-padding tokens/s, peak RSS and the
ratios LoRA / full. Tokens/s is given twice: over the runs' summed step times, and over the sum of each step's
fastest time among a kind's runs (the same tokens each time), which a slowdown of the shared machine during one
run moves less.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import MODEL, make_assets, mean, spawn  # noqa: E402

SIZES = {"10M": MODEL,
         "100M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, max_position_embeddings=1024, tie_word_embeddings=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--dropout", action="store_true", help="LoRA dropout 0.05 (the recipes' default), not 0")
    args = parser.parse_args()
    print(f"{args.steps} steps per run, batch 8 x accumulation 2, packed, BF16, no checkpointing, LoRA dropout "
          f"{0.05 if args.dropout else 0}")
    print("| model | run | tokens/s | tokens/s, per-step minima | peak RSS GB | train loss |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for size in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
        assets_file = folder / "assets.json"
        assets_file.write_text(json.dumps(make_assets(folder, model=SIZES[size])))
        lora = "_dropout" if args.dropout else ""
        kinds = ("sft_full_packed", f"sft_lora_packed{lora}", f"sft_lora_packed_peft{lora}")
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for kind in (*kinds, *reversed(kinds)):
            runs[kind].append(spawn("finetune", kind, assets_file, args.steps))
        figures = {}
        for kind, group in runs.items():
            tps = sum(r["tokens"] for r in group) / sum(r["train_s"] for r in group)
            # every run of a size trains on the same steps' tokens: each step's fastest run shows the work
            # without the slowdowns a shared machine adds to one run or another
            fastest = group[0]["tokens"] / sum(min(times) for times in zip(*(r["step_s"] for r in group), strict=True))
            figures[kind] = (tps, fastest, mean(group, "peak_rss_gb"))
            print(f"| {size} | {kind} | {tps:.0f} | {fastest:.0f} | {figures[kind][2]:.2f} | "
                  f"{group[-1]['train_loss']:.3f} |")
        full, lora, peft = (figures[kind] for kind in kinds)
        ratios.append((size, lora[0] / full[0], lora[1] / full[1], lora[2] / full[2], peft[0] / full[0]))
    print("\nratios LoRA / full (same invocation):")
    for size, t, fastest, m, t_peft in ratios:
        print(f"  {size}: tokens/s x{t:.2f} (per-step minima x{fastest:.2f}), peak RSS x{m:.2f}; with peft's own "
              f"LoRA forward: tokens/s x{t_peft:.2f}")


if __name__ == "__main__":
    main()
