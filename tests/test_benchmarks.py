"""Benchmark scripts run end to end: the GPU one on this CPU with its tiny model, so it is ready when a GPU is."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT, python, run_cli


@pytest.mark.slow
def test_bench_gpu_runs_and_reports_each_configuration():
    proc = run_cli(python(), "benchmarks/bench_gpu.py", "--size", "tiny", "--steps", "3", "--warmup", "1",
                   "--rows", "60", "--batch-tokens", "4096", "--configs", "full", "lora", "full_liger", "dpo_lora",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for config in ("full", "lora"):
        tokens_per_s, memory, mfu = (rows[config].split("|")[i].strip() for i in (2, 3, 4))
        assert float(tokens_per_s) > 0 and float(memory) > 0 and re.fullmatch(r"\d+\.\d%", mfu)
    tokens_per_s, memory, mfu = (rows["dpo_lora"].split("|")[i].strip() for i in (2, 3, 4))
    assert float(tokens_per_s) > 0 and float(memory) > 0 and mfu == "-"  # prompts counted twice: no MFU
    if not torch.cuda.is_available():
        assert "failed: model.liger_kernel: its Triton kernels need a CUDA GPU" in rows["full_liger"]


@pytest.mark.slow
def test_bench_tokenize_reports_each_setting():
    proc = run_cli(python(), "benchmarks/bench_tokenize.py", "--rows", "2000", "--workers", "2", "--repeats", "1",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for setting in ("1 process", "2 workers", "cache hit"):
        cells = rows[setting].split("|")
        assert float(cells[2]) > 0 and float(cells[4]) >= float(cells[5]) > 0, proc.stdout  # RSS, its data part


@pytest.mark.slow
def test_bench_optimizer_reports_each_variant_and_the_size_of_its_state():
    # torch's default and foreach AdamW left out: the same state as fused, each its own process of 4-5 s
    proc = run_cli(python(), "benchmarks/bench_optimizer.py", "--sizes", "10M", "--steps", "1", "--variants", "lion",
                   "adamw_8bit", "lion_8bit", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| 10M")}
    assert sorted(rows) == ["adamw_8bit", "fused", "lion", "lion_8bit"], proc.stdout
    assert all(float(r[3]) > 0 for r in rows.values())
    state = {k: float(r[5].split()[0]) for k, r in rows.items()}
    assert state["fused"] == 2 * state["lion"]
    assert state["adamw_8bit"] < 0.3 * state["fused"] and state["lion_8bit"] < 0.3 * state["lion"]


def test_bench_trl_ratio_of_each_round():
    """Each A B B A round's ratio comes from that round's two runs a side, tokens over time summed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "benchmarks" / "bench_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = lambda tokens, seconds: {"tokens": tokens, "train_s": seconds}  # noqa: E731
    ours = [run(100, 1.0), run(300, 1.0), run(100, 2.0), run(100, 3.0)]  # rounds: 200 tok/s, then 40
    theirs = [run(100, 1.0), run(100, 3.0), run(50, 2.0), run(50, 3.0)]  # 50 tok/s, then 20
    # not the mean of the runs' own ratios (1 and 9: 5 for the first round), nor the whole invocation's (2.57)
    assert bench.round_ratios(ours, theirs) == pytest.approx([4.0, 2.0])
    assert bench.tokens_per_s(ours) == pytest.approx(600 / 7)
    assert bench.round_ratios(ours[:2], theirs[:2]) == pytest.approx([4.0])
