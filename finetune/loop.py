"""The one training loop, shared by every task (SFT, reward modeling, DPO), driven by Hugging Face Accelerate.

Read it top to bottom: set up -> build model and data -> optimizer and schedule -> prepare -> resume ->
steps (accumulate, clip, step, log, evaluate, checkpoint) -> export.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from finetune import checkpoint, lock, precision
from finetune.config import Recipe, to_yaml
from finetune.errors import SaidByMainProcess, UserError, count, on_out_of_memory
from finetune.memory import bound_kernel_caches, heap_trimmer
from finetune.optimizer import build_optimizer, check_optimizer
from finetune.sampling import EpochBatches, TokenBudgetBatches, eval_shard
from finetune.schedule import lr_multiplier
from finetune.tasks import Task
from finetune.tracking import NullTracker, Tracker, read_metrics

logger = logging.getLogger("finetune")


@dataclass
class Result:
    output_dir: Path
    model_dir: Path
    metrics: dict[str, float]  # final train loss and final evaluation metrics
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # every logged event
    model: Any = field(default=None, repr=False)  # the trained (unwrapped) model, for notebooks and tests
    preempted: bool = False
    tokenizer: Any = field(default=None, repr=False)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # the recipe's, for prompts as in training

    def generate(self, *prompts: str, max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        """The trained model's answers to `prompts`, as `finetune generate` gives them from the exported one in the
        same dtype (on a GPU it loads bfloat16 by default, and this model may be float32)."""
        from finetune.generate import answers

        return list(answers(self.model, self.tokenizer, prompts, max_new_tokens, temperature,
                            kwargs=self.chat_template_kwargs))

    def score(self, prompt: str, *responses: str) -> list[float]:
        """A reward model's scores of `responses` to `prompt`, as `finetune score` gives them."""
        from finetune.score import scores

        return scores(self.model, self.tokenizer, prompt, list(responses), kwargs=self.chat_template_kwargs)


class _Signals:
    """SIGTERM/SIGINT: finish the step, save, exit cleanly (a second one stops at once). SIGUSR1: save a
    checkpoint after the current step and go on (a checkpoint on demand). Checked after each optimizer step."""

    def __init__(self) -> None:
        self.requested = False  # stop
        self.save_now = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self.save_now = True
            logger.warning("received SIGUSR1: saving a checkpoint after this step")
            return
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received signal %d: finishing this step, saving a checkpoint, then stopping", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _DropTiedWeightNotice(logging.Filter):
    """Accelerate warns on every save of a model with tied embeddings; the tie is restored on load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())


def quiet_libraries(warnings: bool = True) -> None:
    """No progress bars from transformers and datasets (loading, saving) and, unless `warnings`, no warnings."""
    import datasets
    import transformers

    if not warnings:
        transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _explain_oom(step: int, tokens: int, checkpoints: Path) -> Any:
    """A micro-batch that does not fit in GPU memory: one line with the recipe keys that make it fit."""
    return on_out_of_memory(f"step {step}: out of GPU memory on a micro-batch of {tokens} tokens "
                            f"({checkpoint.last_saved(checkpoints)}); lower train.batch_size (or train.batch_tokens, "
                            "data.max_length), or turn on train.gradient_checkpointing, train.fused_linear_loss or "
                            "lora.enabled")


@contextmanager
def _said_once() -> Iterator[None]:
    """For checks that fail alike in every process of a launch: the main process says the error, the others
    stop quietly (the CLI prints a SaidByMainProcess in the main process only)."""
    try:
        yield
    except SaidByMainProcess:
        raise
    except UserError as e:
        raise SaidByMainProcess(str(e)) from None


@contextmanager
def _main_process_first(accelerator: Any) -> Iterator[None]:
    """`accelerator.main_process_first()`, except that a user error on the main process (a bad row, too little
    data, a model that cannot load) stops the others too, quietly, instead of leaving them in the barrier until
    the main process exits and they fail with a traceback of their own."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        yield
        return
    said: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            yield
        except BaseException as e:  # a bug too: the others must not wait for a process that is gone
            said[0] = str(e) or type(e).__name__
            raise
        finally:
            accelerator.wait_for_everyone()
            broadcast_object_list(said)
    else:
        accelerator.wait_for_everyone()
        broadcast_object_list(said)
        if said[0] is not None:
            raise SaidByMainProcess(said[0])
        yield


