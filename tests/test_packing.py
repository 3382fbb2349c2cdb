"""Padding-free packing and logits only at target positions: exactly the padded batch's loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEVICES, small_recipe, tiny_config

import finetune
from finetune import attention
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


def assert_same_grads(grads: dict, ref_grads: dict) -> None:
    for name, grad in grads.items():
        # float32 sums in another order: measured up to 1.3e-6 of the tensor's largest element (torch 2.11, CPU
        # and CUDA); a sequence attending across a boundary changes gradients far more
        ref = ref_grads[name]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_varlen"])
def test_packed_equals_padded(tiny_dir, attn: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn).to(device)
    data = rows(tok)

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    padded = on_device(CausalLMCollator(tok.pad_token_id)(data))
    packed = on_device(CausalLMCollator(tok.pad_token_id, packed=True)(data))
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in data))
    assert packed["num_items"] == padded["num_items"] and packed["num_tokens"] == padded["num_tokens"]
    ref_loss, ref_count, ref_grads = loss_and_grads(model, padded, keep=False)
    for batch, keep in ((padded, True), (packed, False), (packed, True)):
        loss, count, grads = loss_and_grads(model, batch, keep)
        assert count == ref_count
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert_same_grads(grads, ref_grads)


def test_sliding_window_packed_equals_padded(windowed_dir):
    """A model with a sliding window (8 positions, rows of 30-60 tokens): the packed rows' loss and gradients
    equal the padded batch's under transformers' own windowed SDPA mask; and the window is really applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    tok = AutoTokenizer.from_pretrained(windowed_dir)
    data = rows(tok)
    padded = CausalLMCollator(tok.pad_token_id)(data)
    packed = CausalLMCollator(tok.pad_token_id, packed=True)(data)
    assert min(len(r["input_ids"]) for r in data) > 8 * 3
    ref = AutoModelForCausalLM.from_pretrained(windowed_dir, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(windowed_dir, attn_implementation="sdpa_varlen")
    ref_loss, _, ref_grads = loss_and_grads(ref, padded, keep=False)
    loss, _, grads = loss_and_grads(model, packed, keep=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads, ref_grads)
    model.config.sliding_window = None  # the same weights attending to every earlier token
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    unwindowed, _, _ = loss_and_grads(model, packed, keep=True)
    assert abs(unwindowed - ref_loss) > 1e-3


ARCHITECTURES = {  # tiny configurations of other popular decoders; windows of 8 positions where they have them
    "qwen2": {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8},
    "phi3": {},
    "olmo2": {},
}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_packed_equals_padded_for_other_architectures(tiny_dir, model_type: str):
    """Packing relies on each architecture passing `position_ids` to its rotary embedding and attention: the
    packed rows' loss and gradients equal the padded batch's for Qwen2 (sliding and full layers), Qwen3,
    Gemma 3 (local and global layers), Phi-3 (fused projections) and OLMo 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = tiny_config(model_type, tok, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa_varlen")
    model.load_state_dict(ref.state_dict())
    data = rows(tok)
    ref_loss, _, ref_grads = loss_and_grads(ref, CausalLMCollator(tok.pad_token_id)(data), keep=False)
    loss, _, grads = loss_and_grads(model, CausalLMCollator(tok.pad_token_id, packed=True)(data), keep=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads, ref_grads)


def test_sequence_bounds_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert attention.sequence_bounds(pos) == [[(0, 3, 0, 0), (3, 5, 3, 3), (5, 9, 5, 5)], [(0, 9, 0, 0)]]
    # no root before it: a sequence starting above 0 has no prefix to share
    assert attention.sequence_bounds(torch.tensor([[5, 6, 0]])) == [[(0, 2, 0, 0), (2, 3, 2, 2)]]
    # a branch at position 2 shares the first two tokens of the root before it
    assert attention.sequence_bounds(torch.tensor([[0, 1, 2, 3, 2, 3]])) == [[(0, 4, 0, 0), (4, 6, 0, 2)]]


def test_bounds_are_read_again_for_a_new_or_modified_position_tensor():
    pos = torch.tensor([[0, 1, 0, 1]])
    assert attention._bounds_once_per_forward(pos) == [[(0, 2, 0, 0), (2, 4, 2, 2)]]
    pos[0, 2:] = torch.tensor([2, 3])  # in place: one sequence now
    assert attention._bounds_once_per_forward(pos) == [[(0, 4, 0, 0)]]
    assert attention._bounds_once_per_forward(torch.tensor([[0, 0, 1, 2]])) == [[(0, 1, 0, 0), (1, 4, 1, 1)]]


def test_varlen_attention_equals_sequences_alone(tiny_dir):
    """Each packed sequence's hidden states equal those of the sequence run alone (and a padded batch and
    generation still work through the fallback path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa_varlen").eval()
    data = rows(tok, 3)
    packed = CausalLMCollator(tok.pad_token_id, packed=True)(data)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for r in data:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(out[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
            start += len(alone)
        ids = torch.tensor([[tok.pad_token_id, 5, 6], [4, 5, 6]])
        mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id)
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                use_cache=True, pad_token_id=tok.pad_token_id)
        assert torch.equal(gen, expected)


def _reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False,
                      top_left=False, window_slack=0, **causal):
    """What torch's flash varlen kernel computes, from SDPA on each sequence of the (tokens, heads, dim) layout:
    a sequence with more keys than queries has its causal mask aligned to the bottom right (flash-attention's
    rule), or to the top left with `top_left`; `window_size=(left, 0)` lets a query see the keys at most `left`
    behind it (`window_slack` more, for a kernel whose rule differs)."""
    left = causal.get("window_size", (-1, 0))[0]
    assert causal == {"is_causal": True} or (causal == {"window_size": (left, 0)} and left >= -1)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and len(cq) == len(ck)
    assert max_q == max(b - a for a, b in zip(cq[:-1], cq[1:], strict=True))
    assert max_k == max(b - a for a, b in zip(ck[:-1], ck[1:], strict=True))
    out = []
    for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
        n, m = b - a, d - c
        mask = torch.ones(n, m, dtype=torch.bool).tril(0 if top_left else m - n)
        if left >= 0:
            mask &= ~torch.ones(n, m, dtype=torch.bool).tril((0 if top_left else m - n) - left - 1 - window_slack)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


