"""Supervised fine-tuning: next-token loss on assistant/completion tokens, plus greedy-generation exact match."""

from __future__ import annotations

import logging
from typing import Any

import torch

from finetune import model as model_lib
from finetune.chat import CHAT_FORMATS, apply_template, chat_args, conversational_prompt, row_messages
from finetune.collate import CausalLMCollator, pad
from finetune.data import (
    ROWS,
    Numbering,
    Part,
    column_names,
    concatenate,
    detect_format,
    encode_dataset,
    eval_sources,
    fractions,
    list_lengths,
    prompt_and_completion,
    row_name,
    take,
    tokenizer_workers,
    train_eval_rows,
)
from finetune.errors import on_out_of_memory
from finetune.losses import causal_lm_loss
from finetune.model import accepts_logits_to_keep, causal_lm_forward, output_head, target_logps
from finetune.tasks import LossOutput, TaskData
from finetune.tokenized import cached

logger = logging.getLogger("finetune")


def generation_examples(rows: Any, source: str, fmt: str, tokenizer: Any, limit: int, numbering: Numbering = ROWS,
                        template_kwargs: dict[str, Any] | None = None) -> list[tuple[list, str]]:
    """(prompt ids, reference answer) pairs for exact-match scoring; rows without a reference are skipped.
    `template_kwargs`: data.chat_template_kwargs."""
    fmt = detect_format(column_names(rows), source, fmt)
    out = []
    for i, row in enumerate(take(rows, list(range(min(limit, len(rows)))))):
        where = row_name(source, i, numbering)
        if fmt in CHAT_FORMATS or (conversation := conversational_prompt(row, fmt, where)):
            msgs = row_messages(row, fmt, where) if fmt in CHAT_FORMATS else conversation[0] + conversation[1]
            ref = msgs[-1].get("content")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or ref is None:  # e.g. a tool call: no text
                continue
            ids = apply_template(tokenizer, msgs[:-1], where, tokenize=True, add_generation_prompt=True,
                                 return_dict=True, **chat_args(row, where, tokenizer, template_kwargs))["input_ids"]
            out.append((list(ids), ref))
        elif fmt in ("prompt_completion", "alpaca"):
            prompt, ref = prompt_and_completion(row, fmt, where)
            out.append((tokenizer(prompt)["input_ids"], ref))
    return out


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, examples: list[tuple[list, str]], max_new_tokens: int,
                batch_size: int, device: torch.device, progress: bool = False, synced: bool = False) -> list[bool]:
    """Greedy-decode each prompt; whether each answer equals its reference after stripping whitespace.
    `synced`: every process decodes until all are done (sharded models run a collective per forward)."""
    from tqdm.auto import tqdm

    correct: list[bool] = []
    starts = range(0, len(examples), batch_size)
    with model_lib.in_eval_mode(model):
        for start in tqdm(starts, desc="generate", leave=False, dynamic_ncols=True, disable=not progress):
            chunk = examples[start:start + batch_size]
            ids = pad([p for p, _ in chunk], tokenizer.pad_token_id, left=True).to(device)
            mask = pad([[1] * len(p) for p, _ in chunk], 0, left=True).to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            correct += [t.strip() == ref.strip() for t, (_, ref) in zip(texts, chunk, strict=True)]
    return correct


