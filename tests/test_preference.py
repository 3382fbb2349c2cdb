"""Reward modeling and DPO on the one loop, and the preference data they read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import fused_spy, python, run_cli

import finetune
from finetune import attention
from finetune.builtin import preference_rows
from finetune.collate import pad
from finetune.errors import DataError, UserError
from finetune.losses import IGNORE_INDEX
from finetune.pairs import PairCollator, encode_pair, encode_pairs
from finetune.tracking import read_metrics

QUICK = ["log.progress=false", "log.tensorboard=false"]


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in preference_rows("train")[:96]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in preference_rows("test")[:16]))
    return train, evals


def pair_recipe(tmp_path: Path, pair_files, task: str, **sections) -> dict:
    train, evals = pair_files
    recipe = {"task": task, "output_dir": str(tmp_path), "seed": 0,
              "data": {"train": str(train), "eval": str(evals), "max_length": 48},
              "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1},
              "log": {"progress": False, "tensorboard": False}}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def perturbed(model: Any) -> Any:
    """`model` with seeded noise (std 0.05) added to every weight: a policy that moved away from the reference."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def losses(result) -> list[float]:
    return [e["loss"] for e in result.history if "loss" in e]


# ------------------------------------------------------------------ data


@pytest.fixture()
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_conversational_pair_shares_the_prompt(tok):
    row = preference_rows("train")[0]
    enc = encode_pair(row, tok, 64, 32, "x")
    assert tok.decode(enc["prompt"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc["chosen"]) == row["chosen"][1]["content"] + "<|im_end|>\n"
    assert tok.decode(enc["rejected"]) == row["rejected"][1]["content"] + "<|im_end|>\n"


def test_string_pairs_and_margin(tok):
    enc = encode_pair({"prompt": "Sort: 2 1", "chosen": " 1 2", "rejected": " 2 1", "margin": 2}, tok, 64, 32, "x")
    assert tok.decode(enc["chosen"]) == " 1 2<|im_end|>" and enc["margin"] == 2.0


def test_implicit_prompts_are_extracted_as_trl_does(tok):
    """Two common layouts TRL reads through `maybe_extract_prompt` (the oracle here): texts that begin with
    their prompt and no `prompt` field (Anthropic/hh-rlhf), and whole conversations beside a text `prompt`
    that repeats their first message (HuggingFaceH4/ultrafeedback_binarized). A text prompt before responses
    alone becomes the user's message."""
    from trl.data_utils import maybe_extract_prompt

    hh = {"chosen": "\n\nHuman: Sort: 2 1\n\nAssistant: 1 2", "rejected": "\n\nHuman: Sort: 2 1\n\nAssistant: 2 1"}
    question = [{"role": "user", "content": "Sort: 3 1 2"}]
    uf = {"prompt": "Sort: 3 1 2", "chosen": question + [{"role": "assistant", "content": "1 2 3"}],
          "rejected": question + [{"role": "assistant", "content": "3 2 1"}]}
    for row in (hh, uf):
        extracted = maybe_extract_prompt(row)
        assert extracted.get("prompt") != row.get("prompt")  # TRL did extract one
        assert encode_pair(row, tok, 64, 32, "x") == encode_pair(extracted, tok, 64, 32, "x")
    assert tok.decode(encode_pair(hh, tok, 64, 32, "x")["chosen"]) == " 1 2<|im_end|>"
    answers = {"prompt": uf["prompt"], "chosen": uf["chosen"][1:], "rejected": uf["rejected"][1:]}
    assert encode_pair(answers, tok, 64, 32, "x") == encode_pair(uf, tok, 64, 32, "x")


def test_conversational_pairs_render_their_tools(tok):
    """A pair's `tools` (JSON text or a list) reach the chat template, in the prompt both responses follow."""
    import copy

    tool_tok = copy.deepcopy(tok)
    tool_tok.chat_template = ("{% if tools %}tools: {{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
                              "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}")
    row = {"prompt": [{"role": "user", "content": "2 + 3?"}], "chosen": [{"role": "assistant", "content": "5"}],
           "rejected": [{"role": "assistant", "content": "6"}], "tools": json.dumps([{"name": "add"}])}
    enc = encode_pair(row, tool_tok, 64, 32, "x")
    assert tool_tok.decode(enc["prompt"]) == "tools: add\nuser: 2 + 3?\nassistant: "
    assert encode_pair({**row, "tools": [{"name": "add"}]}, tool_tok, 64, 32, "x") == enc
    assert tool_tok.decode(encode_pair({**row, "tools": None}, tool_tok, 64, 32, "x")["prompt"]) == \
        "user: 2 + 3?\nassistant: "


def test_llama_factory_sharegpt_pairs_are_conversational_pairs(tok):
    """LLaMA-Factory's ShareGPT preference rows (`conversations` so far, `chosen` and `rejected` one turn each, an
    optional `system` field) encode as the same pair in TRL's conversational layout."""
    trl_row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}],
               "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}
    factory = {"conversations": [{"from": "human", "value": "2 + 3?"}], "system": "Be brief.",
               "chosen": {"from": "gpt", "value": "5"}, "rejected": {"from": "gpt", "value": "6"}}
    assert encode_pair(factory, tok, 64, 32, "x") == encode_pair(trl_row, tok, 64, 32, "x")
    with pytest.raises(DataError, match=r"^x: expected 'chosen' to be one turn \{from, value\}, as 'conversations'"):
        encode_pair({**factory, "chosen": {"role": "assistant", "content": "5"}}, tok, 64, 32, "x")


def test_truncation_keeps_the_end_of_the_prompt(tok):
    prompt = "Reverse: " + " ".join(["cat"] * 30) + " dog"
    enc = encode_pair({"prompt": prompt, "chosen": " moon sun", "rejected": " sun"}, tok, 16, 8, "x")
    assert enc["truncated"] and len(enc["prompt"]) == 8
    assert tok.decode(enc["prompt"]).endswith(" dog")
    assert len(enc["prompt"]) + len(enc["chosen"]) <= 16


def test_pairs_with_empty_response_are_dropped_and_counted(tok, caplog):
    rows = [{"prompt": "q", "chosen": " a", "rejected": " b"}, {"prompt": "x " * 40, "chosen": "a", "rejected": "b"}]
    ds, stats = encode_pairs(rows, "mem", tok, 16, 16, progress=False)
    assert (stats.rows, stats.kept, stats.dropped_empty) == (2, 1, 1) and len(ds) == 1
    assert "mem: dropped 1 of 2 pairs whose response is empty after truncation (first: row 1)" in caplog.text


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "row 0: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": ["x"]}, "both strings or both message lists"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "expected 'prompt' to be a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' to be a number"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "share no leading prompt"),
    ({"chosen": "yes", "rejected": "no"}, "row 0: chosen and rejected share no leading text and there is no 'prompt'"),
])
def test_malformed_pairs_name_the_row(tok, row, message):
    with pytest.raises(DataError, match=message):
        encode_pairs([row], "pairs.jsonl", tok, 32, 16, progress=False)


