"""The three ways in, each in a fresh process, exactly as a user types them."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from conftest import python, run_cli

from finetune.tracking import read_metrics

QUICK = ["train.max_steps=3", "train.eval_generate=4", "log.progress=false", "log.tensorboard=false"]


@pytest.mark.slow
def test_accelerate_launch_finetune_from_repo_root(tmp_path: Path):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher should be installed with the package"
    proc = run_cli(accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "finetune", "sft", "recipes/tiny_sft.yaml",
                   f"output_dir={tmp_path}", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3]
    assert "eval_accuracy" in events[-1]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_python_dash_m_and_console_script(tmp_path: Path):
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/tiny_lora.yaml", f"output_dir={tmp_path}", *QUICK,
                   "data.eval=null", "model.name_or_path=builtin:tiny-llama")  # not tiny_sft's output
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    assert "kernels-community" not in proc.stderr  # bitsandbytes' CPU 4-bit hint, noise without QLoRA
    assert "%|" not in proc.stderr  # log.progress=false: no progress bar, transformers' loading/saving ones neither
    script = shutil.which("finetune")
    assert script, "the finetune console script should be installed"
    helped = run_cli(script, "sft", "--help")
    assert helped.returncode == 0 and "--print-config" in helped.stdout


def test_real_recipe_parses_then_stops_cleanly_offline(tmp_path: Path):
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/llama_lora.yaml", f"output_dir={tmp_path}",
                   env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune: error: model.name_or_path:") and "offline" in last


@pytest.mark.slow
def test_accelerate_launch_of_a_real_recipe_offline_ends_on_our_line_without_a_traceback(tmp_path: Path):
    """The README's `accelerate launch finetune sft recipes/llama_lora.yaml`, offline: finetune's one line, and
    not the one-process launcher's CalledProcessError traceback after it (the launcher is stopped instead)."""
    proc = run_cli(shutil.which("accelerate"), "launch", "finetune", "sft", "recipes/llama_lora.yaml",
                   f"output_dir={tmp_path}", env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in proc.stderr and proc.stderr.count("finetune: error:") == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune: error: model.name_or_path:") and "offline" in last


def test_wrong_task_for_recipe_and_missing_file():
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/nope.yaml")
    assert proc.returncode == 2 and "recipes/nope.yaml: recipe file not found" in proc.stderr
    proc = run_cli(python(), "-m", "finetune", "dpo", "recipes/tiny_sft.yaml", "--print-config")
    assert proc.returncode == 2 and "run `finetune sft ...`" in proc.stderr


def test_unwritable_output_dir_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "a_file").write_text("")
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/tiny_sft.yaml", f"output_dir={tmp_path}/a_file/run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"finetune: error: output_dir: cannot write to {tmp_path}")


def test_ctrl_c_before_training_is_one_line_and_exit_130(tmp_path: Path, monkeypatch, capsys):
    import finetune.loop
    from finetune.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.loop, "run", interrupted)  # as if Ctrl-C came while the model loads
    assert main(["sft", "recipes/tiny_sft.yaml", f"output_dir={tmp_path}"]) == 130
    assert capsys.readouterr().err.strip() == "finetune: interrupted"


def test_an_error_under_a_progress_bar_starts_its_own_line(tmp_path: Path, capsys):
    """A bad row is found while the tokenizing bar is drawn: the error must not be glued to the bar's line."""
    import re

    from finetune.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": 3}]}\n')
    assert main(["sft", "recipes/tiny_sft.yaml", f"data.train={bad}", f"output_dir={tmp_path / 'run'}",
                 "log.progress=true"]) == 2
    err = capsys.readouterr().err
    assert f"Tokenizing {bad}" in err  # the bar was drawn
    assert re.search(r"(\A|[\r\n])finetune: error: \S*bad.jsonl: line 2: expected messages\[0\]\.content to be a "
                     r"string, got int\n\Z", err), repr(err[-400:])


