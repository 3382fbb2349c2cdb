"""What only a CUDA GPU runs: torch's flash-attention varlen kernel for packed rows, and training in BF16 with
packing and LoRA that resumes as the uninterrupted run goes on. Skipped without a GPU (CI has none); the tests
that also run on CPU take a CUDA parameter through `conftest.DEVICES`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import relative_error, small_recipe

import finetune
from finetune import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


POSITIONS = {
    # two packed rows of 512 tokens: sequences of 300, 17 and 195 tokens; of 1 and 511
    "roots": [list(range(300)) + list(range(17)) + list(range(195)), [0] + list(range(511))],
    # preference pairs' layout: a branch of 162 tokens sharing its root's first 100 (then a root of 100), and
    # one of 212 sharing its root's first 7; the shared keys are gathered in front of the branch's own
    "branches": [list(range(250)) + list(range(100, 262)) + list(range(100)),
                 list(range(300)) + list(range(7, 219))],
}


@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("layout", POSITIONS)
def test_flash_varlen_kernel_is_as_close_to_float32_as_per_sequence_sdpa(monkeypatch, layout: str,
                                                                         window: int | None):
    """Packed rows under bf16 autocast go to the varlen kernel, one call per layer; its logits and gradients
    are as close to a float32 run as the per-sequence SDPA path's (both compute in bf16). With a sliding window
    (a Mistral) shorter than the sequences, the kernel applies it."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    if attention._varlen_kernel() is None:
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    attention.register()
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa_varlen")
    torch.manual_seed(0)
    if window is None:
        model = LlamaForCausalLM(LlamaConfig(**shape)).cuda()
    else:
        assert attention._window_rule(torch.device("cuda"), torch.bfloat16), "the kernel's window is not the rule"
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **shape)).cuda()
    ids = torch.randint(0, 1000, (2, 512), device="cuda")
    pos = torch.tensor(POSITIONS[layout], device="cuda")
    if layout == "branches":
        assert any(ps < pe for row in attention.sequence_bounds(pos) for _, _, ps, pe in row)
        assert attention._prefix_aligned(pos.device, torch.bfloat16), "the kernel's causal mask is not bottom-right"

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        (logits * torch.linspace(-1, 1, 1000, device="cuda")).sum().backward()
        return [logits.detach(), *(p.grad.clone() for p in model.parameters())]

    exact = run(autocast=False)  # float32: no flash kernel
    calls = []
    kernel, causal, params = attention._varlen_kernel()

    def spy(q, *args, **kwargs):
        calls.append((q.dtype, kwargs.get("window_size")))
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (spy, causal, params))
    flash = run(autocast=True)
    assert calls == [(torch.bfloat16, causal.get("window_size") if window is None else (window - 1, 0))] * 2
    monkeypatch.setattr(attention, "_flash_dtype", lambda query, scaling: None)
    per_sequence = run(autocast=True)
    assert len(calls) == 2
    for i, (a, b, ref) in enumerate(zip(flash, per_sequence, exact, strict=True)):
        assert relative_error(a, ref) < 0.02, i
        assert relative_error(a, ref) <= 1.5 * relative_error(b, ref) + 1e-3, i


def test_bf16_packed_lora_training_on_cuda_resumes_as_it_would_have_gone_on(tmp_path: Path, chat_files):
    """Four steps with a checkpoint at step 2; the step-2 checkpoint resumed in a new output directory goes on
    to the same steps 3 and 4 (to bf16 rounding: the GPU's kernels need not be deterministic)."""
    train, evals = chat_files
    sections = dict(lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.1},
                    data={"packing": True}, train={"max_steps": 4, "save_every": 2, "mixed_precision": "bf16"})
    whole = finetune.train(small_recipe(tmp_path / "whole", train, evals, **sections))
    assert next(whole.model.parameters()).device.type == "cuda"
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-0000002"
    assert checkpoint.is_dir()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed = finetune.train(small_recipe(tmp_path / "resumed", train, evals, **sections))

    def losses(result) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in result.history if "loss" in e}

    a, b = losses(whole), losses(resumed)
    assert sorted(b) == [3, 4] and a[4] < a[1]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=2e-3), step


def test_full_fine_tuning_of_float16_weights_under_fp16_is_a_one_line_error(tmp_path: Path, chat_files):
    """Without the check, the loss scaler stops the first step with `Attempting to unscale FP16 gradients`."""
    from finetune.errors import UserError

    train, _ = chat_files
    recipe = small_recipe(tmp_path, train, model={"dtype": "float16"}, train={"mixed_precision": "fp16"})
    with pytest.raises(UserError, match="^model.dtype: .* trainable parameters are float16"):
        finetune.train(recipe)
    assert finetune.train(recipe, lora={"enabled": True, "r": 4}).steps == 3  # float32 adapters train