@pytest.mark.parametrize("kind", ["conversational", "strings"])
def test_pair_tokens_match_trl_dpo_and_reward_trainers(tok, tiny_dir, tmp_path: Path, kind: str):
    """TRL as the oracle: DPOTrainer's prompt/chosen/rejected ids and RewardTrainer's whole-sequence ids of the
    same rows equal ours (conversational rows split their shared leading messages into the prompt)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    rows = preference_rows("train")[:24]
    if kind == "strings":
        rows = [{"prompt": r["chosen"][0]["content"], "chosen": " " + r["chosen"][1]["content"],
                 "rejected": " " + r["rejected"][1]["content"]} for r in rows]
    ours = [encode_pair(r, tok, 1024, 512, f"row {i}") for i, r in enumerate(rows)]
    common = dict(report_to="none", bf16=False, max_length=None)
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
                     train_dataset=datasets.Dataset.from_list(rows))
    assert dpo.train_dataset["prompt_ids"] == [p["prompt"] for p in ours]
    assert dpo.train_dataset["chosen_ids"] == [p["chosen"] for p in ours]
    assert dpo.train_dataset["rejected_ids"] == [p["rejected"] for p in ours]
    rm = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1),
                       processing_class=tok, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                       train_dataset=datasets.Dataset.from_list(rows))
    assert rm.train_dataset["chosen_ids"] == [p["prompt"] + p["chosen"] for p in ours]
    assert rm.train_dataset["rejected_ids"] == [p["prompt"] + p["rejected"] for p in ours]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "sigmoid+bco_pair+ipo"])
@pytest.mark.parametrize("layout", ["padded", "packed", "packed-shared-prompt"])
def test_dpo_loss_of_a_real_model_matches_trl(tok, tiny_dir, tmp_path: Path, loss_type: str, layout: str):
    """TRL as the oracle end to end: DPOTrainer.compute_loss of a perturbed policy against the initial model on
    8 pairs equals our DPO task's loss on the same pairs (log-probs, prompt masking, IPO's length averaging, a
    weighted list of losses), however our batch is laid out."""
    import copy

    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from finetune.config import DPOConfig as OurDPOConfig
    from finetune.tasks.dpo import DPOTask

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    policy = perturbed(copy.deepcopy(ref))
    rows = preference_rows("train")[:8]
    kinds = loss_type.split("+")
    weights = [0.8, 0.2, 0.5] if len(kinds) > 1 else None
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_length=None, beta=0.1,
                     loss_type=kinds, loss_weights=weights, per_device_eval_batch_size=8)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))

    task = DPOTask()
    task.cfg = OurDPOConfig(beta=0.1, loss_type=kinds if weights else loss_type, loss_weights=weights)
    task.keep_logits = True
    task.ref_model = ref
    if layout == "packed-shared-prompt":  # the prompt runs once per pair: needs sdpa_varlen
        attention.register()
        varlen = {"attn_implementation": attention.NAME}
        task.ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir, **varlen).eval()
        moved = policy.state_dict()
        policy = AutoModelForCausalLM.from_pretrained(tiny_dir, **varlen)
        policy.load_state_dict(moved)
    collate = PairCollator(tok.pad_token_id, packed=layout != "padded", share_prompt=layout.endswith("prompt"))
    pairs = [dict(encode_pair(r, tok, 1024, 512, f"row {i}"), uid=i) for i, r in enumerate(rows)]
    with torch.no_grad():
        ours = task.loss(policy, collate(pairs)).loss_sum / len(pairs)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert abs(theirs.item() - {"sigmoid": 0.6931, "ipo": 25.0}.get(loss_type, 0.0)) > 1e-3  # the policy moved


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_orpo_loss_of_a_real_model_matches_trl(tok, tiny_dir, packed: bool):
    """TRL's ORPOTrainer as the oracle, on our tokens (its own tokenizer appends a second end token after the chat
    template's): its odds-ratio term and length-averaged log-probs of a perturbed model on 8 pairs equal ours.
    Its supervised term averages over the batch's chosen tokens, ours pair by pair, as our -logp_c per token:
    so the loss minus the logged nll is compared, and our nll against the per-pair mean computed here."""
    import os

    import datasets
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from finetune.config import DPOConfig as OurDPOConfig
    from finetune.tasks.dpo import DPOTask

    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_dir))
    rows = preference_rows("train")[:8]
    pairs = [dict(encode_pair(r, tok, 1024, 512, f"row {i}"), uid=i) for i, r in enumerate(rows)]
    width = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((8, width), tok.pad_token_id)
        labels = torch.full((8, width), IGNORE_INDEX)
        for i, p in enumerate(pairs):
            n, m = len(p["prompt"]), len(p[side])
            ids[i, :n + m] = torch.tensor(p["prompt"] + p[side])
            labels[i, n:n + m] = torch.tensor(p[side])
        lengths = torch.tensor([len(p["prompt"]) + len(p[side]) for p in pairs])
        batch |= {f"{side}_input_ids": ids, f"{side}_labels": labels,
                  f"{side}_attention_mask": (torch.arange(width) < lengths[:, None]).long()}
    args = ORPOConfig(output_dir="/tmp/finetune-orpo-oracle", report_to="none", bf16=False, beta=0.1)
    trainer = ORPOTrainer(model=policy, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(rows))
    with torch.no_grad():
        theirs, their_metrics = trainer.get_batch_loss_metrics(policy, batch, train_eval="eval")

    task = DPOTask()
    task.cfg, task.keep_logits = OurDPOConfig(beta=0.1, loss_type="orpo"), True
    collate = PairCollator(tok.pad_token_id, packed=packed)
    with torch.no_grad():
        out = task.loss(policy, collate(pairs))
    ours, nll = out.loss_sum / 8, out.metric_sums["nll"] / 8
    assert (ours - nll).item() == pytest.approx(theirs.item() - their_metrics["eval_nll_loss"], rel=1e-4)
    assert out.metric_sums["logps/chosen"].item() / 8 == pytest.approx(their_metrics["eval_logps/chosen"], rel=1e-5)
    assert out.metric_sums["logps/rejected"].item() / 8 == pytest.approx(their_metrics["eval_logps/rejected"],
                                                                         rel=1e-5)
    assert out.metric_sums["rewards/chosen"].item() / 8 == pytest.approx(their_metrics["eval_rewards/chosen"],
                                                                         rel=1e-5)
    assert nll.item() == pytest.approx(-out.metric_sums["logps/chosen"].item() / 8, rel=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kto_loss_of_a_real_model_matches_trl(tok, tiny_dir, tmp_path: Path, packed: bool):
    """TRL's KTOTrainer as the oracle on our tokens: 8 preference pairs unpaired into 16 rows, each with the
    completion of the row before as its KL completion. The reference is a perturbed model and the policy a
    flatter copy of it, so that mismatched completions get likelier and KTO's reference point (the KL
    estimate, clamped at 0) is above 0 and counts; then the other way round, where it is clamped."""
    import copy

    import datasets
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from finetune.config import DPOConfig as OurDPOConfig
    from finetune.pairs import encode_kto_rows
    from finetune.tasks.dpo import DPOTask

    g = torch.Generator().manual_seed(0)
    sharp = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in sharp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    flat = copy.deepcopy(sharp)
    with torch.no_grad():
        flat.lm_head.weight.mul_(0.3)
    items = list(encode_kto_rows(preference_rows("train")[:8], "x", tok, 1024, 512, progress=False))
    batch = {"label": torch.tensor([bool(r["label"]) for r in items])}
    for key, name in (("chosen", ""), ("rejected", "KL_")):  # TRL's names: the completion and the KL one
        lengths = torch.tensor([len(r["prompt"]) + len(r[key]) for r in items])
        starts = torch.tensor([len(r["prompt"]) for r in items])
        width = torch.arange(int(lengths.max()))
        batch[f"{name}input_ids"] = pad([r["prompt"] + r[key] for r in items], tok.pad_token_id)
        batch[f"{name}attention_mask"] = (width < lengths[:, None]).long()
        batch[f"{name}completion_mask"] = ((width >= starts[:, None]) & (width < lengths[:, None])).long()
    args = KTOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, beta=0.1, gradient_checkpointing=False,
                     desirable_weight=1.0, undesirable_weight=1.5)
    kls = []
    for policy, ref in ((flat, sharp), (sharp, flat)):  # then the other way round: the KL is clamped to 0
        policy.train(), ref.eval()  # TRL files its metrics under the policy's mode
        trainer = KTOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=datasets.
                             Dataset.from_list([{"prompt": "a", "completion": "b", "label": True}]))
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, batch)
        kls.append(trainer._metrics["train"]["kl"][-1])

        task = DPOTask()
        task.cfg = OurDPOConfig(beta=0.1, loss_type="kto", undesirable_weight=1.5)
        task.keep_logits, task.ref_model = True, ref
        with torch.no_grad():
            out = task.loss(policy, PairCollator(tok.pad_token_id, packed=packed)(items))
        assert (out.metric_sums["kl"] / len(items)).item() == pytest.approx(kls[-1], rel=1e-5)
        assert (out.loss_sum / len(items)).item() == pytest.approx(theirs.item(), rel=1e-5)
    assert kls[0] > 1 and kls[1] == 0  # the reference point counts, and is clamped


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kto_runs_mismatched_completions_without_gradients(tok, tiny_dir, packed: bool):
    """KTO's reference point is not differentiated, so the mismatched completions run in a forward of their own
    without gradients: the forward with gradients sees only the rows' completions, and the gradients equal
    those of one forward over both (with a reference point above 0, so that it counts in the loss)."""
    import copy

    from transformers import AutoModelForCausalLM

    from finetune.config import DPOConfig as OurDPOConfig
    from finetune.pairs import encode_kto_rows
    from finetune.tasks.dpo import DPOTask

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        policy.lm_head.weight.mul_(0.3)  # flatter: the mismatched completions get likelier, the KL is above 0
    items = list(encode_kto_rows(preference_rows("train")[:6], "x", tok, 1024, 512, progress=False))
    batch = PairCollator(tok.pad_token_id, packed=packed)(items)
    completion_tokens = sum(len(r["prompt"]) + len(r["chosen"]) for r in items)
    seen = []
    policy.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), int((args[0] != tok.pad_token_id).sum()))))
    task = DPOTask()
    task.cfg = OurDPOConfig(beta=0.1, loss_type="kto")
    task.keep_logits, task.ref_model = True, ref

    out = task.loss(policy, batch)
    out.loss_sum.backward()
    assert [tokens for grad, tokens in seen if grad] == [completion_tokens]
    assert out.metric_sums["kl"].item() > 0
    split = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    one_forward = task.unpaired_loss(task.pair_logps(policy, batch, None), task.reference_logps(policy, batch),
                                     batch["label"])
    one_forward.loss_sum.backward()
    assert one_forward.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)
    for a, p in zip(split, policy.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_kto_rows_and_pairs_become_completions_with_a_mismatched_one(tok, tmp_path: Path, caplog):
    """Unpaired rows keep their order; pairs are unpaired chosen-first, so that no KL completion answers its
    own prompt; each row's KL completion is the one before it (cyclically); labels must be booleans."""
    from finetune.pairs import encode_kto_rows

    pairs = preference_rows("train")[:3]
    items = list(encode_kto_rows(pairs, "p", tok, 1024, 512, progress=False))
    encoded = [encode_pair(r, tok, 1024, 512, "x") for r in pairs]
    assert [r["chosen"] for r in items] == [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    assert [r["label"] for r in items] == [True] * 3 + [False] * 3
    assert [r["rejected"] for r in items] == [items[i - 1]["chosen"] for i in range(6)]
    assert all(r["prompt"] != items[i - 1]["prompt"] for i, r in enumerate(items))
    unpaired = [{"prompt": "What is 1 + 1?", "completion": "2", "label": True},
                {"prompt": "What is 2 + 2?", "completion": "5", "label": False}]
    rows = list(encode_kto_rows(unpaired, "u", tok, 1024, 512, progress=False))
    assert [r["label"] for r in rows] == [True, False] and rows[0]["rejected"] == rows[1]["chosen"]
    long = {"prompt": "x " * 40, "completion": "a", "label": False}  # nothing left of the completion at 16 tokens
    assert len(encode_kto_rows([unpaired[0], long], "u", tok, 16, 16, progress=False)) == 1
    assert "u: dropped 1 completions that are empty after truncation (first: row 1)" in caplog.text
    with pytest.raises(DataError, match=r"^u: row 1: expected 'label' to be true or false .*got 'no'"):
        encode_kto_rows([unpaired[0], {**unpaired[1], "label": "no"}], "u", tok, 1024, 512, progress=False)
    with pytest.raises(DataError, match=r"^u: row 1: expected a 'prompt' beside the completion"):
        encode_kto_rows([unpaired[0], {"completion": "3", "label": True}], "u", tok, 1024, 512, progress=False)
    with pytest.raises(DataError, match=r"^u: row 0: expected prompt, completion and label \(or a preference"):
        encode_kto_rows([{"prompt": "a", "answer": "b"}], "u", tok, 1024, 512, progress=False)


def test_an_unpaired_completion_is_tokenized_once(tok, monkeypatch):
    """KTO's unpaired rows go through the pair encoder with their completion on both sides; it is rendered and
    tokenized once (the prompt, plus the prompt with the completion), for text and for messages alike."""
    from finetune.pairs import encode_kto_rows

    rendered, tokenized = [], []
    render, call = tok.apply_chat_template, type(tok).__call__
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: rendered.append(1) or render(*a, **k))
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: tokenized.append(1) or call(self, *a, **k))
    chat = {"prompt": [{"role": "user", "content": "2 + 3?"}], "completion": [{"role": "assistant", "content": "5"}],
            "label": True}
    [row] = encode_kto_rows([chat], "u", tok, 64, 32, progress=False)
    assert len(rendered) == 2 and tok.decode(row["chosen"]) == "5<|im_end|>\n" and row["rejected"] == row["chosen"]
    tokenized.clear()
    encode_kto_rows([{"prompt": "2 + 3 =", "completion": " 5", "label": True}], "u", tok, 64, 32, progress=False)
    assert len(tokenized) == 2  # the prompt, the completion


