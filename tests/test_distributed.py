"""Two CPU processes on gloo through `accelerate launch`, compared with one process doing the same work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import finetune
from finetune.builtin import preference_rows
from finetune.config import parse_overrides
from finetune.tracking import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
DDP = ["--config_file", "accelerate_configs/cpu_ddp.yaml"]


def launch(config: list[str], recipe_overrides: list[str], env: dict | None = None):
    proc = run_cli(shutil.which("accelerate"), "launch", *config, "finetune", "sft", "recipes/tiny_sft.yaml",
                   "log.progress=false", "log.tensorboard=false", "train.eval_generate=0",
                   *recipe_overrides, env={"ACCELERATE_USE_CPU": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_ddp_two_by_four_equals_one_by_eight(tmp_path: Path, chat_files, optimizer: str):
    """Also with bitsandbytes' 8-bit AdamW: each process quantises the same all-reduced gradients alike. A second
    held-out source of one row, which one process has no row of, is evaluated alike."""
    train, evals = chat_files
    one = tmp_path / "one.jsonl"
    one.write_text(evals.read_text().splitlines(keepends=True)[0])
    common = [f"data.train={train}", f"data.eval=[{evals}, {one}]", "train.max_steps=4", "train.warmup_steps=1",
              "train.lr=1e-3", "train.grad_accum=2", "seed=0", f"train.optimizer={optimizer}"]
    launch(DDP, [f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", *common])
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    single = finetune.train("recipes/tiny_sft.yaml", output_dir=str(tmp_path / "one"), seed=0,
                            data={"train": str(train), "eval": [str(evals), str(one)]},
                            train={"max_steps": 4, "warmup_steps": 1, "lr": 1e-3, "batch_size": 8, "grad_accum": 2,
                                   "eval_generate": 0, "optimizer": optimizer},
                            log={"progress": False, "tensorboard": False})
    d = [e for e in ddp if "loss" in e]
    s = [e for e in single.history if "loss" in e]
    assert len(d) == len(s) == 4
    for a, b in zip(d, s, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"])
    # the schedule is stepped once per optimizer step, not once per process: the last step is at the floor
    assert d[-1]["lr"] == pytest.approx(1e-3 * 0.1)
    for key in ("eval_loss", "eval_eval_loss", "eval_one_loss"):
        assert [e[key] for e in ddp if "eval_loss" in e] == pytest.approx(
            [e[key] for e in single.history if "eval_loss" in e], rel=1e-5)
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


def test_launch_without_distributed_backend_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, "finetune", "sft", "recipes/tiny_sft.yaml",
                   f"output_dir={tmp_path}", "train.max_steps=1")
    assert proc.returncode != 0
    assert "processes were launched but Accelerate set up 1" in proc.stderr


def test_ddp_dpo_lora_matches_one_process(tmp_path: Path):
    """DPO with LoRA under DDP: the reference pass must disable the adapter through the DDP wrapper. If it did not,
    reference == policy and the loss would stay ln 2; here it must move, and match one process exactly."""
    common = ["train.max_steps=3", "train.warmup_steps=0", "train.lr=1e-2", "seed=0", "lora.enabled=true", "lora.r=4",
              "lora.dropout=0", "data.eval=null"]  # no dropout: its random stream differs between 1 and 2 processes
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, "finetune", "dpo", "recipes/tiny_dpo.yaml",
                   f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", "dpo.precompute_ref_logps=false",
                   "log.progress=false", *common, env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = [e for e in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in e]
    single = finetune.train("recipes/tiny_dpo.yaml", output_dir=str(tmp_path / "one"),
                            **parse_overrides(common),
                            **{"train.batch_size": 8, "dpo.precompute_ref_logps": False, "log.progress": False})
    one = [e for e in single.history if "loss" in e]
    assert [e["loss"] for e in ddp] == pytest.approx([e["loss"] for e in one], rel=1e-5)
    assert ddp[-1]["loss"] < 0.69


def test_ddp_dpo_precomputed_reference_matches_one_process(tmp_path: Path):
    """Reference log-probs precomputed by 2 processes (each a shard, then gathered) equal one process's."""
    common = ["train.max_steps=2", "seed=0", "data.eval=null", "dpo.precompute_ref_logps=true"]
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, "finetune", "dpo", "recipes/tiny_dpo.yaml",
                   f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", "log.progress=false", *common,
                   env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = finetune.train("recipes/tiny_dpo.yaml", output_dir=str(tmp_path / "one"),
                            **parse_overrides(common),
                            **{"train.batch_size": 8, "log.progress": False})
    from safetensors.torch import load_file

    (ddp_cache,) = (tmp_path / "ddp" / "ref_logps").glob("*.safetensors")
    (one_cache,) = (tmp_path / "one" / "ref_logps").glob("*.safetensors")
    torch.testing.assert_close(load_file(str(ddp_cache))["ref_logps"], load_file(str(one_cache))["ref_logps"],
                               rtol=1e-5, atol=1e-4)
    ddp = [e["loss"] for e in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in e]
    assert ddp == pytest.approx([e["loss"] for e in single.history if "loss" in e], rel=1e-5)


