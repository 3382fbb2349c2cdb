"""What a user sees when something goes wrong: one-line errors naming the key, file or row, warnings for runs
that would silently do something else than asked, and stops that keep the last good checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import NO_GPU, small_recipe, tiny_config

import finetune
from finetune.errors import UserError


def test_resume_false_refuses_existing_checkpoints(tmp_path: Path, chat_files):
    train, _ = chat_files
    recipe = small_recipe(tmp_path, train, train={"max_steps": 2, "save_every": 2})
    finetune.train(recipe)
    with pytest.raises(UserError, match="already holds checkpoints"):
        finetune.train(recipe, resume=False)
    again = finetune.train(recipe, resume=False, overwrite_output_dir=True)
    assert again.steps == 2
    # the same output directory after switching LoRA on: its checkpoints cannot be restored into this model
    with pytest.raises(UserError, match=r"^no readable checkpoint among .*step-0000002 \(saved by a run with another "
                                        r"model, task or LoRA setting\? .*resume: false and overwrite_output_dir"):
        finetune.train(recipe, lora={"enabled": True})
    assert finetune.train(recipe, lora={"enabled": True}, resume=False, overwrite_output_dir=True).steps == 2


@NO_GPU
def test_fp16_on_cpu_is_refused_instead_of_silently_training_in_float32(tmp_path: Path, chat_files):
    """Accelerate runs an fp16 recipe on CPU without autocast or loss scaler (float32 training); and LoRA's
    frozen base, stored in fp16 for autocast, then met float32 inputs and crashed."""
    from finetune.errors import UserError

    train, _ = chat_files
    with pytest.raises(UserError, match="train.mixed_precision: fp16 needs a GPU"):
        finetune.train(small_recipe(tmp_path, train), **{"train.mixed_precision": "fp16", "lora.enabled": True})


def test_float16_weights_under_fp16_are_refused_before_the_first_step(tiny_dir: Path):
    """The loss scaler refuses float16 gradients (shown here on the CPU's own GradScaler), which stopped a full
    fine-tuning of a model loaded in float16 at its first step with a traceback; LoRA's adapters are float32."""
    from transformers import AutoModelForCausalLM

    from finetune.config import LoraConfig
    from finetune.model import apply_lora, check_trainable_dtypes

    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(weight.float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.SGD([weight], lr=0.1))

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16)
    with pytest.raises(UserError, match=r"^model.dtype: \d+ trainable parameters are float16 \(e.g. "
                                        r"model.embed_tokens.weight\), and train.mixed_precision fp16's loss scaler"):
        check_trainable_dtypes(model, "fp16")
    lora = apply_lora(model, LoraConfig(enabled=True, r=4), "CAUSAL_LM", False)
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    check_trainable_dtypes(lora, "fp16")


def test_trained_16_bit_weights_are_warned_about(tiny_dir: Path, tmp_path: Path, caplog):
    """Pure bfloat16 (or float16) full fine-tuning rounds every update to 8 bits: a warning, not an error (it
    saves memory, and at higher learning rates it trains). Measured behind the warning's words: 20 steps of the
    tiny SFT at lr 2e-5 moved the held-out loss 6.00 -> 5.90 with bfloat16 weights, -> 5.63 in float32 under
    bf16 autocast; the loop below checks that gap still shows."""
    from transformers import AutoModelForCausalLM

    import finetune
    from finetune.config import LoraConfig
    from finetune.model import apply_lora, check_trainable_dtypes

    for dtype in (torch.bfloat16, torch.float16):
        caplog.clear()
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
        check_trainable_dtypes(model, "bf16")
        n, name = len(list(model.parameters())), str(dtype).removeprefix("torch.")
        assert f"model.dtype: {n} trainable parameters are {name} (e.g. model.embed_tokens.weight)" in caplog.text
    caplog.clear()
    check_trainable_dtypes(AutoModelForCausalLM.from_pretrained(tiny_dir), "bf16")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)  # a frozen bf16 base is fine
    check_trainable_dtypes(apply_lora(base, LoraConfig(enabled=True, r=4), "CAUSAL_LM", False), "bf16")
    assert "trainable parameters are" not in caplog.text

    losses = {}
    for dtype, precision in (("bfloat16", "no"), ("float32", "bf16")):
        run = finetune.train("recipes/tiny_sft.yaml", model={"dtype": dtype}, output_dir=str(tmp_path / dtype),
                             resume=False, overwrite_output_dir=True, log={"progress": False, "tensorboard": False},
                             train={"max_steps": 20, "lr": 2e-5, "mixed_precision": precision, "eval_generate": 0})
        losses[dtype] = run.metrics["eval_loss"]
    assert losses["bfloat16"] - losses["float32"] > 0.1