def test_version_names_finetune_and_its_libraries(capsys):
    import torch
    import transformers

    import finetune
    from finetune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith(f"finetune {finetune.__version__} (torch {torch.__version__}, transformers "
                          f"{transformers.__version__}, ")


def test_a_missing_recipe_argument_names_only_the_recipe(capsys):
    from finetune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["sft"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # argparse would also call the optional overrides required unless they have a default
    assert done.value.code == 2 and err == "finetune sft: error: the following arguments are required: recipe"


def test_overrides_may_follow_a_flag_and_eval_only_prints_json(tmp_path: Path, monkeypatch, capsys):
    import json

    import finetune.loop
    from finetune.cli import main

    seen = {}

    def fake_run(recipe, task, eval_only=False):
        seen.update(recipe=recipe, eval_only=eval_only)
        return finetune.loop.Result(output_dir=tmp_path, model_dir=tmp_path, metrics={"eval_loss": 1.5}, steps=0)

    monkeypatch.setattr(finetune.loop, "run", fake_run)
    assert main(["sft", "recipes/tiny_sft.yaml", "train.lr=0.5", "--eval-only", "seed=3", "train.lr=0.25"]) == 0
    assert seen["eval_only"] and seen["recipe"].seed == 3 and seen["recipe"].train.lr == 0.25  # in order
    assert json.loads(capsys.readouterr().out) == {"eval_loss": 1.5}
    assert main(["sft", "recipes/tiny_sft.yaml", "seed=4"]) == 0
    assert not seen["eval_only"] and capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as done:
        main(["sft", "recipes/tiny_sft.yaml", "--eval-only", "seed=3", "--bogus"])
    assert done.value.code == 2 and capsys.readouterr().err.strip().endswith("unrecognized arguments: --bogus")
    assert main(["sft", "recipes/tiny_sft.yaml", "--print-config", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def test_show_rows_marks_the_tokens_with_a_loss_and_trains_nothing(tmp_path: Path, capsys, tiny_dir):
    import json

    from transformers import AutoTokenizer

    from finetune.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    eos = tokenizer.eos_token
    rows = [{"prompt": f"Say {i}:", "completion": f" {i * 7}"} for i in range(3)]
    (tmp_path / "say.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["sft", "recipes/tiny_sft.yaml", "--show-rows", "2", f"data.train={tmp_path / 'say.jsonl'}",
                 "data.eval=null", f"output_dir={out}", "log.progress=false"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[1::2] == [f"Say 0:[[ 0{eos}]]", f"Say 1:[[ 7{eos}]]"] and len(shown) == 4
    trained = len(tokenizer(f" 0{eos}", add_special_tokens=False)["input_ids"])
    assert shown[0].startswith("--- row 0: ") and shown[0].endswith(f" tokens, {trained} with a loss (inside [[ ]])")
    assert main(["dpo", "recipes/tiny_dpo.yaml", "--show-rows", "1", f"output_dir={out}"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("--- pair 0: tokens of prompt ")
    assert "chosen: key sun cat<|im_end|>" in shown and "rejected: key sun cat key<|im_end|>" in shown
    # kto: pairs unpaired, chosen rows first, each with the completion of the row before as its mismatched one
    assert main(["dpo", "recipes/tiny_dpo.yaml", "dpo.loss_type=kto", "--show-rows", "2", f"output_dir={out}"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("--- row 0 (desirable): tokens of prompt ")
    completions = [line.split(": ", 1)[1] for line in shown if line.startswith("completion: ")]
    mismatched = [line.split(": ", 1)[1] for line in shown if line.startswith("mismatched completion (KL estimate): ")]
    assert completions[0] == "key sun cat<|im_end|>" and mismatched[1] == completions[0]
    assert not out.exists()
    assert main(["sft", "recipes/tiny_sft.yaml", "--show-rows", "-1"]) == 2
    assert "--show-rows: expected a number of rows >= 1, got -1" in capsys.readouterr().err
