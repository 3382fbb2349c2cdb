"""Preference pairs: validate rows, render prompt and responses, truncate, and collate chosen+rejected batches.

Rows hold `prompt`, `chosen`, `rejected` and an optional numeric `margin`, either
- as strings: the prompt text followed by each response text (plus the tokenizer's eos); without `prompt`, the
  texts' shared beginning is the prompt (as TRL's `extract_prompt`), or
- conversational: `chosen`/`rejected` are message lists rendered with the chat template; the prompt is the shared
  leading messages (or `prompt`, a message list, when given, with `chosen`/`rejected` being only the responses;
  a text `prompt` is the user's message when the lists share no leading messages, and ignored when they do).

Truncation keeps the *end* of the prompt (at most `max_prompt_length` tokens) and cuts the responses to fit
`max_length`; pairs left with an empty response are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from finetune import attention
from finetune.chat import chat_args, check_messages, render_after_prompt, row_messages, sharegpt_messages
from finetune.collate import pad
from finetune.data import (
    ROWS,
    Numbering,
    Part,
    TokenColumns,
    concatenate,
    eval_sources,
    fractions,
    list_lengths,
    map_rows,
    tokenizer_workers,
    train_eval_rows,
)
from finetune.errors import DataError
from finetune.losses import IGNORE_INDEX
from finetune.model import attention_for
from finetune.tokenized import cached

logger = logging.getLogger("finetune")


@dataclass(frozen=True)
class PairStats:
    rows: int
    kept: int
    truncated: int
    dropped_empty: int


def _split_conversation(row: dict[str, Any], where: str) -> tuple[list, list, list]:
    chosen = check_messages(row["chosen"], f"{where} (chosen)")
    rejected = check_messages(row["rejected"], f"{where} (rejected)")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return check_messages(prompt, f"{where} (prompt)"), chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared:  # the conversations hold the prompt; a text `prompt` beside them repeats it (HuggingFaceH4's sets)
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(prompt, str):  # responses alone, after a text prompt: the user's message
        return [{"role": "user", "content": prompt}], chosen, rejected
    raise DataError(f"{where}: chosen and rejected share no leading prompt messages; add a 'prompt' field")


def _split_text(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """Prompt, chosen and rejected of texts that begin with their prompt (Anthropic/hh-rlhf): the longest shared
    beginning, less a space before the responses, which they keep (TRL's `extract_prompt`)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    if not n:
        raise DataError(f"{where}: chosen and rejected share no leading text and there is no 'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]


def _render_chat(tokenizer: Any, prompt: list, response: list, where: str,
                 args: dict[str, Any]) -> tuple[list[int], list[int]]:
    head, full = render_after_prompt(tokenizer, prompt, response, where, "conversational pairs", args)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])


def encode_pair(row: dict[str, Any], tokenizer: Any, max_length: int, max_prompt_length: int,
                where: str, template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Token ids of the prompt and both responses, truncated; `truncated` / `empty` flags for the counts.
    `template_kwargs`: data.chat_template_kwargs."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{where}: missing field {key!r} (expected prompt, chosen, rejected; data.columns can "
                            "rename yours)")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: expected 'margin' to be a number, got {type(margin).__name__}")
    once = row["rejected"] is row["chosen"]  # KTO's unpaired rows pass one completion as both: tokenized once
    if isinstance(row.get("conversations"), list) and isinstance(row["chosen"], dict) \
            and isinstance(row["rejected"], dict):  # LLaMA-Factory's ShareGPT pairs: the turns so far, then one each
        for key in ("chosen", "rejected"):
            if "from" not in row[key] or "value" not in row[key]:
                raise DataError(f"{where}: expected '{key}' to be one turn {{from, value}}, as 'conversations' holds")
        row = {**row, "prompt": row_messages(row, "sharegpt", f"{where} (conversations)"),
               **{key: sharegpt_messages([row[key]], f"{where} ({key})") for key in ("chosen", "rejected")}}
    if isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        texts = row.get("prompt"), row["chosen"], row["rejected"]
        if texts[0] is None:  # the prompt is the beginning both texts share
            texts = _split_text(row["chosen"], row["rejected"], where)
        elif not isinstance(texts[0], str):
            raise DataError(f"{where}: expected 'prompt' to be a string like 'chosen' and 'rejected'")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt = tokenizer(texts[0])["input_ids"]
        chosen = tokenizer(texts[1], add_special_tokens=False)["input_ids"] + eos
        rejected = chosen if once else tokenizer(texts[2], add_special_tokens=False)["input_ids"] + eos
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        p_msgs, c_msgs, r_msgs = _split_conversation(row, where)
        args = chat_args(row, where, tokenizer, template_kwargs)
        prompt, chosen = _render_chat(tokenizer, p_msgs, c_msgs, where, args)
        rejected = chosen if once else _render_chat(tokenizer, p_msgs, r_msgs, where, args)[1]
    else:
        raise DataError(f"{where}: expected 'chosen' and 'rejected' to be both strings or both message lists")
    longest = len(prompt) + max(len(chosen), len(rejected))
    truncated = longest > max_length
    if truncated:
        prompt = prompt[-max_prompt_length:]  # keep the end of the prompt: the question is usually last
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin or 0.0),
            "truncated": truncated, "empty": not chosen or not rejected}


