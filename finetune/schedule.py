"""Learning-rate schedule as a pure function of the optimizer step."""

from __future__ import annotations

import math

SHAPES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float, shape: str = "cosine") -> float:
    """LR multiplier for optimizer step `step` (0-based: the multiplier used for the update made at that step).

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then a decay of the given `shape` reaching exactly
    `min_ratio` on the last step (`total_steps - 1`) and staying there if training runs longer: `cosine` (half a
    cosine), `linear` (a straight line), or `constant` (no decay: 1 after the warmup, `min_ratio` unused).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if shape == "constant":
        return 1.0
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    left = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * left
