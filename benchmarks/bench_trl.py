"""finetune vs TRL, side by side in one invocation, on the same random-init Llama, data and hyperparameters.

    python benchmarks/bench_trl.py                 # all pairs, 30 steps each, A B B A order
    python benchmarks/bench_trl.py --steps 10 --only sft_full
    python benchmarks/bench_trl.py --precision fp32    # both sides in float32, for CPUs where bf16 is slower
    python benchmarks/bench_trl.py --steps 8 --only rm --rounds 3   # A B B A three times: the ratio's spread

Each run is its own process (so peak RSS is its own). For every pair the order is A B B A and each side's
figure is over its two runs, so drift in the machine's load affects both sides alike (`--rounds N` repeats the
A B B A N times and also prints each round's ratio, for a target the noise puts in doubt). Printed per run:
non-padding tokens/s, peak RSS, model FLOP utilisation against a matmul peak measured in this invocation (in
float32 for float32 runs; for BF16 runs the faster of bf16 and float32, since attention runs in float32 on CPU),
final train loss and held-out loss; then the ratios finetune / TRL. Absolute numbers on a shared 2-core machine
swing 2-5x; only the ratios of one invocation mean anything.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the model of the TRL figures in shared/FACTS.md: 4 layers, hidden 384, vocab 8192 (about 13M parameters)
MODEL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
             num_key_value_heads=6, max_position_embeddings=1024, tie_word_embeddings=True)
VOCAB = 8192
HP = dict(batch_size=8, grad_accum=2, lr=5e-4, warmup=3, max_length=512, seed=0)


# ------------------------------------------------------------------ shared fixtures (made once per invocation)


def make_assets(folder: Path, lengths: str = "uniform", model: dict | None = None) -> dict[str, Any]:
    """A random-init Llama with the builtin tokenizer, chat data of 20-450 tokens, and preference pairs.

    `lengths`: word counts drawn uniformly (TRL pads about a third of each batch), or `longtail`: one
    log-uniform draw per row scales all its parts over the same ranges, so many rows are short and few long, as
    in real chat data (TRL pads about half; the issue's own TRL measurements saw 61-68%). `model`: the Llama's
    shape instead of MODEL."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from finetune.builtin import WORDS, build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, **(model or MODEL))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")

    rng = random.Random(0)

    scale = 0.0  # longtail: one log-uniform draw per row sets the length of all its parts

    def words(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi) if lengths == "uniform" else round(lo * (hi / lo) ** scale)
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def row_scale() -> None:
        nonlocal scale
        if lengths == "longtail":  # (uniform draws nothing here: its data stay those of earlier results)
            scale = rng.random()

    def chat(n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            row_scale()
            prompt, answer = "Repeat the last words: " + words(8, 200), words(2, 150)
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        return rows

    def pairs(n: int) -> list[dict]:
        out = []
        for _ in range(n):
            row_scale()
            user = {"role": "user", "content": "Say something: " + words(8, 150)}
            out.append({"chosen": [user, {"role": "assistant", "content": words(2, 100)}],
                        "rejected": [user, {"role": "assistant", "content": words(2, 100)}]})
        return out

    paths: dict[str, Any] = {}
    sets = {"sft_train": chat(600), "sft_eval": chat(48), "pref_train": pairs(600), "pref_eval": pairs(48)}
    for name, rows in sets.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    paths["model"] = str(folder / "model")

    # token budgets of the `_budget` runs: batch_size times the mean row (pair) length, so a step holds about
    # the tokens of batch_size rows as on the other side
    def tokens(messages: list) -> int:
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    sft = sum(tokens(r["messages"]) for r in sets["sft_train"]) / len(sets["sft_train"])
    pair = sum(tokens(r["chosen"]) + tokens(r["rejected"]) for r in sets["pref_train"]) / len(sets["pref_train"])
    # with the prompt shared (packed pairs under sdpa_varlen) a pair runs prompt + chosen + 1 + rejected tokens of
    # the 2 x prompt + chosen + rejected it counts; MFU of those runs is scaled by this share
    prompt = sum(tokens(r["chosen"][:1]) for r in sets["pref_train"]) / len(sets["pref_train"])
    paths["pair_executed_share"] = (pair - prompt + 1) / pair
    paths["budget"] = {"sft": int(round(HP["batch_size"] * sft, -1)),
                       "pairs": max(int(round(HP["batch_size"] * pair, -1)), 2 * HP["max_length"])}
    return paths


def matmul_peak(m: int = 2048, k: int = MODEL["hidden_size"], n: int = MODEL["intermediate_size"],
                device: str = "cpu", seconds: float = 3.0, dtype: str = "bfloat16") -> float:
    """GEMM FLOP/s of (m x k) @ (k x n) in `dtype`, measured now; by default the model's shape (tokens x hidden
    @ hidden x intermediate)."""
    import torch

    a = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(k, n, dtype=getattr(torch, dtype), device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * m * k * n * count / (time.perf_counter() - start)


# ------------------------------------------------------------------ one run (in its own process)


def bf16() -> bool:
    """Whether the runs train under BF16 autocast (--precision, passed to each run's process)."""
    return os.environ.get("BENCH_PRECISION", "bf16") == "bf16"


def run_finetune(kind: str, assets: dict, steps: int) -> dict:
    import finetune

    task = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "dpo"}[kind.split("_")[0]]
    pref = task != "sft"
    recipe = {
        "task": task, "output_dir": tempfile.mkdtemp(), "seed": HP["seed"],
        "model": {"name_or_path": assets["model"]},
        # "_peft": LoRA layers run peft's own forward instead of finetune's fused one (lora.fused); "_dropout": LoRA
        # dropout 0.05, the recipes' default (TRL's side and the other runs have none)
        "lora": {"enabled": "lora" in kind, "r": 16, "alpha": 32, "dropout": 0.05 if "_dropout" in kind else 0.0,
                 "fused": "_peft" not in kind},
        "data": {"train": assets["pref_train" if pref else "sft_train"],
                 "eval": assets["pref_eval" if pref else "sft_eval"], "max_length": HP["max_length"],
                 "packing": "packed" in kind},
        # "budget": micro-batches of whole rows up to the tokens of batch_size average rows (same tokens per step)
        "train": {"max_steps": steps, "batch_size": HP["batch_size"], "grad_accum": HP["grad_accum"],
                  "batch_tokens": assets["budget"]["sft" if task == "sft" else "pairs"] if "budget" in kind else 0,
                  "lr": HP["lr"], "warmup_steps": HP["warmup"], "mixed_precision": "bf16" if bf16() else "no",
                  "gradient_checkpointing": False, "log_every": 1, "trim_memory": "trim" in kind,
                  "compile": "compile" in kind, "fused_linear_loss": "fused" in kind},
        "dpo": {"loss_type": "kto" if kind.startswith("kto") else "sigmoid"},  # kto: the pairs unpaired
        "log": {"progress": False, "tensorboard": False},
    }
    result = finetune.train(recipe)
    events = [e for e in result.history if "loss" in e]
    # each step logs the non-padding tokens it processed per second; recover tokens and time per step
    tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip([{"tokens_seen": 0}, *events], events,
                                                                  strict=False)]
    step_s = [t / e["tokens_per_s"] for t, e in zip(tokens, events, strict=True)]
    return {"train_loss": events[-1]["loss"], "eval_loss": result.metrics.get("eval_loss"),
            "eval_accuracy": result.metrics.get("eval_accuracy"), "tokens": sum(tokens), "train_s": sum(step_s),
            "step_s": step_s, "padding_share": 0.0 if "packed" in kind else None}


