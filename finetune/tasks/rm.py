"""Reward modeling: a one-output sequence-classification head trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from finetune import model as model_lib
from finetune.losses import bradley_terry_loss
from finetune.pairs import build_pair_data, pair_lengths
from finetune.tasks import LossOutput, TaskData

logger = logging.getLogger("finetune")


def pair_reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (the loop divides by the pair count): accuracy, margin, mean chosen/rejected reward."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
            "chosen_reward": chosen.sum(), "rejected_reward": rejected.sum()}


def score_head(model: Any) -> torch.nn.Module:
    """The scalar head (`score`, as on transformers' *ForSequenceClassification causal LMs) under any wrapping."""
    inner = model_lib.unwrap(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise model_lib.ModelError(f"data.packing: the reward model {type(inner).__name__} has no `score` head to "
                                   "read packed sequences from; set data.packing: false")
    return head


class RewardModelTask:
    name = "rm"

    def build_data(self, recipe: Any, tokenizer: Any) -> TaskData:
        progress = recipe.log.progress and logger.isEnabledFor(logging.INFO)
        train, evals, collate, sizes = build_pair_data(recipe, tokenizer, progress)
        self.center = recipe.rm.center_rewards
        return TaskData(train=train, eval=evals, collate=collate, train_lengths=pair_lengths(train),
                        eval_sources=sizes)

    def build_model(self, recipe: Any, accelerator: Any, tokenizer: Any) -> Any:
        # the pad token is set on the config, so the head scores each row's last non-pad token
        return model_lib.build(recipe.model, recipe.lora, recipe.train.gradient_checkpointing, accelerator.device,
                               tokenizer, kind="seq_cls", packed=recipe.data.packing)

    def prepare(self, recipe: Any, accelerator: Any, model: Any, eval_only: bool = False) -> None:
        self.token_scores: list[torch.Tensor] = []
        if recipe.data.packing:
            # a sequence-classification model pools one score per row; a packed row holds many sequences, so
            # keep the head's per-token scores and read each sequence's at its last token
            head = score_head(model)
            head.register_forward_hook(lambda module, args, out: self.token_scores.append(out))

    def rewards(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One scalar per sequence (2B: chosen then rejected), from one forward over all of them."""
        if "sequence_ends" not in batch:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        self.token_scores.clear()
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        return self.token_scores.pop()[0, batch["sequence_ends"], 0]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossOutput:
        chosen, rejected = self.rewards(model, batch).float().chunk(2)
        losses = bradley_terry_loss(chosen, rejected, batch["margin"])
        if self.center:  # keeps rewards near zero: the loss only sees differences
            losses = losses + self.center * (chosen + rejected) ** 2
        return LossOutput(loss_sum=losses.sum(), metric_sums=pair_reward_metrics(chosen, rejected))

    def extra_eval(self, recipe: Any, accelerator: Any, model: Any) -> dict[str, float]:
        return {}

    def finish(self, model: Any) -> None:
        pass  # nothing added for training alone
