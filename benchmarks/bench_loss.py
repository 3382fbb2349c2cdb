"""The output projection + loss, unfused (logits, then cross-entropy by chunks) vs `train.fused_linear_loss`
(`finetune.losses.linear_token_logps`), side by side in one invocation, with PyTorch's own cross-entropy on
the same logits as a reference ("torch").

    python benchmarks/bench_loss.py                         # Llama 3's vocabulary (128256), hidden 1024
    python benchmarks/bench_loss.py --vocab 8192 --tokens 8192

Forward and backward of the summed cross-entropy of `--tokens` target tokens under bf16 autocast, with the
weight trained (full fine-tuning, tied or untied head) and frozen (LoRA). Each measurement runs in its own
process, in A B C C B A order; printed: seconds per forward+backward and the peak RSS above the inputs' (the
memory the loss itself needs), then the ratios fused / unfused and unfused / torch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import mean  # noqa: E402


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e9


def child(kind: str, trained: bool, tokens: int, hidden: int, vocab: int, repeats: int) -> dict:
    import torch

    from finetune.losses import linear_token_logps, token_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden).div_(hidden ** 0.5).requires_grad_(trained)  # in place: no setup peak
    targets = torch.randint(0, vocab, (tokens,))
    base = rss_gb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "fused":
                loss = -linear_token_logps(h, w, targets).sum()
            elif kind == "unfused":  # what the sft task does without the option: logits at target rows, the loss
                loss = token_cross_entropy_sum(torch.nn.functional.linear(h, w), targets)
            else:  # PyTorch's cross-entropy on float32 copies of 4096-row chunks (finetune's loss until 2026-11-24)
                logits = torch.nn.functional.linear(h, w)
                loss = sum(torch.nn.functional.cross_entropy(logits[s:s + 4096].float(), targets[s:s + 4096],
                                                             reduction="sum") for s in range(0, tokens, 4096))
        loss.backward()
        times.append(time.perf_counter() - start)
        h.grad = w.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"seconds": min(times), "peak_above_inputs_gb": peak - base, "loss": loss.item() / tokens}


def spawn(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, trained, tokens, hidden, vocab, repeats = args.child
        print(json.dumps(child(kind, trained == "1", int(tokens), int(hidden), int(vocab), int(repeats))))
        return
    import torch

    print(f"{args.tokens} target tokens x hidden {args.hidden} x vocab {args.vocab}, bf16 autocast, "
          f"{torch.get_num_threads()} threads; best of {args.repeats} forward+backward per process")
    print("| weight | loss | s per fwd+bwd | peak RSS above inputs GB | loss value |\n|---|---|---|---|---|")
    ratios = []
    for trained in ("1", "0"):
        runs: dict[str, list[dict]] = {"torch": [], "unfused": [], "fused": []}
        for kind in (*runs, *reversed(runs)):
            runs[kind].append(spawn(kind, trained, str(args.tokens), str(args.hidden), str(args.vocab),
                                    str(args.repeats)))
        label = "trained" if trained == "1" else "frozen (LoRA)"
        means = {}
        for kind, group in runs.items():
            means[kind] = {k: mean(group, k) for k in group[0]}
            m = means[kind]
            print(f"| {label} | {kind} | {m['seconds']:.2f} | {m['peak_above_inputs_gb']:.2f} | {m['loss']:.4f} |")
        for a, b in (("fused", "unfused"), ("unfused", "torch")):
            ratios.append((label, a, b, means[a]["seconds"] / means[b]["seconds"],
                           means[a]["peak_above_inputs_gb"] / max(means[b]["peak_above_inputs_gb"], 1e-9)))
    print("\nratios (same invocation):")
    for label, a, b, t, m in ratios:
        print(f"  weight {label}, {a} / {b}: time x{t:.2f}, peak RSS above inputs x{m:.2f}")


if __name__ == "__main__":
    main()