def run_trl(kind: str, assets: dict, steps: int) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    pref = kind.startswith(("rm", "dpo", "kto"))
    data = load_dataset("json", data_files={"train": assets["pref_train" if pref else "sft_train"],
                                            "test": assets["pref_eval" if pref else "sft_eval"]})
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=HP["batch_size"],
                  per_device_eval_batch_size=HP["batch_size"], gradient_accumulation_steps=HP["grad_accum"],
                  learning_rate=HP["lr"], warmup_steps=HP["warmup"], lr_scheduler_type="cosine", bf16=bf16(),
                  gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                  seed=HP["seed"], use_cpu=True, dataloader_num_workers=0, eval_strategy="no")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") if "lora" in kind else None
    if kind.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(assets["model"])
        # TRL's fastest option: best-fit-decreasing packing, which turns on its padding-free collator
        fastest = kind.endswith("padding_free")
        cfg = SFTConfig(**common, max_length=HP["max_length"], assistant_only_loss=True, packing=fastest,
                        packing_strategy="bfd")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["test"],
                             processing_class=tok, peft_config=lora)
    elif kind.startswith("rm"):
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        cfg = RewardConfig(**common, max_length=HP["max_length"])
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["test"],
                                processing_class=tok, peft_config=lora)
    elif kind.startswith("kto"):
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import maybe_extract_prompt, unpair_preference_dataset

        model = AutoModelForCausalLM.from_pretrained(assets["model"])
        # TRL's own settings but the shared ones (common); it samples rows in order, as its KL pairing requires
        cfg = KTOConfig(**common, max_length=HP["max_length"], beta=0.1)
        rows = {split: unpair_preference_dataset(data[split].map(maybe_extract_prompt)) for split in data}
        trainer = KTOTrainer(model=model, args=cfg, train_dataset=rows["train"], eval_dataset=rows["test"],
                             processing_class=tok, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(assets["model"])
        cfg = DPOConfig(**common, max_length=HP["max_length"], beta=0.1)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["test"],
                             processing_class=tok, peft_config=lora)

    collate = trainer.data_collator
    seen = {"real": 0, "padded": 0}

    def counting(features):
        batch = collate(features)
        for prefix in ("", "KL_"):  # KTO's batches hold the mismatched (KL) completions apart
            ids, mask = batch.get(f"{prefix}input_ids"), batch.get(f"{prefix}attention_mask")
            if ids is not None:
                seen["real"] += int(mask.sum()) if mask is not None else ids.numel()
                seen["padded"] += ids.numel()
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    fed = dict(seen)
    metrics = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": losses[-1], "eval_loss": metrics.get("eval_loss"),
            "eval_accuracy": metrics.get("eval_accuracy", metrics.get("eval_rewards/accuracies")),
            "tokens": fed["real"], "train_s": seconds, "padding_share": 1 - fed["real"] / max(fed["padded"], 1)}