def test_kto_trains_on_preference_pairs(tmp_path: Path, pair_files):
    """`dpo.loss_type: kto` on the builtin pairs (unpaired): at step 0 (policy = reference) every completion's
    loss is 1 - sigmoid(0) = 1/2 and no reward moved; after 6 steps the held-out desirable completions gained
    on the undesirable ones (0.012 measured; with the labels ignored it would stay near 0, inverted below).
    The held-out loss itself hardly moves here: the KL reference point grows as fast (0 -> 1.7)."""
    run = finetune.train(pair_recipe(tmp_path, pair_files, "dpo", dpo={"loss_type": "kto"},
                                     train={"max_steps": 6}))
    evals = [e for e in run.history if "eval_loss" in e]
    assert evals[0]["eval_loss"] == pytest.approx(0.5) and evals[0]["eval_rewards/margin"] == 0
    assert evals[-1]["eval_rewards/margin"] > 0.005 and evals[-1]["eval_kl"] > 0
    assert {"eval_rewards", "eval_logps"} <= set(run.metrics)


def test_orpo_trains_without_any_reference(tmp_path: Path, pair_files, monkeypatch):
    """Reference-free: no frozen copy of the model and no reference log-probs, also with LoRA (whose reference
    would be the adapter switched off), and the loss goes down."""
    from finetune.tasks import dpo

    def fail(*args, **kwargs):
        raise AssertionError("a reference was used")

    monkeypatch.setattr(dpo, "copy", SimpleNamespace(deepcopy=fail))  # the task's frozen copy, not anyone's
    monkeypatch.setattr(dpo.DPOTask, "reference_logps", fail)
    for lora in (False, True):
        run = finetune.train(pair_recipe(tmp_path / str(lora), pair_files, "dpo", dpo={"loss_type": "orpo"},
                                         lora={"enabled": lora}, train={"max_steps": 6}))
        evals = [e["eval_loss"] for e in run.history if "eval_loss" in e]
        assert evals[-1] < evals[0], evals


