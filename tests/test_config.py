from pathlib import Path

import pytest
from conftest import ROOT, python, run_cli

from finetune.config import ConfigError, Recipe, load_recipe, parse_overrides

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny_sft.yaml", "tiny_lora.yaml", "llama_lora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.output_dir
    assert recipe.unused_settings() == []  # a shipped recipe sets nothing it does not use


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_no_recipe_trains_16_bit_weights(path: Path, caplog):
    """A recipe's model, built as its task builds it (the tiny model standing in, in the recipe's dtype, with
    its LoRA settings), trains no bfloat16/float16 weights, whose updates the loop warns are rounded away."""
    import dataclasses

    import torch

    from finetune import model as model_lib

    recipe = load_recipe(path)
    cfg = dataclasses.replace(recipe.model, name_or_path="builtin:tiny-llama")
    tokenizer = model_lib.load_tokenizer(cfg)
    model = model_lib.build(cfg, recipe.lora, False, torch.device("cpu"), tokenizer,
                            "seq_cls" if recipe.task == "rm" else "causal_lm")
    model_lib.check_trainable_dtypes(model, recipe.train.mixed_precision)
    assert "trainable parameters are" not in caplog.text


def test_settings_a_run_does_not_use_are_named():
    """Most likely a forgotten switch: LoRA's settings without lora.enabled, another task's section, 4-bit
    options without load_in_4bit. Only values away from their defaults count."""
    sft = {"task": "sft", "lora": {"r": 8, "alpha": 16}, "dpo": {"beta": 0.5}, "rm": {"center_rewards": 0.01},
           "model": {"bnb_4bit_quant_type": "fp4"}}
    assert load_recipe(sft).unused_settings() == [
        "lora.r, lora.alpha: set, but not used: lora.enabled is false (all weights are trained)",
        "rm.center_rewards: set, but not used: the task is sft",
        "dpo.beta: set, but not used: the task is sft",
        "model.bnb_4bit_quant_type: set, but not used: model.load_in_4bit is false"]
    used = {**sft, "task": "dpo", "lora": {"enabled": True, "r": 8, "alpha": 16}, "rm": {},
            "model": {"bnb_4bit_quant_type": "fp4", "load_in_4bit": True}}
    assert load_recipe(used).unused_settings() == []
    # a run's own recipe.yaml holds every section at its defaults: reused for another task, it says nothing
    written = load_recipe({"task": "sft"}).to_dict()
    assert load_recipe({**written, "task": "rm"}).unused_settings() == []
    assert load_recipe({"task": "sft", "lora": {"r": 16}}).unused_settings() == []  # r's default
    # held-out data (max_steps beside a recipe's epochs is the usual way to shorten a run: nothing to say)
    dpo = {"task": "dpo", "data": {"train": "builtin:prefs"}, "train": {"eval_every": 5, "eval_generate": 3,
                                                                       "max_steps": 4, "epochs": 2}}
    assert load_recipe(dpo).unused_settings() == [
        "train.eval_every, train.eval_generate: set, but not used: no held-out data (data.eval or "
        "data.eval_fraction)",
        "train.eval_generate: set, but not used: the task is dpo (exact match of generated answers is sft's)"]
    both = {"data": {"eval": "held.jsonl", "eval_fraction": 0.1}, "train": {"eval_every": 5, "eval_generate": 3}}
    assert load_recipe(both).unused_settings() == [
        "data.eval_fraction: set, but not used: data.eval names the held-out data"]
    assert load_recipe({"data": {"eval_fraction": 0.1}, "train": {"eval_every": 5, "max_steps": 9}}
                       ).unused_settings() == []
    # eval_batch_size: held-out batches, and DPO's precomputed reference log-probs without held-out data
    assert load_recipe({"train": {"eval_batch_size": 32}}).unused_settings() == [
        "train.eval_batch_size: set, but not used: no held-out data (data.eval or data.eval_fraction)"]
    precomputing = {"task": "dpo", "train": {"eval_batch_size": 32}, "dpo": {"precompute_ref_logps": True}}
    assert load_recipe(precomputing).unused_settings() == []
    lion = {"train": {"optimizer": "lion_8bit", "adam_eps": 1e-6, "adam_beta2": 0.99}}  # its betas are used
    assert load_recipe(lion).unused_settings() == [
        "train.adam_eps: set, but not used: train.optimizer lion_8bit has no epsilon"]
    assert load_recipe({"train": {"optimizer": "adamw_8bit", "adam_eps": 1e-6}}).unused_settings() == []
    # DPO settings of other loss types
    orpo = {"task": "dpo", "dpo": {"loss_type": "orpo", "gamma": 1.0, "label_smoothing": 0.1,
                                   "precompute_ref_logps": True}}
    assert load_recipe(orpo).unused_settings() == [
        "dpo.gamma: set, but not used: it is simpo's target margin, and dpo.loss_type is orpo",
        "dpo.label_smoothing: set, but not used: it is for sigmoid, robust and exo_pair, and dpo.loss_type is orpo",
        "dpo.precompute_ref_logps: set, but not used: dpo.loss_type orpo uses no reference model"]
    used = {"task": "dpo", "dpo": {"loss_type": ["robust", "bco_pair"], "label_smoothing": 0.1,
                                   "precompute_ref_logps": True}}
    assert load_recipe(used).unused_settings() == []
    assert load_recipe({"task": "dpo", "dpo": {"loss_type": "simpo", "gamma": 1.0}}).unused_settings() == []
    assert load_recipe({"task": "dpo", "dpo": {"desirable_weight": 1.3}}).unused_settings() == [
        "dpo.desirable_weight: set, but not used: it is kto's, and dpo.loss_type is sigmoid"]
    assert load_recipe({"task": "dpo", "dpo": {"loss_type": "kto", "desirable_weight": 1.3}}).unused_settings() == []


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_close_one(tmp_path: Path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "train.lrr" in msg and "did you mean train.lr?" in msg


def test_unknown_section(tmp_path: Path):
    with pytest.raises(ConfigError, match="did you mean train"):
        load_recipe(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize("text, expected", [
    ("train:\n  batch_size: eight\n", "train.batch_size: expected an integer, got 'eight'"),
    ("train:\n  batch_size: 2.5\n", "train.batch_size: expected an integer"),
    ("train:\n  lr: -1\n", "train.lr: expected a value > 0"),
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision: expected one of no, bf16, fp16"),
    ("train:\n  optimizer: sgd\n", "train.optimizer: expected one of adamw, adamw_8bit, lion, lion_8bit, "
                                   "paged_adamw_8bit, paged_adamw_32bit, paged_lion_8bit, got 'sgd'"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout: expected a value >= 0 and < 1"),
    ("model:\n  trust_remote_code: maybe\n", "model.trust_remote_code: expected true/false"),
    ("train: 3\n", "train: expected a mapping"),
    ("model:\n  load_in_4bit: true\n", "set lora.enabled"),
    ("task: rm\ntrain:\n  fused_linear_loss: true\n", "train.fused_linear_loss: only sft and dpo"),
    ("- a\n- b\n", "expected a mapping of recipe sections"),
    ("data:\n  train: []\n", "data.train: expected a data source or a non-empty list of them, got []"),
    ("data:\n  eval: [a.jsonl, '']\n", "data.eval: expected a data source or a non-empty list of them"),
    ("data:\n  train: [a.jsonl, 3]\n",
     "data.train: expected a string, a list of strings or a mapping of names to numbers, got ['a.jsonl', 3]"),
    ("lora:\n  target_modules: 3\n", "lora.target_modules: expected a string or a list of strings, got 3"),
    ("lora:\n  target_modules: []\n", "lora.target_modules: expected all-linear or a list of module names"),
    ("lora:\n  target_modules: [q_proj, '']\n", "lora.target_modules: expected all-linear or a list of module"),
    ("output_dir: ''\n", "output_dir: expected a path or name, got an empty string"),
    ("resume: ' '\n", "resume: expected a path or name, got an empty string"),
    ("model:\n  name_or_path: ''\n", "model.name_or_path: expected a path or name, got an empty string"),
    ("dpo:\n  ref_model: ''\n", "dpo.ref_model: expected a path or name, got an empty string"),
    ("dpo:\n  loss_type: [sigmoid, kpo]\n", "dpo.loss_type: expected one of sigmoid, robust, hinge, ipo, bco_pair"),
    ("data:\n  chat_template_kwargs: [enable_thinking]\n",
     "data.chat_template_kwargs: expected a mapping of names to values, got ['enable_thinking']"),
    ("dpo:\n  loss_type: []\n", "dpo.loss_type: expected a loss type or a list of them, got an empty list"),
    ("dpo:\n  loss_type: [sigmoid, simpo]\n", "dpo.loss_type: simpo uses no reference model and cannot be combined"),
    ("dpo:\n  loss_type: [orpo, sigmoid]\n", "dpo.loss_type: orpo uses no reference model and cannot be combined"),
    ("dpo:\n  loss_type: exo_pair\n", "dpo.label_smoothing: exo_pair needs a value above 0 (its eps; the paper"),
    ("dpo:\n  loss_type: [sigmoid, kto]\n", "dpo.loss_type: kto trains on unpaired rows and cannot be combined"),
    ("dpo:\n  loss_type: kto\n  rpo_alpha: 1.0\n", "dpo.rpo_alpha: not with kto, whose completions are not all"),
    ("dpo:\n  loss_type: kto\n  undesirable_weight: -1\n", "dpo.undesirable_weight: expected a value >= 0"),
    ("task: dpo\ndpo:\n  loss_type: orpo\n  ref_model: sft/model\n",
     "dpo.ref_model: dpo.loss_type orpo uses no reference model; leave it unset"),
    ("dpo:\n  loss_type: [sigmoid, bco_pair]\n  loss_weights: [0.8]\n",
     "dpo.loss_weights: expected one weight per loss type (2), got 1"),
    ("dpo:\n  loss_type: [sigmoid, bco_pair]\n  loss_weights: [0.8, -1]\n",
     "dpo.loss_weights[1]: expected a value >= 0"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert expected in str(e.value)


def test_yaml_scientific_notation_is_a_float(tmp_path: Path):
    assert load_recipe(write(tmp_path, "train:\n  lr: 1e-4\n")).train.lr == pytest.approx(1e-4)


def test_overrides_are_typed_and_nested():
    nested = parse_overrides(["train.lr=1e-4", "lora.r=32", "lora.target_modules=[q_proj, v_proj]",
                              "data.eval=null", "output_dir=runs/x",
                              "data.chat_template_kwargs.enable_thinking=false"])
    recipe = load_recipe({"lora": {"enabled": True}}, nested)
    assert recipe.data.chat_template_kwargs == {"enable_thinking": False}
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.lora.r == 32 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.eval is None and recipe.output_dir == "runs/x"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_no_is_a_word_and_only_true_false_are_booleans(tmp_path: Path):
    # YAML 1.1 (PyYAML's default) reads no/yes/on/off as booleans: `mixed_precision: no` was refused
    nested = parse_overrides(["train.mixed_precision=no", "lora.enabled=true", "resume=false"])
    recipe = load_recipe({}, nested)
    assert recipe.train.mixed_precision == "no" and recipe.lora.enabled is True and recipe.resume is False
    path = write(tmp_path, "train:\n  mixed_precision: no\n  compile: False\nlora:\n  enabled: TRUE\n")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no" and recipe.train.compile is False and recipe.lora.enabled is True
    with pytest.raises(ConfigError, match="lora.enabled: expected true/false, got 'yes'"):
        load_recipe({}, parse_overrides(["lora.enabled=yes"]))


def test_cli_bad_key_is_one_line_exit_2(tmp_path: Path):
    path = write(tmp_path, "train:\n  batch_sise: 4\n")
    proc = run_cli(python(), "-m", "finetune", "sft", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.batch_sise" in lines[0] and "did you mean train.batch_size" in lines[0]


def test_cli_bad_override_exit_2():
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/tiny_sft.yaml", "train.lr=abc")
    assert proc.returncode == 2 and "train.lr: expected a number, got 'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_print_config_applies_overrides():
    proc = run_cli(python(), "-m", "finetune", "sft", "recipes/tiny_sft.yaml", "train.lr=0.5", "--print-config")
    assert proc.returncode == 0, proc.stderr
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 0.5 and printed["task"] == "sft"
    assert load_recipe(printed).train.lr == 0.5


def test_paths_under_home_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir):
    """`~` in the keys that hold paths is the home directory (Python's file functions would take it literally:
    output_dir ./~/runs, a model or data file not found); other strings keep theirs. A short run from a model
    and data under ~ writes under ~."""
    import json
    import shutil

    import finetune

    monkeypatch.setenv("HOME", str(tmp_path))
    r = load_recipe({"output_dir": "~/runs/x", "resume": "~/ckpt", "model": {"name_or_path": "~/m"},
                     "data": {"train": {"~/a.jsonl": 1.0, "builtin:tasks": 0.5}, "eval": ["~/b.jsonl"]},
                     "dpo": {"ref_model": "~/ref"}, "log": {"wandb_project": "~x"}})
    assert (r.output_dir, r.resume, r.model.name_or_path, r.dpo.ref_model) == (
        f"{tmp_path}/runs/x", f"{tmp_path}/ckpt", f"{tmp_path}/m", f"{tmp_path}/ref")
    assert r.data.train == {f"{tmp_path}/a.jsonl": 1.0, "builtin:tasks": 0.5}
    assert r.data.eval == [f"{tmp_path}/b.jsonl"]
    assert r.log.wandb_project == "~x"
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "completion": " 2"}) + "\n")
    run = finetune.train("recipes/tiny_sft.yaml", output_dir="~/runs/x", model={"name_or_path": "~/m"},
                         data={"train": "~/a.jsonl", "eval": None},
                         train={"max_steps": 1, "eval_generate": 0, "batch_size": 1},
                         log={"progress": False, "tensorboard": False})
    assert run.output_dir == tmp_path / "runs" / "x" and (run.model_dir / "model.safetensors").is_file()
