"""The loop, in process: accumulation, seeds, LoRA/full export, checkpointing, precision, resume."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import NO_GPU, as_sharegpt, fused_spy, small_recipe

import finetune
from finetune.errors import UserError


def steps(result) -> list[dict]:
    return [e for e in result.history if "loss" in e]


def test_accumulation_4x2_equals_1x8(tmp_path: Path, chat_files):
    """Loss normalised over all target tokens of a step: 4 micro-batches of 2 == 1 batch of 8 (rows of
    different lengths, so averaging per micro-batch would differ)."""
    train, _ = chat_files
    one = finetune.train(small_recipe(tmp_path / "a", train), **{"train.batch_size": 8, "train.grad_accum": 1})
    four = finetune.train(small_recipe(tmp_path / "b", train), **{"train.batch_size": 2, "train.grad_accum": 4})
    a, b = steps(one), steps(four)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)  # Adam hides a scale error; the norm shows it
    # The two sum in different float32 orders, and Adam divides each element's update by its gradient's own
    # scale: on elements whose gradient is near zero that left differences of up to 2.2e-6 (measured with two
    # equally exact loss implementations). Normalising per micro-batch instead moves them by 3e-3.
    for (name, p), q in zip(one.model.named_parameters(), four.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_same_seed_same_losses_other_seed_differs(tmp_path: Path, chat_files):
    train, evals = chat_files
    a = finetune.train(small_recipe(tmp_path / "a", train, evals))
    b = finetune.train(small_recipe(tmp_path / "b", train, evals))
    c = finetune.train(small_recipe(tmp_path / "c", train, evals), seed=1)
    la, lb, lc = ([e["loss"] for e in steps(r)] for r in (a, b, c))
    assert la == lb  # bitwise on CPU
    assert la != lc
    assert a.metrics["eval_loss"] == b.metrics["eval_loss"]


def test_sharegpt_files_train_as_their_chat_messages(tmp_path: Path, chat_files):
    """The same rows as ShareGPT `conversations` (read from JSONL and from Parquet): the same run, bitwise."""
    import datasets

    files = []
    for source, form in zip(chat_files, ("jsonl", "parquet"), strict=True):
        lines = source.read_text().splitlines()
        rows = [{"conversations": as_sharegpt(json.loads(line)["messages"])} for line in lines]
        files.append(tmp_path / f"{source.stem}.{form}")
        if form == "jsonl":
            files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(files[-1]))
    sections = {"train": {"eval_generate": 8}}
    chat = finetune.train(small_recipe(tmp_path / "chat", *chat_files, **sections))
    shared = finetune.train(small_recipe(tmp_path / "sharegpt", *files, **sections))
    assert [e["loss"] for e in steps(shared)] == [e["loss"] for e in steps(chat)]
    # (the exact-match examples themselves are compared in test_data)
    assert shared.metrics["eval_loss"] == chat.metrics["eval_loss"]
    assert shared.metrics["eval_accuracy"] == chat.metrics["eval_accuracy"]


def test_metrics_file_and_outputs(tmp_path: Path, chat_files):
    train, evals = chat_files
    result = finetune.train(small_recipe(tmp_path, train, evals, train={"eval_generate": 8}))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "loss" in e]
    eval_events = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in train_events] == [1, 2, 3]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= train_events[0].keys()
    assert [e["step"] for e in eval_events] == [0, 3]
    assert "eval_accuracy" in eval_events[-1] and 0.0 <= eval_events[-1]["eval_accuracy"] <= 1.0
    assert train_events[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup step 0 of 1
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    assert result.metrics["eval_loss"] == eval_events[-1]["eval_loss"]


def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_time(tmp_path: Path, chat_files, monkeypatch):
    """Each step's tokens/s is the training throughput: the step after a slow evaluation or save is not slower."""
    import time

    import finetune.checkpoint
    from finetune.tasks.sft import SFTTask

    def slowly(fn):
        def wrapped(*args, **kwargs):
            time.sleep(1.0)  # about 30 tiny training steps
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(SFTTask, "extra_eval", slowly(SFTTask.extra_eval))
    monkeypatch.setattr(finetune.checkpoint, "save", slowly(finetune.checkpoint.save))
    train, evals = chat_files
    result = finetune.train(small_recipe(tmp_path, train, evals), **{
        "train.max_steps": 6, "train.eval_every": 2, "train.save_every": 3})
    rates = {e["step"]: e["tokens_per_s"] for e in steps(result)}
    assert sorted(rates) == [1, 2, 3, 4, 5, 6]
    # steps 3, 4 and 5 follow an evaluation or a save: counting those seconds made them ~30x slower
    assert min(rates[s] for s in (3, 4, 5)) > 0.25 * max(rates[s] for s in (2, 6)), rates


def test_a_sigterm_during_evaluation_saves_and_stops_at_that_step(tmp_path: Path, chat_files, monkeypatch):
    """Preemption gives a grace period: a signal that comes while a long evaluation runs must not wait for
    another training step."""
    import os
    import signal

    from finetune.tasks.sft import SFTTask

    evaluate = SFTTask.extra_eval

    def preempted_at_step_2(self, recipe, accelerator, model):
        if self.step_seen == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        self.step_seen += 2
        return evaluate(self, recipe, accelerator, model)

    monkeypatch.setattr(SFTTask, "step_seen", 0, raising=False)  # evaluations at steps 0, 2, 4, ...
    monkeypatch.setattr(SFTTask, "extra_eval", preempted_at_step_2)
    train, evals = chat_files
    result = finetune.train(small_recipe(tmp_path, train, evals), **{"train.max_steps": 6, "train.eval_every": 2})
    assert result.preempted and result.steps == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]


def test_the_start_of_run_line_counts_in_words(tmp_path: Path, chat_files, caplog, tiny_dir):
    import re

    train, _ = chat_files
    with caplog.at_level("INFO", logger="finetune"):
        finetune.train(small_recipe(tmp_path, train), **{"train.max_steps": 1})
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sft: ")]
    assert re.match(r"sft: 256 train rows \((\d+\.\d)k tokens\), 0 eval rows, 1 optimizer step \(32 micro-batches/"
                    r"epoch x 1 process\), ", line), line
    from transformers import AutoTokenizer

    from finetune.tasks.sft import SFTTask

    built = SFTTask().build_data(finetune.load_recipe(small_recipe(tmp_path, train)),
                                 AutoTokenizer.from_pretrained(tiny_dir))
    tokens = sum(len(ids) for ids in built.train["input_ids"])  # an epoch's tokens, counted here
    assert re.match(r"sft: 256 train rows \((\d+\.\d)k", line)[1] == f"{tokens / 1e3:.1f}"


def test_settings_the_run_does_not_use_are_warned_about(tmp_path: Path, chat_files, caplog):
    train, _ = chat_files
    finetune.train(small_recipe(tmp_path, train, train={"max_steps": 1}, lora={"r": 4}))
    (warning,) = [r for r in caplog.records if "not used" in r.getMessage()]
    assert warning.levelname == "WARNING" and warning.getMessage().startswith("lora.r: set, but not used")


