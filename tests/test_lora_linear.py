"""The fused LoRA forward against peft's own: outputs and every gradient, with and without dropout and biases,
in float64 and under bf16 autocast; the cases it leaves to peft; and its place in training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, relative_error, small_recipe

import finetune
from finetune.lora_linear import FusedLoraLinear, dropout_keep_mask, fuse_lora_layers


class _SameMaskDropout(torch.nn.Module):
    """Inverted dropout with the fused path's masks, drawn in the same order: peft's model with these computes
    what the fused one should, exactly."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * dropout_keep_mask(x.shape, self.p, x.device) / (1 - self.p)


def _pair(dropout: float = 0.0, dtype: torch.dtype = torch.float64, device: str = "cpu", **lora: object) -> tuple:
    """A tiny Llama with biases under LoRA, adapters randomised (B starts at zero), as peft's and fused."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).to(device, dtype)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout,
                                                  target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)  # drawn in float32 on the CPU: the same values everywhere
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 14  # q k v o gate up down in each of 2 layers
    if dropout:  # peft's side draws the fused path's masks, so the two compare exactly
        for layer in peft_model.modules():
            if hasattr(layer, "lora_dropout"):
                layer.lora_dropout["default"] = _SameMaskDropout(dropout)
    return peft_model, fused


def _run(model: torch.nn.Module, embeds: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    """Logits and the gradients of a fixed function of them: the adapters' and the input embeddings'."""
    torch.manual_seed(1)  # the same dropout masks for both models
    x = embeds.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs_embeds=x).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=x.device)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.float(), {**grads, "inputs_embeds": x.grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_fused_lora_equals_peft_in_float64(dropout: float, device: str):
    peft_model, fused = _pair(dropout, device=device)
    embeds = torch.randn(2, 7, 32, dtype=torch.float64, device=device)
    ref_logits, ref_grads = _run(peft_model, embeds, autocast=False)
    logits, grads = _run(fused, embeds, autocast=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) == 29  # 28 adapter matrices and the input
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_fused_lora_under_bf16_autocast_is_as_close_to_float64_as_peft(dropout: float, device: str):
    """Both compute in bf16. Against the float64 result, over four inputs, the fused path's errors are no larger
    than peft's in total (it rounds the adapter's product once, inside the GEMM, where peft rounds it, scales it
    and rounds the sum); per input and tensor, bf16 rounding may favour either."""
    exact_model, _ = _pair(dropout, device=device)
    peft_model, fused = _pair(dropout, dtype=torch.float32, device=device)
    for model in (peft_model, fused):
        for layer in model.modules():  # the frozen base in bf16, as the loop stores it under autocast
            if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad:
                layer.to(torch.bfloat16)

    totals = {"ours": [0.0, 0.0], "theirs": [0.0, 0.0]}  # logits, gradients
    for seed in range(4):
        embeds = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        embeds = embeds.to(device)
        exact_logits, exact_grads = _run(exact_model, embeds, autocast=False)
        for side, model in (("theirs", peft_model), ("ours", fused)):
            logits, grads = _run(model, embeds.float(), autocast=True)
            assert relative_error(logits, exact_logits) < 0.05
            totals[side][0] += relative_error(logits, exact_logits)
            for name, g in grads.items():
                assert g.dtype == torch.float32 and relative_error(g, exact_grads[name]) < 0.1, name
                totals[side][1] += relative_error(g, exact_grads[name])
    assert totals["ours"][0] <= 1.2 * totals["theirs"][0]
    assert totals["ours"][1] <= 1.2 * totals["theirs"][1]


def test_fused_lora_runs_as_one_autograd_node_only_where_it_applies():
    peft_model, fused = _pair()
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_LoraLinearBackward"
    base = layer.base_layer(x)
    with fused.disable_adapter():  # DPO's reference: the base layer alone
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
    fused.merge_adapter()  # merged weights: the base layer computes everything
    assert type(layer(x).grad_fn).__name__ != "_LoraLinearBackward"
    fused.unmerge_adapter()
    torch.testing.assert_close(layer(x), peft_model.base_model.model.model.layers[0].self_attn.q_proj(x),
                               rtol=1e-12, atol=1e-12)
    stock = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    for module in (layer, stock):  # float32 adapters on a float64 base, no autocast: peft's own casting rules
        module.lora_A.float(), module.lora_B.float()
    assert type(layer(x).grad_fn).__name__ != "_LoraLinearBackward"
    torch.testing.assert_close(layer(x), stock(x), rtol=1e-12, atol=1e-12)  # merge and unmerge round


def test_dora_layers_keep_peft_forward():
    peft_model, fused = _pair(use_dora=True)
    embeds = torch.randn(1, 5, 32, dtype=torch.float64)
    ref_logits, _ = _run(peft_model, embeds, autocast=False)
    logits, _ = _run(fused, embeds, autocast=False)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)


def test_lora_fused_is_the_default_and_can_be_turned_off(tmp_path: Path, chat_files):
    """Trained both ways (float32): the same losses and adapters, and the same adapter files."""
    train, _ = chat_files
    results = {}
    for fused in (True, False):
        recipe = small_recipe(tmp_path / str(fused), train, lora={"enabled": True, "r": 4, "dropout": 0.0,
                                                                   "fused": fused})
        results[fused] = finetune.train(recipe)
    layers = {f: [m for m in r.model.modules() if isinstance(m, FusedLoraLinear)] for f, r in results.items()}
    assert layers[True] and not layers[False]
    losses = {f: [e["loss"] for e in r.history if "loss" in e] for f, r in results.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    weights = {f: dict(r.model.named_parameters()) for f, r in results.items()}
    for name, p in weights[True].items():
        if "lora_" in name:
            torch.testing.assert_close(p, weights[False][name], rtol=1e-4, atol=1e-6, msg=name)
    configs = [(r.model_dir / "adapter_config.json").read_text() for r in results.values()]
    assert configs[0] == configs[1]


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keep_mask_draws_bernoulli_from_the_seeded_generator(device: str):
    device = torch.device(device)
    for p in (0.05, 0.5):
        torch.manual_seed(0)
        mask = dropout_keep_mask(torch.Size([1000, 1001]), p, device)
        n = mask.numel()
        assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
        assert abs(mask.sum().item() - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5
        for rows in (mask[:, :500], mask[500:]):  # no part of the mask is constant or skewed
            assert abs(rows.float().mean().item() - (1 - p)) < 0.01
        torch.manual_seed(0)
        assert torch.equal(dropout_keep_mask(torch.Size([1000, 1001]), p, device), mask)
        assert not torch.equal(dropout_keep_mask(torch.Size([1000, 1001]), p, device), mask)
    assert dropout_keep_mask(torch.Size([3, 5]), 0.3, device).shape == (3, 5)  # not a multiple of 4


def test_fused_dropout_only_while_training():
    _, fused = _pair(0.5)
    layer = fused.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(4, 32, dtype=torch.float64)
    train_out = layer(x)
    layer.eval()
    eval_out = layer(x)
    layer.lora_dropout["default"].p = 0.0
    torch.testing.assert_close(eval_out, layer(x), rtol=0, atol=0)
    assert not torch.allclose(train_out, eval_out)
