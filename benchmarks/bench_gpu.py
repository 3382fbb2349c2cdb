"""finetune's throughput and model FLOP utilisation (MFU) on a GPU: a random-init 1B-class Llama, BF16, packed
rows of 2048 tokens, against a bf16 matmul peak measured in the same invocation.

    python benchmarks/bench_gpu.py                                   # the configurations below, 20 steps each
    python benchmarks/bench_gpu.py --configs full lora --steps 30
    python benchmarks/bench_gpu.py --configs full_flash               # with the flash-attn package installed
    python benchmarks/bench_gpu.py --size tiny --steps 3              # a CPU smoke run of this script

Each configuration is its own process (so peak memory is its own) and trains `finetune.train` on the same
model and data: documents of 64-2048 tokens of random words, packed into rows of 2048 by best-fit-decreasing
(`data.packing`), micro-batches of `--batch-tokens` tokens (`train.batch_tokens`). The first `--warmup` steps
are left out of the timings (CUDA/cuDNN autotuning, allocator growth). Printed per configuration: tokens/s,
peak GPU memory (peak RSS on CPU), MFU against the measured peak and, on a GPU whose datasheet figure is known,
against that (dense bf16, no sparsity), and the final loss.

The dpo_* configurations train DPO with LoRA on preference pairs of random words (prompts of 32-600 words,
responses of 16-500), packed two sequences a pair, the prompt shared by both (`dpo_lora`) where the attention
kernel allows, or every sequence by itself through SDPA (`dpo_lora_per_sequence`). Their tokens/s count each
prompt twice, as TRL's collator does, though it is computed once: no MFU is printed for them.

FLOPs per token: 6 x parameters of the matmuls that see every token (all linear layers and the output layer;
not the input embedding, a lookup) for full fine-tuning; 4 x those with LoRA (no weight gradients for the frozen
base; LoRA's own rank-r products are left out) -- plus causal attention, 6 x layers x hidden x s per token for a
sequence of s tokens (QK^T and AV: 2 x 2 x hidden x s/2 forward, twice that backward), with s averaged over
the tokens of the training documents as sampled (E[s^2] / E[s]).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import matmul_peak  # noqa: E402

SIZES = {
    # TinyLlama-1.1B's shape (grouped-query attention, 4 key/value heads), with Llama 2's vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False),
}
# recipe overrides of each configuration
LORA = {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0}
CONFIGS = {
    "full": {},
    # packed attention as SDPA per sequence, not torch's flash varlen kernel (what torch < 2.10 runs)
    "full_per_sequence": {"per_sequence": True},
    "full_liger": {"model": {"liger_kernel": True}},
    "full_checkpointing": {"train": {"gradient_checkpointing": True}},
    "lora": {"lora": LORA},
    "full_compile": {"train": {"compile": True}},
    "lora_compile": {"lora": LORA, "train": {"compile": True}},
    # the two that each helped on the H100 (compile 1.32x eager, liger 1.13-1.25x), together: never run on a GPU
    "full_compile_liger": {"model": {"liger_kernel": True}, "train": {"compile": True}},
    "dpo_lora": {"task": "dpo", "lora": LORA},
    "dpo_lora_per_sequence": {"task": "dpo", "lora": LORA, "per_sequence": True},
    "full_flash": {"model": {"attn_implementation": "flash_attention_2"}},  # needs the flash-attn package
}
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense TFLOP/s, SXM parts


def make_assets(folder: Path, size: str, max_length: int, rows: int) -> dict:
    """The random-init model (with the builtin tokenizer) and a JSONL of documents; E[s^2]/E[s] of their
    lengths in tokens after truncation to `max_length`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from finetune.builtin import WORDS, build_tokenizer

    logging.disable_progress_bar()

    tok = build_tokenizer()
    config = LlamaConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         **SIZES[size])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B random init is slow on a CPU
        LlamaForCausalLM(config).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(48, 1800))) for _ in range(rows)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    lengths = [min(len(tok(d)["input_ids"]) + 1, max_length) for d in docs]  # + eos

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    pairs = [{"prompt": words(32, 600), "chosen": " " + words(16, 500), "rejected": " " + words(16, 500)}
             for _ in range(rows)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"model": str(folder / "model"), "train": str(folder / "train.jsonl"),
            "pairs": str(folder / "pairs.jsonl"), "context": sum(n * n for n in lengths) / sum(lengths)}


def device_peak(device: str) -> float:
    """bf16 GEMM FLOP/s: on a GPU a large square product (what datasheets quote), on a CPU a small one."""
    n = 8192 if device == "cuda" else 1024
    return matmul_peak(n, n, n, device, seconds=2.0)


