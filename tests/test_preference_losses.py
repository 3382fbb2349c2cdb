"""Bradley-Terry and DPO-family losses: hand-derived values, gradcheck in float64, and TRL as the oracle."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from finetune.losses import bradley_terry_loss, dpo_loss, kto_loss


def logps(seed: int, n: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4))


# ------------------------------------------------------------------ hand-derived values


def test_bradley_terry_by_hand():
    # r_c - r_r = 0 -> ln 2; = ln 3 -> -log(3/4) = ln(4/3); margin 1 shifts the difference
    chosen, rejected = torch.tensor([0.0, math.log(3)]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx([math.log(2), math.log(4 / 3)])
    margin = torch.tensor([1.0, math.log(3)])
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(
        [math.log(1 + math.e), math.log(2)])


def test_dpo_sigmoid_by_hand():
    # policy gains ln 3 on chosen, nothing on rejected; beta 1: h = ln 3 -> loss = -log sigmoid(ln 3) = ln(4/3)
    pc, rc = torch.tensor([-1.0 + math.log(3)]), torch.tensor([-1.0])
    pr = rr = torch.tensor([-2.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3))
    assert cr.item() == pytest.approx(math.log(3)) and rj.item() == pytest.approx(0.0)
    # cDPO with eps = 0.25: 0.75 ln(4/3) + 0.25 ln 4
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.25)
    assert smoothed.item() == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4))


def test_other_types_by_hand():
    z = torch.zeros(1)
    h = torch.tensor([2.0])  # chosen log-ratio 2, rejected 0
    assert dpo_loss(h, z, z, z, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)  # 1 - 0.5
    assert dpo_loss(h, z, z, z, beta=0.25, loss_type="ipo")[0].item() == pytest.approx((2 - 2) ** 2)
    assert dpo_loss(h, z, z, z, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)  # (2 - 1)^2
    # robust with eps = 0.25, beta h = ln 3: [0.75 ln(4/3) - 0.25 ln 4] / 0.5
    robust = dpo_loss(torch.tensor([math.log(3)]), z, z, z, beta=1.0, loss_type="robust", label_smoothing=0.25)[0]
    assert robust.item() == pytest.approx((0.75 * math.log(4 / 3) - 0.25 * math.log(4)) / 0.5)
    # simpo: beta (pc - pr) - gamma = 2 * (-1 + 2) - 1 = 1 -> -log sigmoid(1)
    simpo = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), None, None, beta=2.0, loss_type="simpo", gamma=1.0)
    assert simpo[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    # orpo: p_c = 1/2, p_r = 1/4 -> odds 1 and 1/3, log odds ratio ln 3: -ln(1/2) - beta log sigmoid(ln 3)
    orpo = dpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), None, None, beta=0.5,
                    loss_type="orpo")
    assert orpo[0].item() == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3))
    assert orpo[1].item() == pytest.approx(0.5 * math.log(0.5))


def test_kto_by_hand():
    # beta 1: r = ln 3 desirable -> 1 - sigmoid(ln 3) = 1/4; r = -ln 3 undesirable -> 1 - sigmoid(ln 3) = 1/4;
    # with the reference point z = ln 3 the desirable one is at 1 - sigmoid(0) = 1/2, the undesirable at
    # 1 - sigmoid(z - r) = 1 - sigmoid(ln 9) = 1/10
    policy, ref = torch.tensor([math.log(3), -math.log(3)]), torch.zeros(2)
    desirable = torch.tensor([True, False])
    losses, rewards = kto_loss(policy, ref, desirable, 0.0, beta=1.0)
    assert losses.tolist() == pytest.approx([0.25, 0.25]) and rewards.tolist() == pytest.approx(policy.tolist())
    shifted, _ = kto_loss(policy, ref, desirable, math.log(3), beta=1.0, desirable_weight=2.0, undesirable_weight=3.0)
    assert shifted.tolist() == pytest.approx([2 * 0.5, 3 * 0.1])
    pc, rc = (t.clone().requires_grad_(i == 0) for i, t in enumerate(logps(5, 4)[:2]))
    assert torch.autograd.gradcheck(lambda a: kto_loss(a, rc, desirable.repeat(2), 0.3, beta=0.1)[0], (pc,))


def test_bad_arguments():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, loss_type="nope")
    with pytest.raises(ValueError, match=r"\(kto: kto_loss\), got 'kto'"):
        dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(z, z, None, None)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"exo_pair needs a value in \(0, 0.5\)"):
        dpo_loss(z, z, z, z, loss_type="exo_pair")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "nca_pair", "exo_pair", "sppo_hard",
                                       "apo_zero", "apo_down", "simpo", "orpo"])
def test_gradcheck(loss_type: str):
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(logps(3, 4)))
    # hinge has a kink at 1: keep away from it with small beta
    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dpo_loss(a, b, rc, rr, beta=0.01, loss_type=loss_type, label_smoothing=0.1)[0]

    assert fn(pc, pr).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (pc, pr))


def test_bradley_terry_gradcheck():
    a, b, m = (torch.randn(4, dtype=torch.float64, requires_grad=i < 2) for i in range(3))
    assert torch.autograd.gradcheck(lambda x, y: bradley_terry_loss(x, y, m), (a, b))


# ------------------------------------------------------------------ TRL as the oracle


def trl_dpo(pc, pr, rc, rr, lengths_c, lengths_r, beta, loss_type, label_smoothing):
    """Run TRL's own DPOTrainer._compute_loss on given sequence log-probs (its loss lives inline in the method,
    so we call the method with a minimal stand-in for the trainer and the model)."""
    from trl import DPOTrainer

    n = pc.shape[0]
    width = int(max(lengths_c.max(), lengths_r.max())) + 1
    completion = torch.zeros(2 * n, width, dtype=torch.long)
    for i, length in enumerate(torch.cat([lengths_c, lengths_r]).tolist()):
        completion[i, 1:1 + int(length)] = 1
    per_token = torch.zeros(2 * n, width - 1, dtype=pc.dtype)
    per_token[:, 0] = torch.cat([pc, pr])  # TRL sums per-token log-probs over the row

    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = lambda **kw: outputs  # noqa: E731
    identity = lambda t: t  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long), "attention_mask": torch.ones(2 * n, width),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0),
                                                   ("bco_pair", 0.0), ("nca_pair", 0.0), ("exo_pair", 1e-3),
                                                   ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0)])
def test_matches_trl(loss_type: str, smoothing: float):
    pc, pr, rc, rr = logps(7)
    lengths_c, lengths_r = torch.tensor([3, 5, 8, 2, 4]), torch.tensor([6, 1, 4, 7, 3])
    trl_loss, trl_metrics = trl_dpo(pc, pr, rc, rr, lengths_c, lengths_r, 0.1, loss_type, smoothing)
    if loss_type == "ipo":  # IPO on length-averaged log-probs, as TRL does
        args = (pc / lengths_c, pr / lengths_r, rc / lengths_c, rr / lengths_r)
    else:
        args = (pc, pr, rc, rr)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=0.1, loss_type=loss_type,
                                                        label_smoothing=smoothing)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5)
    if loss_type != "ipo":
        assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=1e-5)
        assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=1e-5)


def test_orpo_matches_trls_odds_ratio_loss():
    """TRL's ORPOTrainer.odds_ratio_loss (float32, its sign: beta log sigmoid) on length-averaged log-probs where
    the odds matter (p from 0.05 to 0.95) and where they are about p (p near 0, log1mexp's other branch)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(0)
    pc = torch.cat([torch.rand(6, generator=g) * 0.9 + 0.05, torch.rand(2, generator=g) * 1e-3]).log().double()
    pr = torch.cat([torch.rand(6, generator=g) * 0.9 + 0.05, torch.rand(2, generator=g) * 1e-3]).log().double()
    fake = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    theirs, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, pc, pr)
    losses, ours_chosen, ours_rejected = dpo_loss(pc, pr, None, None, beta=0.2, loss_type="orpo")
    torch.testing.assert_close(losses, -pc - theirs.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_chosen.float(), chosen_rewards)
    torch.testing.assert_close(ours_rejected.float(), rejected_rewards)


def test_bradley_terry_matches_trl_reward_trainer():
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 1, generator=g)
    margin = torch.rand(4, generator=g)
    for extra in ({}, {"margin": margin}):
        fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(
            center_rewards_coefficient=None), _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
            _tp_size=1,
            accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t))
        trl_loss = RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=rewards),
                                              {"attention_mask": torch.ones(8, 3), **extra})
        ours = bradley_terry_loss(rewards[:4, 0], rewards[4:, 0], extra.get("margin")).mean()
        assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)
