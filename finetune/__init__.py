"""finetune: one small Accelerate training loop for SFT, LoRA/QLoRA, reward modeling and DPO.

    import finetune
    result = finetune.train("recipes/tiny_sft.yaml", **{"train.max_steps": 50})
    result.metrics["eval_loss"], result.model_dir

Heavy libraries (torch, transformers) load only when training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import ConfigError, Recipe, load_recipe, set_dotted
from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.loop import Result

__all__ = ["train", "evaluate", "load_recipe", "Recipe", "ConfigError", "UserError"]
__version__ = "0.1.0"


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1e-4, "lora": {"r": 8}, "seed": 1}` -> one nested dict."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(nested, key, value)
    return nested


def train(recipe: str | Path | dict[str, Any] | Recipe, task: str | None = None, **overrides: Any) -> Result:
    """Train from a recipe (a YAML path, a dict or a `Recipe`) with overrides; return a `Result`.

    Overrides are dotted keys (`**{"train.lr": 1e-4}`), whole sections (`train={"lr": 1e-4}`) or top-level keys
    (`output_dir="runs/x"`). `task` (sft, rm, dpo) overrides the recipe's `task`. Can be called repeatedly in one
    process (e.g. a notebook).
    """
    return _run(recipe, task, overrides, eval_only=False)


def evaluate(recipe: str | Path | dict[str, Any] | Recipe, task: str | None = None, **overrides: Any) -> Result:
    """Evaluate the recipe's model (or the checkpoint it would resume from) on its held-out data, as a run does
    at step 0, without training or writing anything; `Result.metrics` holds the evaluation. Arguments as in
    `train`, e.g. `evaluate("recipes/tiny_sft.yaml", **{"model.name_or_path": "runs/tiny_sft/model"})`."""
    return _run(recipe, task, overrides, eval_only=True)


def _run(recipe: str | Path | dict[str, Any] | Recipe, task: str | None, overrides: dict[str, Any],
         eval_only: bool) -> Result:
    from accelerate.state import AcceleratorState, GradientState

    from finetune.loop import run
    from finetune.tasks import get_task

    nested = _nest(overrides)
    if task is not None:
        nested["task"] = task
    resolved = load_recipe(recipe, nested)
    # Accelerate keeps process-wide singletons; a second run in the same process may use other settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return run(resolved, get_task(resolved.task), eval_only=eval_only)
