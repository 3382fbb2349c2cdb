"""`finetune score` and `Result.score`: a reward model's scores, encoded as in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT

import finetune
from finetune.builtin import preference_rows
from finetune.cli import main
from finetune.generate import load
from finetune.score import scores


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A reward model trained 40 steps of the tiny recipe, and a file of held-out pairs."""
    folder = tmp_path_factory.mktemp("score")
    held = folder / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in preference_rows("test")[:24]))
    run = finetune.train(str(ROOT / "recipes/tiny_rm.yaml"), output_dir=str(folder / "rm"), **{
        "train.max_steps": 40, "data.eval": str(held), "log.progress": False, "log.tensorboard": False})
    return run, held


def test_scores_of_held_out_pairs_average_to_the_runs_evaluation(reward_run):
    run, held = reward_run
    model, tokenizer = load(run.model_dir, reward=True)
    pairs = [json.loads(line) for line in held.read_text().splitlines()]
    got = [scores(model, tokenizer, p["chosen"][0]["content"], [p["chosen"][1]["content"],
                                                                 p["rejected"][1]["content"]]) for p in pairs]
    assert sum(c for c, _ in got) / len(got) == pytest.approx(run.metrics["eval_chosen_reward"], rel=1e-4)
    assert sum(r for _, r in got) / len(got) == pytest.approx(run.metrics["eval_rejected_reward"], rel=1e-4)
    assert sum(c > r for c, r in got) / len(got) == pytest.approx(run.metrics["eval_accuracy"])
    prompt, answers = pairs[0]["chosen"][0]["content"], [pairs[0]["chosen"][1]["content"], "no idea"]
    assert run.score(prompt, *answers) == pytest.approx(scores(model, tokenizer, prompt, answers), rel=1e-5)


def test_command_line_scores_and_refuses_a_language_model(reward_run, tiny_dir, capsys):
    run, _ = reward_run
    model, tokenizer = load(run.model_dir, reward=True)
    answers = ["rain key star fire", "rain key star fire rain"]
    assert main(["score", str(run.model_dir), "Reverse: fire star key rain", *answers]) == 0
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert printed == pytest.approx(scores(model, tokenizer, "Reverse: fire star key rain", answers), rel=1e-5)
    assert main(["score", str(tiny_dir), "x", "y"]) == 2
    assert "a language model, not a reward model; it generates and does not score" in capsys.readouterr().err
    assert main(["generate", str(run.model_dir), "x"]) == 2
    assert "a reward model; it scores text and does not generate (finetune score)" in capsys.readouterr().err
    assert main(["score", str(run.model_dir), "x", "y", "--template-var", "enable_thinking=false"]) == 2
    assert "--template-var enable_thinking: the chat template never reads enable_thinking" in capsys.readouterr().err


def test_template_variables_render_the_scored_pair_as_in_training(tiny_dir):
    from test_data import THINK_TEMPLATE
    from transformers import AutoTokenizer

    from finetune.pairs import encode_pair
    from finetune.score import response_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    # as SmolLM3's: the variable also shows in the system header, so that the scored tokens differ
    tokenizer.chat_template = "{% if enable_thinking is false %}/no_think\n{% endif %}" + THINK_TEMPLATE
    off = {"enable_thinking": False}
    turns = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    pair = encode_pair({"chosen": turns, "rejected": turns}, tokenizer, 64, 32, "x", off)
    assert response_ids(tokenizer, "2 + 3?", "5", kwargs=off) == pair["prompt"] + pair["chosen"]
    assert response_ids(tokenizer, "2 + 3?", "5") != pair["prompt"] + pair["chosen"]


def test_raw_scoring_is_a_pair_of_strings(reward_run, tmp_path: Path):
    from finetune.pairs import encode_pair
    from finetune.score import response_ids

    _, tokenizer = load(reward_run[0].model_dir, reward=True)
    pair = encode_pair({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}, tokenizer, 64, 32, "x")
    assert response_ids(tokenizer, "Q: 2+2?", " 4", raw=True) == pair["prompt"] + pair["chosen"]
    assert response_ids(tokenizer, "Q: 2+2?", " 4") != pair["prompt"] + pair["chosen"]  # a chat turn instead
