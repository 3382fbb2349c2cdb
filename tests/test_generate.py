"""`finetune generate`: answers equal a greedy decode written out by hand, for full models and LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, python, run_cli

import finetune
from finetune.cli import main
from finetune.generate import answers, load

PROMPTS = ["What is 12 + 7?", "Sort: 3 1 2"]


def greedy_by_hand(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Argmax of the next token's logits, appended one at a time over the whole sequence (no KV cache, no
    `generate`), from the chat template's rendered text."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple:
    """A full model and a LoRA adapter, each trained 100 steps of the tiny recipes (about 6 s each): enough to
    answer with digits rather than the whitespace of an untrained model."""
    folder = tmp_path_factory.mktemp("generate")
    short = {"train.max_steps": 100, "train.eval_generate": 0, "data.eval": None, "log.progress": False,
             "log.tensorboard": False}
    full = finetune.train(str(ROOT / "recipes/tiny_sft.yaml"), output_dir=str(folder / "full"), **short)
    lora = finetune.train(str(ROOT / "recipes/tiny_lora.yaml"), output_dir=str(folder / "lora"), **short,
                          **{"lora.dropout": 0.5,  # in training mode its answers would be random
                             "model.name_or_path": str(full.model_dir)})  # the recipe's base: tiny_sft's model
    return full, lora


@pytest.fixture(scope="module")
def trained(runs) -> tuple[Path, Path]:
    return runs[0].model_dir, runs[1].model_dir


def test_a_result_in_memory_answers_as_its_exported_model(runs):
    from finetune.builtin import task_rows

    prompts = [row["messages"][0]["content"] for row in task_rows("test")[:12]]
    for result in runs:  # the LoRA run's model is still in training mode, with adapter dropout
        assert result.model.training
        # in the in-memory model's dtype: on a GPU `load` picks bfloat16, whose greedy answers can differ
        dtype = str(next(result.model.parameters()).dtype).removeprefix("torch.")
        model, tokenizer = load(result.model_dir, dtype)
        assert result.generate(*prompts, max_new_tokens=16) == list(answers(model, tokenizer, prompts, 16))
        assert result.model.training  # given back as it was


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_full_model_answers_as_a_greedy_decode_by_hand(trained, tiny_dir, which):
    model, tokenizer = load(tiny_dir if which == "untrained" else trained[0])
    got = list(answers(model, tokenizer, PROMPTS, max_new_tokens=6))
    assert got == [greedy_by_hand(model, tokenizer, p, 6) for p in PROMPTS]
    assert all(got) or which == "untrained"  # the untrained model answers with whitespace


def test_lora_adapter_answers_as_the_unmerged_adapter_and_not_as_its_base(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.model import peft_quietly

    prompts = [*PROMPTS, "Sort descending: 3 1 2"]  # the adapter's own task
    model, tokenizer = load(trained[1])  # its base, the full run's model, found from the adapter's config
    got = list(answers(model, tokenizer, prompts, max_new_tokens=6))
    assert all(got)
    with peft_quietly():
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained[0]), trained[1]).eval()
    assert got == [greedy_by_hand(unmerged, tokenizer, p, 6) for p in prompts]
    base = AutoModelForCausalLM.from_pretrained(trained[0]).eval()
    assert got != [greedy_by_hand(base, tokenizer, p, 6) for p in prompts]


def test_sampling_is_seeded_and_raw_prompts_skip_the_template(trained):
    model, tokenizer = load(trained[0])
    first = list(answers(model, tokenizer, PROMPTS * 3, max_new_tokens=8, temperature=5.0, seed=1))
    assert first == list(answers(model, tokenizer, PROMPTS * 3, max_new_tokens=8, temperature=5.0, seed=1))
    assert first != list(answers(model, tokenizer, PROMPTS * 3, max_new_tokens=8, temperature=5.0, seed=2))
    from finetune.generate import prompt_ids

    assert prompt_ids(tokenizer, "hi", raw=True) == tokenizer("hi")["input_ids"]
    assert len(prompt_ids(tokenizer, "hi")) > len(prompt_ids(tokenizer, "hi", raw=True))


@pytest.mark.slow
def test_command_line_answers_arguments_and_stdin_lines(trained):
    model, tokenizer = load(trained[0])
    expected = list(answers(model, tokenizer, PROMPTS, max_new_tokens=5))
    # prompts on both sides of a flag
    done = run_cli(python(), "-m", "finetune", "generate", str(trained[0]), PROMPTS[0], "--max-new-tokens", "5",
                   *PROMPTS[1:])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected
    import subprocess

    done = subprocess.run([python(), "-m", "finetune", "generate", str(trained[0]), "--max-new-tokens", "5"],
                          input=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected


def test_what_cannot_generate_is_refused_in_one_line(tmp_path: Path, trained, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "x"]) == 2
    assert "nothing: no such directory (expected a trained model" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "x"]) == 2
    assert "not a model directory (no config.json or adapter_config.json)" in capsys.readouterr().err
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    assert main(["generate", str(reward), "x"]) == 2
    assert "a reward model; it scores text and does not generate" in capsys.readouterr().err
    assert main(["generate", str(trained[0]), "x", "--max-new-tokens", "0"]) == 2
    assert "expected --max-new-tokens >= 1" in capsys.readouterr().err


def test_an_adapter_whose_base_cannot_be_loaded_is_named_in_one_line(tmp_path: Path, trained, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained[1], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/llama"}))
    for command in (["generate", str(adapter), "x"], ["merge", str(adapter), str(tmp_path / "merged")]):
        assert main(command) == 2
        assert "adapter: cannot load its base model 'someone/llama' (merge takes --base PATH)" in \
            capsys.readouterr().err


def test_an_unreachable_hub_puts_the_hub_libraries_offline(tmp_path: Path, trained, monkeypatch, request, capsys):
    """Without HF_HUB_OFFLINE, a base model that is not local would be looked up on the hub despite
    local_files_only (transformers looks for an adapter_config.json beside it), retrying for about 25 s."""
    import shutil
    import socket

    import huggingface_hub.constants

    from finetune import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as when imported online

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    hub.hub_reachable.cache_clear()
    request.addfinalizer(hub.hub_reachable.cache_clear)
    lookups, resolve = [], socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or resolve(host, *a, **k))
    adapter = tmp_path / "adapter"
    shutil.copytree(trained[1], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/llama"}))
    assert main(["generate", str(adapter), "x"]) == 2
    assert "cannot load its base model 'someone/llama'" in capsys.readouterr().err
    assert lookups == [] and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_template_variables_render_prompts_as_in_training(tmp_path: Path, capsys, monkeypatch):
    """A run with data.chat_template_kwargs: its in-memory result prompts with them, and so do `generate` and a
    merged adapter's, from the file exported beside the model, `--template-var` over it; variables that cannot
    reach the template are refused."""
    from test_data import THINK_TEMPLATE

    import finetune.generate
    from finetune.checkpoint import TEMPLATE_KWARGS
    from finetune.generate import prompt_ids
    from finetune.merge import merge_adapter

    off = {"enable_thinking": False}
    common = {"train.max_steps": 2, "train.eval_generate": 0, "data.eval": None, "log.progress": False,
              "log.tensorboard": False, "model.chat_template": THINK_TEMPLATE, "data.chat_template_kwargs": off}
    result = finetune.train(str(ROOT / "recipes/tiny_sft.yaml"), output_dir=str(tmp_path / "run"), **common)
    model, tokenizer = load(result.model_dir)
    assert result.chat_template_kwargs == off
    assert tokenizer.decode(prompt_ids(tokenizer, "x", kwargs=off)).endswith("assistant\n<think>\n\n</think>\n\n")
    rendered = []  # two steps leave answers of whitespace: the prompts' variables are what is compared
    monkeypatch.setattr(finetune.generate, "prompt_ids", lambda *a: rendered.append(a[3]) or prompt_ids(*a))
    expected = list(answers(model, tokenizer, PROMPTS, 4, kwargs=off))
    assert result.generate(*PROMPTS, max_new_tokens=4) == expected and rendered == [off] * 4
    assert main(["generate", str(result.model_dir), *PROMPTS, "--max-new-tokens", "4"]) == 0  # the saved ones
    assert capsys.readouterr().out.splitlines() == expected and rendered == [off] * 6
    assert main(["generate", str(result.model_dir), "x", "--max-new-tokens", "1",
                 "--template-var", "enable_thinking=true"]) == 0
    assert rendered[-1] == {"enable_thinking": True}
    capsys.readouterr()
    for flags, error in ((["--template-var", "enable_reasoning=false"],
                          "--template-var enable_reasoning: the chat template never reads enable_reasoning"),
                         (["--template-var", "enable_thinking"],
                          "--template-var 'enable_thinking': expected NAME=VALUE"),
                         (["--template-var", "tools=[]"], "--template-var tools: an argument of apply_chat_template"),
                         (["--raw", "--template-var", "enable_thinking=false"],
                          "--template-var: no chat template renders the prompt here")):
        assert main(["generate", str(result.model_dir), "x", *flags]) == 2
        assert error in capsys.readouterr().err
    assert main(["generate", str(result.model_dir), "x", "--raw", "--max-new-tokens", "1"]) == 0  # saved: unused

    adapter = finetune.train(str(ROOT / "recipes/tiny_sft.yaml"), output_dir=str(tmp_path / "lora"), **common,
                             **{"lora.enabled": True}).model_dir
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert json.loads((merged / TEMPLATE_KWARGS).read_text()) == json.loads((adapter / TEMPLATE_KWARGS).read_text())
