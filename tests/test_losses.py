import torch
import torch.nn.functional as F

from finetune.losses import IGNORE_INDEX, causal_lm_loss, sequence_logps, target_positions


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
