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
    """Right-pads `input_ids`/`labels`; `num_items` is the number of next-token targets in the batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = pad([r["input_ids"] for r in rows], self.pad_token_id)
        labels = pad([r["labels"] for r in rows], IGNORE_INDEX)
        attention_mask = pad([[1] * len(r["input_ids"]) for r in rows], 0)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "num_items": (labels[:, 1:] != IGNORE_INDEX).sum()}