LAYOUTS = {
    # two packed rows of 24 tokens; positions restart per sequence
    "roots": ([list(range(10)) + list(range(14)), list(range(5)) + list(range(12)) + list(range(7))],
              [0, 10, 24, 29, 41, 48], [0, 10, 24, 29, 41, 48]),
    # with branches (preference pairs' shared prompts): one at position 4 shares its root's first 4 tokens, one
    # at position 3 the first 3 of the 12-token root before it
    "branches": ([list(range(10)) + [4, 5, 6] + list(range(11)),
                  list(range(5)) + list(range(12)) + list(range(3, 10))],
                 [0, 10, 13, 24, 29, 41, 48], [0, 10, 17, 28, 33, 45, 55]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("torch_version", ["2.10", "2.11+"])
def test_varlen_kernel_call_equals_per_sequence_attention(monkeypatch, torch_version: str, layout: str):
    """On CUDA, packed rows go to torch's flash varlen kernel in one call. Checked here with a reference kernel in
    its place: two packed rows with grouped-query attention give the per-sequence path's logits and gradients,
    for torch 2.10's signature (is_causal; no scale, no GQA: the keys are repeated) and the later one
    (window_size, scale, enable_gqa); branches get their shared prefix's keys gathered in front of their own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa_varlen")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 100, (2, 24))
    positions, cu_q, cu_k = LAYOUTS[layout]
    pos = torch.tensor(positions)

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_grads = run()
    calls = []

    def kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), cu_seq_q.tolist(), cu_seq_k.tolist()))
        return _reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **kw)

    if torch_version == "2.10":
        params, causal = {"is_causal"}, {"is_causal": True}
    else:
        params, causal = {"window_size", "scale", "enable_gqa"}, {"window_size": (-1, 0)}
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, causal, params))
    monkeypatch.setattr(attention, "_flash_dtype", lambda query, scaling: torch.float32)
    monkeypatch.setattr(attention, "_prefix_aligned", lambda device, dtype: True)
    logits, grads = run()
    kv_heads = 4 if torch_version == "2.10" else 2
    assert calls == [((48, 4, 16), (cu_k[-1], kv_heads, 16), cu_q, cu_k)] * 2
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_left", [False, True])
def test_branches_use_the_varlen_kernel_only_if_it_aligns_causal_masks_bottom_right(monkeypatch, top_left: bool):
    """Whether the kernel sees a shared prefix whole is probed once per process on a tiny input; a kernel that
    aligns causal masks to the top left leaves branches on the per-sequence path."""
    from functools import cache

    calls = []

    def kernel(q, *args, **kw):
        calls.append(q.shape[0])
        return _reference_varlen(q, *args, top_left=top_left, **kw)

    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, {"window_size": (-1, 0)}, set()))
    monkeypatch.setattr(attention, "_prefix_aligned", cache(attention._prefix_aligned.__wrapped__))
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 2, 3, 4, 5]])  # a root of 8 and a branch sharing its first 2
    expected = attention._packed_attention(q, k, v, pos, 0.0, None, None, False)
    monkeypatch.setattr(attention, "_flash_dtype", lambda query, scaling: torch.float32)
    for _ in range(2):
        out = attention._packed_attention(q, k, v, pos, 0.0, None, None, False)
        torch.testing.assert_close(out, expected)
    assert attention._prefix_aligned(torch.device("cpu"), torch.float32) is not top_left
    assert calls == [2] + ([] if top_left else [12, 12])  # the probe, once; then the rows where it holds


@pytest.mark.parametrize("kernel_kind", ["windowed", "off_by_one", "torch_2.10"])
def test_a_sliding_window_goes_to_the_varlen_kernel_only_where_it_applies_the_window_as_transformers(
        monkeypatch, kernel_kind: str):
    """Rows with a sequence longer than the model's sliding window call the varlen kernel with
    `window_size=(window - 1, 0)`, a rule probed once per process: output and gradients equal the per-sequence
    path's windowed masks, shared prefixes included. A kernel whose window is off by one, or torch 2.10's, which
    takes none, leaves such rows on the per-sequence path; a window no sequence reaches changes nothing."""
    from functools import cache

    calls = []

    def kernel(q, *args, **kw):
        calls.append((q.shape[0], kw.get("window_size")))
        return _reference_varlen(q, *args, window_slack=int(kernel_kind == "off_by_one"), **kw)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 18, 8, generator=g) for _ in range(3))
    # sequences of 8 and 4 tokens, then a root of 3 and a branch sharing its first 2 (3 tokens more)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 2, 3, 4]])

    def attend(window):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention._packed_attention(*inputs, pos, 0.0, None, window, False)
        out.mul(torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return [out.detach(), *(t.grad for t in inputs)]

    windowed, full = attend(4), attend(None)
    assert not torch.allclose(windowed[0][:, 4:8], full[0][:, 4:8])  # the window hides the first tokens from the last
    torch.testing.assert_close(windowed[0][:, :4], full[0][:, :4])  # ... and nothing from those within it
    assert not torch.allclose(windowed[0][:, 17], full[0][:, 17])  # the branch's last token: its prefix is too far
    params = {"is_causal"} if kernel_kind == "torch_2.10" else {"window_size"}
    causal = {"is_causal": True} if kernel_kind == "torch_2.10" else {"window_size": (-1, 0)}
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, causal, params))
    monkeypatch.setattr(attention, "_window_rule", cache(attention._window_rule.__wrapped__))
    monkeypatch.setattr(attention, "_prefix_aligned", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_flash_dtype", lambda query, scaling: torch.float32)
    for _ in range(2):
        for got, expected in zip(attend(4), windowed, strict=True):
            torch.testing.assert_close(got, expected)
    if kernel_kind == "windowed":
        assert calls == [(2, (1, 0))] + [(18, (3, 0))] * 2  # the probe, once; then the rows
    else:
        assert calls == ([] if kernel_kind == "torch_2.10" else [(2, (1, 0))])
    calls.clear()
    for got, expected in zip(attend(8), full, strict=True):  # no sequence is longer than 8: plain causal
        torch.testing.assert_close(got, expected)
    assert calls == [(18, causal.get("window_size"))]


def test_varlen_attention_runs_float32_under_cpu_autocast(tiny_dir, monkeypatch):
    """Under bf16 autocast on CPU the per-sequence SDPA runs in float32 with autocast off: half-precision SDPA
    there is slower and grows memory for every new sequence length. Llama's rotary embedding hands the
    attention float32 inputs under autocast, so checking the input dtype alone is not enough (it was, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa_varlen")
    packed = CausalLMCollator(tok.pad_token_id, packed=True)(rows(tok, 3))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert logits.dtype == torch.bfloat16  # the rest of the model still runs in bf16
    assert len(seen) == 3 * model.config.num_hidden_layers
    assert set(seen) == {(torch.float32, torch.float32, False)}


def test_packing_with_sdpa_loads_varlen_attention():
    from finetune.config import ModelConfig
    from finetune.model import attention_for

    assert attention_for(ModelConfig(), packed=True) == "sdpa_varlen"
    assert attention_for(ModelConfig(), packed=False) == "sdpa"
    assert attention_for(ModelConfig(attn_implementation="eager"), packed=True) == "eager"


def test_packing_without_position_aware_attention_is_refused():
    with pytest.raises(ConfigError, match="data.packing: needs model.attn_implementation"):
        load_recipe({"data": {"packing": True}, "model": {"attn_implementation": "flex_attention"}})


def test_packed_training_matches_padded_training(tmp_path: Path, chat_files):
    train, evals = chat_files
    padded = finetune.train(small_recipe(tmp_path / "a", train, evals))
    packed = finetune.train(small_recipe(tmp_path / "b", train, evals, data={"packing": True}))
    a = [e for e in padded.history if "loss" in e]
    b = [e for e in packed.history if "loss" in e]
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
    assert packed.metrics["eval_loss"] == pytest.approx(padded.metrics["eval_loss"], rel=1e-5)