@pytest.mark.parametrize("name, says", [("flash_attention_2", "FlashAttention2"), ("nonsense", "nonsense")])
def test_unusable_attention_implementation_is_a_one_line_error(tmp_path: Path, chat_files, name: str, says: str):
    from finetune.errors import UserError

    train, _ = chat_files
    with pytest.raises(UserError, match=f"^model.attn_implementation: .*{says}") as caught:
        finetune.train(small_recipe(tmp_path, train, model={"attn_implementation": name}))
    assert "\n" not in str(caught.value)


def test_attention_a_model_does_not_support_names_the_one_to_use(tmp_path: Path, chat_files, tiny_dir: Path):
    """Gemma 2 soft-caps its attention logits, which SDPA cannot: the recipe's default `sdpa` is refused in one
    line that says to use eager attention, and eager trains (packed too, as padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.errors import UserError

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = tiny_config("gemma2", tok, head_dim=16, sliding_window=8)
    assert config.attn_logit_softcapping
    folder = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    train, evals = chat_files
    recipe = small_recipe(tmp_path / "run", train, evals, model={"name_or_path": str(folder)})
    with pytest.raises(UserError, match=r"^model.attn_implementation: Gemma2ForCausalLM does not support .*"
                                        r"Set model.attn_implementation: eager$") as caught:
        finetune.train(recipe)
    assert "\n" not in str(caught.value)
    losses = [finetune.train(recipe, **{"model.attn_implementation": "eager", "data.packing": packing,
                                        "output_dir": str(tmp_path / f"run{packing}")}).metrics["eval_loss"]
              for packing in (False, True)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@NO_GPU
def test_liger_kernel_needs_a_gpu_and_the_package(tmp_path: Path, chat_files, monkeypatch):
    from finetune.model import liger_applier

    train, _ = chat_files
    with pytest.raises(UserError, match="^model.liger_kernel: its Triton kernels need a CUDA GPU, and this process "
                                        "runs on cpu$"):
        finetune.train(small_recipe(tmp_path, train, model={"liger_kernel": True}))
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed, even where it is
    with pytest.raises(UserError, match=r"^model.liger_kernel: needs the liger-kernel package; pip install"):
        liger_applier(torch.device("cuda"))


def test_a_bad_row_is_refused_before_the_model_loads(tmp_path: Path, chat_files, monkeypatch):
    import finetune.model

    train, _ = chat_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text() + json.dumps({"messages": [{"role": "user", "content": 7}]}) + "\n")
    monkeypatch.setattr(finetune.model, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(UserError, match=f"^{bad}: line 257: expected messages\\[0\\].content"):  # 256 rows first
        finetune.train(small_recipe(tmp_path / "out", bad))


@pytest.mark.parametrize("files, says", [((), "is a directory without a config.json"),
                                         (("config.json",), "cannot load a tokenizer from .* tokenizer files"),
                                         (("adapter_config.json",), "m is a LoRA adapter, not a whole model; fold "
                                          "it into its base first \\(finetune merge .*/m .*/merged\\)")])
def test_a_model_directory_missing_files_is_a_one_line_error(tmp_path: Path, chat_files, tiny_dir: Path,
                                                              files: tuple, says: str):
    train, _ = chat_files
    (tmp_path / "m").mkdir()
    for name in files:
        if name == "adapter_config.json":  # what a LoRA run exports as its model
            (tmp_path / "m" / name).write_text("{}")
        else:
            shutil.copy(tiny_dir / name, tmp_path / "m" / name)
    with pytest.raises(UserError, match=f"^model.name_or_path: .*{says}") as caught:
        finetune.train(small_recipe(tmp_path / "out", train, model={"name_or_path": str(tmp_path / "m")}))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["runs/tiny_sft/model", "./m", "MISSING_ABS/m", "~/no-such-model-dir"])
def test_a_missing_local_model_path_says_so_not_offline_hub(tmp_path: Path, chat_files, name: str, monkeypatch):
    """A name that cannot be a hub id (`org/name`) and is not a directory: a one-line 'no directory' error, not
    the hub's 'offline' one (e.g. tiny_lora.yaml before tiny_sft.yaml has been run)."""
    monkeypatch.chdir(tmp_path)
    train, _ = chat_files
    name = name.replace("MISSING_ABS", str(tmp_path / "missing"))
    shown = os.path.expanduser(name)  # the recipe expands ~
    with pytest.raises(UserError, match=f"^model.name_or_path: no directory '{re.escape(shown)}' \\(a local path"):
        finetune.train(small_recipe(tmp_path / "out", train, model={"name_or_path": name}))


