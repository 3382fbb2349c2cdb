"""FSDP2 on 2 CPU processes (through the test-only tests/fsdp_cpu_launch.py): it really shards, matches one
process, exports loadable full models and LoRA adapters, and its sharded checkpoints resume on one process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import finetune
from finetune.config import parse_overrides
from finetune.tracking import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
FSDP = ["--config_file", "accelerate_configs/cpu_fsdp.yaml", "tests/fsdp_cpu_launch.py"]


def launch_fsdp(out: Path, train: Path, evals: Path, *extra: str, recipe: str = "recipes/tiny_sft.yaml"):
    proc = run_cli(shutil.which("accelerate"), "launch", *FSDP, "sft", recipe, f"output_dir={out}",
                   f"data.train={train}", f"data.eval={evals}", "train.max_steps=6", "train.batch_size=4",
                   "train.warmup_steps=1", "train.lr=1e-3", "train.eval_generate=0", "seed=0", "log.progress=false",
                   "log.tensorboard=false", *extra, env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_process(out: Path, train: Path, evals: Path, generate: int = 0, **overrides):
    """The same recipe and global batch as `launch_fsdp`, on this process."""
    return finetune.train("recipes/tiny_sft.yaml", output_dir=str(out), seed=0,
                          data={"train": str(train), "eval": str(evals)},
                          train={"max_steps": 6, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3,
                                 "eval_generate": generate, "max_new_tokens": 6},
                          log={"progress": False, "tensorboard": False}, **overrides)


def test_fsdp_shards_matches_one_process_and_exports(tmp_path: Path, chat_files):
    from transformers import AutoModelForCausalLM

    train, evals = chat_files
    # 7 generation examples: the processes get 4 and 3, and decode in lockstep (sharded forwards all-gather)
    launch_fsdp(tmp_path / "fsdp", train, evals, "train.save_every=4", "train.eval_generate=7",
                "train.max_new_tokens=6")
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-0000004" / "pytorch_model_fsdp_0")
                    .iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard per process: really FSDP
    single = one_process(tmp_path / "one", train, evals, generate=7)
    accuracy = [e["eval_accuracy"] for e in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "eval_loss" in e]
    assert accuracy == [e["eval_accuracy"] for e in single.history if "eval_loss" in e] and len(accuracy) == 2
    fsdp = [e for e in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in e]
    ref = [e for e in single.history if "loss" in e]
    assert [e["loss"] for e in fsdp] == pytest.approx([e["loss"] for e in ref], rel=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    single.model.eval()
    torch.testing.assert_close(exported(ids).logits, single.model(ids).logits, rtol=1e-4, atol=1e-4)

    # the sharded checkpoint of 2 processes resumes on 1 (DCP reshards): with model, optimizer and schedule
    # restored, steps 5 and 6 repeat the FSDP run's
    resumed = one_process(tmp_path / "resumed", train, evals,
                          resume=str(tmp_path / "fsdp" / "checkpoints" / "step-0000004"))
    after = [e for e in resumed.history if "loss" in e]
    assert [e["step"] for e in after] == [5, 6]
    assert [e["loss"] for e in after] == pytest.approx([e["loss"] for e in fsdp[4:]], rel=1e-5)
    assert [e["lr"] for e in after] == pytest.approx([e["lr"] for e in fsdp[4:]])


def test_fsdp_export_best_loads_the_sharded_best_checkpoint_on_every_process(tmp_path: Path, chat_files):
    from transformers import AutoModelForCausalLM

    train, evals = chat_files
    best = ["train.export_best=true", "train.save_every=1", "train.eval_every=1", "train.lr=0.1",
            "train.warmup_steps=0"]
    proc = launch_fsdp(tmp_path / "fsdp", train, evals, *best)
    single = one_process(tmp_path / "one", train, evals, **{"train.export_best": True, "train.save_every": 1,
                                                             "train.eval_every": 1, "train.lr": 0.1,
                                                             "train.warmup_steps": 0})
    losses = [e["eval_loss"] for e in single.history if "eval_loss" in e]
    assert min(losses[1:]) < losses[-1] - 0.5  # the best is not the last step
    assert "exporting step-" in proc.stderr + proc.stdout
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    single.model.eval()  # the one-process run's best checkpoint, loaded back
    torch.testing.assert_close(exported(ids).logits, single.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp_fused_linear_loss_matches_one_process(tmp_path: Path, chat_files):
    """The fused output layer under FSDP (its weight unsharded inside the root's forward and backward) trains
    like one unfused process."""
    train, evals = chat_files
    launch_fsdp(tmp_path / "fsdp", train, evals, "train.fused_linear_loss=true")
    single = one_process(tmp_path / "one", train, evals)
    fsdp = [e for e in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in e]
    ref = [e for e in single.history if "loss" in e]
    assert [e["loss"] for e in fsdp] == pytest.approx([e["loss"] for e in ref], rel=1e-5)
    assert [e["grad_norm"] for e in fsdp] == pytest.approx([e["grad_norm"] for e in ref], rel=1e-4)


def test_fsdp_lora_adapter_export_is_complete(tmp_path: Path, chat_files, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train, evals = chat_files
    launch_fsdp(tmp_path / "fsdp", train, evals, "lora.enabled=true", "lora.r=4", "lora.dropout=0",
                "train.gradient_checkpointing=true")
    adapter = load_file(str(tmp_path / "fsdp" / "model" / "adapter_model.safetensors"))
    assert len(adapter) == 4 * 7 * 2  # 4 layers x 7 linear modules x (A, B): none lost to wrapper prefixes
    single = one_process(tmp_path / "one", train, evals, lora={"enabled": True, "r": 4, "dropout": 0.0},
                         **{"train.gradient_checkpointing": True})
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                         tmp_path / "fsdp" / "model").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    single.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, single.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp_dpo_lora_reference_disables_the_adapter(tmp_path: Path):
    """DPO with LoRA under FSDP: the reference pass disables the adapter through the FSDP-wrapped model (else the
    loss would stay ln 2), and the run matches one process."""
    common = ["train.max_steps=3", "train.warmup_steps=0", "train.lr=1e-2", "seed=0", "lora.enabled=true",
              "lora.r=4", "lora.dropout=0", "data.eval=null", "dpo.precompute_ref_logps=false"]
    proc = run_cli(shutil.which("accelerate"), "launch", *FSDP, "dpo", "recipes/tiny_dpo.yaml",
                   f"output_dir={tmp_path / 'fsdp'}", "train.batch_size=4", "log.progress=false", *common,
                   env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    fsdp = [e["loss"] for e in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in e]
    single = finetune.train("recipes/tiny_dpo.yaml", output_dir=str(tmp_path / "one"), **parse_overrides(common),
                            **{"train.batch_size": 8, "log.progress": False})
    assert fsdp == pytest.approx([e["loss"] for e in single.history if "loss" in e], rel=1e-5)
    assert fsdp[-1] < 0.69
