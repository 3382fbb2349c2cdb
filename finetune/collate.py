"""Collators: turn tokenized rows into padded tensors plus the count of target items the loop normalises by."""

from __future__ import annotations

from typing import Any

import torch

from finetune.losses import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + list(s)) if left else (list(s) + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class CausalLMCollator:
    """Rows -> a batch with `num_items` (next-token targets) and `num_tokens` (real, non-padding tokens).

    Padded (default): rows right-padded to the longest, with an attention mask.
    Packed (`packed=True`, padding-free): the rows concatenated into one row, with `position_ids` restarting at
    each row and no attention mask, so the model's attention never crosses a row boundary; the first token of
    each row is not a target of the row before. Loss and gradients equal the padded batch's, and no compute is
    spent on padding.
    """

    def __init__(self, pad_token_id: int, packed: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packed:
            ids, labels, positions = [], [], []
            for r in rows:
                ids += r["input_ids"]
                labels += [IGNORE_INDEX] + list(r["labels"][1:])
                positions += range(len(r["input_ids"]))
            batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                     "position_ids": torch.tensor([positions])}
        else:
            batch = {"input_ids": pad([r["input_ids"] for r in rows], self.pad_token_id),
                     "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
                     "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0)}
        batch["num_items"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        batch["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        return batch