def test_without_a_progress_bar_each_logged_step_is_a_log_line(tmp_path: Path, chat_files, caplog):
    train, evals = chat_files
    with caplog.at_level("INFO", logger="finetune"):
        result = finetune.train(small_recipe(tmp_path, train, evals), **{"train.log_every": 2, "train.max_steps": 5})
    lines = [r.getMessage() for r in caplog.records if "/5: " in r.getMessage()]
    logged = steps(result)
    assert [e["step"] for e in logged] == [2, 4, 5] and len(lines) == 3
    for line, event in zip(lines, logged, strict=True):
        assert line.startswith(f"step {event['step']}/5: loss={event['loss']:.4f}  lr={event['lr']:.2e}  "), line


def test_full_export_reloads_with_same_logits(tmp_path: Path, chat_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, _ = chat_files
    result = finetune.train(small_recipe(tmp_path, train))
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    ids = torch.tensor([tok("Sort: 3 1 2")["input_ids"]])
    result.model.eval()
    torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_lora_adapter_reloads_with_same_logits(tmp_path: Path, chat_files, tiny_dir, variant: str):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train, _ = chat_files
    lora = {"enabled": True, "r": 4, "alpha": 8, "use_rslora": variant == "rslora", "use_dora": variant == "dora"}
    result = finetune.train(small_recipe(tmp_path, train, lora=lora))
    saved = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert (saved["use_rslora"], saved["use_dora"]) == (lora["use_rslora"], lora["use_dora"])
    scaling = result.model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert scaling == pytest.approx(8 / 2 if variant == "rslora" else 8 / 4)  # alpha / sqrt(r), alpha / r
    assert (result.model_dir / "adapter_model.safetensors").is_file()
    assert not (result.model_dir / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    base_logits = base(ids).logits
    reloaded = PeftModel.from_pretrained(base, result.model_dir)
    result.model.eval()
    trained = result.model(ids).logits
    torch.testing.assert_close(reloaded(ids).logits, trained)
    assert not torch.allclose(base_logits, trained)  # the adapter learned something


def test_gradient_checkpointing_same_losses(tmp_path: Path, chat_files):
    train, _ = chat_files
    for lora in (False, True):
        extra = {"lora": {"enabled": lora, "r": 4}}
        plain = finetune.train(small_recipe(tmp_path / f"p{lora}", train, **extra))
        ckpt = finetune.train(small_recipe(tmp_path / f"c{lora}", train, **extra),
                              **{"train.gradient_checkpointing": True})
        assert [e["loss"] for e in steps(plain)] == pytest.approx([e["loss"] for e in steps(ckpt)], rel=1e-6)


def test_bf16_then_fp32_in_one_process(tmp_path: Path, chat_files, monkeypatch, caplog):
    """Mixed precision from the recipe; a second train() in the same process may change it. A bf16 run on a
    CPU whose bf16 products are slower than float32's is told so (the measurement is replaced here: this CPU's
    own may go either way); a float32 run measures nothing."""
    import finetune.precision

    measured = []
    monkeypatch.setattr(finetune.precision, "bf16_matmul_speedup", lambda: measured.append(1) or 0.5)
    train, _ = chat_files
    with caplog.at_level("WARNING", logger="finetune"):
        bf16 = finetune.train(small_recipe(tmp_path / "bf16", train), **{"train.mixed_precision": "bf16"})
    assert len(measured) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]
    assert "0.50x" in warning and "train.mixed_precision=no" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune"):
        fp32 = finetune.train(small_recipe(tmp_path / "fp32", train))
    assert len(measured) == 1 and not any("float32" in r.getMessage() for r in caplog.records)
    lb, lf = [e["loss"] for e in steps(bf16)], [e["loss"] for e in steps(fp32)]
    assert all(torch.isfinite(torch.tensor(lb)))
    assert lb != lf and lb == pytest.approx(lf, rel=0.05)  # autocast really ran, and trains the same thing


def test_bf16_advice_comes_after_the_model_loads(tmp_path: Path, chat_files, monkeypatch, caplog):
    """A bf16 recipe whose model cannot be loaded stops with that error alone: the CPU's bf16 speed is measured,
    and advised on, only once there is a model to train."""
    import finetune.precision

    measured = []
    monkeypatch.setattr(finetune.precision, "bf16_matmul_speedup", lambda: measured.append(1) or 0.5)
    train, _ = chat_files
    missing = tmp_path / "no-such-model"
    with caplog.at_level("WARNING", logger="finetune"), pytest.raises(UserError, match="^model.name_or_path: "):
        finetune.train(small_recipe(tmp_path / "run", train), **{"train.mixed_precision": "bf16",
                                                                 "model.name_or_path": str(missing)})
    assert measured == [] and not any("slower than float32" in r.getMessage() for r in caplog.records)


def test_bf16_speed_measurement_and_advice():
    from finetune.precision import SLOWER, bf16_cpu_advice, bf16_matmul_speedup

    speedup = bf16_matmul_speedup()
    assert 0.05 < speedup < 20  # a ratio of two real timings (0.5 on an Intel Xeon VM, 2.2 on AMD Zen 4)
    assert bf16_cpu_advice(SLOWER) is None and bf16_cpu_advice(1.9) is None
    assert "0.51x" in bf16_cpu_advice(0.51)


@pytest.mark.parametrize("lora, optimizer", [(False, "adamw"), (True, "adamw"), (False, "adamw_8bit"),
                                             (False, "lion")], ids=["full", "lora-dropout", "adamw_8bit", "lion"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, chat_files, lora: bool, optimizer: str):
    """Checkpoints every 2 steps; delete the later ones (as if the run died after step 2) and resume.
    With LoRA dropout every step draws from the restored RNG, so it must be exactly where the save left it
    (creating a data loader must not draw from it: the resumed run creates one the uninterrupted run did not).
    The states of bitsandbytes' optimizers (AdamW's 8-bit moments and block scales, Lion's momentum) too."""
    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 5,
                                                          "eval_every": 3, "optimizer": optimizer},
                          lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.1})
    full = finetune.train(recipe)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004", "step-0000006"]
    weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    for name in ("step-0000004", "step-0000006"):
        shutil.rmtree(ckpts / name)
    (ckpts / ".tmp-step-0000008").mkdir()  # a torn write
    (ckpts / "step-0000009").mkdir()  # no `complete` marker
    resumed = finetune.train(recipe)
    assert [(e["step"], e["loss"]) for e in steps(resumed)] == [(e["step"], e["loss"]) for e in steps(full)]
    assert resumed.metrics["eval_loss"] == full.metrics["eval_loss"]
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_a_resume_with_another_optimizer_is_refused_and_leaves_the_checkpoint(tmp_path: Path, chat_files):
    """An adamw checkpoint holds no 8-bit state to continue from (and the other way round): one line, before
    anything is loaded, instead of every checkpoint skipped as unreadable."""
    train, _ = chat_files
    recipe = small_recipe(tmp_path, train, train={"max_steps": 2, "save_every": 2})
    finetune.train(recipe, train={"optimizer": "adamw_8bit"})
    ckpt = tmp_path / "checkpoints" / "step-0000002"
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    with pytest.raises(UserError, match=f"resume: {ckpt} holds the state of train.optimizer adamw_8bit, not adamw; "):
        finetune.train(recipe, train={"max_steps": 4})
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    assert finetune.train(recipe, train={"max_steps": 4, "optimizer": "adamw_8bit"}).history[-1]["step"] == 4


