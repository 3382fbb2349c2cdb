"""Tasks plug into the one loop (`finetune.loop.run`) through the small `Task` protocol below."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class LossOutput:
    """One micro-batch: the *summed* loss over its target items, and metric sums over the same items."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TaskData:
    train: Any  # a sized, indexable dataset of tokenized rows
    eval: Any | None
    collate: Any  # rows -> batch dict with a `num_items` tensor (target tokens or pairs)
    train_lengths: list[int] | None = None  # tokens per train row (for token-budget micro-batches)
    # several held-out sources: each one's name and rows, in order (`data.eval_sources`), for metrics of each
    eval_sources: list[tuple[str, int]] | None = None


class Task(Protocol):
    name: str

    def build_data(self, recipe: Any, tokenizer: Any) -> TaskData:
        """Tokenized train/eval datasets and the collator (called first: bad rows fail before a model loads)."""

    def build_model(self, recipe: Any, accelerator: Any, tokenizer: Any) -> Any:
        """The trainable model (LoRA applied if asked)."""

    def prepare(self, recipe: Any, accelerator: Any, model: Any, eval_only: bool = False) -> None:
        """Anything needed once the model is wrapped (e.g. a reference model); with `eval_only`, what evaluation
        needs, and nothing written."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Forward one micro-batch."""

    def extra_eval(self, recipe: Any, accelerator: Any, model: Any) -> dict[str, float]:
        """Task metrics beyond the loss, computed on the held-out split (e.g. generation accuracy)."""

    def finish(self, model: Any) -> None:
        """Undo what `build_model` added for training alone, on the unwrapped model the run returns."""


def get_task(name: str) -> Task:
    from finetune.tasks.dpo import DPOTask
    from finetune.tasks.rm import RewardModelTask
    from finetune.tasks.sft import SFTTask

    return {"sft": SFTTask, "rm": RewardModelTask, "dpo": DPOTask}[name]()