def test_max_length_beyond_the_models_positions_is_warned(tmp_path: Path, chat_files, caplog):
    train, _ = chat_files
    finetune.train(small_recipe(tmp_path / "a", train, data={"max_length": 600}, train={"max_steps": 1}))
    assert "data.max_length=600 is more than the model's max_position_embeddings=512" in caplog.text
    caplog.clear()
    finetune.train(small_recipe(tmp_path / "b", train, data={"max_length": 512}, train={"max_steps": 1}))
    assert "max_position_embeddings" not in caplog.text


def test_a_full_disk_while_saving_frees_the_partial_save_and_keeps_the_last_checkpoint(tmp_path: Path, chat_files,
                                                                                        monkeypatch):
    import errno

    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    train, _ = chat_files
    recipe = small_recipe(tmp_path, train, train={"max_steps": 4, "save_every": 2})
    save_state, saves = Accelerator.save_state, []

    def fills_the_disk(self, output_dir, **kwargs):
        saves.append(output_dir)
        if len(saves) == 2:  # the second checkpoint: part of it is written, then the disk is full
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    root = tmp_path / "checkpoints"
    with pytest.raises(UserError, match=f"^saving checkpoint step-0000004 failed: No space left on device; the last "
                                        f"complete checkpoint, {root / 'step-0000002'}, is untouched"):
        finetune.train(recipe)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]  # the partial save is gone
    monkeypatch.setattr(Accelerator, "save_state", save_state)

    def no_room(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_room)  # the export, after the weights
    with pytest.raises(UserError, match=f"^exporting the model to {tmp_path / 'model'} failed: No space left on "
                                        f"device; the last complete checkpoint, {root / 'step-0000004'}, is"):
        finetune.train(recipe)
    assert not (tmp_path / "model").exists() and not (tmp_path / ".tmp-model").exists()