def test_a_resume_with_a_new_lr_and_weight_decay_trains_with_them(tmp_path: Path, chat_files, caplog):
    """The checkpoint restores the optimizer's and scheduler's hyperparameters; the recipe's new ones must win
    (lower the lr and resume is what a user does after a loss spike), with a warning, not be silently dropped."""
    caplog.set_level(logging.INFO, logger="finetune")
    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 4, "save_every": 2, "warmup_steps": 0})
    full = finetune.train(recipe)
    lrs = {e["step"]: e["lr"] for e in steps(full)}
    (tmp_path / "checkpoints" / "step-0000004").rename(tmp_path / "step-0000004")
    at_2 = {k: v.clone() for k, v in finetune.train(recipe, train={"max_steps": 2}).model.state_dict().items()}
    resumed = finetune.train(recipe, train={"lr": 1e-12, "weight_decay": 0.5})
    assert "resuming with train.lr=1e-12 (was 0.001), train.weight_decay=0.5 (was 0): the recipe's values apply " \
           "from step 3 on" in caplog.text
    # the same schedule, scaled to the new peak
    assert {e["step"]: e["lr"] for e in steps(resumed) if e["step"] > 2} == {
        s: pytest.approx(lr * 1e-9, rel=1e-9, abs=0) for s, lr in lrs.items() if s > 2}
    # ... and the optimizer used it: two steps at lr 1e-12 leave the step-2 weights (at 0.001 they moved ~1e-3)
    moved = max((v - at_2[k]).abs().max().item() for k, v in resumed.model.state_dict().items())
    assert moved < 1e-9
    caplog.clear()
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004")
    (tmp_path / "step-0000004").rename(tmp_path / "checkpoints" / "step-0000004")
    finetune.train(recipe, train={"max_steps": 6})  # the recipe's own values: nothing to say
    assert "resumed from" in caplog.text and "resuming with" not in caplog.text


def test_resuming_on_other_training_data_is_warned_about(tmp_path: Path, chat_files, caplog):
    train, _ = chat_files
    lines = train.read_text().splitlines(keepends=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(lines))
    recipe = small_recipe(tmp_path / "run", data, train={"max_steps": 2, "save_every": 2})
    finetune.train(recipe)
    changed = "the training data differ from those of"
    finetune.train(recipe, **{"train.max_steps": 3, "train.save_every": 3})  # the same data: nothing to say
    assert not [r for r in caplog.records if changed in r.getMessage()]
    data.write_text("".join(lines[1:]))  # one row fewer: the batch position now points at other rows
    finetune.train(recipe, **{"train.max_steps": 4})
    (warning,) = [r.getMessage() for r in caplog.records if changed in r.getMessage()]
    assert f"{len(lines)} rows" in warning and f"now {len(lines) - 1} rows" in warning
    assert "with seed=" not in caplog.text
    finetune.train(recipe, **{"train.max_steps": 5, "seed": 7})  # the seed orders each epoch's rows
    assert re.search(r"resuming \S*step-0000004 with seed=7, not its run's 0: the rows of this epoch are in another "
                     "order", caplog.text)


