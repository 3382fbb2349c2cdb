"""Exact resume after preemption (SIGTERM) and after `kill -9`, on 1 process, DDP and FSDP (2 CPU processes).

Each case compares a run interrupted and resumed against an uninterrupted run with the same command: every
logged step's loss, grad norm and lr must be identical (bitwise: CPU runs are deterministic) and so must the
final weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from finetune.checkpoint import complete_checkpoints
from finetune.tracking import read_metrics

pytestmark = pytest.mark.slow
STEPS = 80
LAUNCHERS = {
    "single": [sys.executable, "-m", "finetune"],
    "ddp": ["accelerate", "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "finetune"],
    "fsdp": ["accelerate", "launch", "--config_file", "accelerate_configs/cpu_fsdp.yaml", "tests/fsdp_cpu_launch.py"],
}


def command(kind: str, out: Path, chat_files) -> list[str]:
    train, evals = chat_files
    batch = 8 if kind == "single" else 4  # the same global batch
    launcher = list(LAUNCHERS[kind])
    if launcher[0] == "accelerate":
        launcher[0] = shutil.which("accelerate")
    # NEFTune draws noise at every step: a resumed run matches only if the RNG state is restored exactly
    return [*launcher, "sft", "recipes/tiny_sft.yaml", f"output_dir={out}", f"data.train={train}",
            f"data.eval={evals}", f"train.max_steps={STEPS}", f"train.batch_size={batch}", "train.save_every=10",
            "train.keep_checkpoints=2", "train.eval_every=30", "train.eval_generate=0", "train.warmup_steps=5",
            "train.neftune_alpha=5", "seed=3", "log.progress=false", "log.tensorboard=false"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: signals reach launcher and workers


def wait_until(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((e["step"] for e in read_metrics(path) if "loss" in e), default=0)


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers live in their own sessions)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_to_end(cmd: list[str], log: Path) -> None:
    proc = start(cmd, log)
    assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]


def trajectory(out: Path) -> list[tuple]:
    return [(e["step"], e.get("loss"), e.get("grad_norm"), e.get("lr"), e.get("eval_loss"))
            for e in read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = trajectory(a), trajectory(b)
    assert len([t for t in ta if t[1] is not None]) == STEPS
    assert ta == tb
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("kind", ["single", pytest.param("ddp", marks=pytest.mark.distributed),
                                  pytest.param("fsdp", marks=pytest.mark.distributed)])
def test_sigterm_then_kill_9_then_resume_is_exact(kind: str, tmp_path: Path, chat_files):
    """A run preempted twice, as on spot instances: SIGTERM (it finishes the step, saves and stops cleanly);
    then, resumed, SIGKILL to the launcher and every worker at once after its next checkpoint (a node dying, no
    cleanup); resumed again from its last complete checkpoint, it ends exactly as the uninterrupted run. (One
    scenario rather than one test per way of stopping: each launch of 2 processes costs 10-15 s.)"""
    ref = tmp_path / "ref"
    run_to_end(command(kind, ref, chat_files), tmp_path / "ref.log")
    out = tmp_path / "run"
    cmd = command(kind, out, chat_files)

    proc = start(cmd, tmp_path / "first.log")
    wait_until(proc, lambda: steps_logged(out) >= 23)
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=120)
    text = (tmp_path / "first.log").read_text()
    # the workers stop cleanly; torchrun's agent itself reports the signal it got with a non-zero exit
    assert code == 0 or kind != "single", text[-4000:]
    assert "run the same command again" in text
    stopped = steps_logged(out)
    assert stopped < STEPS and (out / "checkpoints" / f"step-{stopped:07d}" / "complete").is_file()

    proc = start(cmd, tmp_path / "second.log")
    after = f"step-{stopped:07d}"
    wait_until(proc, lambda: any(p.name > after for p in complete_checkpoints(out / "checkpoints")))
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert f"resumed from {out / 'checkpoints' / after}" in (tmp_path / "second.log").read_text()
    assert steps_logged(out) < STEPS
    last = complete_checkpoints(out / "checkpoints")[0]

    run_to_end(cmd, tmp_path / "third.log")
    assert f"resumed from {last}" in (tmp_path / "third.log").read_text()
    assert_same_run(ref, out)


def test_sigusr1_saves_a_checkpoint_and_goes_on(tmp_path: Path, chat_files):
    out = tmp_path / "run"
    cmd = [*command("single", out, chat_files), "train.save_every=0"]
    proc = start(cmd, tmp_path / "log")
    wait_until(proc, lambda: steps_logged(out) >= 7)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    saved = complete_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and 7 <= int(saved[0].name.removeprefix("step-")) < STEPS
    assert steps_logged(out) == STEPS and (out / "model" / "model.safetensors").is_file()