def encode_pairs(rows: Any, source: str, tokenizer: Any, max_length: int, max_prompt_length: int,
                 progress: bool = True, uid_start: int = 0, workers: int = 1, numbering: Numbering = ROWS,
                 template_kwargs: dict[str, Any] | None = None) -> tuple[Any, PairStats]:
    """Tokenize all preference rows into a `datasets.Dataset` (prompt, chosen, rejected, margin, uid).

    `uid` numbers the kept pairs from `uid_start`, so train and eval pairs can share one table of reference
    log-probs. `numbering`: how messages number the rows (`Part.numbering`); `template_kwargs`:
    data.chat_template_kwargs."""
    max_prompt_length = max_prompt_length or max_length // 2
    out, truncated = TokenColumns("prompt", "chosen", "rejected"), 0

    def encode(row: Any, where: str) -> dict:
        return encode_pair(row, tokenizer, max_length, max_prompt_length, where, template_kwargs)

    empty: list[int] = []
    for i, enc in enumerate(map_rows(encode, rows, source, progress, workers, numbering)):
        truncated += enc["truncated"]
        if enc["empty"]:
            empty.append(i)
        else:
            out.append(prompt=enc["prompt"], chosen=enc["chosen"], rejected=enc["rejected"], margin=enc["margin"],
                       uid=uid_start + len(out))
    kept = len(out)
    stats = PairStats(rows=len(rows), kept=kept, truncated=truncated, dropped_empty=len(rows) - kept)
    if truncated:
        logger.warning("%s: %d of %d pairs truncated (prompt end kept, at most %d tokens; responses cut to fit "
                       "data.max_length=%d)", source, truncated, stats.rows, max_prompt_length, max_length)
    if stats.dropped_empty:
        logger.warning("%s: dropped %d of %d pairs whose response is empty after truncation (first: %s)", source,
                       stats.dropped_empty, stats.rows, numbering.of(empty[0]))
    if not kept:
        raise DataError(f"{source}: no pair is left after truncation to data.max_length={max_length}")
    return out.dataset(), stats