@pytest.mark.slow
def test_qlora_trains_lora_on_4bit_weights(tmp_path: Path, chat_files):
    pytest.importorskip("bitsandbytes")
    train, _ = chat_files
    result = finetune.train(small_recipe(tmp_path, train, lora={"enabled": True, "r": 4},
                                         model={"name_or_path": "builtin:tiny-llama", "load_in_4bit": True,
                                                "bnb_4bit_compute_dtype": "float32"}),
                            **{"train.max_steps": 2})
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    losses = [e["loss"] for e in steps(result)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (result.model_dir / "adapter_model.safetensors").is_file()
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it trained


@pytest.mark.slow
def test_tiny_sft_learns(tmp_path: Path):
    """The builtin default visibly learns: held-out loss falls to at most half its step-0 value."""
    result = finetune.train("recipes/tiny_sft.yaml", output_dir=str(tmp_path),
                            **{"train.max_steps": 150, "train.eval_generate": 0, "log.progress": False})
    evals = [e for e in result.history if "eval_loss" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 150
    assert evals[-1]["eval_loss"] <= 0.5 * evals[0]["eval_loss"]


def test_merge_folds_the_adapter_into_the_base(tmp_path: Path, chat_files, monkeypatch, capsys, recwarn):
    from transformers import AutoModelForCausalLM

    from finetune.cli import main

    train, _ = chat_files
    result = finetune.train(small_recipe(tmp_path / "run", train, lora={"enabled": True, "r": 4, "alpha": 8}))
    assert main(["merge", str(result.model_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    result.model.cpu().eval()
    torch.testing.assert_close(merged(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-5)
    # peft's read of transformers' deprecated is_gradient_checkpointing: no FutureWarning for the user
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
    assert main(["merge", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "nothing: no such directory (expected a LoRA adapter" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "x")]) == 2
    assert "run: not a LoRA adapter directory (no adapter_config.json)" in capsys.readouterr().err
    # the output is replaced as a whole: never a directory holding the adapter or the current one, and an
    # existing non-empty one only with --overwrite (the current directory is a temporary one here, so that a
    # regression deletes nothing outside the test)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (result.model_dir, tmp_path / "run", work, tmp_path):
        assert main(["merge", str(result.model_dir), str(output)]) == 2
    assert (result.model_dir / "adapter_config.json").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert main(["merge", str(result.model_dir), str(tmp_path / "merged")]) == 2
    assert main(["merge", str(result.model_dir), str(tmp_path / "merged"), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


@pytest.mark.parametrize("key, name", [("modules_to_save", "embed_tokens"), ("modules_to_save", "lm_head"),
                                       ("target_modules", "embed_tokens")])
def test_lora_runs_on_tied_embeddings_merge_into_the_model_they_trained(tmp_path: Path, chat_files, tiny_dir,
                                                                        key: str, name: str):
    """The tiny Llama ties its input and output embeddings (as Qwen2.5's and Llama 3.2's small models and Gemma
    do). Naming one of them in lora.modules_to_save trains both as the one tensor they are, in the run and in
    the merged model (without peft's ensure_weight_tying one trained while the other kept its old weights). A
    LoRA adapter on the input embeddings adapts them alone: the merged model is saved untied, the output layer
    as it was (merged into the shared tensor, it changed too). Either way the merged model's logits are the
    run's."""
    from transformers import AutoModelForCausalLM

    from finetune.cli import main

    train, _ = chat_files
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": [],
            "target_modules": ["q_proj", "v_proj"]}
    lora[key] = [*lora[key], name]
    result = finetune.train(small_recipe(tmp_path / "run", train, lora=lora, train={"lr": 1e-2}))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).get_input_embeddings().weight
    result.model.cpu().eval()
    assert main(["merge", str(result.model_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    inputs, outputs = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.allclose(inputs, base)  # trained
    if key == "modules_to_save":
        torch.testing.assert_close(outputs, inputs)
    else:
        assert not merged.config.tie_word_embeddings
        torch.testing.assert_close(outputs, base)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    torch.testing.assert_close(merged(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_keeps_last_k_and_the_best_and_skips_a_truncated_checkpoint(tmp_path: Path, chat_files):
    from finetune.checkpoint import complete_checkpoints

    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 8, "save_every": 2, "keep_checkpoints": 2,
                                                          "eval_every": 2, "lr": 3e-3})
    result = finetune.train(recipe)
    evals_by_step = {e["step"]: e["eval_loss"] for e in result.history if "eval_loss" in e}
    kept = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    best = min((s for s in (2, 4, 6, 8)), key=lambda s: evals_by_step[s])
    assert kept[:2] == ["step-0000008", "step-0000006"]
    assert f"step-{best:07d}" in kept and len(kept) == (2 if best >= 6 else 3)
    # a complete-looking checkpoint whose weights file is truncated is skipped for the one before it
    weights = tmp_path / "checkpoints" / "step-0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    again = finetune.train(recipe, **{"train.max_steps": 9})
    assert [e["step"] for e in again.history if "loss" in e][-3:] == [7, 8, 9]


def test_the_best_checkpoint_is_one_whose_weights_were_evaluated(tmp_path: Path, chat_files):
    import json

    from finetune.checkpoint import complete_checkpoints

    train, evals = chat_files
    # saves at 2, 4, 6 and evaluations at 0, 4, 7; a learning rate of almost 0 keeps every eval loss the same,
    # so step 6, saved after step 4's evaluation, would tie with it if that evaluation counted for it
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 7, "save_every": 2, "keep_checkpoints": 1,
                                                          "eval_every": 4, "lr": 1e-12, "warmup_steps": 0})
    finetune.train(recipe)
    state = json.loads((tmp_path / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["best_checkpoint"] == "step-0000004"
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-0000006", "step-0000004"]


def test_export_best_exports_the_evaluated_checkpoint_with_the_lowest_loss(tmp_path: Path, chat_files, caplog):
    from safetensors.torch import load_file

    train, evals = chat_files
    # a learning rate this high makes the held-out loss jump about after the first steps
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 6, "lr": 0.1, "min_lr_ratio": 1.0,
                                                          "warmup_steps": 0, "save_every": 1, "eval_every": 1,
                                                          "keep_checkpoints": 1, "export_best": True})
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = finetune.train(recipe)
    logged = {e["step"]: e["eval_loss"] for e in result.history if "eval_loss" in e}
    best = min((s for s in logged if s > 0), key=logged.get)
    assert logged[best] < logged[6] - 0.5  # the test means something only if the last step is clearly worse
    assert result.metrics["eval_loss"] == pytest.approx(logged[best], rel=1e-6)  # evaluated again once loaded
    assert f"exporting step-{best:07d}, the evaluated checkpoint with the lowest loss" in caplog.text
    exported = load_file(result.model_dir / "model.safetensors")
    saved = load_file(tmp_path / "checkpoints" / f"step-{best:07d}" / "model.safetensors")
    assert exported.keys() <= saved.keys() and all(torch.equal(exported[k], saved[k]) for k in exported)
    last = load_file(tmp_path / "checkpoints" / "step-0000006" / "model.safetensors")
    assert not all(torch.equal(exported[k], last[k]) for k in exported)


def test_early_stopping_stops_after_evaluations_without_a_new_lowest_and_stays_stopped(tmp_path: Path, chat_files,
                                                                                       caplog):
    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, train={"max_steps": 12, "lr": 0.1, "min_lr_ratio": 1.0,
                                                          "warmup_steps": 0, "save_every": 1, "eval_every": 1,
                                                          "early_stopping": 2})
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = finetune.train(recipe)
    losses = [e["eval_loss"] for e in result.history if "eval_loss" in e]  # steps 0, 1, 2, ...
    # by hand: the first step after which 2 evaluations in a row did not go below the lowest before them
    expected = next(i for i in range(2, len(losses)) if min(losses[i - 1:i + 1]) >= min(losses[:i - 1]))
    assert result.steps == expected < 12 and len(losses) == expected + 1
    assert f"early stopping at step {expected} of 12: 2 evaluations in a row" in caplog.text
    assert (result.model_dir / "model.safetensors").is_file()
    again = finetune.train(recipe)  # resumed from the last checkpoint: nothing more to train
    assert again.steps == expected and not [e for e in again.history if e.get("step", 0) > expected]


@pytest.mark.parametrize("sections, says", [
    ({"train": {"early_stopping": 2, "eval_every": 1}}, "train.early_stopping: needs evaluations during the run"),
    ({"data": {"eval_fraction": 0.1}, "train": {"early_stopping": 2}}, "train.early_stopping: needs evaluations"),
    ({"train": {"export_best": True, "save_every": 2, "eval_every": 2}}, "needs held-out data"),
    ({"data": {"eval_fraction": 0.1}, "train": {"export_best": True, "save_every": 3, "eval_every": 2}},
     r"set train.save_every \(now 3\) to a multiple of train.eval_every \(now 2\)"),
    ({"data": {"eval_fraction": 0.1}, "train": {"export_best": True, "save_every": 0, "eval_every": 2}},
     "every checkpoint must be evaluated"),
])
def test_export_best_and_early_stopping_refuse_runs_they_cannot_work_in(tmp_path: Path, chat_files, sections: dict,
                                                                        says: str):
    from finetune.config import ConfigError

    train, _ = chat_files
    with pytest.raises(ConfigError, match=says if says.startswith("train.") else f"train.export_best: .*{says}"):
        finetune.train(small_recipe(tmp_path, train, **sections))


def test_epochs_and_eval_fraction_and_tensorboard(tmp_path: Path, chat_files):
    pytest.importorskip("tensorboard")
    train, _ = chat_files
    recipe = small_recipe(tmp_path, train, data={"eval_fraction": 0.25}, train={"max_steps": 0, "epochs": 0.5},
                          log={"progress": False, "tensorboard": True})
    result = finetune.train(recipe)
    # 256 rows: 64 held out, 192 train -> 24 batches of 8 per epoch -> half an epoch is 12 steps
    assert result.steps == 12
    assert [e["step"] for e in result.history if "eval_loss" in e] == [0, 12]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def tiny_sft_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The newcomer's first command, the recipe as shipped (~75 s), run once for the tests that follow it."""
    out = tmp_path_factory.mktemp("tiny_sft")
    return finetune.train("recipes/tiny_sft.yaml", output_dir=str(out), **{"train.eval_every": 0,
                                                                            "log.progress": False})


def builtin_tasks_exact_match(model_dir: Path, output_dir: Path) -> float:
    """Held-out exact match of a whole model on builtin:tasks, as tiny_sft.yaml evaluates it."""
    return finetune.evaluate("recipes/tiny_sft.yaml", output_dir=str(output_dir), **{
        "model.name_or_path": str(model_dir), "log.progress": False}).metrics["eval_accuracy"]


@pytest.mark.slow
def test_tiny_sft_learns_what_the_readme_says(tiny_sft_run: Any):
    """The README's held-out figures. Measured with seeds 42, 1, 2, 3: final loss 0.015-0.027, exact match
    0.96-0.995. At the recipe's old lr (3e-3) the same seeds ended at loss 0.18-0.88 and exact match 0.15 for
    seed 42 (a plateau left or not by chance), which this test fails."""
    evals = [e for e in tiny_sft_run.history if "eval_loss" in e]
    assert evals[0]["eval_accuracy"] == 0 and evals[0]["eval_loss"] > 5
    assert evals[-1]["eval_loss"] < 0.1 and evals[-1]["eval_accuracy"] >= 0.9, evals[-1]


@pytest.mark.slow
def test_tiny_lora_teaches_the_sft_model_a_new_task_and_keeps_the_old(tiny_sft_run: Any, tmp_path: Path):
    """tiny_lora.yaml as shipped, from the SFT model (~20 s): the README's figures. Measured with seeds 42, 1, 2,
    3: the new task's exact match 0 -> 0.955-0.98; the old tasks 0.92-0.94 after merging (0.01 when trained on
    the new task alone, which the second assertion fails)."""
    from finetune.merge import merge_adapter

    result = finetune.train("recipes/tiny_lora.yaml", output_dir=str(tmp_path / "lora"),
                            **{"model.name_or_path": str(tiny_sft_run.model_dir), "train.eval_every": 0,
                               "log.progress": False})
    evals = [e for e in result.history if "eval_loss" in e]
    assert evals[0]["eval_accuracy"] == 0 and evals[-1]["eval_accuracy"] >= 0.9, evals
    merge_adapter(result.model_dir, tmp_path / "merged")
    assert builtin_tasks_exact_match(tmp_path / "merged", tmp_path / "old") >= 0.85


@pytest.mark.slow
def test_dpo_from_the_sft_model_as_the_readme_says_keeps_its_answers(tiny_sft_run: Any, tmp_path: Path):
    """The README's SFT -> DPO command (~35 s): reward accuracy 1.0 and exact match on builtin:tasks 0.94-0.98
    (seeds 42, 1, 2). With the recipe's lr 1e-3 and no NLL term, exact match fell to 0 (measured), which the
    second assertion fails."""
    dpo = finetune.train("recipes/tiny_dpo.yaml", output_dir=str(tmp_path / "dpo"),
                         **{"model.name_or_path": str(tiny_sft_run.model_dir), "train.lr": 2e-4,
                            "dpo.rpo_alpha": 1.0, "train.eval_every": 0, "log.progress": False})
    assert dpo.metrics["eval_accuracy"] >= 0.9, dpo.metrics
    assert builtin_tasks_exact_match(dpo.model_dir, tmp_path / "tasks") >= 0.85


def test_large_export_is_sharded_with_an_index(tmp_path: Path, chat_files):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.checkpoint import export_model

    train, _ = chat_files
    result = finetune.train(small_recipe(tmp_path / "run", train))
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    export_model(Accelerator(), result.model, tok, tmp_path / "sharded", tmp_path / "checkpoints",
                 max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.tensor([[2, 40, 41]])
    result.model.cpu().eval()
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("packing,fused", [(False, False), (True, False), (True, True)])
def test_compile_option_trains_the_same(tmp_path: Path, chat_files, packing: bool, fused: bool):
    """Also packed: sdpa_varlen runs eagerly inside the compiled model (its per-sequence bounds are data; traced,
    they were frozen into the graph and the second batch failed); and so does the fused output layer."""
    train, _ = chat_files
    base = {"train.max_steps": 3, "data.packing": packing, "train.fused_linear_loss": fused}
    plain = finetune.train(small_recipe(tmp_path / "a", train), **base)
    compiled = finetune.train(small_recipe(tmp_path / "b", train), **base, **{"train.compile": True})
    assert [e["loss"] for e in steps(compiled)] == pytest.approx([e["loss"] for e in steps(plain)], rel=1e-4)
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()


@NO_GPU
def test_trim_memory_trains_the_same_and_trims_after_each_backward(tmp_path: Path, chat_files, monkeypatch):
    import finetune.loop
    from finetune.memory import heap_trimmer

    calls = []

    def counting(device):
        release = heap_trimmer(device)
        assert release is not None  # glibc on this Linux CPU
        return lambda: calls.append(release())

    monkeypatch.setattr(finetune.loop, "heap_trimmer", counting)
    train, _ = chat_files
    overrides = {"train.grad_accum": 2, "train.batch_size": 4, "train.mixed_precision": "bf16"}
    plain = finetune.train(small_recipe(tmp_path / "a", train), **overrides)
    assert calls == []
    trimmed = finetune.train(small_recipe(tmp_path / "b", train), **overrides, **{"train.trim_memory": True})
    assert len(calls) == 3 * 2  # steps x micro-batches
    assert [e["loss"] for e in steps(trimmed)] == [e["loss"] for e in steps(plain)]


# bf16 matmuls of 300 new row counts, then the RSS they left behind, in MB
_MATMUL_SHAPES = """
import sys, torch
if sys.argv[1] == "bounded":
    from finetune.memory import bound_kernel_caches
    bound_kernel_caches()
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
w = torch.randn(1024, 256, dtype=torch.bfloat16)
before = rss()
for m in range(1000, 1300):
    torch.randn(m, 256, dtype=torch.bfloat16) @ w.t()
print(rss() - before)
"""


def test_bounded_kernel_caches_stop_memory_growing_with_new_matmul_shapes():
    """Without the bound, oneDNN and ideep keep a kernel for every new matmul shape (as every packed micro-batch
    has), and RSS grows by about a megabyte per shape; with it, memory stays flat."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    # a fixed mmap threshold returns each freed tensor to the OS: with glibc's sliding one, freed buffers stayed in
    # the heap and made the bounded run's growth 35-81 MB (against 219-363 unbounded; a fresh-clone CI run failed
    # at 81 / 220); with it, 15.6 against 180.5 MB in six runs of each
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    grown = {mode: float(subprocess.run([sys.executable, "-c", _MATMUL_SHAPES, mode], env=env, check=True,
                                        capture_output=True, text=True).stdout)
             for mode in ("unbounded", "bounded")}
    if grown["unbounded"] < 50:
        pytest.skip(f"this CPU's bf16 matmuls do not cache kernels per shape (grew {grown['unbounded']:.0f} MB)")
    assert grown["bounded"] < grown["unbounded"] / 3, grown


def test_the_loop_bounds_kernel_caches_and_keeps_the_users_setting(tmp_path: Path, chat_files, monkeypatch):
    train, _ = chat_files
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    finetune.train(small_recipe(tmp_path, train), **{"train.max_steps": 1})
    from finetune.memory import KERNEL_CACHE_ENTRIES

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == KERNEL_CACHE_ENTRIES
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"


def test_trim_memory_is_ignored_with_a_warning_off_cpu(caplog):
    from finetune.memory import heap_trimmer

    with caplog.at_level("WARNING", logger="finetune"):
        assert heap_trimmer(torch.device("cuda")) is None
    assert "train.trim_memory" in caplog.text and "cuda" in caplog.text


def test_frozen_lora_base_stored_in_bf16_trains_bitwise_the_same(tmp_path: Path, chat_files, monkeypatch):
    """Under bf16 autocast, LoRA's frozen base weights are kept in bf16 (what autocast computes with anyway):
    the same losses bitwise as casting them at every step; the tied embedding stays float32. Generation (exact
    match) runs under autocast too, and the returned model is float32 again, usable outside autocast."""
    import finetune.model

    train, evals = chat_files
    overrides = {"train.mixed_precision": "bf16", "lora.enabled": True, "lora.r": 4, "train.eval_generate": 4}
    cast_during_training = []

    def recording(model, dtype):
        cast = store(model, dtype)
        cast_during_training.extend((p, p.dtype) for p in cast)
        return cast

    store = finetune.model.store_frozen_linears_in
    monkeypatch.setattr(finetune.model, "store_frozen_linears_in", recording)
    stored = finetune.train(small_recipe(tmp_path / "a", train, evals), **overrides)
    model = stored.model.get_base_model()
    q = model.model.layers[0].self_attn.q_proj
    assert any(p is q.base_layer.weight for p, _ in cast_during_training)
    assert {dtype for _, dtype in cast_during_training} == {torch.bfloat16}
    assert q.base_layer.weight.dtype == q.lora_A["default"].weight.dtype == torch.float32  # restored at the end
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert "eval_accuracy" in stored.metrics
    stored.model.generate(input_ids=torch.tensor([[2, 40, 41]]), max_new_tokens=2, do_sample=False)

    monkeypatch.setattr(finetune.model, "store_frozen_linears_in", lambda model, dtype: [])
    cast = finetune.train(small_recipe(tmp_path / "b", train, evals), **overrides)
    assert [e["loss"] for e in steps(stored)] == [e["loss"] for e in steps(cast)]
    assert stored.metrics["train_grad_norm"] == cast.metrics["train_grad_norm"]
    assert stored.metrics["eval_loss"] == cast.metrics["eval_loss"]


@pytest.mark.parametrize("overrides", [{}, {"data.packing": True},
                                       {"lora.enabled": True, "lora.r": 4, "train.mixed_precision": "bf16"}],
                         ids=["padded", "packed", "lora-bf16"])


def test_fused_linear_loss_trains_like_logits_then_loss(tmp_path: Path, chat_files, monkeypatch, overrides: dict):
    """train.fused_linear_loss: the output projection and log-softmax by chunks give the unfused run's losses,
    gradient norms and eval loss; greedy generation (logits) still works through the same layer."""
    train, evals = chat_files
    sections = {"train.grad_accum": 2, "train.batch_size": 4, "train.eval_generate": 4, **overrides}
    plain = finetune.train(small_recipe(tmp_path / "a", train, evals), **sections)
    calls = fused_spy(monkeypatch)
    fused = finetune.train(small_recipe(tmp_path / "b", train, evals), **sections,
                           **{"train.fused_linear_loss": True})
    assert len(calls) >= 3 * 2 and min(calls) > 5  # every micro-batch, in several chunks
    tol = 2e-3 if "train.mixed_precision" in overrides else 1e-5
    assert [e["loss"] for e in steps(fused)] == pytest.approx([e["loss"] for e in steps(plain)], rel=tol)
    assert [e["grad_norm"] for e in steps(fused)] == pytest.approx([e["grad_norm"] for e in steps(plain)],
                                                                   rel=10 * tol)
    assert fused.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], rel=tol)
    assert fused.metrics["eval_accuracy"] == plain.metrics["eval_accuracy"]
    if "lora.enabled" not in overrides:  # the swapped output layer exports as a plain model
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model").eval()
        ids = torch.tensor([[2, 40, 41, 42]])
        fused.model.cpu().eval()
        torch.testing.assert_close(reloaded(ids).logits, fused.model(ids).logits)


def test_fused_linear_loss_refuses_an_output_layer_it_cannot_fuse(tiny_dir):
    from transformers import AutoModelForCausalLM

    from finetune.model import ModelError, make_fused_head

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    head = model.get_output_embeddings()
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with pytest.raises(ModelError, match="train.fused_linear_loss: .*with a bias"):
        make_fused_head(model)
    model.config.final_logit_softcapping = 30.0
    model.lm_head = head
    with pytest.raises(ModelError, match="soft-capped"):
        make_fused_head(model)


def test_fused_linear_loss_refuses_a_lora_wrapped_output_layer(tmp_path: Path, chat_files):
    from finetune.model import ModelError

    train, _ = chat_files
    with pytest.raises(ModelError, match="train.fused_linear_loss: the output layer became a .*lora.target_modules"):
        finetune.train(small_recipe(tmp_path, train), **{"train.fused_linear_loss": True, "lora.enabled": True,
                                                         "lora.target_modules": ["q_proj", "lm_head"]})


def test_liger_kernel_patches_this_models_norms_and_mlps_and_nothing_else(tiny_dir: Path):
    """Where liger-kernel is installed (not in CI: it pulls in Triton, 1 GB): what it patches. Its kernels
    themselves only run on CUDA. Liger also swaps classes and the rotary function in transformers' modeling
    module, for every later model of the process: that is undone (on a GPU machine, a CPU model loaded after a
    liger run failed in a Triton kernel)."""
    pytest.importorskip("liger_kernel")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.llama import modeling_llama

    from finetune.model import liger_applier

    module = dict(vars(modeling_llama))
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        model = cls.from_pretrained(tiny_dir)
        forward = model.forward
        liger_applier(torch.device("cuda"))(model)
        layer = model.model.layers[0]
        assert "Liger" in repr(layer.mlp.forward) and "Liger" in repr(layer.input_layernorm.forward)
        assert "Liger" in repr(model.model.norm.forward)
        assert model.forward == forward  # no fused linear cross-entropy: our losses get the logits/hidden states
        assert [name for name, value in vars(modeling_llama).items() if module.get(name) is not value] == []
        later = cls.from_pretrained(tiny_dir).model.layers[0]
        assert "Liger" not in repr(later.mlp.forward) and "Liger" not in repr(later.input_layernorm.forward)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert type(lora.base_model.model.model.layers[0].mlp.gate_proj).__name__ == "Linear"  # peft's, wrapped
    model.config.model_type = "no-such-model"
    with pytest.raises(UserError, match="^model.liger_kernel: liger-kernel has no kernels for model type"):
        liger_applier(torch.device("cuda"))(model)


def test_chat_template_for_a_tokenizer_without_one(tmp_path: Path, chat_files, tiny_dir: Path):
    from transformers import AutoTokenizer

    from finetune.builtin import CHAT_TEMPLATE

    base = tmp_path / "base"  # the tiny model as a base model ships: no chat template
    shutil.copytree(tiny_dir, base)
    (base / "chat_template.jinja").unlink()
    train, _ = chat_files
    with pytest.raises(UserError, match="has none; set model.chat_template"):
        finetune.train(small_recipe(tmp_path / "none", train, model={"name_or_path": str(base)}))
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    losses = []
    for name, template in [("builtin", None), ("named", "chatml"), ("file", str(tmp_path / "t.jinja")),
                           ("inline", CHAT_TEMPLATE)]:
        model = {"name_or_path": str(tiny_dir if template is None else base), "chat_template": template}
        result = finetune.train(small_recipe(tmp_path / name, train, model=model, train={"max_steps": 2}))
        losses.append([e["loss"] for e in result.history if "loss" in e])
        assert AutoTokenizer.from_pretrained(result.model_dir).chat_template == CHAT_TEMPLATE  # exported with it
    assert losses[1:] == [losses[0]] * 3  # the same tokens and masks as the tokenizer's own template
    with pytest.raises(UserError, match="^model.chat_template: 'chatm' is neither 'chatml', a Jinja template, nor"):
        finetune.train(small_recipe(tmp_path / "bad", train, model={"name_or_path": str(base),
                                                                    "chat_template": "chatm"}))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("markers", [False, True], ids=["base-without-markers", "markers-other-eos"])
def test_chatml_on_a_base_model_makes_its_markers_tokens_and_stops_at_im_end(tmp_path: Path, chat_files, lora: bool,
                                                                             markers: bool):
    """A base model's tokenizer without ChatML's markers (Mistral's, Llama 2's) gets them as special tokens, the
    model rows for them that it trains (LoRA: peft's trainable tokens), and <|im_end|> as the eos token that the
    exported model's generation stops at; one with the markers and another eos (Qwen's base) just the eos. Before,
    the markers were a dozen text tokens each and generation went on past the answer into a next turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.builtin import SPECIAL_TOKENS, build_tiny_llama, build_tokenizer
    from finetune.merge import load_merged

    base = tmp_path / "base"
    special = SPECIAL_TOKENS if markers else ["<|pad|>", "</s>"]
    tokenizer = build_tokenizer(special, eos="<|endoftext|>" if markers else "</s>", chat_template=None)
    build_tiny_llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    train, _ = chat_files
    result = finetune.train(small_recipe(tmp_path / "run", train, model={"name_or_path": str(base),
                                                                         "chat_template": "chatml"},
                                         lora={"enabled": True, "r": 4, "alpha": 8} if lora else {},
                                         train={"max_steps": 2}))
    exported = AutoTokenizer.from_pretrained(result.model_dir)
    assert len(exported) == len(tokenizer) + (0 if markers else 2) and exported.eos_token == "<|im_end|>"
    im_start, im_end = exported.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = list(exported.apply_chat_template(turns, return_dict=True)["input_ids"])
    assert row[0] == im_start and row.count(im_end) == 2  # one token each
    model = load_merged(result.model_dir)[0] if lora else AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.generation_config.eos_token_id == im_end == model.config.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(exported)
    ids = torch.tensor([row])
    result.model.eval()
    torch.testing.assert_close(model(ids).logits, result.model(ids).logits)  # the export holds the new rows
    if lora:  # the adapter holds the new rows alone, not the whole resized embeddings
        from safetensors import safe_open

        with safe_open(result.model_dir / "adapter_model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if "lora_" not in k and "trainable_tokens_delta" not in k]
    if lora and not markers:  # the new rows trained: peft's trainable tokens moved away from their initial rows
        for name, delta in result.model.named_parameters():
            if name.endswith("trainable_tokens_delta.default"):
                layer = result.model.get_submodule(name.rsplit(".trainable_tokens_delta", 1)[0])
                assert not torch.allclose(delta, layer.base_layer.weight[[im_start, im_end]]), name
                break
        else:
            raise AssertionError("no trainable tokens")


def test_lora_on_added_tokens_is_refused_under_fsdp():
    """Measured: FSDP2's fully_shard stops on peft's trainable-token layers with a traceback."""
    from types import SimpleNamespace

    from finetune.model import check_added_tokens

    added, none = SimpleNamespace(finetune_new_tokens=[384, 385]), SimpleNamespace(finetune_new_tokens=[])
    with pytest.raises(UserError, match="^model.chat_template: chatml adds its markers .* FSDP cannot shard"):
        check_added_tokens(added, lora=True, distributed_type="FSDP")
    check_added_tokens(added, lora=True, distributed_type="MULTI_GPU")
    check_added_tokens(added, lora=False, distributed_type="FSDP")
    check_added_tokens(none, lora=True, distributed_type="FSDP")
    check_added_tokens(SimpleNamespace(), lora=True, distributed_type="FSDP")


def test_warmup_ratio_and_the_schedules_shape_reach_the_optimizer(tmp_path: Path, chat_files):
    from finetune.config import ConfigError
    from finetune.schedule import lr_multiplier

    train, _ = chat_files
    finetune.train(small_recipe(tmp_path, train), **{"train.max_steps": 25, "train.warmup_steps": 0,
                                                     "train.warmup_ratio": 0.28, "train.batch_size": 2,
                                                     "train.lr_schedule": "linear"})
    logged = [e["lr"] for e in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in e]
    # 0.28 x 25 is 7.000000000000001 in floating point: 7 steps, not 8
    assert logged == pytest.approx([1e-3 * lr_multiplier(s, 25, 7, 0.1, "linear") for s in range(25)])
    with pytest.raises(ConfigError, match=r"train.warmup_steps \(2\) and train.warmup_ratio \(0.1\): expected "
                                          "one of them, the other 0"):
        finetune.train(small_recipe(tmp_path, train), **{"train.warmup_steps": 2, "train.warmup_ratio": 0.1})


def test_evaluate_only_gives_the_runs_own_evaluations_and_writes_nothing(tmp_path: Path, chat_files):
    from finetune.errors import UserError

    train, evals = chat_files
    run = tmp_path / "run"
    recipe = small_recipe(run, train, evals, train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    trained = finetune.train(recipe)
    logged = {e["step"]: e["eval_loss"] for e in trained.history if "eval_loss" in e}
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    exported = finetune.evaluate(recipe, **{"model.name_or_path": str(trained.model_dir),
                                            "output_dir": str(tmp_path / "elsewhere"),
                                            "data.train": str(tmp_path / "not-here.jsonl")})  # not needed
    assert exported.metrics["eval_loss"] == pytest.approx(logged[4], rel=1e-6)
    assert exported.steps == 0 and exported.history == [] and not (tmp_path / "elsewhere").exists()
    base = finetune.evaluate(recipe, resume=False)  # the recipe's model, beside the run's checkpoints
    assert base.metrics["eval_loss"] == pytest.approx(logged[0], rel=1e-6)
    # the checkpoint a run would resume from: step 2's weights, evaluated as the run did at step 2
    middle = finetune.evaluate(recipe, resume=str(run / "checkpoints" / "step-0000002"))
    assert middle.steps == 2 and middle.metrics["eval_loss"] == pytest.approx(logged[2], rel=1e-6)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == files  # nothing in the run was touched
    with pytest.raises(UserError, match="--eval-only: needs held-out data to evaluate on"):
        finetune.evaluate(small_recipe(tmp_path / "none", train))


def test_neftune_hook_is_gone_from_the_returned_model(tmp_path: Path, chat_files):
    """As after TRL's training: the model `finetune.train` returns trains on (in a notebook, say) without
    NEFTune's noise, which was on during the run (the losses differ from a run without it)."""
    train, _ = chat_files
    noisy = finetune.train(small_recipe(tmp_path / "a", train, train={"neftune_alpha": 5.0, "max_steps": 2}))
    plain = finetune.train(small_recipe(tmp_path / "b", train, train={"max_steps": 2}))
    assert [e["loss"] for e in steps(noisy)] != [e["loss"] for e in steps(plain)]
    embeddings = noisy.model.train().get_input_embeddings()
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(embeddings(ids), torch.nn.functional.embedding(ids, embeddings.weight))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_neftune_adds_bounded_uniform_noise_to_embeddings_in_training_only(tiny_dir, lora: bool):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from finetune.config import ConfigError, load_recipe
    from finetune.tasks.sft import SFTTask

    alpha = 5.0
    recipe = load_recipe({"model": {"name_or_path": str(tiny_dir)}, "lora": {"enabled": lora},
                          "train": {"neftune_alpha": alpha}})
    model = SFTTask().build_model(recipe, SimpleNamespace(device=torch.device("cpu")),
                                  AutoTokenizer.from_pretrained(tiny_dir))
    embeddings = model.get_input_embeddings()
    torch.manual_seed(0)  # the statistical checks below hold for most seeds, not all: fix one
    ids = torch.randint(0, embeddings.num_embeddings, (2, 50))
    clean = torch.nn.functional.embedding(ids, embeddings.weight).detach()
    bound = alpha / math.sqrt(50 * clean.shape[-1])  # NEFTune: alpha / sqrt(length x hidden size)
    model.train()
    noise = (embeddings(ids) - clean).detach()
    assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.99 * bound
    assert abs(noise.mean()) < bound / 20 and noise.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    with pytest.raises(ConfigError, match="train.neftune_alpha: NEFTune is for sft"):
        load_recipe({"task": "rm", "train": {"neftune_alpha": alpha}})


def test_each_held_out_source_is_evaluated_alone_as_well(tmp_path: Path, chat_files):
    """Several data.eval sources: eval_loss over all their rows, as one file of them all gives it, and each source's
    own metrics, as an evaluation of it alone gives them (also for a source of one row)."""
    _, evals = chat_files
    rows = evals.read_text().splitlines(keepends=True)
    sums, sort, one = tmp_path / "sums.jsonl", tmp_path / "sort.parquet", tmp_path / "one" / "sums.jsonl"
    sums.write_text("".join(rows[:20]))
    import datasets

    datasets.Dataset.from_list([json.loads(r) for r in rows[20:31]]).to_parquet(str(sort))
    one.parent.mkdir()
    one.write_text(rows[31])
    recipe = small_recipe(tmp_path / "run", evals, evals)
    both = finetune.evaluate(recipe, **{"data.eval": [str(sums), str(sort), str(one)]}).metrics
    assert both["eval_loss"] == pytest.approx(finetune.evaluate(recipe).metrics["eval_loss"], rel=1e-5)
    for name, source in (("sums", sums), ("sort", sort), ("sums_3", one)):
        alone = finetune.evaluate(recipe, **{"data.eval": str(source)}).metrics["eval_loss"]
        assert both[f"eval_{name}_loss"] == pytest.approx(alone, rel=1e-5)
    assert len({both["eval_sums_loss"], both["eval_sort_loss"], both["eval_loss"]}) == 3
    assert finetune.evaluate(recipe).metrics.keys() == {"eval_loss"}  # one source: no names


def test_exact_match_takes_the_first_rows_of_each_held_out_source(tmp_path: Path, chat_files, monkeypatch):
    """train.eval_generate with several held-out sources: the first rows of each, scored overall and per source
    (here by a stand-in for greedy decoding, right where the prompt has a multiple of 3 tokens)."""
    from transformers import AutoTokenizer

    import finetune.tasks.sft
    from finetune.builtin import ensure_builtin_model
    from finetune.tasks.sft import generation_examples

    monkeypatch.setattr(finetune.tasks.sft, "exact_match",
                        lambda model, tokenizer, examples, *a, **k: [len(p) % 3 == 0 for p, _ in examples])
    _, evals = chat_files
    rows = evals.read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(rows[:16]))
    second.write_text("".join(rows[16:]))
    recipe = small_recipe(tmp_path / "run", evals, evals, train={"eval_generate": 6})
    got = finetune.evaluate(recipe, **{"data.eval": [str(first), str(second)]}).metrics
    tok = AutoTokenizer.from_pretrained(ensure_builtin_model("builtin:tiny-llama"))
    right = {}
    for name, source in (("first", first), ("second", second)):
        examples = generation_examples([json.loads(r) for r in source.read_text().splitlines()], name, "auto", tok, 6)
        right[name] = [len(p) % 3 == 0 for p, _ in examples]
        assert len(right[name]) == 6 and got[f"eval_{name}_accuracy"] == pytest.approx(sum(right[name]) / 6)
    assert got["eval_accuracy"] == pytest.approx((sum(right["first"]) + sum(right["second"])) / 12)
    assert got["eval_first_accuracy"] != got["eval_second_accuracy"]
    alone = finetune.evaluate(recipe, **{"data.eval": str(first)}).metrics  # one source: its first rows, unnamed
    assert alone["eval_accuracy"] == got["eval_first_accuracy"] and "eval_first_accuracy" not in alone


def test_eval_batch_size_sets_the_held_out_batches_not_the_metrics(tmp_path: Path, chat_files, monkeypatch):
    from finetune.tasks.sft import SFTTask

    _, evals = chat_files  # 32 rows
    real, sizes = SFTTask.loss, []

    def spy(self, model, batch):
        if not model.training:
            sizes.append(batch["input_ids"].shape[0])
        return real(self, model, batch)

    import finetune.tasks.sft

    generated, real_match = [], finetune.tasks.sft.exact_match

    def exact_match(model, tokenizer, examples, max_new_tokens, batch_size, *args, **kwargs):
        generated.append(batch_size)
        return real_match(model, tokenizer, examples, max_new_tokens, batch_size, *args, **kwargs)

    monkeypatch.setattr(SFTTask, "loss", spy)
    monkeypatch.setattr(finetune.tasks.sft, "exact_match", exact_match)
    recipe = small_recipe(tmp_path / "run", evals, evals, train={"eval_generate": 2, "max_new_tokens": 2})
    default = finetune.evaluate(recipe).metrics  # train.batch_size 8
    assert sizes == [8] * 4 and generated == [32]  # generation: 4 x batch_size prompts at a time
    sizes.clear()
    five = finetune.evaluate(recipe, **{"train.eval_batch_size": 5}).metrics
    assert sizes == [5] * 6 + [2] and generated == [32, 5]
    assert five["eval_loss"] == pytest.approx(default["eval_loss"], rel=1e-5)

    def too_big(self, model, batch):  # as on a GPU, where a held-out batch may not fit when training ones do
        if not model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, batch)

    monkeypatch.setattr(SFTTask, "loss", too_big)
    with pytest.raises(UserError, match=r"^evaluation at step 0: out of GPU memory on a batch of \d+ tokens; lower "
                                        r"train.eval_batch_size \(now 5 rows\)$"):
        finetune.evaluate(recipe, **{"train.eval_batch_size": 5})
    monkeypatch.setattr(SFTTask, "loss", real)

    def decoding_too_much(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(finetune.tasks.sft, "exact_match", decoding_too_much)
    with pytest.raises(UserError, match=r"^train.eval_generate: out of GPU memory decoding 32 prompts at a time; "
                                        r"set train.eval_batch_size lower$"):
        finetune.evaluate(recipe)