def _amount(n: int) -> str:
    """12,345,678 -> '12.3M'; 45,678 -> '45.7k'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _format_metrics(metrics: dict[str, float]) -> str:
    special = {"lr": "{:.2e}", "tokens_per_s": "{:.0f}"}
    return "  ".join(f"{k}={special.get(k, '{:.4f}').format(v)}" for k, v in metrics.items())


def _diverged(grad_norm: Any, accelerator: Any) -> torch.Tensor:
    """1.0 on the device if the step's gradient norm is nan or inf: the optimizer has then made the weights nan.
    0.0 under fp16's loss scaler (it skips such steps itself) and under DeepSpeed (it reports a float or None)."""
    if accelerator.scaler is not None or not isinstance(grad_norm, torch.Tensor):
        return torch.zeros((), device=accelerator.device)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor, which cannot join a plain all-reduce
        grad_norm = grad_norm.full_tensor()
    return (~torch.isfinite(grad_norm)).float().to(accelerator.device)


def run(recipe: Recipe, task: Task, eval_only: bool = False) -> Result:
    """Train `task` as `recipe` says; with `eval_only`, only evaluate the model (or the checkpoint it would resume
    from) on the held-out data, writing nothing to output_dir."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    bound_kernel_caches()  # before the first matmul: CPU memory would grow with every new batch length
    cfg = recipe.train
    # ---- set up: the accelerator, seeds, output directory, who logs
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False,
                              dynamo_backend="inductor" if cfg.compile else "no")
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    with _said_once():  # the recipe against the launch: the same outcome in every process
        if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            # Accelerate would silently train in float32 (no fp16 autocast or loss scaler on CPU)
            raise UserError("train.mixed_precision: fp16 needs a GPU (on CPU Accelerate does not autocast to "
                            "fp16); use bf16 or no")
        check_optimizer(cfg.optimizer, accelerator.distributed_type.name)
        if launched > world:  # Accelerate's silent trap: N launched processes, each training alone
            raise UserError(f"{launched} processes were launched but Accelerate set up {world} (no distributed "
                            "backend); on CPU set ACCELERATE_USE_CPU=1 with a MULTI_GPU-type config "
                            "(see accelerate_configs/cpu_ddp.yaml)")
    if not main:  # only the main process logs and shows progress
        logger.setLevel(logging.ERROR)
        quiet_libraries(warnings=False)
    elif not recipe.log.progress:  # e.g. output going to a log file: no bars at all, the libraries' included
        quiet_libraries()
    set_seed(recipe.seed)  # python, numpy, torch (all devices); data order has its own seeded generator
    for unused in recipe.unused_settings():
        logger.warning(unused)
    if eval_only and not (recipe.data.eval or recipe.data.eval_fraction):
        raise UserError("--eval-only: needs held-out data to evaluate on: data.eval or data.eval_fraction")
    if eval_only and recipe.data.eval:  # no training rows are needed (nor need they be on this machine)
        d = recipe.data
        recipe = replace(recipe, data=replace(d, train=d.eval, split=d.eval_split))
    out = Path(recipe.output_dir)
    # eval_only writes nothing, so resume: false needs no overwrite_output_dir to evaluate the model itself
    candidates = checkpoint.resume_candidates(recipe.resume, out, recipe.overwrite_output_dir or eval_only)
    with _main_process_first(accelerator):  # the others wait, and stop too if the main process cannot start
        if main and not eval_only:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.claim(out)  # one live run per output_dir, before anything in it is deleted or written
                if not candidates and recipe.overwrite_output_dir:  # starting over: old checkpoints are not resumed
                    shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "recipe.yaml").write_text(to_yaml(recipe))
            except OSError as e:  # before any model is loaded: a run that cannot save must not start
                raise UserError(f"output_dir: cannot write to {out}: {e.strerror or e}") from None

    # ---- data, then model (the main process goes first so caches are written once)
    from finetune.model import (
        check_added_tokens,
        check_trainable_dtypes,
        frozen_weights_dtype,
        load_tokenizer,
        restore_float32,
        store_frozen_linears_in,
        unwrap,
    )

    budget = cfg.batch_tokens  # micro-batches of at most this many tokens instead of batch_size rows

    def train_sampler(epoch: int, start: int) -> EpochBatches | TokenBudgetBatches:
        if budget:
            return TokenBudgetBatches(data.train_lengths, budget, world, rank, recipe.seed, epoch, start)
        return EpochBatches(len(data.train), cfg.batch_size, world, rank, recipe.seed, epoch, start)

    procs = count(world, "process", "processes")
    with _main_process_first(accelerator):
        tokenizer = load_tokenizer(recipe.model)
        check_added_tokens(tokenizer, recipe.lora.enabled, accelerator.distributed_type.name)
        # data first, and checked: a bad row or too little data is refused before a large model loads
        data = task.build_data(recipe, tokenizer)
        if budget and data.train_lengths is None:
            raise UserError(f"train.batch_tokens: the {task.name} task does not support token-budget batches")
        per_epoch = len(train_sampler(0, 0))
        if per_epoch == 0 and not eval_only:
            rows = count(len(data.train), "row")
            if len(data.train) < world:
                raise UserError(f"data.train: {rows}, fewer than the {world} processes")
            if budget:
                raise UserError(f"data.train: {rows} cannot fill one batch of train.batch_tokens={budget} x {procs} "
                                "(one bin of rows per process); set train.batch_tokens lower")
            raise UserError(f"data.train: {rows} cannot fill one batch of train.batch_size={cfg.batch_size} x "
                            f"{procs}; set train.batch_size={len(data.train) // world} or lower")
        if data.eval is not None and len(data.eval) < world:
            raise UserError(f"data.eval: {count(len(data.eval), 'row')}, fewer than the {world} processes")
        model = task.build_model(recipe, accelerator, tokenizer)
    check_trainable_dtypes(model, cfg.mixed_precision)
    # after the data and model load, so that a user's mistake there is not preceded by advice about speed
    if main and not eval_only and cfg.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        advice = precision.bf16_cpu_advice(precision.bf16_matmul_speedup())  # some CPUs: half float32's speed
        if advice:
            logger.warning(advice)

    positions = getattr(unwrap(model).config, "max_position_embeddings", None)
    if positions and recipe.data.max_length > positions:
        logger.warning("data.max_length=%d is more than the model's max_position_embeddings=%d: longer sequences "
                       "reach positions it was not trained for", recipe.data.max_length, positions)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch / cfg.grad_accum)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params = sum(p.numel() for p in model.parameters())
    evals = count(0 if data.eval is None else len(data.eval), "eval row")
    if eval_only:
        logger.info("%s: %s, %.2fM parameters", task.name, evals, n_params / 1e6)
    else:
        rows = count(len(data.train), "train row")
        if data.train_lengths:  # what an epoch costs, in the unit throughput is measured in
            rows += f" ({_amount(sum(data.train_lengths))} tokens)"
        logger.info("%s: %s, %s, %s (%s/epoch x %s), %.2fM of %.2fM parameters trainable", task.name, rows, evals,
                    count(total_steps, "optimizer step"), count(per_epoch, "micro-batch", "micro-batches"), procs,
                    n_trainable / 1e6, n_params / 1e6)

    # ---- optimizer and warmup-then-decay schedule (a pure function of the step, stepped once per optimizer step)
    frozen_dtype = frozen_weights_dtype(cfg.mixed_precision, accelerator.distributed_type.name)
    # frozen weights (LoRA's base) kept in the dtype autocast casts them to at each step; float32 again at the end
    frozen_cast = [] if frozen_dtype is None else store_frozen_linears_in(model, frozen_dtype)

    optimizer = build_optimizer(model, cfg, accelerator.device.type)
    # warmup_ratio rounds up, as transformers does, but not a float's error: 0.28 x 25 steps is 7, not 8
    warmup = cfg.warmup_steps or math.ceil(round(cfg.warmup_ratio * total_steps, 9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, total_steps=total_steps, warmup_steps=warmup, min_ratio=cfg.min_lr_ratio,
                           shape=cfg.lr_schedule))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    task.prepare(recipe, accelerator, model, eval_only)
    wanted = checkpoint.recipe_hyperparameters(optimizer, scheduler)  # before a checkpoint overwrites them

    # ---- resume: restores model, optimizer, scheduler, scaler, RNG; the data order is positioned, not replayed
    resume_from, state = checkpoint.load_first_readable(accelerator, candidates, cfg.optimizer)
    units = world if budget else cfg.batch_size * world  # rows (or token-budget bins) per global batch
    if resume_from is not None and not eval_only:  # (eval_only says what it evaluates below)
        logger.info("resumed from %s at step %d", resume_from, state.step)
        changed = checkpoint.keep_recipe_hyperparameters(optimizer, scheduler, wanted)
        if changed:
            logger.warning("resuming with %s: the recipe's values apply from step %d on", ", ".join(changed),
                           state.step + 1)
        if state.step >= total_steps:
            logger.warning("the checkpoint is at step %d, the run has %d steps: nothing left to train; the model "
                           "is exported as it is (raise train.max_steps or epochs to go on)", state.step, total_steps)
        if state.batch_tokens != budget:
            logger.warning("resuming with train.batch_tokens=%d instead of %d: the batches differ, so the data "
                           "position restarts at the beginning of epoch %d", budget, state.batch_tokens, state.epoch)
            state.batch_in_epoch = 0
        elif state.rows_per_batch != units:
            # other processes or batch size: same row order, so re-cut the consumed prefix into this run's batches
            rows_done = state.batch_in_epoch * state.rows_per_batch
            state.batch_in_epoch = rows_done // units
            if rows_done % units:
                logger.warning("resuming with %d rows per global batch instead of %d: the data position is rounded "
                               "down to a whole batch", units, state.rows_per_batch)
    state.rows_per_batch, state.batch_tokens, state.optimizer = units, budget, cfg.optimizer
    if not eval_only:
        checkpoint.note_training_data(state, resume_from, len(data.train), sum(data.train_lengths or ()), recipe.seed)
    tracker = Tracker(out, recipe.log, recipe.to_dict(), state.step if resume_from else None) \
        if main and not eval_only else NullTracker()

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}

    def loader(batch_sampler: Any, dataset: Any, stream: int) -> torch.utils.data.DataLoader:
        # Its own generator: each new iterator draws its workers' base seed from it; from the global RNG (the
        # default) that draw would shift dropout's random numbers, and a resumed run creates a loader where
        # the uninterrupted one did not, so resuming would not be exact. `stream`: a distinct seed per loader.
        seeds = torch.Generator().manual_seed((recipe.seed * 1_000_003 + rank * 10_007 + stream + 1) % 2**63)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=data.collate,
                                           num_workers=recipe.data.num_workers, worker_init_fn=_seed_worker,
                                           generator=seeds, pin_memory=accelerator.device.type == "cuda")

    def micro_batches() -> Any:
        """Endless stream of this process's micro-batches, tracking (epoch, batch) for checkpoints."""
        epoch, start = state.epoch, state.batch_in_epoch
        while True:
            for i, batch in enumerate(loader(train_sampler(epoch, start), data.train, epoch), start=start):
                yield epoch, i + 1, batch
            epoch, start = epoch + 1, 0

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if data.eval is None:
            return {}
        model.eval()
        # several held-out sources: batches of one source each, whose sums are that source's metrics as well
        sources, batches, start = data.eval_sources or [("", len(data.eval))], [], 0
        for name, n in sources:
            shard, n_real = eval_shard(n, cfg.eval_rows, world, rank, start)
            batches += [(name, rows, i < n_real) for i, rows in enumerate(shard)]
            start += n
        totals: dict[tuple[str, str], torch.Tensor] = {}
        shown = tqdm(loader([rows for _, rows, _ in batches], data.eval, -1), desc="eval", total=len(batches),
                     leave=False, dynamic_ncols=True, disable=not (main and recipe.log.progress))
        for (name, _, real), batch in zip(batches, shown, strict=True):
            tokens = int(batch["num_tokens"])  # read on the CPU, before the move: no device sync per batch
            batch = to_device(batch)
            with on_out_of_memory(f"evaluation at step {state.step}: out of GPU memory on a batch of {tokens} "
                                  f"tokens; lower train.eval_batch_size (now {cfg.eval_rows} rows)"):
                result = task.loss(model, batch)
            got = {"loss": result.loss_sum.detach().float(), "items": batch["num_items"].float(),
                   **{k: v.detach().float() for k, v in result.metric_sums.items()}}
            for k, v in got.items():  # a padding batch, run only to keep sharded processes in step, adds 0
                totals[name, k] = totals.get((name, k), 0) + (v if real else torch.zeros_like(v))
        keys = sorted(totals)  # every process has every key: each runs a batch of each source
        reduced = dict(zip(keys, accelerator.reduce(torch.stack([totals[k] for k in keys]), "sum").tolist(),
                           strict=True))
        metrics: dict[str, float] = {}
        for prefix, source in [("", None), *((f"{name}_", name) for name, _ in data.eval_sources or ())]:
            sums: dict[str, float] = defaultdict(float)  # all rows' sums, then each source's
            for (name, k), v in reduced.items():
                if source in (None, name):
                    sums[k] += v
            items = max(sums.pop("items"), 1.0)
            metrics.update({f"eval_{prefix}{k}": v / items for k, v in sorted(sums.items())})
        model.train()
        with accelerator.autocast():  # e.g. generation, which does not go through the wrapped forward
            metrics.update(task.extra_eval(recipe, accelerator, model))
        return metrics

    def log_eval(step: int) -> dict[str, float]:
        metrics = evaluate()
        if metrics:
            state.eval_loss, state.eval_step = metrics["eval_loss"], step
            if state.lowest_eval_loss is None or state.eval_loss < state.lowest_eval_loss:
                state.lowest_eval_loss, state.evals_since_lowest = state.eval_loss, 0
            else:
                state.evals_since_lowest += 1
            tracker.log({"step": step, **metrics})
            sources = tuple(f"eval_{name}_" for name, _ in data.eval_sources or ())
            shown = {k: v for k, v in metrics.items() if not k.startswith(sources) or k.endswith(("loss", "accuracy"))}
            logger.info("step %d: %s", step, _format_metrics(shown))  # of each source its loss and accuracy
        return metrics

    # ---- the end of every run, defined before the steps for --eval-only, which ends after its evaluation
    def finish(final_eval: dict[str, float], last_train: dict[str, float], stopped: bool) -> Result:
        """Float32 weights back, the processes leave together, the model is freed from its wrappers and the
        task's training-only additions, and the metrics are returned."""
        nonlocal model
        tracker.close()
        restore_float32(frozen_cast)  # the returned model runs outside autocast too, e.g. in a notebook
        accelerator.wait_for_everyone()  # all processes leave together (avoids rare aborts at exit)
        # Free the DDP wrapper while the process group is still registered. Otherwise its reducer holds the last
        # reference to the gloo group after end_training, and freeing it (as this function returns) joins gloo's
        # worker threads with the GIL held: a worker still releasing the barrier above waits for the GIL, and the
        # process hangs at exit (seen about once in ten 2-process runs; pytorch/pytorch#56297).
        trained = accelerator.unwrap_model(model)
        task.finish(trained)
        model = None
        accelerator.free_memory()
        gc.collect()  # modules sit in reference cycles: collect them now, not after the group is gone
        accelerator.end_training()
        lock.release(out)
        metrics = {f"train_{k}": v for k, v in last_train.items()} | final_eval
        history = read_metrics(out / "metrics.jsonl") if main and not eval_only else []
        return Result(output_dir=out, model_dir=out / "model", metrics=metrics, steps=state.step, history=history,
                      model=trained, preempted=stopped, tokenizer=tokenizer,
                      chat_template_kwargs=recipe.data.chat_template_kwargs)

    # ---- the steps (none with eval_only: it evaluates and ends)
    if eval_only:
        logger.info("evaluating %s; nothing is trained or written", resume_from or recipe.model.name_or_path)
        return finish(log_eval(state.step), {}, False)
    final_eval = log_eval(0) if state.step == 0 else {}
    stream = micro_batches()
    trim = heap_trimmer(accelerator.device) if cfg.trim_memory else None
    model.train()
    progress = tqdm(total=total_steps, initial=state.step, desc=task.name, dynamic_ncols=True,
                    disable=not (main and recipe.log.progress))
    last_train: dict[str, float] = {}
    stopped = False  # agreed by all processes, even if only some of them got the signal
    t_last, tokens_since = time.perf_counter(), 0

    def converged() -> bool:  # train.early_stopping; the same on every process (eval losses are all-reduced)
        return bool(cfg.early_stopping) and state.evals_since_lowest >= cfg.early_stopping

    with _Signals() as signals:
        while state.step < total_steps and not converged():
            # Fetch this step's micro-batches first: the loss is normalised by the target items of all of them,
            # summed over all processes, so that K x B accumulation equals one batch of K*B (and W processes
            # equal one). DDP averages gradients over processes, hence the factor `world`.
            batches, micro_tokens = [], []
            for _ in range(cfg.grad_accum):
                epoch, next_batch, batch = next(stream)
                micro_tokens.append(int(batch["num_tokens"]))  # counted on the CPU: no device sync per micro-batch
                batches.append(to_device(batch))
            n_items = accelerator.reduce(sum(b["num_items"] for b in batches).float(), "sum")
            step_sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(batches):
                sync_now = i == len(batches) - 1
                with nullcontext() if sync_now else accelerator.no_sync(model), \
                        _explain_oom(state.step + 1, micro_tokens[i], out / "checkpoints"):
                    result = task.loss(model, batch)
                    accelerator.backward(result.loss_sum * world / n_items.clamp(min=1))
                if trim is not None:  # this micro-batch's activations are free now
                    trim()
                for k, v in {"loss": result.loss_sum, **result.metric_sums}.items():
                    step_sums[k] = step_sums.get(k, 0) + v.detach().float()
            tokens_since += sum(micro_tokens)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch, state.batch_in_epoch = (epoch + 1, 0) if next_batch == per_epoch else (epoch, next_batch)
            progress.update(1)

            if state.step % cfg.log_every == 0 or state.step == total_steps:
                keys = sorted(step_sums)
                reduced = accelerator.reduce(torch.stack([step_sums[k] for k in keys]), "sum")
                means = {k: v / max(n_items.item(), 1.0) for k, v in zip(keys, reduced.tolist(), strict=True)}
                tokens = accelerator.reduce(torch.tensor(tokens_since, device=accelerator.device), "sum").item()
                now = time.perf_counter()
                state.tokens_seen += tokens
                last_train = {"loss": means.pop("loss"), **means, "lr": lr, "grad_norm": float(grad_norm),
                              "tokens_per_s": tokens / max(now - t_last, 1e-9)}
                tracker.log({"step": state.step, "epoch": state.epoch, **last_train, "tokens_seen": state.tokens_seen})
                if not recipe.log.progress:  # e.g. a cluster job's log file: a line per logged step, not a bar
                    logger.info("step %d/%d: %s", state.step, total_steps, _format_metrics(last_train))
                progress.set_postfix(loss=f"{last_train['loss']:.4f}", lr=f"{lr:.2e}",
                                     tok_s=f"{last_train['tokens_per_s']:.0f}")
                t_last, tokens_since = now, 0

            paused_at = time.perf_counter()
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == total_steps:
                final_eval = log_eval(state.step)
            # one reduction per step (it syncs anyway): a signal on any process (one that came during a long
            # evaluation included), and a diverged update
            dev = accelerator.device
            flags = accelerator.reduce(torch.stack([torch.tensor(float(signals.requested), device=dev),
                                                    torch.tensor(float(signals.save_now), device=dev),
                                                    _diverged(grad_norm, accelerator)]), "sum").tolist()
            stopped, save_now = flags[0] > 0, flags[1] > 0
            signals.save_now = False
            if flags[2]:
                progress.close()
                raise UserError(f"step {state.step}: the gradient norm is {float(grad_norm)}: training diverged; "
                                f"stopped without saving ({checkpoint.last_saved(out / 'checkpoints')}); lower "
                                "train.lr, keep train.max_grad_norm on, or look for broken rows")
            if (cfg.save_every and state.step % cfg.save_every == 0) or stopped or save_now:
                path = checkpoint.save(accelerator, out / "checkpoints", state, cfg.keep_checkpoints)
                logger.info("saved checkpoint %s", path)
            t_last += time.perf_counter() - paused_at  # tokens/s measures training, not evaluation or saving
            if stopped:
                break
    progress.close()
    if converged():
        logger.info("early stopping at step %d of %d: %s in a row without an eval_loss below %.4f", state.step,
                    total_steps, count(state.evals_since_lowest, "evaluation"), state.lowest_eval_loss)

    # ---- export the final model (or adapter) with its tokenizer; with train.export_best, the weights of the
    # evaluated checkpoint with the lowest eval loss instead, when the last step's are worse
    best = state.best_checkpoint
    if not stopped and cfg.export_best and best and state.best_eval_loss < final_eval.get("eval_loss", math.inf):
        last = final_eval.get("eval_loss", math.nan)
        accelerator.load_state(str(out / "checkpoints" / best))  # the run is over: only its weights matter now
        final_eval = evaluate()
        logger.info("exporting %s, the evaluated checkpoint with the lowest loss (eval_loss=%.4f; the last step's "
                    "%.4f)", best, final_eval["eval_loss"], last)
    if not stopped:
        model_dir = out / "model"
        checkpoint.export_model(accelerator, model, tokenizer, model_dir, out / "checkpoints",
                                template_kwargs=recipe.data.chat_template_kwargs)
        logger.info("saved the model to %s", model_dir)
    else:
        logger.warning("stopped at step %d of %d; run the same command again (resume: auto) to continue",
                       state.step, total_steps)
    return finish(final_eval, last_train, stopped)