def encode_kto_rows(rows: Any, source: str, tokenizer: Any, max_length: int, max_prompt_length: int,
                    progress: bool = True, uid_start: int = 0, workers: int = 1, numbering: Numbering = ROWS,
                    template_kwargs: dict[str, Any] | None = None) -> Any:
    """KTO's rows as pairs the DPO task's machinery runs (one forward, reference, packing, cached reference
    log-probs): `chosen` is the row's completion, `rejected` the completion of the row before it (cyclically),
    whose log-ratio under this prompt estimates KTO's KL reference point, and `label` says whether the completion
    is desirable. Rows are `prompt`, `completion` and a boolean `label` (TRL's unpaired format), or preference
    pairs, unpaired into a desirable chosen row and an undesirable rejected one (the chosen rows first, so that
    no row's KL completion answers its own prompt)."""

    max_prompt_length = max_prompt_length or max_length // 2

    def encode(row: Any, where: str) -> list[dict]:
        if isinstance(row, dict) and "completion" in row:
            if not isinstance(row.get("label"), bool):
                raise DataError(f"{where}: expected 'label' to be true or false (is the completion desirable?), got "
                                f"{row.get('label')!r}")
            if row.get("prompt") is None and not isinstance(row["completion"], list):
                raise DataError(f"{where}: expected a 'prompt' beside the completion")
            enc = encode_pair({**row, "chosen": row["completion"], "rejected": row["completion"]}, tokenizer,
                              max_length, max_prompt_length, where, template_kwargs)
            return [{**enc, "label": row["label"]}]
        if not isinstance(row, dict) or "chosen" not in row:
            raise DataError(f"{where}: expected prompt, completion and label (or a preference pair: prompt, chosen, "
                            "rejected) for dpo.loss_type kto; data.columns can rename yours")
        enc = encode_pair(row, tokenizer, max_length, max_prompt_length, where, template_kwargs)
        return [{**enc, "label": True}, {**enc, "chosen": enc["rejected"], "label": False}]

    def kept_parts(item: dict, row: int, prompt: np.ndarray) -> dict:  # int32 tokens, as `TokenColumns` keeps them
        return {"prompt": prompt, "chosen": np.asarray(item["chosen"], dtype=np.int32), "label": item["label"],
                "row": row}

    firsts, seconds, truncated = [], [], 0
    for i, items in enumerate(map_rows(encode, rows, source, progress, workers, numbering)):
        truncated += items[0]["truncated"]
        prompt = np.asarray(items[0]["prompt"], dtype=np.int32)  # one copy for both rows of an unpaired pair
        firsts.append(kept_parts(items[0], i, prompt))
        seconds += [kept_parts(item, i, prompt) for item in items[1:]]
    kept = [e for e in firsts + seconds if len(e["chosen"])]
    if truncated:
        logger.warning("%s: %d of %d rows truncated (prompt end kept, at most %d tokens; completions cut to fit "
                       "data.max_length=%d)", source, truncated, len(rows), max_prompt_length, max_length)
    empty = [e["row"] for e in firsts + seconds if not len(e["chosen"])]
    if empty:
        logger.warning("%s: dropped %d completions that are empty after truncation (first: %s)", source, len(empty),
                       numbering.of(empty[0]))
    if not kept:
        raise DataError(f"{source}: no completion is left after truncation to data.max_length={max_length}")
    out = TokenColumns("prompt", "chosen", "rejected")
    for i, e in enumerate(kept):
        out.append(prompt=e["prompt"], chosen=e["chosen"],
                   rejected=kept[i - 1]["chosen"][:max_length - len(e["prompt"])],  # the KL completion
                   margin=0.0, label=e["label"], uid=uid_start + i)
    return out.dataset()


def build_pair_data(recipe: Any, tokenizer: Any, progress: bool
                    ) -> tuple[Any, Any | None, PairCollator, list[tuple[str, int]] | None]:
    """Tokenized train and held-out pairs (uids numbered across both), their collator, and the held-out
    sources' names and sizes when there are several (`data.eval_sources`)."""
    d = recipe.data
    train_parts, eval_parts = train_eval_rows(d, recipe.seed)

    kto = recipe.dpo.loss_types == ["kto"]

    def encode(part: Part, uid_start: int) -> Any:
        settings = {"task": "kto" if kto else "pairs", "max_length": d.max_length,
                    "max_prompt_length": d.max_prompt_length, "uid_start": uid_start,
                    "numbering": part.numbering,  # rows are named in its warnings
                    "chat_template_kwargs": d.chat_template_kwargs}
        args = (part.rows, part.source, tokenizer, d.max_length, d.max_prompt_length, progress, uid_start,
                tokenizer_workers(d.num_proc), part.numbering, d.chat_template_kwargs)
        return cached(part.rows, part.source, tokenizer, settings, enabled=d.cache_tokenized,
                      encode=lambda: encode_kto_rows(*args) if kto else encode_pairs(*args)[0])

    def encode_all(parts: list[Part], uid_start: int) -> list[Any]:
        encoded = []
        for part in parts:  # uids run on across sources and on from train into eval
            encoded.append(encode(part, uid_start))
            uid_start += len(encoded[-1])
        return encoded

    # a pair a mixture takes twice keeps its uid
    train = concatenate(encode_all(train_parts, 0), fractions(d.train), recipe.seed)
    # held-out uids follow every train pair's, also those a mixture's fraction below 1 leaves out
    held = None if eval_parts is None else encode_all(eval_parts, max(train["uid"]) + 1)
    evals = None if held is None else concatenate(held)
    # the prompt runs once per pair where the attention understands shared prefixes (sdpa_varlen); not for KTO,
    # whose two completions of a row run in separate forwards (`split_sides`)
    share = d.packing and not kto and attention_for(recipe.model, d.packing) == attention.NAME
    return train, evals, PairCollator(tokenizer.pad_token_id, d.packing, share), held and eval_sources(d, held)


def pair_tokens(prompt: int, chosen: int, rejected: int) -> int:
    """Tokens a pair holds, from its parts' lengths: the prompt twice (once before each response) plus both
    responses."""
    return 2 * prompt + chosen + rejected