@pytest.mark.parametrize("center", [0.0, 0.01])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_reward_loss_of_a_real_model_matches_trl(tok, tiny_dir, tmp_path: Path, packed: bool, center: float):
    """TRL as the oracle end to end: RewardTrainer.compute_loss of a reward model with a random head on 8 pairs
    equals our reward task's loss (with and without reward centring), padded or packed."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from finetune.tasks.rm import RewardModelTask

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    rows = preference_rows("train")[:8]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_length=None,
                        per_device_eval_batch_size=8, center_rewards_coefficient=center or None)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(rows))
    with torch.no_grad():
        theirs = trainer.compute_loss(model, next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))

    task = RewardModelTask()
    task.center = center
    task.prepare(SimpleNamespace(data=SimpleNamespace(packing=packed)), None, model)
    pairs = [dict(encode_pair(r, tok, 1024, 512, f"row {i}"), uid=i) for i, r in enumerate(rows)]
    with torch.no_grad():
        ours = task.loss(model, PairCollator(tok.pad_token_id, packed=packed)(pairs)).loss_sum / len(pairs)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert abs(theirs.item() - 0.6931) > 1e-3  # the random head tells the pairs apart a little


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_packed_reward_model_runs_its_last_mlp_only_where_scores_are_read(tok, tiny_dir, monkeypatch,
                                                                          checkpointing: bool):
    """Packed, the last decoder layer's MLP runs on each sequence's last token alone (2 per pair, not the row's
    every token): the loss and every gradient are those of the whole MLP, with gradient checkpointing too (the
    layer runs again in backward); `finish` gives the model back its own forward and no hook."""
    from transformers import AutoModelForSequenceClassification

    from finetune.tasks.rm import RewardModelTask, last_mlp

    attention.register()
    rows = preference_rows("train")[:6]
    pairs = [dict(encode_pair(r, tok, 1024, 512, f"row {i}"), uid=i) for i, r in enumerate(rows)]
    batch = PairCollator(tok.pad_token_id, packed=True, share_prompt=True)(pairs)

    def run(scored_mlp):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1,
                                                                   attn_implementation="sdpa_varlen")
        model.config.pad_token_id = tok.pad_token_id
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        rows, down = [], last_mlp(model).down_proj
        forward = down.forward  # wrapped, not hooked: checkpointing's recompute runs no module hooks
        down.forward = lambda x: (rows.append(x.shape[-2]), forward(x))[1]
        task = RewardModelTask()
        task.center = 0.0
        if not scored_mlp:
            monkeypatch.setattr(task, "scored_mlp", lambda mlp: setattr(task, "mlp", None))
        task.prepare(SimpleNamespace(data=SimpleNamespace(packing=True)), None, model)
        loss = task.loss(model, batch).loss_sum
        loss.backward()
        task.finish(model)
        return model, loss.detach(), rows

    whole, whole_loss, whole_rows = run(scored_mlp=False)
    model, loss, rows = run(scored_mlp=True)
    tokens = batch["input_ids"].shape[1]
    assert whole_rows == [tokens] * (1 + checkpointing)
    assert rows == [2 * len(pairs)] * (1 + checkpointing) and 2 * len(pairs) < tokens
    torch.testing.assert_close(loss, whole_loss)
    for (name, p), q in zip(model.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "forward" not in vars(last_mlp(model)) and not model.score._forward_hooks


def test_a_last_block_that_is_no_plain_mlp_runs_whole():
    """A block returning more than a tensor (a mixture of experts with its router logits) is run over every
    token, as the model would, and keeps its own forward from then on."""
    from finetune.tasks.rm import RewardModelTask

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x), torch.zeros(x.shape[:-1])

    block, task = Experts(), RewardModelTask()
    task.scored_mlp(block)
    task.scored, task.row_length = torch.tensor([1, 3]), 5
    x = torch.randn(1, 5, 4)
    out, router = block(x)
    torch.testing.assert_close(out, block.linear(x))
    assert router.shape == (1, 5) and "forward" not in vars(block)
    task.finish(None)


def test_collator_masks_prompts_and_stacks_chosen_first(tok):
    rows = [encode_pair(r, tok, 64, 32, "x") | {"uid": i} for i, r in enumerate(preference_rows("train")[:3])]
    batch = PairCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape[0] == 6 and batch["num_items"].item() == 3
    first = rows[0]
    labels = batch["labels"][0].tolist()
    assert labels[:len(first["prompt"])] == [IGNORE_INDEX] * len(first["prompt"])
    assert batch["input_ids"][3, :len(first["prompt"])].tolist() == first["prompt"]  # rejected of pair 0


# ------------------------------------------------------------------ reward model


def test_rm_trains_exports_and_scores(tmp_path: Path, pair_files):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = finetune.train(pair_recipe(tmp_path, pair_files, "rm"))
    evals = [e for e in result.history if "eval_loss" in e]
    assert {"eval_accuracy", "eval_margin", "eval_chosen_reward", "eval_rejected_reward"} <= evals[-1].keys()
    assert evals[0]["eval_loss"] == pytest.approx(0.693, abs=0.05)  # untrained head: about ln 2
    loaded = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    enc = tok(["<|im_start|>user\nSort: 2 1<|im_end|>\n<|im_start|>assistant\n1 2<|im_end|>\n"], return_tensors="pt")
    result.model.eval()
    torch.testing.assert_close(loaded(**enc).logits, result.model(**enc).logits)
    assert loaded(**enc).logits.shape == (1, 1)


def test_reward_model_load_reports_the_new_head_in_one_line_and_warns_of_a_missing_body_weight(
        tok, tiny_dir, tmp_path: Path, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from finetune.config import ModelConfig
    from finetune.model import load_model

    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    assert any("LOAD REPORT" in r.getMessage() for r in caplog.records)  # what transformers alone says: a table
    caplog.clear()
    with caplog.at_level("INFO"):
        load_model(ModelConfig(name_or_path=str(tiny_dir)), tok, torch.device("cpu"), "seq_cls")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= 20] == [
        ("INFO", f"reward head score.weight: new, initialised at random ({tiny_dir} has none)")]

    # a checkpoint that lacks a weight of the model's body: that is still warned about
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level("INFO", logger="finetune"):
        load_model(ModelConfig(name_or_path=str(broken)), tok, torch.device("cpu"), "seq_cls")
    assert ("WARNING", f"{broken}: 1 weight missing (initialised at random): model.layers.0.mlp.up_proj.weight") \
        in [(r.levelname, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("task", ["rm", "dpo"])
def test_lora_dropout_resume_is_exact(tmp_path: Path, pair_files, task: str):
    """Packed pairs, bf16, LoRA with dropout (every step draws random numbers; DPO's reference runs with the
    adapter off): a run resumed from its step-2 checkpoint logs the uninterrupted run's losses."""
    sections = dict(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}, data={"packing": True},
                    train={"max_steps": 4, "save_every": 2, "eval_every": 2, "mixed_precision": "bf16"})
    full = finetune.train(pair_recipe(tmp_path / "full", pair_files, task, **sections))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000002",
                    tmp_path / "resumed" / "checkpoints" / "step-0000002")
    resumed = finetune.train(pair_recipe(tmp_path / "resumed", pair_files, task, **sections))
    assert "loss" in resumed.history[0] and resumed.history[0]["step"] == 3
    assert losses(resumed) == losses(full)[2:]
    assert resumed.metrics["eval_loss"] == full.metrics["eval_loss"]


