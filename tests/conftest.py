"""Shared fixtures: one builtin cache per test session, small recipes, and a helper to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# two pytest-xdist workers on two cores: one thread each, or their OpenMP threads spin against each other (a
# step went from 42 ms to 2.3 s in FACTS.md)
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# tests that also run on a CUDA GPU where there is one (CI has none; see tests/test_cuda.py)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA GPU"))]
# tests of what a machine without a GPU does (refusals, CPU-only memory handling)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


@pytest.fixture(scope="session", autouse=True)
def finetune_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin artifacts are generated once per session, in a temporary home (never the user's cache)."""
    home = Path(os.environ.get("FINETUNE_TEST_HOME") or tmp_path_factory.mktemp("finetune_home"))
    os.environ["FINETUNE_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture(scope="session")
def tiny_dir(finetune_home: Path) -> Path:
    from finetune.builtin import ensure_builtin_model

    return ensure_builtin_model("builtin:tiny-llama")


def tiny_config(model_type: str, tok: Any, **extra: Any) -> Any:
    """The config of a tiny decoder of `model_type` (2 layers, hidden 64, grouped-query attention) for the
    builtin tokenizer `tok`, with `extra` settings (a sliding window, a head size)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                **extra)


@pytest.fixture(scope="session")
def windowed_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral with the builtin tokenizer whose attention sees only the last 8 positions (as Mistral
    v0.1, Qwen2 with use_sliding_window, and Gemma's local layers): the builtin rows are longer than that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("mistral", tok, sliding_window=8))
    folder = tmp_path_factory.mktemp("windowed")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small JSONL train/eval files of builtin task rows (so tests also exercise file loading)."""
    from finetune.builtin import task_rows

    folder = tmp_path_factory.mktemp("data")
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in task_rows("train")[:256]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in task_rows("test")[:32]))
    return train, evals


def small_recipe(output_dir: Path, train_file: Path, eval_file: Path | None = None, **sections: dict) -> dict:
    recipe = {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train": str(train_file), "eval": str(eval_file) if eval_file else None, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_grad_norm": 1.0},
        "log": {"progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    return recipe


def as_sharegpt(messages: list[dict]) -> list[dict]:
    """Chat messages as ShareGPT `conversations` turns, with its usual names (human, gpt)."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if full_env.get("ACCELERATE_USE_CPU"):  # CPU processes on a GPU machine too (not one rank per GPU)
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([*args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def python() -> str:
    return sys.executable


def relative_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    """||a - exact|| / ||exact||, in float64."""
    return ((a.double() - exact.double()).norm() / exact.double().norm()).item()


def fused_spy(monkeypatch, tokens_per_chunk: int = 5) -> list[int]:
    """Force several chunks per batch through the fused output layer and count its calls (rows per call)."""
    import finetune.model
    from finetune.losses import linear_token_logps

    calls = []

    def spy(hidden, weight, targets):
        calls.append(hidden.shape[0])
        return linear_token_logps(hidden, weight, targets, chunk_logits=weight.shape[0] * tokens_per_chunk)

    monkeypatch.setattr(finetune.model, "linear_token_logps", spy)
    return calls
