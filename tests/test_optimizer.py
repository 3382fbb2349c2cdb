"""train.optimizer: the parameter groups; bitsandbytes' AdamW8bit against torch's AdamW, its Lion against Lion's
update rule; and what is refused."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import relative_error

from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.optimizer import BITSANDBYTES, build_optimizer, check_optimizer, param_groups, state_bytes


def test_no_weight_decay_on_biases_and_norms(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["params"]
    assert not any("norm" in names[id(p)] for p in decay["params"])


def test_adamw_8bit_updates_as_adamw_does_with_a_quarter_of_its_state(tiny_dir):
    """The same gradients (their scale changing from step to step, so the second moment matters) through both
    optimizers: the 8-bit moments move the weights as torch's float32 AdamW does, to the quantisation's error
    (1.7% measured; a recipe's lr, betas or weight decay not reaching it: 9-25% off), from about a quarter of
    the state's memory."""
    exact, full_bytes, _ = moved_by("adamw", tiny_dir)
    moved, small_bytes, opt = moved_by("adamw_8bit", tiny_dir)
    assert relative_error(moved, exact) < 0.03
    assert small_bytes / full_bytes < 0.3  # 2 bytes per parameter instead of 8, plus block scales
    assert any(t.dtype == torch.uint8 for s in opt.state.values() for t in _tensors(s))


def test_lion_is_lions_update_rule_and_lion_8bit_follows_it(tiny_dir):
    """Lion (Chen et al. 2023, Algorithm 2): w <- w - lr (sign(b1 m + (1 - b1) g) + wd w), then
    m <- b2 m + (1 - b2) g, with no weight decay on the no-decay group; computed here from the formula.
    bitsandbytes' 32-bit Lion is it to float rounding; its 8-bit momentum flips the sign of a few updates
    (measured: 2.5% of the entries after 10 steps; 68% with bitsandbytes' default betas) and takes a quarter
    of the memory."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    decays = {id(p) for p in param_groups(base, 1.0)[0]["params"]}
    gen = torch.Generator().manual_seed(0)
    weights = [p.detach().clone() for p in base.parameters()]
    momenta = [torch.zeros_like(w) for w in weights]
    for step in range(STEPS):
        for i, p in enumerate(base.parameters()):
            g = torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3)
            wd = WEIGHT_DECAY if id(p) in decays else 0.0
            weights[i] = weights[i] * (1 - LR * wd) - LR * torch.sign(BETAS[0] * momenta[i] + (1 - BETAS[0]) * g)
            momenta[i] = BETAS[1] * momenta[i] + (1 - BETAS[1]) * g
    exact = torch.cat([(w - p0).flatten() for w, p0 in zip(weights, base.parameters(), strict=True)]).detach()
    moved, full_bytes, _ = moved_by("lion", tiny_dir)
    torch.testing.assert_close(moved, exact, rtol=0, atol=1e-6)
    moved8, small_bytes, _ = moved_by("lion_8bit", tiny_dir)
    flipped = ((moved8 - exact).abs() > LR).float().mean().item()
    assert 0 < flipped < 0.05
    assert small_bytes / full_bytes < 0.3  # 1 byte per parameter instead of 4, plus block scales


@pytest.mark.parametrize("paged, twin", [("paged_adamw_8bit", "adamw_8bit"), ("paged_lion_8bit", "lion_8bit"),
                                          ("paged_adamw_32bit", "adamw")])
def test_paged_optimizers_update_as_their_unpaged_twins(tiny_dir, paged: str, twin: str):
    """Paging moves the state, not the update: on a CPU (where bitsandbytes keeps it in plain memory) a paged
    optimizer moves the weights exactly as its twin; the 32-bit AdamW as torch's, to float rounding."""
    moved, size, opt = moved_by(paged, tiny_dir)
    twin_moved, twin_size, _ = moved_by(twin, tiny_dir)
    assert type(opt).__name__.startswith("Paged") and size == pytest.approx(twin_size, rel=1e-3)  # torch: steps
    if twin == "adamw":
        torch.testing.assert_close(moved, twin_moved, rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(moved, twin_moved)


LR, WEIGHT_DECAY, BETAS, STEPS = 1e-3, 5.0, (0.9, 0.8), 10


def moved_by(optimizer: str, tiny_dir) -> tuple[torch.Tensor, int, torch.optim.Optimizer]:
    """How far `optimizer` moves the tiny model's weights in STEPS steps of seeded random gradients whose scale
    changes from step to step; with the bytes of its state and the optimizer."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = copy.deepcopy(base)
    cfg = TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                      optimizer=optimizer)
    opt = build_optimizer(model, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3)
        opt.step()
    pairs = zip(model.parameters(), base.parameters(), strict=True)
    moved = torch.cat([(p - p0).detach().flatten() for p, p0 in pairs])
    return moved, state_bytes(opt), opt


def _tensors(state: dict) -> list[torch.Tensor]:
    return [t for v in state.values() for t in (_tensors(v) if isinstance(v, dict) else [v]) if torch.is_tensor(t)]


@pytest.mark.parametrize("name", sorted(BITSANDBYTES))
def test_bitsandbytes_optimizers_are_refused_where_they_cannot_run(monkeypatch, name: str):
    check_optimizer(name, "MULTI_GPU")  # DDP: each process updates whole parameters
    check_optimizer("adamw", "FSDP")
    # measured: under FSDP2 the first step stops in bitsandbytes' kernels on the sharded (DTensor) parameters
    with pytest.raises(UserError, match=f"train.optimizer: {name} does not work under FSDP"):
        check_optimizer(name, "FSDP")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(UserError, match=rf"{name} needs bitsandbytes; pip install 'finetune\[qlora\]'"):
        check_optimizer(name, "NO")