def test_rm_lora_adapter_reloads_and_merges(tmp_path: Path, pair_files, tiny_dir, caplog):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune.cli import main

    result = finetune.train(pair_recipe(tmp_path, pair_files, "rm", lora={"enabled": True, "r": 4}))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    base.config.pad_token_id = 0
    reloaded = PeftModel.from_pretrained(base, result.model_dir).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    result.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)
    caplog.clear()
    assert main(["merge", str(result.model_dir), str(tmp_path / "merged")]) == 0
    # the base has no reward head, the adapter brings it: transformers' MISSING table would only mislead
    assert not any("LOAD REPORT" in r.getMessage() for r in caplog.records)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["rm", "dpo"])
def test_pair_accumulation_4x2_equals_1x8(tmp_path: Path, pair_files, task: str):
    one = finetune.train(pair_recipe(tmp_path / "a", pair_files, task, train={"batch_size": 8, "grad_accum": 1}))
    four = finetune.train(pair_recipe(tmp_path / "b", pair_files, task, train={"batch_size": 2, "grad_accum": 4}))
    a = [e for e in one.history if "loss" in e]
    b = [e for e in four.history if "loss" in e]
    # The first step shows a normalisation error in full (a wrong one is off by a factor); later ones also carry
    # float32 summation-order noise that Adam's first steps amplify: the reward model's third loss differed by
    # 1.3e-5 relative on an Intel Xeon (its GEMMs block batches of 8 and 2 differently), by less on AMD EPYC.
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6 if i == 0 else 1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5 if i == 0 else 1e-3)
        assert x["accuracy"] == pytest.approx(y["accuracy"])


# ------------------------------------------------------------------ DPO