def child(side: str, kind: str, assets: dict, steps: int, out: Path) -> None:
    import shutil

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    tempfile.tempdir = str(work)  # both sides' output directories go here and are removed afterwards
    try:
        result = run_finetune(kind, assets, steps) if side == "finetune" else run_trl(kind, assets, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------ the parent: pairs in A B B A order

# (finetune run, TRL default run, extra runs made once: TRL's fastest option, finetune with a token budget),
# FLOPs per token as a multiple of parameters
# ("_trim": train.trim_memory, handing freed heap pages back to the OS after each backward; "_fused":
# train.fused_linear_loss, which pays with large vocabularies, see bench_loss.py, not at this one's 8192)
PAIRS = {
    "sft_full": ("sft_full_packed", "sft_full", ("trl", "sft_full_padding_free", "finetune", "sft_full_packed_budget",
                                                 "finetune", "sft_full_packed_budget_trim", "finetune",
                                                 "sft_full_packed_fused"), 6),
    "sft_lora": ("sft_lora_packed", "sft_lora", ("trl", "sft_lora_padding_free", "finetune", "sft_lora_packed_budget",
                                                 "finetune", "sft_lora_packed_budget_trim"), 4),
    "rm": ("rm_full_packed", "rm_full",
           ("finetune", "rm_full_packed_budget", "finetune", "rm_full_packed_budget_trim"), 6),
    "dpo_lora": ("dpo_lora_packed", "dpo_lora", ("finetune", "dpo_lora_packed_budget", "finetune",
                                                 "dpo_lora_packed_budget_trim"), 6),  # policy 4N + ref 2N
    # KTO on the pairs unpaired (rows twice the pairs); a token is a completion's (policy 4N) or a mismatched
    # one's (policy without gradients 2N), each also in the reference (2N): 5N on average
    "kto_lora": ("kto_lora_packed", "kto_lora", ("finetune", "kto_lora_packed_budget"), 5),
}


def spawn(side: str, kind: str, assets_file: Path, steps: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", side, kind, str(assets_file), str(steps), str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def tokens_per_s(runs: list[dict]) -> float:
    return sum(r["tokens"] for r in runs) / sum(r["train_s"] for r in runs)


def round_ratios(ours: list[dict], theirs: list[dict]) -> list[float]:
    """finetune / TRL tokens/s of each A B B A round: runs 2k and 2k + 1 of each side are round k's."""
    return [tokens_per_s(ours[k:k + 2]) / tokens_per_s(theirs[k:k + 2]) for k in range(0, len(ours), 2)]


def mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)  # as in the issue's TRL figures
    parser.add_argument("--only", nargs="*", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--lengths", choices=("uniform", "longtail"), default="uniform",
                        help="row length distribution of the data (see make_assets)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="both sides under BF16 autocast (default) or in float32")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds per pair (default 1)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.child:
        side, kind, assets_file, steps, out = args.child
        child(side, kind, json.loads(Path(assets_file).read_text()), int(steps), Path(out))
        return

    os.environ["BENCH_PRECISION"] = args.precision  # read by every run's process
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    assets = make_assets(folder, args.lengths)
    assets_file = folder / "assets.json"
    assets_file.write_text(json.dumps(assets))
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(assets["model"]).parameters())
    peaks = {"fp32": matmul_peak(dtype="float32")}
    if args.precision == "bf16":  # attention runs in float32 on CPU: where float32 is faster, its peak is the bound
        peaks["bf16"] = matmul_peak()
    peak = max(peaks.values())
    print(f"model: {n_params / 1e6:.1f}M parameters; matmul peaks measured now: "
          f"{', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items())} GFLOP/s (MFU against {peak / 1e9:.0f}); "
          f"token budgets {assets['budget']}; "
          f"{args.lengths} lengths, {args.steps} steps, batch {HP['batch_size']} x accumulation {HP['grad_accum']}, "
          f"{'BF16' if args.precision == 'bf16' else 'float32'}, no checkpointing")
    rows, raw, headline = [], {}, set()  # headline: (pair, label) of the A B B A runs the ratios compare
    for name in args.only:
        ours, theirs, extra, flops_per_param = PAIRS[name]
        a, b = [], []
        for _ in range(args.rounds):
            for side, kind, bucket in (("finetune", ours, a), ("trl", theirs, b), ("trl", theirs, b),
                                       ("finetune", ours, a)):
                bucket.append(spawn(side, kind, assets_file, args.steps))
        runs = [("finetune " + ours, a), ("TRL " + theirs, b)]
        headline.update((name, label) for label, _ in runs)
        for side, kind in zip(extra[::2], extra[1::2], strict=True):
            label = ("TRL " if side == "trl" else "finetune ") + kind
            runs.append((label, [spawn(side, kind, assets_file, args.steps)]))
        for label, group in runs:
            tps = tokens_per_s(group)
            executed = assets["pair_executed_share"] if name in ("rm", "dpo_lora") and "packed" in label else 1.0
            mfu = flops_per_param * n_params * tps * executed / peak
            rows.append((name, label, tps, mean(group, "peak_rss_gb"), mfu,
                         mean(group, "padding_share"), mean(group, "train_loss"), mean(group, "eval_loss"),
                         mean(group, "eval_accuracy")))
        raw[name] = {"finetune": a, "trl": b}
    header = ("pair", "run", "tokens/s", "peak RSS GB", "MFU", "padding", "train loss", "eval loss", "eval acc")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {fmt(r[3], '.2f')} | {fmt(r[4], '.1%')} | {fmt(r[5], '.0%')} | "
              f"{fmt(r[6], '.3f')} | {fmt(r[7], '.3f')} | {fmt(r[8], '.2f')} |")
    print("\nratios finetune / TRL default (same invocation):")
    by = {(r[0], r[1].split(" ")[0]): r for r in rows if (r[0], r[1]) in headline}
    for name in args.only:
        f, t = by[(name, "finetune")], by[(name, "TRL")]
        rounds = "" if args.rounds == 1 else \
            f" (rounds: {', '.join(f'x{r:.2f}' for r in round_ratios(raw[name]['finetune'], raw[name]['trl']))})"
        print(f"  {name}: tokens/s x{f[2] / t[2]:.2f}{rounds}, peak RSS x{f[3] / t[3]:.2f}")
        for r in rows:
            if r[0] == name and r[1] != f[1] and r[1].startswith("finetune"):
                print(f"  {name} ({r[1].split(' ')[1]}): tokens/s x{r[2] / t[2]:.2f}, peak RSS x{r[3] / t[3]:.2f}")
    if ("sft_lora", "finetune") in by and ("sft_full", "finetune") in by:
        lora, full = by[("sft_lora", "finetune")], by[("sft_full", "finetune")]
        print(f"  finetune LoRA / finetune full: tokens/s x{lora[2] / full[2]:.2f}, peak RSS x{lora[3] / full[3]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1))
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