class SFTTask:
    name = "sft"

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.examples: list[tuple[list, str]] = []
        self.example_sources: list[int] = []  # each example's held-out source, where there are several
        self.source_names: list[str] = []
        self.keep_logits = False
        self.head: Any = None  # the fused output layer, with train.fused_linear_loss

    def build_data(self, recipe: Any, tokenizer: Any) -> TaskData:
        d, self.tokenizer = recipe.data, tokenizer
        progress = recipe.log.progress and logger.isEnabledFor(logging.INFO)  # off on non-main processes
        train_parts, eval_parts = train_eval_rows(d, recipe.seed)

        def encode(part: Part) -> Any:
            settings = {"task": "sft", "format": d.format, "max_length": d.max_length,
                        "completion_only_loss": d.completion_only_loss, "numbering": part.numbering,  # in warnings
                        "chat_template_kwargs": d.chat_template_kwargs}
            return cached(part.rows, part.source, tokenizer, settings, enabled=d.cache_tokenized,
                          encode=lambda: encode_dataset(part.rows, part.source, d.format, tokenizer, d.max_length,
                                                        d.completion_only_loss, progress,
                                                        tokenizer_workers(d.num_proc), part.numbering,
                                                        d.chat_template_kwargs)[0])

        train = concatenate([encode(part) for part in train_parts], fractions(d.train), recipe.seed)
        evals = sizes = None
        if eval_parts is not None:
            encoded = [encode(part) for part in eval_parts]
            evals, sizes = concatenate(encoded), eval_sources(d, encoded)
            # the first train.eval_generate held-out rows: across sources, or of each where they are named apart
            self.examples, self.example_sources = [], []
            self.source_names = [name for name, _ in sizes or ()]
            for i, part in enumerate(eval_parts):
                limit = recipe.train.eval_generate - (0 if sizes else len(self.examples))
                if limit > 0:
                    got = generation_examples(part.rows, part.source, d.format, tokenizer, limit, part.numbering,
                                              d.chat_template_kwargs)
                    self.examples += got
                    self.example_sources += [i] * len(got)
        return TaskData(train=train, eval=evals, collate=CausalLMCollator(tokenizer.pad_token_id, d.packing),
                        train_lengths=list_lengths(train, "input_ids"), eval_sources=sizes)

    def build_model(self, recipe: Any, accelerator: Any, tokenizer: Any) -> Any:
        model = model_lib.build(recipe.model, recipe.lora, recipe.train.gradient_checkpointing, accelerator.device,
                                tokenizer, packed=recipe.data.packing, fused_head=recipe.train.fused_linear_loss)
        self.neftune = None
        if recipe.train.neftune_alpha:  # noise on the input embeddings in training mode only (transformers' hook)
            from transformers.integrations.neftune import activate_neftune

            self.neftune = activate_neftune(model, recipe.train.neftune_alpha)
        return model

    def finish(self, model: Any) -> None:
        if self.neftune is not None:  # the returned model trains on without noise, as after TRL's training
            self.neftune.remove()

    def prepare(self, recipe: Any, accelerator: Any, model: Any, eval_only: bool = False) -> None:
        self.keep_logits = accepts_logits_to_keep(model)
        self.head = output_head(model) if recipe.train.fused_linear_loss else None

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossOutput:
        if self.head is not None:
            return LossOutput(loss_sum=-target_logps(model, batch, self.head).sum())
        logits = causal_lm_forward(model, batch, self.keep_logits)
        loss_sum, _ = causal_lm_loss(logits, batch["labels"])
        return LossOutput(loss_sum=loss_sum)

    def extra_eval(self, recipe: Any, accelerator: Any, model: Any) -> dict[str, float]:
        if not self.examples:
            return {}
        world = accelerator.num_processes
        mine = self.examples[accelerator.process_index::world]
        sources = self.example_sources[accelerator.process_index::world]
        sharded = accelerator.distributed_type.name == "FSDP"
        if sharded:  # every forward all-gathers weights: the same prompts, batches and decode steps everywhere
            real, per_process = len(mine), -(-len(self.examples) // world)
            mine = mine + self.examples[:per_process - real]  # padding, not counted
        at_once = recipe.train.eval_batch_size or 4 * recipe.train.batch_size
        with on_out_of_memory(f"train.eval_generate: out of GPU memory decoding {at_once} prompts at a time; set "
                              "train.eval_batch_size lower"):
            correct = exact_match(accelerator.unwrap_model(model), self.tokenizer, mine, recipe.train.max_new_tokens,
                                  at_once, accelerator.device, recipe.log.progress and accelerator.is_main_process,
                                  synced=sharded)
        if sharded:
            correct = correct[:real]
        # (right, answered) of all examples, then of each named source's
        counts = [[0.0, 0.0] for _ in range(1 + len(self.source_names))]
        for ok, source in zip(correct, sources, strict=True):
            for row in (0, 1 + source) if self.source_names else (0,):
                counts[row][0] += ok
                counts[row][1] += 1
        counts = accelerator.reduce(torch.tensor(counts, device=accelerator.device), "sum").tolist()
        metrics = {"eval_accuracy": counts[0][0] / max(1, counts[0][1])}
        for name, (right, answered) in zip(self.source_names, counts[1:], strict=True):
            if answered:
                metrics[f"eval_{name}_accuracy"] = right / answered
        return metrics
