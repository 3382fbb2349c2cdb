"""Padding-free packing and logits only at target positions: exactly the padded batch's loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_recipe

import finetune
from finetune.builtin import task_rows
from finetune.collate import CausalLMCollator
from finetune.config import ConfigError, load_recipe
from finetune.data import encode_row
from finetune.losses import causal_lm_loss
from finetune.model import causal_lm_forward


def rows(tok, n=6):
    return [encode_row(r, "chat", tok, 64, True, "x") for r in task_rows("train")[:n]]


def loss_and_grads(model, batch, keep: bool):
    model.zero_grad()
    loss, count = causal_lm_loss(causal_lm_forward(model, batch, keep), batch["labels"])
    loss.backward()
    return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_padded(tiny_dir, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn)
    data = rows(tok)
    padded = CausalLMCollator(tok.pad_token_id)(data)
    packed = CausalLMCollator(tok.pad_token_id, packed=True)(data)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in data))
    assert packed["num_items"] == padded["num_items"] and packed["num_tokens"] == padded["num_tokens"]
    ref_loss, ref_count, ref_grads = loss_and_grads(model, padded, keep=False)
    for batch, keep in ((padded, True), (packed, False), (packed, True)):
        loss, count, grads = loss_and_grads(model, batch, keep)
        assert count == ref_count
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_without_position_aware_attention_is_refused():
    with pytest.raises(ConfigError, match="data.packing: needs model.attn_implementation"):
        load_recipe({"data": {"packing": True}, "model": {"attn_implementation": "flex_attention"}})
    with pytest.raises(ConfigError, match="only for sft"):
        load_recipe({"task": "dpo", "data": {"packing": True}})


def test_packed_training_matches_padded_training(tmp_path: Path, chat_files):
    train, evals = chat_files
    padded = finetune.train(small_recipe(tmp_path / "a", train, evals))
    packed = finetune.train(small_recipe(tmp_path / "b", train, evals, data={"packing": True}))
    a = [e for e in padded.history if "loss" in e]
    b = [e for e in packed.history if "loss" in e]
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
    assert packed.metrics["eval_loss"] == pytest.approx(padded.metrics["eval_loss"], rel=1e-5)
