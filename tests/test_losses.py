import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

from finetune.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    linear_token_logps,
    per_sequence,
    sequence_logps,
    target_positions,
    token_cross_entropy_sum,
    token_logps,
)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    return logits, labels


def test_causal_lm_loss_matches_shifted_cross_entropy():
    logits, labels = batch()
    total, count = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    assert count.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    torch.testing.assert_close(total, ref)


def test_causal_lm_loss_hand_value():
    # two positions, uniform logits over 4 classes: each target costs ln 4
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    total, count = causal_lm_loss(logits, labels)
    assert count.item() == 2
    torch.testing.assert_close(total, torch.tensor(2 * torch.log(torch.tensor(4.0)).item()))


def test_chunking_does_not_change_the_loss_or_gradient():
    logits, labels = batch(1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la, _ = causal_lm_loss(a, labels, chunk_size=2)
    lb, _ = causal_lm_loss(b, labels, chunk_size=10_000)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_token_logps_gradients_against_log_softmax(device: str):
    """Its own backward (softmax - onehot, by chunks): gradcheck in float64 over uneven chunks, and under bf16
    logits against autograd through a float32 log-softmax, as F.cross_entropy computes it."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    t = torch.randint(0, 11, (5,), generator=g).to(device)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, t, chunk_size=2), (logits,))
    weights = torch.randn(5, generator=g, dtype=torch.float64).to(device)
    (ours,) = torch.autograd.grad((token_logps(logits, t, chunk_size=2) * weights).sum(), [logits])
    (ref,) = torch.autograd.grad((logits.log_softmax(-1)[torch.arange(5, device=device), t] * weights).sum(),
                                 [logits])
    torch.testing.assert_close(ours, ref)

    half = torch.randn(300, 1000, generator=g).mul_(3).bfloat16().to(device).requires_grad_(True)
    t = torch.randint(0, 1000, (300,), generator=g).to(device)
    total = token_cross_entropy_sum(half, t, chunk_size=64)
    (ours,) = torch.autograd.grad(total, [half])
    wide = half.detach().float().requires_grad_(True)
    ref_total = F.cross_entropy(wide, t, reduction="sum")
    ref_total.backward()
    assert total.dtype == torch.float32 and ours.dtype == torch.bfloat16
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(ours.float(), wide.grad, rtol=1e-2, atol=1e-4)  # bf16 rounding of the gradient


def test_token_logps_of_no_targets_is_empty_and_still_in_the_graph():
    logits = torch.randn(0, 7, requires_grad=True)
    out = token_logps(logits, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.grad_fn is not None
    token_cross_entropy_sum(logits, torch.zeros(0, dtype=torch.long)).backward()
    assert logits.grad is not None and logits.grad.shape == (0, 7)


def test_sequence_logps_against_log_softmax():
    logits, labels = batch(2)
    logp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    ref = (torch.gather(logp, -1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(sequence_logps(logits, labels), ref)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), ref / mask.sum(-1))


def test_kept_rows_give_the_same_results():
    """Logits only at target positions (what `logits_to_keep=target_positions(labels)` returns) give the same
    loss and log-probs as full logits."""
    logits, labels = batch(4)
    kept = logits[target_positions(labels)]
    total, count = causal_lm_loss(logits, labels)
    kept_total, kept_count = causal_lm_loss(kept, labels)
    torch.testing.assert_close(kept_total, total)
    assert kept_count == count and kept.shape[0] == count
    torch.testing.assert_close(sequence_logps(kept, labels), sequence_logps(logits, labels))


def projection(n: int = 45, hidden: int = 12, vocab: int = 37, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    return h, w, torch.randint(0, vocab, (n,), generator=g), torch.randn(n, generator=g, dtype=dtype)


def grads(fn, *inputs) -> tuple:
    for x in inputs:
        x.grad = None
    return tuple(torch.autograd.grad(fn(), [x for x in inputs if x.requires_grad]))


@pytest.mark.parametrize("tokens_per_chunk", [1, 7, 45, 100])
def test_linear_token_logps_equals_logits_then_log_softmax(tokens_per_chunk: int):
    """Values and gradients (hidden and weight) equal the unfused projection + log-softmax, whatever the chunks."""
    h, w, t, g = projection()
    fused = lambda: (linear_token_logps(h, w, t, chunk_logits=37 * tokens_per_chunk) * g).sum()  # noqa: E731
    plain = lambda: (torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None]).squeeze(-1) * g).sum()  # noqa: E731
    torch.testing.assert_close(fused(), plain())
    for a, b in zip(grads(fused, h, w), grads(plain, h, w), strict=True):
        torch.testing.assert_close(a, b)


def test_linear_token_logps_gradcheck_and_frozen_weight():
    h, w, t, _ = projection(n=9, hidden=5, vocab=6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_token_logps(a, b, t, chunk_logits=6 * 4), (h, w))
    frozen = w.detach()  # LoRA's base: only the hidden states get a gradient
    (gh,) = torch.autograd.grad(linear_token_logps(h, frozen, t, chunk_logits=6 * 4).sum(), [h])
    (ref,) = torch.autograd.grad(token_logps(h @ frozen.T, t).sum(), [h])
    torch.testing.assert_close(gh, ref)


def test_linear_token_logps_of_no_targets_keeps_zero_gradients():
    h, w, t, _ = projection(n=0)
    out = linear_token_logps(h, w, t)
    assert out.shape == (0,)
    gh, gw = torch.autograd.grad(out.sum(), [h, w])
    assert not gh.any() and not gw.any()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_token_logps_under_bf16_autocast_matches_autocast_linear(device: str):
    """The projection in bf16 as F.linear under autocast, the softmax in float32: identical values; gradients
    within bf16 rounding (the weight's is summed over chunks in float32 instead of one bf16 product)."""
    h, w, t, g = (x.detach().to(device).requires_grad_(x.requires_grad) for x in projection(n=64, hidden=32,
                                                                                            vocab=50))
    with torch.autocast(device, dtype=torch.bfloat16):
        fused = linear_token_logps(h, w, t, chunk_logits=50 * 16)
        plain = token_logps(F.linear(h, w), t)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad((fused * g).sum(), [h, w]), torch.autograd.grad((plain * g).sum(), [h, w]),
                    strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())


def test_per_sequence_of_token_logps_is_sequence_logps():
    logits, labels = batch()
    mask = target_positions(labels)
    per_token = token_logps(logits[mask], labels[:, 1:][mask[:, :-1]])
    torch.testing.assert_close(per_sequence(per_token, labels), sequence_logps(logits, labels))
    torch.testing.assert_close(per_sequence(per_token, labels, average=True),
                               sequence_logps(logits, labels, average=True))