def test_ddp_kto_reference_point_spans_processes(tmp_path: Path):
    """KTO's reference point is the mean log-ratio of the mismatched completions over all processes' rows, as
    TRL's: 2 processes x 4 rows train and evaluate as 1 x 8. With each process's own mean, the losses differ
    once the policy has moved from the reference (the reference point is 0 at the start)."""
    rows = tmp_path / "rows"
    rows.mkdir()
    for split, n in (("train", 64), ("test", 16)):
        (rows / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(split)[:n]))
    common = ["train.max_steps=4", "train.warmup_steps=0", "train.lr=5e-3", "seed=0", "dpo.loss_type=kto",
              "train.eval_every=2", f"data.train={rows / 'train.jsonl'}", f"data.eval={rows / 'test.jsonl'}"]
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, "finetune", "dpo", "recipes/tiny_dpo.yaml",
                   f"output_dir={tmp_path / 'ddp'}", "train.batch_size=4", "log.progress=false", *common,
                   env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = finetune.train("recipes/tiny_dpo.yaml", output_dir=str(tmp_path / "one"), **parse_overrides(common),
                            **{"train.batch_size": 8, "log.progress": False})
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    for key in ("loss", "kl", "eval_loss", "eval_kl"):
        theirs, ours = ([e[key] for e in run if key in e] for run in (ddp, single.history))
        assert len(theirs) == len(ours) > 2 and theirs == pytest.approx(ours, rel=1e-5), key
    assert max(e["kl"] for e in ddp if "kl" in e) > 0


def test_ddp_packed_pairs_on_a_token_budget_match_one_process(tmp_path: Path):
    """Reward model, packed pairs with a shared prompt, token-budget micro-batches: 2 processes x 1 micro-batch
    see the same bins per step as 1 process x 2 micro-batches, so losses and grad norms match."""
    common = ["train.max_steps=3", "train.warmup_steps=0", "seed=0", "data.packing=true", "train.batch_tokens=384",
              "data.eval=null", "train.epochs=1"]
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, "finetune", "rm", "recipes/tiny_rm.yaml",
                   f"output_dir={tmp_path / 'ddp'}", "train.grad_accum=1", "log.progress=false", *common,
                   env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = [e for e in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in e]
    single = finetune.train("recipes/tiny_rm.yaml", output_dir=str(tmp_path / "one"), **parse_overrides(common),
                            **{"train.grad_accum": 2, "log.progress": False})
    one = [e for e in single.history if "loss" in e]
    assert len(ddp) == len(one) == 3
    assert [e["loss"] for e in ddp] == pytest.approx([e["loss"] for e in one], rel=1e-5)
    assert [e["grad_norm"] for e in ddp] == pytest.approx([e["grad_norm"] for e in one], rel=1e-4)
    assert [e["tokens_seen"] for e in ddp] == [e["tokens_seen"] for e in one]


TEARDOWN_PROBE = '''
import gc, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv.pop(1))
destroy = dist.destroy_process_group


def counted(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {dist.get_rank()}: DDP wrappers alive when the group is destroyed: {alive}", flush=True)
    return destroy(*args, **kwargs)


dist.destroy_process_group = counted
from finetune.cli import main
sys.exit(main())
'''


def test_ddp_wrapper_is_freed_before_the_process_group(tmp_path: Path, chat_files):
    # Freed after the group, DDP's reducer drops the last reference to it and joins gloo's worker threads with
    # the GIL held, which deadlocked about one 2-process run in ten at exit (pytorch/pytorch#56297).
    train, _ = chat_files
    probe = tmp_path / "probe.py"
    probe.write_text(TEARDOWN_PROBE)
    proc = run_cli(shutil.which("accelerate"), "launch", *DDP, str(probe), str(Path.cwd()), "sft",
                   "recipes/tiny_sft.yaml", f"output_dir={tmp_path / 'run'}", f"data.train={train}", "data.eval=null",
                   "train.max_steps=1", "log.progress=false", "log.tensorboard=false",
                   env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = sorted(line for line in proc.stdout.splitlines() if "DDP wrappers alive" in line)
    assert lines == [f"rank {r}: DDP wrappers alive when the group is destroyed: 0" for r in (0, 1)]


def test_user_errors_of_two_processes_are_said_once_without_worker_tracebacks(tmp_path: Path):
    """A recipe error (the same in every process), the recipe refused for the launch (fp16 on CPU: the same
    in every process too, found after the set-up), a data error found by the main process alone (token
    budgets: three short rows fill one bin, and each process needs one per micro-batch) and an output directory
    it cannot write (a file is in its path): one line each, no traceback from the other process, and the main
    process is the launcher's root cause."""
    import json

    from finetune.builtin import task_rows

    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps(r) + "\n" for r in task_rows("train")[:3]))
    for overrides, message in (
            (["train.lrr=3"], "finetune: error: recipes/tiny_sft.yaml: train.lrr: unknown key (did you mean "
                              "train.lr?)"),
            (["train.mixed_precision=fp16"], "finetune: error: train.mixed_precision: fp16 needs a GPU"),
            ([f"data.train={three}", "data.eval=null", "data.packing=true", "data.max_length=64",
              "train.batch_tokens=512"],
             "finetune: error: data.train: 3 rows cannot fill one batch of train.batch_tokens=512 x 2 processes "
             "(one bin of rows per process); set train.batch_tokens lower"),
            # found by the main process alone, before any data: its output directory cannot be written
            ([f"output_dir={three}/run"], f"finetune: error: output_dir: cannot write to {three}/run: ")):
        proc = run_cli(shutil.which("accelerate"), "launch", "-q", *DDP, "finetune", "sft", "recipes/tiny_sft.yaml",
                       f"output_dir={tmp_path / 'run'}", *overrides, env={"ACCELERATE_USE_CPU": "1"})
        assert proc.returncode != 0 and proc.stderr.count(message) == 1, proc.stderr[-3000:]
        assert "[rank1]" not in proc.stderr and "Root Cause" in proc.stderr
        cause = proc.stderr.split("Root Cause")[1]
        assert "rank      : 0" in cause and "exitcode  : 2" in cause
