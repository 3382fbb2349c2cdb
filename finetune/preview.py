"""`--show-rows N`: the first training rows as the model will see them, before a long run: the chat template's
rendering, where truncation cut, and which tokens the loss is on."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from finetune.errors import count
from finetune.losses import IGNORE_INDEX


def marked(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The decoded row with the tokens that have a target (the loss is on them) inside [[ ]]."""
    parts = []
    for trained, group in groupby(zip(ids, labels, strict=True), lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in group])
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def show_rows(tokenizer: Any, rows: Any, n: int) -> str:
    """The first `n` rows of a tokenized training set: SFT rows marked as `marked` does; preference pairs as their
    prompt, chosen and rejected parts; KTO's rows as their label, prompt and completion (and the mismatched one)."""
    out = []
    for i in range(min(n, len(rows))):
        row = rows[i]
        if "labels" in row:
            trained = sum(label != IGNORE_INDEX for label in row["labels"])
            out.append(f"--- row {i}: {count(len(row['input_ids']), 'token')}, {trained} with a loss (inside [[ ]])")
            out.append(marked(tokenizer, row["input_ids"], row["labels"]))
        elif "label" in row:  # kto: a completion judged alone, and the mismatched one its reference point uses
            parts = {"prompt": "prompt", "chosen": "completion", "rejected": "mismatched completion (KL estimate)"}
            sizes = ", ".join(f"{name} {len(row[part])}" for part, name in list(parts.items())[:2])
            out.append(f"--- row {i} ({'desirable' if row['label'] else 'undesirable'}): tokens of {sizes}")
            out += [f"{name}: {tokenizer.decode(row[part])}" for part, name in parts.items()]
        else:
            sizes = ", ".join(f"{part} {len(row[part])}" for part in ("prompt", "chosen", "rejected"))
            out.append(f"--- pair {i}: tokens of {sizes}")
            out += [f"{part}: {tokenizer.decode(row[part])}" for part in ("prompt", "chosen", "rejected")]
    return "\n".join(out)
