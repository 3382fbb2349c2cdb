"""Loss functions: pure functions of tensors, importable without loading a model.

Every function returns *summed* (or per-item) quantities together with what they were summed over, so that the
training loop can normalise by the number of target items across all micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    loss = -sum_{t: labels[t+1] != ignore} log softmax(logits[t])[labels[t+1]]

    `logits` is (batch, seq, vocab) and `labels` (batch, seq) aligned with the inputs; the shift happens here.
    Only positions with a target are gathered, then processed in chunks of `chunk_size` tokens, so padding costs
    nothing and no float32 copy of the whole batch's logits is alive at once.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    count = mask.sum()
    picked = logits[:, :-1][mask]  # (n_targets, vocab) in the logits' dtype
    wanted = targets[mask]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], chunk_size):
        chunk = picked[start:start + chunk_size].float()
        total = total + F.cross_entropy(chunk, wanted[start:start + chunk_size], reduction="sum")
    return total, count


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   average: bool = False) -> torch.Tensor:
    """Per-sequence sum (or mean, with `average`) of log p(label token), shape (batch,).

    logp(y) = sum_t [labels[t+1] != ignore] * log softmax(logits[t])[labels[t+1]]

    Uses logsumexp per row instead of a full log-softmax copy: log p = logit[y] - logsumexp(logits).
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1).float()
    norm = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # one row at a time: lean
    token_logps = (picked - norm) * mask
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