def pair_lengths(pairs: Any) -> list[int]:
    """`pair_tokens` of every pair of a tokenized dataset."""
    lengths = (list_lengths(pairs, key) for key in ("prompt", "chosen", "rejected"))
    return [pair_tokens(*parts) for parts in zip(*lengths, strict=True)]


def split_sides(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A `PairCollator` batch (without a shared prompt) as two batches of the same layout: its chosen sequences
    and its rejected ones, each with only the model's inputs and the labels. Padded rows are cut to the longest
    of their half; packed sequences keep their positions, and the rejected ones' segments are renumbered from 0."""
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    if "segment_ids" not in batch:
        n = batch["input_ids"].shape[0] // 2
        halves = []
        for rows in (slice(0, n), slice(n, 2 * n)):
            width = int(batch["attention_mask"][rows].sum(1).max())
            halves.append({k: batch[k][rows, :width] for k in keys if k in batch})
        return halves[0], halves[1]
    segments = batch["segment_ids"]
    n = (int(segments.max()) + 1) // 2
    first = segments < n
    chosen = {k: batch[k][first][None] for k in (*keys, "segment_ids") if k in batch}
    rejected = {k: batch[k][~first][None] for k in (*keys, "segment_ids") if k in batch}
    rejected["segment_ids"] = rejected["segment_ids"] - n
    return chosen, rejected


class PairCollator:
    """Batches of B pairs as 2B sequences, chosen first then rejected, for one concatenated forward.

    `labels` mask the prompt and padding, so log-probs cover response tokens only. Padded (default): 2B rows
    with an attention mask. Packed (`packed=True`, padding-free): all sequences in one row with `position_ids`
    restarting per sequence, `segment_ids` numbering them token by token (chosen 0..B-1, rejected B..2B-1), and
    `sequence_ends` (the index of each one's last token, where a reward model reads its score). With
    `share_prompt` (needs `sdpa_varlen` attention), a pair is laid out as `prompt + chosen` followed by
    `last prompt token + rejected` at positions continuing the prompt, so the prompt runs once per pair; the
    repeated last prompt token is what predicts the first rejected token. When the task has precomputed
    reference log-probs, `ref_logps` (a (n, 2) tensor indexed by uid) is attached per pair.
    """

    def __init__(self, pad_token_id: int, packed: bool = False, share_prompt: bool = False):
        self.pad_token_id = pad_token_id
        self.packed, self.share_prompt = packed, share_prompt
        self.ref_logps: torch.Tensor | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packed:
            batch = self.packed_tensors(rows, self.share_prompt)
        else:
            seqs, labels = [], []
            for side in ("chosen", "rejected"):
                for r in rows:
                    seqs.append(r["prompt"] + r[side])
                    labels.append([IGNORE_INDEX] * len(r["prompt"]) + r[side])
            batch = {"input_ids": pad(seqs, self.pad_token_id), "labels": pad(labels, IGNORE_INDEX),
                     "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
        # tokens of both sequences in full, also when the prompt is shared: what the batch represents
        if "label" in rows[0]:  # kto: whether each row's completion (`chosen`) is desirable
            batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch.update({"margin": torch.tensor([r["margin"] for r in rows]),
                      "uid": torch.tensor([r["uid"] for r in rows]), "num_items": torch.tensor(len(rows)),
                      "num_tokens": torch.tensor(sum(pair_tokens(len(r["prompt"]), len(r["chosen"]),
                                                                 len(r["rejected"])) for r in rows))})
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[batch["uid"]]
        return batch

    @staticmethod
    def packed_tensors(rows: list[dict[str, Any]], share_prompt: bool) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        ends = [0] * (2 * len(rows))

        def add(tokens: list[int], targets: list[int], start: int, segment: int) -> None:
            ids.extend(tokens)
            labels.extend([IGNORE_INDEX] + targets[1:])  # a sequence's first token is no target of the one before
            positions.extend(range(start, start + len(tokens)))
            segments.extend([segment] * len(tokens))
            ends[segment] = len(ids) - 1

        n = len(rows)
        for i, r in enumerate(rows):
            p = r["prompt"]
            add(p + r["chosen"], [IGNORE_INDEX] * len(p) + r["chosen"], 0, i)
            if share_prompt and p:
                add(p[-1:] + r["rejected"], [IGNORE_INDEX] + r["rejected"], len(p) - 1, n + i)
            else:
                add(p + r["rejected"], [IGNORE_INDEX] * len(p) + r["rejected"], 0, n + i)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "segment_ids": torch.tensor([segments]),
                "sequence_ends": torch.tensor(ends)}
