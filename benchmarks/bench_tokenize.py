"""Start-up cost of the data: tokenizing in one process, in worker processes, and reading the tokenized cache.

    python benchmarks/bench_tokenize.py --rows 20000

The benchmark's chat rows (bench_trl.py's data, repeated to `--rows`) and tokenizer; each run builds the SFT
task's data in its own process, as a run's start would: one process, workers, workers, one process (A B B A,
cache off), then one run that writes the cache and two that read it. Printed: seconds of `build_data` per
setting (mean of its runs), the ratios to one process, and the process's peak RSS, also less its RSS before
`build_data` (the model-free start: imports and the tokenizer), which is what the data cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import make_assets  # noqa: E402


def child(assets: dict, rows_file: str, num_proc: int, cache: bool, out: Path) -> None:
    from finetune.config import load_recipe
    from finetune.model import load_tokenizer
    from finetune.tasks.sft import SFTTask

    recipe = load_recipe({"model": {"name_or_path": assets["model"]},
                          "data": {"train": rows_file, "max_length": 512, "num_proc": num_proc,
                                   "cache_tokenized": cache},
                          "log": {"progress": False}})
    tokenizer = load_tokenizer(recipe.model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports kB)
    start = time.perf_counter()
    data = SFTTask().build_data(recipe, tokenizer)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"seconds": seconds, "rows": len(data.train), "peak_mb": peak,
                               "data_mb": peak - before}))


def spawn(assets_file: Path, rows_file: Path, num_proc: int, cache: bool, home: Path) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, "FINETUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(assets_file), str(rows_file), str(num_proc),
                           str(int(cache)), str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"num_proc={num_proc} cache={cache} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each setting (2: A B B A, and two cache hits; 1: A B, one, for a smoke test)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        assets_file, rows_file, num_proc, cache, out = args.child
        child(json.loads(Path(assets_file).read_text()), rows_file, int(num_proc), cache == "1", Path(out))
        return

    folder = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    assets = make_assets(folder)
    assets_file = folder / "assets.json"
    assets_file.write_text(json.dumps(assets))
    rows = Path(assets["sft_train"]).read_text().splitlines()
    rows_file = folder / "rows.jsonl"
    rows_file.write_text("".join(rows[i % len(rows)] + "\n" for i in range(args.rows)))
    home = folder / "home"
    settings = {"1 process": (1, False), f"{args.workers} workers": (args.workers, False)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    order = [*settings, *reversed(settings)] * args.repeats
    for name in order[:len(settings) * args.repeats]:
        runs[name].append(spawn(assets_file, rows_file, *settings[name], home))
    spawn(assets_file, rows_file, 1, True, home)  # writes the cache
    runs["cache hit"] = [spawn(assets_file, rows_file, 1, True, home) for _ in range(args.repeats)]

    print(f"{args.rows} chat rows (bench_trl's data repeated), max_length 512, {os.cpu_count()} CPUs\n")
    print("| setting | seconds | ratio to 1 process | peak RSS (MB) | of it, from build_data (MB) |\n"
          "|---|---|---|---|---|")
    base = sum(r["seconds"] for r in runs["1 process"]) / len(runs["1 process"])
    for name, group in runs.items():
        seconds, peak, data = (sum(r[k] for r in group) / len(group) for k in ("seconds", "peak_mb", "data_mb"))
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x faster | {peak:.0f} | {data:.0f} |")


if __name__ == "__main__":
    main()