@pytest.mark.parametrize("fraction", [None, 1.5, 0.5], ids=["one-file", "fraction-1.5", "fraction-0.5"])
def test_dpo_precomputed_reference_equals_frozen_copy(tmp_path: Path, pair_files, fraction: float | None):
    """Also when a mixture repeats pairs (their reference log-probs are computed once, under their one uid) or
    leaves some out (the held-out pairs' uids still follow every train pair's)."""
    data = {"train": {str(pair_files[0]): fraction}} if fraction else {}
    frozen = finetune.train(pair_recipe(tmp_path / "f", pair_files, "dpo", data=data))
    pre = finetune.train(pair_recipe(tmp_path / "p", pair_files, "dpo", data=data,
                                     dpo={"precompute_ref_logps": True}))
    assert losses(frozen) == pytest.approx(losses(pre), rel=1e-5)
    assert pre.metrics["eval_rewards/margin"] == pytest.approx(frozen.metrics["eval_rewards/margin"], rel=1e-4)
    assert losses(frozen)[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: ln 2
    cached = list((tmp_path / "p" / "ref_logps").glob("*.safetensors"))
    assert len(cached) == 1
    again = finetune.train(pair_recipe(tmp_path / "p", pair_files, "dpo", data=data,
                                       dpo={"precompute_ref_logps": True}), resume=False, overwrite_output_dir=True)
    assert losses(again) == losses(pre)  # from the cache


def test_dpo_precomputes_reference_log_probs_in_batches_of_eval_batch_size(tmp_path: Path, pair_files,
                                                                         monkeypatch):
    from finetune.tasks.dpo import DPOTask

    real, sizes = DPOTask.reference_logps, []

    def spy(self, model, batch):
        if "ref_logps" not in batch:
            sizes.append(len(batch["uid"]))
        return real(self, model, batch)

    monkeypatch.setattr(DPOTask, "reference_logps", spy)
    default = finetune.train(pair_recipe(tmp_path / "a", pair_files, "dpo", dpo={"precompute_ref_logps": True}))
    assert sizes == [8] * 14  # 96 train and 16 held-out pairs, in batches of train.batch_size
    sizes.clear()
    big = finetune.train(pair_recipe(tmp_path / "b", pair_files, "dpo", dpo={"precompute_ref_logps": True},
                                     train={"eval_batch_size": 32}))
    assert sizes == [32, 32, 32, 16]
    assert losses(big) == pytest.approx(losses(default), rel=1e-5)

    def too_big(self, model, batch):  # as on a GPU, where the reference pass may not fit when training does
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DPOTask, "reference_logps", too_big)
    with pytest.raises(UserError, match=r"^reference log-probs: out of GPU memory on a batch of 32 pairs; lower "
                                        r"train.eval_batch_size \(now 32 rows\)$"):
        finetune.train(pair_recipe(tmp_path / "c", pair_files, "dpo", dpo={"precompute_ref_logps": True},
                                   train={"eval_batch_size": 32}))


def test_dpo_lora_reference_is_the_base_model_with_one_copy(tmp_path: Path, pair_files, tiny_dir):
    """With LoRA the reference pass runs the policy with its adapter disabled: after training, reference log-probs
    equal those of the base model loaded from disk, while the policy's differ; and no second model is held."""
    from transformers import AutoModelForCausalLM

    from finetune.losses import sequence_logps
    from finetune.tasks.dpo import DPOTask

    result = finetune.train(pair_recipe(tmp_path, pair_files, "dpo", lora={"enabled": True, "r": 4},
                                        train={"lr": 1e-2}))
    task = DPOTask()
    task.lora, task.ref_model = True, None
    tok = _tok(tiny_dir)
    rows = [encode_pair(r, tok, 48, 24, "x") | {"uid": i} for i, r in enumerate(preference_rows("test")[:4])]
    batch = PairCollator(0)(rows)
    policy = result.model.cpu().eval()
    ref = task.reference_logps(policy, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = sequence_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"]).view(2, -1).T
        trained = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"]).view(2, -1).T
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(trained, expected, atol=1e-3)
    # one model: the task built for a LoRA run keeps no reference copy
    from types import SimpleNamespace

    from finetune.config import load_recipe

    recipe = load_recipe(pair_recipe(tmp_path / "x", pair_files, "dpo", lora={"enabled": True, "r": 4}))
    built = DPOTask()
    model = built.build_model(recipe, SimpleNamespace(device=torch.device("cpu")), _tok(tiny_dir))
    assert built.ref_model is None
    assert sum(1 for m in model.modules() if type(m).__name__ == "LlamaForCausalLM") == 1


def _tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------ end to end, in a subprocess


@pytest.mark.slow
@pytest.mark.parametrize("task", ["rm", "dpo"])
def test_tiny_preference_recipes_end_to_end(tmp_path: Path, task: str):
    proc = run_cli(python(), "-m", "finetune", task, f"recipes/tiny_{task}.yaml", f"output_dir={tmp_path}",
                   "train.max_steps=30", "train.eval_every=30", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [e for e in read_metrics(tmp_path / "metrics.jsonl") if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 30]
    # the README's figures (0.99-1.0 by step 50); measured at step 30: rm 0.52 -> 0.985, dpo 0 -> 0.995
    assert evals[-1]["eval_accuracy"] >= 0.9 > evals[0]["eval_accuracy"], evals
    assert (tmp_path / "model" / "config.json").is_file()


# ------------------------------------------------------------------ packed pairs


def test_packed_pair_collator_numbers_sequences(tok):
    rows = [{"prompt": [1, 2], "chosen": [3, 4], "rejected": [5], "margin": 0.0, "uid": 0},
            {"prompt": [6], "chosen": [7], "rejected": [8, 9, 10], "margin": 1.0, "uid": 1}]
    t = IGNORE_INDEX
    b = PairCollator(tok.pad_token_id, packed=True)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 5, 6, 7, 6, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 2, 1, 1, 3, 3, 3, 3]]  # chosen 0..B-1, rejected B..
    assert b["sequence_ends"].tolist() == [3, 8, 6, 12]
    assert b["labels"].tolist() == [[t, t, 3, 4, t, t, 5, t, 7, t, 8, 9, 10]]
    assert b["num_tokens"] == 13 and b["num_items"] == 2
    # shared prompt: `prompt + chosen`, then `last prompt token + rejected` continuing the prompt's positions
    s = PairCollator(tok.pad_token_id, packed=True, share_prompt=True)(rows)
    assert s["input_ids"].tolist() == [[1, 2, 3, 4, 2, 5, 6, 7, 6, 8, 9, 10]]
    assert s["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert s["segment_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 1, 1, 3, 3, 3, 3]]
    assert s["sequence_ends"].tolist() == [3, 7, 5, 11]
    assert s["labels"].tolist() == [[t, t, 3, 4, t, 5, t, 7, t, 8, 9, 10]]
    assert s["num_tokens"] == 13  # what the pairs hold, not the shorter row
    assert attention.sequence_bounds(s["position_ids"]) == [[(0, 4, 0, 0), (4, 6, 0, 1), (6, 8, 6, 6),
                                                              (8, 12, 8, 8)]]  # a 1-token prompt: a new root


