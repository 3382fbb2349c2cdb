"""finetune LoRA vs finetune full fine-tuning, per token, at two model sizes, in one invocation.

    python benchmarks/bench_lora.py --steps 4
    python benchmarks/bench_lora.py --sizes 10M --interleaved 20 [--dropout] [--fp32]

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

from bench_trl import MODEL, VOCAB, make_assets, mean, spawn  # noqa: E402

SIZES = {"10M": MODEL,
         "100M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, max_position_embeddings=1024, tie_word_embeddings=True)}


def interleaved(size: str, dropout: float, steps: int, bf16: bool = True) -> dict[str, float]:
    """Seconds per optimizer step of full fine-tuning, LoRA, LoRA with peft's forward and training the norms only
    (LoRA with adapters that cost nothing: the bound for any LoRA), the models in one process taking turns step
    by step (A B C D, then D C B A), so a slowdown of the machine falls on all of them.
    A step: one packed row of 2048 tokens (sequences of 20-450, the second half of each a target), forward,
    loss, backward and AdamW; BF16 autocast, or float32 with `bf16` False."""
    import random
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune import attention
    from finetune.config import LoraConfig
    from finetune.losses import IGNORE_INDEX, causal_lm_loss
    from finetune.model import apply_lora, causal_lm_forward, store_frozen_linears_in

    attention.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, attn_implementation=attention.NAME, **SIZES[size])
    models = {}
    for kind in ("full", "lora", "lora_peft", "norms"):
        model = LlamaForCausalLM(config)
        if kind == "norms":  # LoRA's bound: every linear layer frozen, gradients still flow through all of them
            for name, p in model.named_parameters():
                p.requires_grad_("norm" in name)
        elif kind != "full":
            model = apply_lora(model, LoraConfig(enabled=True, r=16, alpha=32, dropout=dropout,
                                                 fused=kind == "lora"), "CAUSAL_LM", False)
        if kind != "full" and bf16:  # as the loop stores frozen weights under BF16 autocast
            store_frozen_linears_in(model, torch.bfloat16)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        models[kind] = (model.train(), optimizer)
    rng = random.Random(0)
    lengths = []
    while sum(lengths) < 2048:
        lengths.append(min(rng.randint(20, 450), 2048 - sum(lengths)))
    ids = torch.randint(0, VOCAB, (1, 2048))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.where(positions < torch.cat([torch.full((n,), n // 2) for n in lengths]), IGNORE_INDEX, ids)
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}  # the first half of each: prompt

    def step(kind: str) -> float:
        model, optimizer = models[kind]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = causal_lm_forward(model, batch, keep_logits=True)  # as the sft task: at targets only
        loss, count = causal_lm_loss(logits, labels)
        loss.div(count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {kind: [] for kind in models}
    for kind in models:  # warm-up: first-call allocations and kernel creation
        step(kind)
    for i in range(steps):
        for kind in list(models) if i % 2 == 0 else reversed(list(models)):
            times[kind].append(step(kind))
    return {kind: sorted(t)[len(t) // 2] for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--dropout", action="store_true", help="LoRA dropout 0.05 (the recipes' default), not 0")
    parser.add_argument("--fp32", action="store_true", help="with --interleaved: float32, not BF16 autocast")
    parser.add_argument("--interleaved", type=int, default=0, metavar="STEPS",
                        help="instead: the models in one process, taking turns for STEPS steps each")
    args = parser.parse_args()
    if args.interleaved:
        dropout = 0.05 if args.dropout else 0.0
        print(f"one process, models taking turns, median of {args.interleaved} steps, LoRA dropout {dropout}, "
              f"{'float32' if args.fp32 else 'BF16'}")
        for size in args.sizes:
            t = interleaved(size, dropout, args.interleaved, bf16=not args.fp32)
            print(f"  {size}: seconds per step full {t['full']:.3f}, LoRA {t['lora']:.3f}, LoRA with peft's forward "
                  f"{t['lora_peft']:.3f}, norms only {t['norms']:.3f}; LoRA / full tokens/s "
                  f"x{t['full'] / t['lora']:.2f} (peft's forward x{t['full'] / t['lora_peft']:.2f}, free adapters "
                  f"x{t['full'] / t['norms']:.2f})")
        return
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
