"""Checkpoints: atomic save through `accelerator.save_state`, find the newest complete one, resume, export.

Layout: OUTPUT_DIR/checkpoints/step-0000100/ holds Accelerate's state (model, optimizer, scheduler, scaler, the
RNG state of every process; sharded under FSDP), `trainer_state.json` and a `complete` marker. A checkpoint is
written under a temporary name and renamed only when every process has finished, so a crash never leaves a
half-written `step-*` directory and never touches the previous one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

logger = logging.getLogger("finetune")

MARKER = "complete"
STATE_FILE = "trainer_state.json"
TEMPLATE_KWARGS = "chat_template_kwargs.json"  # an exported model's data.chat_template_kwargs


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    tokens_seen: int = 0
    rows_per_batch: int = 0  # global micro-batch (batch_size x processes, or token-budget bins) of the saver
    batch_tokens: int = 0  # the saver's train.batch_tokens (0: micro-batches were batch_size rows)
    eval_loss: float | None = None  # most recent held-out loss when this state was saved
    eval_step: int = -1  # the step it was measured at
    lowest_eval_loss: float | None = None  # over every evaluation so far, saved or not (early stopping)
    evals_since_lowest: int = 0
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    train_rows: int = 0  # the saver's training data, to notice a resume on other data (0: not recorded)
    train_tokens: int = 0
    seed: int | None = None  # the saver's seed, which orders the rows of each epoch (None: not recorded)
    optimizer: str | None = None  # the saver's train.optimizer, whose state the checkpoint holds (None: adamw)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest first. Temporary and unmarked directories are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def last_saved(root: Path) -> str:
    """For error messages: where a stopped run can resume from."""
    kept = complete_checkpoints(root)
    return f"the last complete checkpoint, {kept[0]}, is untouched" if kept else "no checkpoint was saved yet"


def note_training_data(state: TrainerState, resumed_from: Path | None, rows: int, tokens: int, seed: int) -> None:
    """Record the size of this run's training data and the seed that orders it in `state`, warning first if a
    resumed checkpoint was saved with other data or another seed: the run goes on from the checkpoint's batch
    position, which then points at other rows."""
    if resumed_from is not None and state.train_rows and (state.train_rows, state.train_tokens) != (rows, tokens):
        logger.warning("the training data differ from those of %s (%d rows, %d tokens; now %d rows, %d tokens): "
                       "training goes on from the same batch position, so rows may be skipped or repeated in "
                       "this epoch", resumed_from, state.train_rows, state.train_tokens, rows, tokens)
    if resumed_from is not None and state.seed is not None and state.seed != seed:
        logger.warning("resuming %s with seed=%d, not its run's %d: the rows of this epoch are in another order "
                       "from here, so rows may be skipped or repeated in it (the random state, e.g. dropout's, is "
                       "the checkpoint's)", resumed_from, seed, state.seed)
    state.train_rows, state.train_tokens, state.seed = rows, tokens, seed


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


@contextmanager
def writing(tmp: Path, what: str, root: Path) -> Iterator[None]:
    """Writes into `tmp`; an OSError there (a full disk, a lost mount) removes `tmp`, so a failed save does not
    keep the space it took, and stops the run with one line that names the last complete checkpoint."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{what} failed: {e.strerror or e}; {last_saved(root)}: fix that and run again to "
                        "resume") from None