@pytest.mark.parametrize("window", [False, True], ids=["full", "sliding-window"])
def test_shared_prompt_attention_equals_separate_sequences(tiny_dir, windowed_dir, tok, window: bool):
    """Each pair's chosen and rejected hidden states with the prompt shared equal those of the sequences alone;
    with a sliding window of 8 positions too, which the rejected answer's view of the shared prompt obeys."""
    from transformers import AutoModelForCausalLM

    attention.register()
    folder = windowed_dir if window else tiny_dir
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa_varlen").eval()
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()  # transformers' masks
    rows = encode_pairs(preference_rows("train")[:3], "x", tok, 64, 32, False)[0]
    rows = [rows[i] for i in range(3)]
    b = PairCollator(tok.pad_token_id, packed=True, share_prompt=True)(rows)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
        for i, r in enumerate(rows):
            for side, segment in (("chosen", i), ("rejected", len(rows) + i)):
                alone = ref(input_ids=torch.tensor([r["prompt"] + r[side]])).logits[0]
                where = (b["segment_ids"][0] == segment).nonzero().flatten()
                n = len(where)  # the sequence's last n tokens (the shared prompt lives in the chosen segment)
                torch.testing.assert_close(out[where], alone[-n:], rtol=1e-5, atol=1e-5)


def test_sequence_logps_of_packed_segments_equal_rows():
    from finetune.losses import sequence_lengths, sequence_logps

    torch.manual_seed(0)
    rows = [torch.randint(0, 11, (n,)) for n in (5, 3, 7)]
    logits = [torch.randn(len(r), 11) for r in rows]
    labels = [torch.cat([torch.tensor([IGNORE_INDEX] * 2), r[2:]]) for r in rows]
    packed_logits, packed_labels = torch.cat(logits)[None], torch.cat(labels)[None]
    segments = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])[None]
    for i, (lg, lb) in enumerate(zip(logits, labels, strict=True)):
        for average in (False, True):
            alone = sequence_logps(lg[None], lb[None], average=average)
            packed = sequence_logps(packed_logits, packed_labels, average=average, segment_ids=segments)
            torch.testing.assert_close(packed[i], alone[0])
    assert sequence_lengths(packed_labels, segment_ids=segments).tolist() == [3, 1, 5]
    assert sequence_lengths(torch.stack([labels[0], labels[0]])).tolist() == [3, 3]


@pytest.mark.parametrize("task,sections", [
    ("rm", {}),
    ("rm", {"lora": {"enabled": True, "r": 4, "dropout": 0.0}}),  # dropout masks depend on the batch shape
    ("dpo", {"lora": {"enabled": True, "r": 4, "dropout": 0.0}}),
    ("dpo", {"dpo": {"precompute_ref_logps": True}}),
    ("dpo", {"dpo": {"loss_type": "ipo"}}),
    ("dpo", {"model": {"attn_implementation": "eager"}}),  # packed without a shared prompt
], ids=["rm", "rm-lora", "dpo-lora", "dpo-precompute", "dpo-ipo-frozen-ref", "dpo-eager"])
def test_packed_pairs_train_like_padded(tmp_path: Path, pair_files, task: str, sections: dict):
    """Packed pairs (one row; the prompt shared under sdpa_varlen) give the padded batches' eval metrics before
    training and the same losses and gradient norms while training (later steps drift by float rounding
    amplified by Adam)."""
    padded = finetune.train(pair_recipe(tmp_path / "a", pair_files, task, **sections))
    packed = finetune.train(pair_recipe(tmp_path / "b", pair_files, task, **sections,
                                        data={"packing": True}))
    first_a, first_b = padded.history[0], packed.history[0]
    assert first_a["step"] == 0 and "eval_loss" in first_a
    for key, value in first_a.items():
        if key.startswith("eval_") and key != "eval_runtime":
            assert first_b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    a = [e for e in padded.history if "loss" in e]
    b = [e for e in packed.history if "loss" in e]
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-4)
    assert [e["grad_norm"] for e in b] == pytest.approx([e["grad_norm"] for e in a], rel=1e-3)
    assert packed.metrics["eval_loss"] == pytest.approx(padded.metrics["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("sections", [
    {"lora": {"enabled": True, "r": 4, "dropout": 0.0}},
    {"train": {"mixed_precision": "bf16"}},
    {"data": {"packing": True}, "dpo": {"loss_type": "ipo"}},
], ids=["lora-adapter-off-reference", "bf16-frozen-copy", "packed-ipo"])
def test_dpo_fused_linear_loss_trains_like_logits_then_loss(tmp_path: Path, pair_files, monkeypatch, sections):
    """train.fused_linear_loss in DPO: policy and reference log-probs through the fused output layer (the
    reference copy's own, or the policy's with the adapter off) give the unfused run's losses and metrics."""
    plain = finetune.train(pair_recipe(tmp_path / "a", pair_files, "dpo", **sections))
    calls = fused_spy(monkeypatch)
    train = {**sections.get("train", {}), "fused_linear_loss": True}
    fused = finetune.train(pair_recipe(tmp_path / "b", pair_files, "dpo", **{**sections, "train": train}))
    assert len(calls) >= 3 * 2  # policy and reference, every step
    tol = 1e-3 if "train" in sections else 1e-5
    assert losses(fused) == pytest.approx(losses(plain), rel=tol)
    for key in ("eval_loss", "eval_rewards/margin", "eval_logps/chosen"):
        assert fused.metrics[key] == pytest.approx(plain.metrics[key], rel=10 * tol, abs=1e-4), key


