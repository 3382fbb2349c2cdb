"""Where metrics go: metrics.jsonl always, TensorBoard when installed, Weights & Biases when enabled.

Only the main process creates a `Tracker`; the others get `NullTracker`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from finetune.errors import UserError

logger = logging.getLogger("finetune")


class NullTracker:
    def log(self, event: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    def __init__(self, output_dir: Path, log_cfg: Any, recipe_dict: dict[str, Any], resume_step: int | None):
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop events logged after the checkpoint we resume from: they will be produced again
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        self.tb = None
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                logger.info("tensorboard not installed; logging to metrics.jsonl only")
        self.wandb = None
        if log_cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("log.wandb: true needs the wandb package; pip install 'finetune[wandb]'") from None
            self.wandb = wandb.init(project=log_cfg.wandb_project, dir=str(output_dir), config=recipe_dict,
                                    name=output_dir.name)

    def log(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        step = event.get("step", 0)
        scalars = {k: v for k, v in event.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key if key.startswith("eval") else f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
