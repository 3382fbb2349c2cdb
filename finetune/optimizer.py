"""The optimizer a recipe names (`train.optimizer`), over the model's trainable parameters.

`adamw`: torch's AdamW, fused (one kernel per step instead of a chain of elementwise ops per tensor:
benchmarks/bench_optimizer.py measures about 5x faster steps on CPU; transformers' Trainer, and so TRL, defaults
to it as well). Its state is two float32 tensors per weight: 8 bytes per trained parameter.

The others are bitsandbytes' (no update rule is written here):
- `adamw_8bit`: AdamW8bit, the same update with both moments stored block-wise quantised to 8 bits (Dettmers et
  al. 2022): 2 bytes per trained parameter. For full fine-tuning that is most of the optimizer's memory back,
  e.g. 6 GB of a 1B model's 8 GB.
- `lion`: Lion (Chen et al. 2023), the sign of a momentum interpolation: one moment, 4 bytes per parameter;
  `lion_8bit` stores it in 8 bits, 1 byte. train.adam_beta1/adam_beta2 are its betas; it has no epsilon.
- `paged_adamw_8bit`, `paged_adamw_32bit`, `paged_lion_8bit`: the same updates with the state in CUDA unified
  memory, which the driver pages out to CPU memory when the GPU runs short instead of failing with an
  out-of-memory error (QLoRA's paged optimizers). On a CPU they are their unpaged twins.
Tensors under 4096 elements keep float32 moments in the 8-bit variants.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.errors import UserError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only; biases and norm weights (1-D) never decay. Frozen params left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# bitsandbytes' optimizer classes, by train.optimizer
BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "lion": "Lion", "lion_8bit": "Lion8bit",
                "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit",
                "paged_lion_8bit": "PagedLion8bit"}


def check_optimizer(name: str, distributed_type: str) -> None:
    """Refuse an optimizer this run cannot use, before the model is loaded."""
    if name not in BITSANDBYTES:
        return
    if distributed_type == "FSDP":
        # measured with FSDP2, whose sharded parameters are DTensors: the first step stops in bitsandbytes'
        # kernels, 8-bit ("got mixed torch.Tensor and DTensor") and 32-bit ("no sharding strategy registered")
        raise UserError(f"train.optimizer: {name} does not work under FSDP, whose sharded parameters bitsandbytes "
                        f"cannot update; use adamw (FSDP shards its state), or data parallel (DDP) with {name}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"train.optimizer: {name} needs bitsandbytes; pip install 'finetune[qlora]'") from None


def build_optimizer(model: torch.nn.Module, cfg: Any, device_type: str) -> torch.optim.Optimizer:
    """`cfg.optimizer` over `model`'s trainable parameters, with the recipe's lr, betas, eps and weight decay."""
    groups = param_groups(model, cfg.weight_decay)
    hyper = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2)}
    if cfg.optimizer in BITSANDBYTES:
        import bitsandbytes as bnb

        eps = {} if "lion" in cfg.optimizer else {"eps": cfg.adam_eps}
        return getattr(bnb.optim, BITSANDBYTES[cfg.optimizer])(groups, **hyper, **eps)
    return torch.optim.AdamW(groups, eps=cfg.adam_eps, fused=device_type in ("cpu", "cuda"), **hyper)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (bitsandbytes keeps some in a nested dict)."""
    def size(value: Any) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0
    return sum(size(s) for s in optimizer.state.values())