def save(accelerator: Any, root: Path, state: TrainerState, keep: int) -> Path:
    """Write a checkpoint of the current state on every process; return its final directory."""
    final = step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp, f"saving checkpoint {final.name}", root):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    # the best is a checkpoint whose own weights were evaluated (a save between evaluations holds weights that
    # the latest eval_loss does not describe); every process tracks it, as all of them act on it at the end
    evaluated = state.eval_loss is not None and state.eval_step == state.step
    if evaluated and (state.best_eval_loss is None or state.eval_loss <= state.best_eval_loss):
        state.best_eval_loss, state.best_checkpoint = state.eval_loss, final.name
    if accelerator.is_main_process:
        with writing(tmp, f"saving checkpoint {final.name}", root):
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            (tmp / MARKER).write_text("")
        old = root / f".old-{final.name}"
        if final.exists():  # the same step saved again (e.g. after resuming from it): swap, then delete
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        prune(root, keep, state.best_checkpoint)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int, best: str | None) -> None:
    """Delete all but the newest `keep` complete checkpoints, never the best one."""
    for path in complete_checkpoints(root)[max(keep, 1):]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)


def resume_candidates(resume: str | bool, output_dir: Path, overwrite: bool) -> list[Path]:
    """Checkpoints to try, in order (`resume: auto`: newest complete first), or [] to start fresh."""
    root = output_dir / "checkpoints"
    if resume is False or resume == "false":
        if complete_checkpoints(root) and not overwrite:
            raise UserError(f"resume: false, but {root} already holds checkpoints; set resume: auto to continue "
                            "or overwrite_output_dir: true to start over")
        return []
    if resume == "auto":
        return complete_checkpoints(root)
    path = Path(resume)
    if not (path / MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise UserError(f"resume: {resume} is not a complete checkpoint directory (no {MARKER} marker)")
    return [path]


def load_first_readable(accelerator: Any, candidates: list[Path], optimizer: str) -> tuple[Path | None, TrainerState]:
    """Restore the first checkpoint that loads; unreadable ones (e.g. a truncated file) are skipped with a
    warning. Restores model, optimizer, scheduler, scaler and RNG state; nothing but tensors is unpickled.
    A checkpoint of another `train.optimizer` is refused: its state cannot become this optimizer's."""
    for path in candidates:
        try:
            state = read_state(path)
            if (state.optimizer or "adamw") != optimizer:
                raise UserError(f"resume: {path} holds the state of train.optimizer {state.optimizer or 'adamw'}, "
                                f"not {optimizer}; resume with that optimizer, or set resume: false and "
                                "overwrite_output_dir: true to start over")
            sharded = (path / "pytorch_model_fsdp_0").is_dir()
            if sharded and accelerator.distributed_type.name != "FSDP":
                load_shards_unsharded(accelerator, path)
            else:
                accelerator.load_state(str(path))
            return path, state
        except UserError:
            raise
        except Exception as e:  # a damaged checkpoint must not stop the run while an older one is good
            logger.warning("skipping unreadable checkpoint %s: %s", path, str(e).splitlines()[0] if str(e) else e)
    if candidates:
        raise UserError(f"no readable checkpoint among {', '.join(str(p) for p in candidates)} (saved by a run with "
                        "another model, task or LoRA setting? Point output_dir elsewhere, or set "
                        "resume: false and overwrite_output_dir: true to start over)")
    return None, TrainerState()


# optimizer hyperparameters a checkpoint restores, by the recipe key that sets them
_HYPERPARAMETERS = {"lr": "train.lr", "weight_decay": "train.weight_decay", "betas": "train.adam_beta1/adam_beta2",
                    "eps": "train.adam_eps"}


def recipe_hyperparameters(optimizer: Any, scheduler: Any) -> list[dict[str, Any]]:
    """Each param group's hyperparameters as the recipe set them, before a checkpoint is loaded (the peak lr is
    the scheduler's base lr)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    return [{k: base if k == "lr" else g[k] for k in _HYPERPARAMETERS}
            for g, base in zip(optimizer.param_groups, inner.base_lrs, strict=True)]


def keep_recipe_hyperparameters(optimizer: Any, scheduler: Any, wanted: list[dict[str, Any]]) -> list[str]:
    """Put back the recipe's hyperparameters after a checkpoint restored the earlier run's (a resume with a lower
    train.lr would otherwise keep the old one, silently); the lr goes on from the schedule's current step.
    Returns what differed, as `key=new (was old)`; with nothing changed nothing is touched (exact resume)."""
    inner = getattr(scheduler, "scheduler", scheduler)
    changed: dict[str, str] = {}
    for i, (group, want) in enumerate(zip(optimizer.param_groups, wanted, strict=True)):
        had = {k: inner.base_lrs[i] if k == "lr" else group[k] for k in want}
        for k, v in want.items():
            if (tuple(had[k]) if k == "betas" else had[k]) != (tuple(v) if k == "betas" else v):
                changed.setdefault(k, f"{_HYPERPARAMETERS[k]}={_short(v)} (was {_short(had[k])})")
                if k == "lr":
                    inner.base_lrs[i] = group["initial_lr"] = v
                    group["lr"] = v * inner.lr_lambdas[i](inner.last_epoch)
                else:
                    group[k] = v
    if "lr" in changed:
        inner._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() says (it is logged)
    return list(changed.values())


def _short(value: Any) -> str:
    return "/".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else f"{value:g}"


def load_shards_unsharded(accelerator: Any, path: Path) -> None:
    """Resume an FSDP (sharded, torch distributed checkpoint) checkpoint without FSDP, e.g. on one process:
    model, optimizer and scheduler are loaded and resharded by DCP; RNG streams restart from the seed."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if len(accelerator._models) != 1 or len(accelerator._optimizers) != 1:
        raise UserError(f"resume: {path} is an FSDP checkpoint; resuming it without FSDP supports one model and "
                        "one optimizer")
    model = accelerator.unwrap_model(accelerator._models[0])
    optimizer = accelerator._optimizers[0].optimizer
    weights = get_model_state_dict(model)
    dcp.load({"model": weights}, checkpoint_id=str(path / "pytorch_model_fsdp_0"))
    set_model_state_dict(model, weights)
    optim = get_optimizer_state_dict(model, optimizer)  # initialises empty Adam state so every entry is loaded
    dcp.load({"optimizer": optim}, checkpoint_id=str(path / "optimizer_0"))
    set_optimizer_state_dict(model, optimizer, optim)
    for i, scheduler in enumerate(accelerator._schedulers):
        name = "scheduler.bin" if i == 0 else f"scheduler_{i}.bin"
        scheduler.scheduler.load_state_dict(torch.load(path / name, weights_only=True))
    logger.warning("resumed the FSDP checkpoint %s without FSDP: model, optimizer and scheduler restored; random "
                   "streams (dropout) are not those of the original processes", path)


def export_model(accelerator: Any, model: Any, tokenizer: Any, target: Path, checkpoints: Path,
                 max_shard_size: str = "5GB", template_kwargs: dict[str, Any] | None = None) -> None:
    """Save the final model (or LoRA adapter) with its tokenizer, loadable by `from_pretrained`; atomic.
    Weights larger than `max_shard_size` are split into shards with an index, as on the hub. `template_kwargs`
    (data.chat_template_kwargs), where set, go beside them for `finetune generate` and `score`."""
    state_dict = accelerator.get_state_dict(model)  # gathers full tensors from shards under FSDP
    if accelerator.is_main_process:
        tmp = target.parent / f".tmp-{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "peft_config"):  # an adapter: one file
            # tokens added to the vocabulary are stored as their trained rows (peft's trainable tokens), which
            # replace whatever rows the base gets when it is resized on load: not the whole resized embeddings too
            added = unwrapped.peft_config["default"].trainable_token_indices
            options = {"save_embedding_layers": False} if added else {}
        else:
            options = {"max_shard_size": max_shard_size}
        with writing(tmp, f"exporting the model to {target}", checkpoints):
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True, **options)
            tokenizer.save_pretrained(str(tmp))
            if template_kwargs:
                (tmp / TEMPLATE_KWARGS).write_text(json.dumps(template_kwargs, indent=2) + "\n")
        old = target.parent / f".old-{target.name}"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