def child(config: str, assets: dict, args: dict, out: Path) -> None:
    import torch

    import finetune

    overrides = CONFIGS[config]
    if overrides.get("per_sequence"):
        from finetune import attention

        attention._flash_dtype = lambda query, scaling: None
    task = overrides.get("task", "sft")
    data = {"train": assets["train"], "format": "text"} if task == "sft" else {"train": assets["pairs"]}
    recipe = {
        "task": task, "output_dir": tempfile.mkdtemp(prefix="bench-gpu-"), "seed": 0,
        "model": {"name_or_path": assets["model"], **overrides.get("model", {})},
        "lora": overrides.get("lora", {"enabled": False}),
        "data": {**data, "max_length": args["max_length"], "packing": True},
        "train": {"max_steps": args["steps"], "batch_tokens": args["batch_tokens"], "grad_accum": 1, "lr": 3e-4,
                  "warmup_steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": False, "save_every": 0,
                  "eval_every": 0, "eval_generate": 0, "log_every": 1, **overrides.get("train", {})},
        "log": {"progress": False, "tensorboard": False},
    }
    if args["profile"]:
        result = profiled(recipe, args["warmup"], Path(args["profile"]) / f"{config}.txt")
    else:
        result = finetune.train(recipe)
    events = [e for e in result.history if "loss" in e]
    tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip([{"tokens_seen": 0}, *events], events,
                                                                  strict=False)]
    timed = list(zip(tokens, events, strict=True))[args["warmup"]:]
    n_tokens = sum(t for t, _ in timed)
    seconds = sum(t / e["tokens_per_s"] for t, e in timed)
    model = result.model
    linear = sum(m.weight.numel() for name, m in model.named_modules()  # LoRA's own A and B left out
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    peak_memory = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out.write_text(json.dumps({"tokens_per_s": n_tokens / seconds, "linear_params": linear,
                               "lora": recipe["lora"]["enabled"], "sft": task == "sft",
                               "peak_memory_gb": peak_memory / 1e9,
                               "loss": events[-1]["loss"]}))


def profiled(recipe: dict, warmup: int, path: Path, active: int = 3):
    """`finetune.train(recipe)` with the `active` optimizer steps after the first `warmup` + 1 under
    torch.profiler. Written to `path`: the operators and kernels that took the most device time, and the most
    host time, with the totals per step and the wall time per step, so a host-bound run (device time well under
    wall time) shows."""
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import finetune

    stamps = []

    def step(*_: object) -> None:
        stamps.append(time.perf_counter())
        prof.step()

    schedule = torch.profiler.schedule(wait=warmup, warmup=1, active=active, repeat=1)
    with torch.profiler.profile(schedule=schedule) as prof:
        hook = register_optimizer_step_post_hook(step)
        try:
            result = finetune.train(recipe)
        finally:
            hook.remove()
    if len(stamps) < warmup + 1 + active:
        raise SystemExit(f"--profile needs --steps of at least {warmup + 1 + active}")
    events = prof.key_averages()
    # kernels only: an operator's row repeats the time of the kernels it launched
    device = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6 / active
    host = sum(e.self_cpu_time_total for e in events) / 1e6 / active
    wall = (stamps[warmup + active] - stamps[warmup]) / active
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"per optimizer step, over {active} steps: wall {wall:.3f} s, self device time {device:.3f} s, "
                    f"self host time {host:.3f} s\n\n"
                    + events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60)
                    + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return result


def spawn(config: str, assets_file: Path, args: argparse.Namespace) -> dict | str:
    out = Path(tempfile.mkdtemp()) / "result.json"
    settings = json.dumps({k: getattr(args, k) for k in ("steps", "warmup", "batch_tokens", "max_length", "profile")})
    proc = subprocess.run([sys.executable, __file__, "--child", config, str(assets_file), settings, str(out)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. flash-attn or liger-kernel not installed: report, go on with the others
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return last.split("Error: ", 1)[-1][:200]
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS)[:-1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timings")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per micro-batch (and per step)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2000, help="documents in the training set")
    parser.add_argument("--profile", metavar="DIR", help="profile 3 steps after the warm-up of each configuration "
                        "and write its top operators to DIR/CONFIG.txt (the table's timings then include the "
                        "profiler's cost)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, assets_file, settings, out = args.child
        child(config, json.loads(Path(assets_file).read_text()), json.loads(settings), Path(out))
        return
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    assets = make_assets(folder, args.size, args.max_length, args.rows)
    assets_file = folder / "assets.json"
    assets_file.write_text(json.dumps(assets))
    peak = device_peak(device)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    cfg = SIZES[args.size]
    attention = 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * assets["context"]
    print(f"{name}, torch {torch.__version__}; model {args.size}; bf16 matmul peak measured {peak / 1e12:.1f} "
          f"TFLOP/s{f', datasheet {sheet / 1e12:.0f}' if sheet else ''}; rows of {args.max_length} tokens, "
          f"micro-batches of {args.batch_tokens}; {args.steps} steps, the first {args.warmup} not timed; mean "
          f"attention context {assets['context']:.0f} tokens\n")
    print("| config | tokens/s | peak memory GB | MFU (measured peak) | MFU (datasheet) | loss |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        r = spawn(config, assets_file, args)
        if isinstance(r, str):
            print(f"| {config} | failed: {r} | | | | |")
            continue
        flops = r["tokens_per_s"] * ((4 if r["lora"] else 6) * r["linear_params"] + attention)
        measured = f"{flops / peak:.1%}" if r["sft"] else "-"
        datasheet = f"{flops / sheet:.1%}" if sheet and r["sft"] else "-"
        print(f"| {config} | {r['tokens_per_s']:.0f} | {r['peak_memory_gb']:.1f} | {measured} | {datasheet} "
              f"| {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
