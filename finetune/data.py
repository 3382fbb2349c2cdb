"""Load rows (local files, hub datasets, builtins), render them, tokenize them and mask the loss.

Supported row formats:
- chat: `messages` = [{role, content}, ...], rendered with the tokenizer's chat template;
- prompt_completion: `prompt`, `completion` strings;
- alpaca: `instruction`, optional `input`, `output` (rendered with the classic Alpaca prompt);
- text: `text`, trained on every token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.builtin import builtin_rows, is_builtin
from finetune.errors import UserError
from finetune.losses import IGNORE_INDEX

logger = logging.getLogger("finetune")

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class DataError(UserError):
    """Bad data the user must fix (printed as one line, exit code 2)."""


@dataclass(frozen=True)
class EncodeStats:
    rows: int
    kept: int
    truncated: int
    dropped_no_target: int


# --------------------------------------------------------------------------------------------- loading


def load_rows(source: str, split: str) -> Any:
    """A `datasets.Dataset` from a builtin name, a local JSONL/JSON/Parquet file, or a hub dataset name."""
    import datasets

    if is_builtin(source):
        try:
            return datasets.Dataset.from_list(builtin_rows(source, split))
        except ValueError as e:
            raise DataError(str(e)) from None
    path = Path(source)
    if path.is_file():
        loader = FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{source}: expected a .jsonl, .json or .parquet file")
        try:
            return datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"{source}: could not be read as {loader}: {str(e).splitlines()[0]}") from None
    if path.suffix.lower() in FILE_LOADERS or source.startswith((".", "/")):
        raise DataError(f"{source}: file not found")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"{source}: not a local file, and the hub dataset could not be loaded "
                        f"(offline or unknown name?): {str(e).splitlines()[0]}") from None


def detect_format(columns: list[str], source: str, wanted: str = "auto") -> str:
    required = {"chat": {"messages"}, "prompt_completion": {"prompt", "completion"},
                "alpaca": {"instruction", "output"}, "text": {"text"}}
    if wanted != "auto":
        missing = required[wanted] - set(columns)
        if missing:
            raise DataError(f"{source}: data.format={wanted} needs column(s) {sorted(missing)}; found {columns}")
        return wanted
    for fmt, cols in required.items():
        if cols <= set(columns):
            return fmt
    raise DataError(f"{source}: cannot tell the format from columns {columns}; expected 'messages', "
                    "'prompt'+'completion', 'instruction'+'output' or 'text'")


# --------------------------------------------------------------------------------------------- rendering


def _check_str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected {what} to be a string, got {type(value).__name__}")
    return value


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected 'messages' to be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        _check_str(m["content"], f"messages[{i}].content", where)
    return messages


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


def chat_ids_and_mask(tokenizer: Any, messages: list[dict[str, str]], where: str = "chat") -> tuple[list, list]:
    """Token ids of a rendered chat and a 0/1 mask of assistant tokens (including each turn's end token).

    Templates with `{% generation %}` markers use transformers' own assistant mask. For templates without
    them (most real models), each assistant turn's character span is found by rendering the conversation up to
    it, and tokens are assigned through the tokenizer's offsets.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat rows need a tokenizer with a chat template, and this tokenizer has none")
    if has_generation_markers(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later turns follow, "
                            "so assistant tokens cannot be located; use a template with {% generation %} markers "
                            "or set data.completion_only_loss: false")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def prompt_and_completion(row: dict[str, Any], fmt: str, where: str) -> tuple[str, str]:
    """The prompt text and the target text of a prompt_completion or alpaca row."""
    if fmt == "prompt_completion":
        return _check_str(row["prompt"], "'prompt'", where), _check_str(row["completion"], "'completion'", where)
    extra = _check_str(row.get("input") or "", "'input'", where)
    prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                  instruction=_check_str(row["instruction"], "'instruction'", where),
                                  input=f"### Input:\n{extra}\n\n" if extra else "")
    return prompt, _check_str(row["output"], "'output'", where)


def encode_row(row: dict[str, Any], fmt: str, tokenizer: Any, max_length: int, completion_only: bool,
               where: str) -> dict[str, Any]:
    """Tokenize one row into `input_ids` and `labels` (IGNORE_INDEX where no loss), truncated on the right."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        ids, mask = chat_ids_and_mask(tokenizer, check_messages(row["messages"], where), where)
    elif fmt == "text":
        ids = tokenizer(_check_str(row["text"], "'text'", where))["input_ids"] + eos
        mask = [1] * len(ids)
    else:
        prompt, completion = prompt_and_completion(row, fmt, where)
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids, mask = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not completion_only:
        mask = [1] * len(ids)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    # the first token is never a target (nothing predicts it)
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "n_targets": sum(mask[1:])}


def encode_dataset(ds: Any, source: str, fmt: str, tokenizer: Any, max_length: int,
                   completion_only: bool) -> tuple[Any, EncodeStats]:
    """Tokenize every row, report truncation, drop rows left with no target token."""
    fmt = detect_format(list(ds.column_names), source, fmt)

    def encode(row: dict[str, Any], idx: int) -> dict[str, Any]:
        return encode_row(row, fmt, tokenizer, max_length, completion_only, f"{source}: row {idx}")

    encoded = ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc=f"Tokenizing {source}")
    n_targets = encoded["n_targets"]
    kept_idx = [i for i, n in enumerate(n_targets) if n > 0]
    stats = EncodeStats(rows=len(encoded), kept=len(kept_idx), truncated=sum(encoded["truncated"]),
                        dropped_no_target=len(encoded) - len(kept_idx))
    if stats.truncated:
        logger.warning("%s: %d of %d rows truncated to data.max_length=%d", source, stats.truncated, stats.rows,
                       max_length)
    if stats.dropped_no_target:
        logger.warning("%s: dropped %d of %d rows that have no trainable token left (after truncation to %d)",
                       source, stats.dropped_no_target, stats.rows, max_length)
    if not kept_idx:
        raise DataError(f"{source}: no row has a trainable token (all {stats.rows} dropped); check data.format, "
                        f"data.max_length={max_length} and data.completion_only_loss")
    if len(kept_idx) < len(encoded):
        encoded = encoded.select(kept_idx)
    return encoded.select_columns(["input_ids", "labels"]), stats