def test_dpo_frozen_reference_copy_stored_in_bf16(tmp_path: Path, pair_files, monkeypatch):
    """Under bf16 the frozen reference copy's linear weights are stored in bf16 once (autocast would cast them at
    every forward): the same losses bitwise as without."""
    import finetune.model
    from finetune.tasks.dpo import DPOTask

    seen = []
    prepare = DPOTask.prepare

    def recording(self, recipe, accelerator, model, eval_only=False):
        prepare(self, recipe, accelerator, model, eval_only)
        seen.append(self.ref_model.model.layers[0].mlp.up_proj.weight.dtype)

    monkeypatch.setattr(DPOTask, "prepare", recording)
    sections = {"train": {"mixed_precision": "bf16"}}
    stored = finetune.train(pair_recipe(tmp_path / "a", pair_files, "dpo", **sections))
    monkeypatch.setattr(finetune.model, "store_frozen_linears_in", lambda model, dtype: [])
    cast = finetune.train(pair_recipe(tmp_path / "b", pair_files, "dpo", **sections))
    assert seen == [torch.bfloat16, torch.float32]
    assert losses(stored) == losses(cast)
    assert stored.metrics["eval_loss"] == cast.metrics["eval_loss"]


@pytest.mark.parametrize("sections", [
    {"dpo": {"precompute_ref_logps": True}},
    {"lora": {"enabled": True, "r": 4, "dropout": 0.0}},
], ids=["precomputed-reference", "lora"])
def test_dpo_checkpoint_evaluated_alone_gives_the_runs_rewards(tmp_path: Path, pair_files, sections: dict):
    """--eval-only on a DPO checkpoint: its rewards against the recipe's model as reference, as the run logged
    them at that step; the reference's log-probs are computed, not precomputed into output_dir."""
    recipe = pair_recipe(tmp_path / "run", pair_files, "dpo", **sections,
                         train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    trained = finetune.train(recipe)
    logged = next(e for e in trained.history if e["step"] == 2 and "eval_loss" in e)
    assert logged["eval_rewards/margin"] != 0
    alone = finetune.evaluate(recipe, resume=str(tmp_path / "run" / "checkpoints" / "step-0000002"),
                              output_dir=str(tmp_path / "elsewhere"))
    for key in ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy", "eval_logps/chosen"):
        assert alone.metrics[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    assert not (tmp_path / "elsewhere").exists()
    if "lora" not in sections:  # the exported model, against the model it started from
        exported = finetune.evaluate(recipe, **{"model.name_or_path": str(trained.model_dir),
                                                "dpo.ref_model": "builtin:tiny-llama",
                                                "output_dir": str(tmp_path / "elsewhere")})
        assert exported.metrics["eval_rewards/margin"] == pytest.approx(trained.metrics["eval_rewards/margin"],
                                                                        rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model with its weights perturbed: another policy of the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = perturbed(AutoModelForCausalLM.from_pretrained(tiny_dir))
    folder = tmp_path_factory.mktemp("other_model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sections", [
    {},
    {"lora": {"enabled": True, "r": 4, "dropout": 0.0}},
    {"dpo": {"precompute_ref_logps": True}},
    {"train": {"fused_linear_loss": True}},
], ids=["frozen-copy", "lora", "precomputed", "fused-output-layers"])
def test_dpo_ref_model_is_the_reference_instead_of_the_initial_policy(tmp_path: Path, pair_files, other_model,
                                                                       sections: dict):
    """Rewards at step 0 are beta x (policy - reference) log-probs, the reference's being what that model scores
    as a policy of its own."""
    dpo = {**sections.get("dpo", {}), "ref_model": str(other_model), "beta": 0.1}
    train = {**sections.get("train", {}), "max_steps": 1}
    run = finetune.train(pair_recipe(tmp_path / "run", pair_files, "dpo", **{**sections, "dpo": dpo, "train": train}))
    at_start = run.history[0]
    reference = finetune.evaluate(pair_recipe(tmp_path / "ref", pair_files, "dpo"),
                                  **{"model.name_or_path": str(other_model)}).metrics
    for side in ("chosen", "rejected"):
        expected = 0.1 * (at_start[f"eval_logps/{side}"] - reference[f"eval_logps/{side}"])
        assert at_start[f"eval_rewards/{side}"] == pytest.approx(expected, rel=1e-4, abs=1e-5), side
    assert abs(at_start["eval_rewards/margin"]) > 1e-3  # not the initial policy


def test_dpo_ref_model_of_another_vocabulary_is_refused(tmp_path: Path, pair_files, other_model):
    from transformers import AutoModelForCausalLM

    from finetune.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(other_model)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(tmp_path / "bigger")
    with pytest.raises(UserError, match=r"dpo.ref_model: \S+bigger has a vocabulary of \d+ tokens, the policy \d+"):
        finetune.train(pair_recipe(tmp_path / "run", pair_files, "dpo", dpo={"ref_model": str(tmp_path / "bigger")}))


def test_dpo_rpo_alpha_adds_the_chosen_responses_nll_per_token(tmp_path: Path, pair_files, tiny_dir):
    """At step 0 the policy is the reference: the loss is ln 2 plus alpha x the mean over held-out pairs of the
    chosen response's negative log-likelihood per token, computed here with a plain forward of the model."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.pairs import encode_pair

    run = finetune.train(pair_recipe(tmp_path, pair_files, "dpo", dpo={"rpo_alpha": 0.5}, train={"max_steps": 1}))
    at_start = run.history[0]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    per_pair = []
    for line in pair_files[1].read_text().splitlines():
        pair = encode_pair(json.loads(line), tokenizer, 48, 24, "x")
        ids = torch.tensor([pair["prompt"] + pair["chosen"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        per_pair.append(-logps[-len(pair["chosen"]):].mean().item())
    nll = sum(per_pair) / len(per_pair)
    assert at_start["eval_nll"] == pytest.approx(nll, rel=1e-4)
    assert at_start["eval_loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)


def test_each_held_out_source_of_pairs_is_evaluated_alone_as_well(tmp_path: Path, pair_files):
    """dpo: each of several data.eval sources has the metrics the same run evaluated on it alone gives, with the
    reference log-probs precomputed (uids across the sources: the reference table serves each source's batches)."""
    rows = pair_files[1].read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(rows[:9]))
    second.write_text("".join(rows[9:]))
    recipe = pair_recipe(tmp_path / "run", pair_files, "dpo", dpo={"precompute_ref_logps": True},
                         train={"max_steps": 2})
    result = finetune.train(recipe, **{"data.eval": [str(first), str(second)]})
    assert result.metrics["eval_first_rewards/margin"] != result.metrics["eval_second_rewards/margin"]
    for name in ("first", "second"):
        alone = finetune.train(recipe, **{"data.eval": str(tmp_path / f"{name}.jsonl"),
                                          "output_dir": str(tmp_path / name)}).metrics
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            assert result.metrics[f"eval_{name}_{key}"] == pytest.approx(alone[f"eval_{key}"], rel=1e-4, abs=1e-6)