def test_a_diverged_run_stops_before_saving_and_keeps_the_last_checkpoint(tmp_path: Path, chat_files,
                                                                           monkeypatch):
    from finetune.errors import UserError
    from finetune.tasks import LossOutput
    from finetune.tasks.sft import SFTTask

    real, train_calls = SFTTask.loss, []

    def poisoned(self, model, batch):  # the third training micro-batch's loss is nan, as after an overflow
        out = real(self, model, batch)
        if model.training:
            train_calls.append(1)
            if len(train_calls) == 3:
                return LossOutput(loss_sum=out.loss_sum * float("nan"), metric_sums=out.metric_sums)
        return out

    monkeypatch.setattr(SFTTask, "loss", poisoned)
    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 5, "save_every": 2})
    with pytest.raises(UserError, match=r"^step 3: the gradient norm is nan: training diverged; stopped without "
                                        r"saving \(the last complete checkpoint, .*step-0000002, is untouched\)") \
            as caught:
        finetune.train(recipe)
    assert "\n" not in str(caught.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (tmp_path / "model").exists()
    # the failed run does not keep its output_dir locked in this process (a notebook retries in the same one)
    monkeypatch.undo()
    assert finetune.train(recipe).steps == 5


def test_a_second_run_in_a_busy_output_dir_is_refused_and_touches_nothing(tmp_path: Path, chat_files):
    import socket
    import subprocess
    import textwrap

    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 2, "save_every": 2})
    finetune.train(recipe)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != ".lock"}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from pathlib import Path
        from finetune import lock
        lock.claim(Path(sys.argv[1]))  # what a running run's main process holds
        print("held", flush=True)
        sys.stdin.read()
        """), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        # starting over would delete the checkpoints of the run that is still going
        with pytest.raises(UserError, match=f"^output_dir: {re.escape(str(tmp_path))} is in use by another run "
                                            rf"\(pid {holder.pid} on {socket.gethostname()}\); wait") as caught:
            finetune.train(recipe, resume=False, overwrite_output_dir=True, train={"max_steps": 1})
        assert "\n" not in str(caught.value)
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != ".lock"} == before
    finally:
        holder.kill()  # as kill -9: the operating system drops the lock with the process
        holder.wait()
    again = finetune.train(recipe, resume=False, overwrite_output_dir=True, train={"max_steps": 1})
    assert again.steps == 1 and not (tmp_path / "checkpoints" / "step-0000002").exists()


def test_a_run_after_a_failed_one_in_the_same_process_keeps_the_lock(tmp_path: Path):
    """A POSIX lock is dropped when any of the process's files on it closes: taking over the failed run's lock
    must not leave its handle to be closed later, unlocking the directory under the next run."""
    import gc
    import subprocess

    from finetune import lock

    lock.claim(tmp_path)  # a run that raised: its lock was never released
    lock.claim(tmp_path)  # the next run in this process
    gc.collect()
    try:
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from finetune import "
                                "lock; lock.claim(Path(sys.argv[1]))", str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and "is in use by another run" in other.stderr, other.stderr[-500:]
    finally:
        lock.release(tmp_path)


def test_a_filesystem_without_locks_is_warned_about_not_refused(tmp_path: Path, monkeypatch, caplog):
    """Some network filesystems have no POSIX locks (lockf fails with ENOLCK): the run goes on, unguarded."""
    import errno

    from finetune import lock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "lockf", no_locks)
    lock.claim(tmp_path)
    assert f"output_dir: cannot lock {tmp_path} (No locks available): a second run" in caplog.text
    lock.release(tmp_path)


def test_out_of_memory_names_the_keys_that_make_it_fit(tmp_path: Path, chat_files, monkeypatch):
    from finetune.tasks.sft import SFTTask

    real, calls = SFTTask.loss, []

    def too_big(self, model, batch):  # the third training micro-batch does not fit, as on a GPU
        calls.append(1)
        if model.training and len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, batch)

    monkeypatch.setattr(SFTTask, "loss", too_big)
    train, _ = chat_files
    with pytest.raises(UserError, match=r"^step 3: out of GPU memory on a micro-batch of \d+ tokens \(the last "
                                        r"complete checkpoint, .*step-0000002, is untouched\); lower "
                                        r"train.batch_size .* train.gradient_checkpointing") as caught:
        finetune.train(small_recipe(tmp_path, train, train={"max_steps": 4, "save_every": 2}))
    assert "\n" not in str(caught.value)


def test_resuming_past_max_steps_says_there_is_nothing_left(tmp_path: Path, chat_files, caplog):
    train, _ = chat_files
    finetune.train(small_recipe(tmp_path, train, train={"max_steps": 4, "save_every": 2}))
    caplog.clear()
    result = finetune.train(small_recipe(tmp_path, train, train={"max_steps": 2, "save_every": 2}))
    assert result.steps == 4 and "step 4, the run has 2 steps: nothing left to train" in caplog.text
    caplog.clear()
    finetune.train(small_recipe(tmp_path, train, train={"max_steps": 5, "save_every": 2}))
    assert "nothing left to train" not in caplog.text


def test_too_few_rows_for_one_batch_name_the_key_and_the_fix_before_the_model_loads(tmp_path: Path, chat_files,
                                                                                      monkeypatch):
    import finetune.model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune.model, "build", no_model)
    train, _ = chat_files
    three = tmp_path / "three.jsonl"
    three.write_text("".join(train.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(UserError, match=r"^data\.train: 3 rows cannot fill one batch of train\.batch_size=8 x 1 "
                                        r"process; set train\.batch_size=3 or lower$"):
        finetune.train(small_recipe(tmp_path / "a", three))
