"""Direct preference optimisation (and IPO, SimPO, ORPO, KTO, ...) against a reference policy, or none.

The reference is, by cost:
- with LoRA: the same model with its adapter disabled (no second copy in memory);
- `dpo.precompute_ref_logps`: log-probs computed once before training by the initial model, cached on disk;
- otherwise: a frozen copy of the initial model.
`dpo.ref_model` names another model as the reference: loaded frozen beside the policy (also with LoRA), or only
while its log-probs are precomputed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from finetune import model as model_lib
from finetune.errors import on_out_of_memory
from finetune.losses import dpo_loss, kto_loss, per_sequence, sequence_lengths, sequence_logps
from finetune.model import accepts_logits_to_keep, causal_lm_forward, target_logps
from finetune.pairs import build_pair_data, pair_lengths, split_sides
from finetune.sampling import eval_shard
from finetune.tasks import LossOutput, TaskData

logger = logging.getLogger("finetune")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")


def data_key(recipe: Any, train: Any, evals: Any | None) -> str:
    """Cache key of reference log-probs: the reference model and every token of the pairs."""
    m = recipe.model
    h = hashlib.sha256(json.dumps([m.name_or_path, m.revision, m.dtype, m.load_in_4bit, m.load_in_8bit,
                                   recipe.dpo.ref_model]).encode())
    for ds in (train, evals):
        if ds is not None:
            for column in ("prompt", "chosen", "rejected", "uid"):
                h.update(json.dumps(ds[column][:]).encode())
    return h.hexdigest()[:24]


class DPOTask:
    name = "dpo"

    def __init__(self) -> None:
        self.ref_model: Any = None
        self.lora = False
        self.keep_logits = False
        self.head: Any = None  # fused output layers, with train.fused_linear_loss
        self.ref_head: Any = None
        self.reduce: Any = None  # sums a tensor over processes, when there are several

    def build_data(self, recipe: Any, tokenizer: Any) -> TaskData:
        progress = recipe.log.progress and logger.isEnabledFor(logging.INFO)
        self.train, self.evals, self.collate, sizes = build_pair_data(recipe, tokenizer, progress)
        return TaskData(train=self.train, eval=self.evals, collate=self.collate,
                        train_lengths=pair_lengths(self.train), eval_sources=sizes)

    def build_model(self, recipe: Any, accelerator: Any, tokenizer: Any) -> Any:
        self.cfg, self.lora = recipe.dpo, recipe.lora.enabled
        model = model_lib.build(recipe.model, recipe.lora, recipe.train.gradient_checkpointing, accelerator.device,
                                tokenizer, packed=recipe.data.packing, fused_head=recipe.train.fused_linear_loss)
        if self.cfg.ref_model and not self.cfg.reference_free:
            reference = dataclasses.replace(recipe.model, name_or_path=self.cfg.ref_model, revision=None)
            self.ref_model = model_lib.load_model(reference, tokenizer, accelerator.device, packed=recipe.data.packing)
            vocab, ref_vocab = (m.get_input_embeddings().num_embeddings for m in (model, self.ref_model))
            if vocab != ref_vocab:
                raise model_lib.ModelError(f"dpo.ref_model: {self.cfg.ref_model} has a vocabulary of {ref_vocab} "
                                           f"tokens, the policy {vocab}; the two must share the tokenizer")
            if recipe.train.fused_linear_loss:
                model_lib.make_fused_head(self.ref_model)
            self.ref_model.eval().requires_grad_(False)
        elif not self.lora and not self.cfg.precompute_ref_logps and not self.cfg.reference_free:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def prepare(self, recipe: Any, accelerator: Any, model: Any, eval_only: bool = False) -> None:
        self.keep_logits = accepts_logits_to_keep(model)
        if accelerator.num_processes > 1:
            self.reduce = accelerator.reduce
        precompute = self.cfg.precompute_ref_logps and not self.cfg.reference_free
        if self.ref_model is not None and precompute:  # dpo.ref_model, needed only until its log-probs are computed
            self.ref_model.to(accelerator.device)
        elif self.ref_model is not None:
            frozen_dtype = model_lib.frozen_weights_dtype(recipe.train.mixed_precision,
                                                          accelerator.distributed_type.name)
            if frozen_dtype is not None:  # the whole copy is frozen: cast once instead of at every forward
                model_lib.store_frozen_linears_in(self.ref_model, frozen_dtype)
            self.ref_model = accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        if recipe.train.fused_linear_loss:
            self.head = model_lib.output_head(model)
            self.ref_head = None if self.ref_model is None else model_lib.output_head(self.ref_model)
        if precompute:
            # runs before any checkpoint is loaded, so `model` is still the initial policy = the reference (or
            # dpo.ref_model is, which is then freed)
            self.collate.ref_logps = self.cached_reference(recipe, accelerator, model, eval_only)
            self.ref_model = self.ref_head = None

    # ---- reference log-probs

    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(pairs, 2) summed log-probs of chosen and rejected under the reference policy."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                return self.pair_logps(self.ref_model, batch, self.ref_head)
            with self.adapter_off(model):
                return self.pair_logps(model, batch, self.head)

    def pair_logps(self, model: Any, batch: dict[str, torch.Tensor], head: Any) -> torch.Tensor:
        """(pairs, 2) summed log-probs of chosen and rejected (one forward over both; prompts masked out)."""
        return self.logps_of(model, batch, head).view(2, -1).T

    def logps_of(self, model: Any, batch: dict[str, torch.Tensor], head: Any) -> torch.Tensor:
        """(sequences,) summed log-probs of each sequence's targets, by rows or packed segments."""
        segments = batch.get("segment_ids")
        if head is not None:  # train.fused_linear_loss
            return per_sequence(target_logps(model, batch, head), batch["labels"], segment_ids=segments)
        return sequence_logps(causal_lm_forward(model, batch, self.keep_logits), batch["labels"],
                              segment_ids=segments)

    def unpaired_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO's (rows, 2) log-probs: each row's completion, and its mismatched completion in a forward without
        gradients. KTO does not differentiate its reference point, so a backward through those would be wasted."""
        completions, mismatched = split_sides(batch)
        with torch.no_grad():  # first: its activations are freed before the completions' are held
            kl_logps = self.logps_of(model, mismatched, self.head)
        return torch.stack([self.logps_of(model, completions, self.head), kl_logps], 1)

    def adapter_off(self, model: Any) -> Any:
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model).disable_adapter() if self.lora else nullcontext()

    def cached_reference(self, recipe: Any, accelerator: Any, model: Any, eval_only: bool) -> torch.Tensor:
        """(pairs, 2) reference log-probs indexed by uid (train pairs, then held-out ones), from the file in
        output_dir/ref_logps or computed and written there; with `eval_only`, of the held-out pairs only and not
        written (the train pairs' rows stay 0)."""
        import datasets
        from safetensors.torch import load_file, save_file

        path = Path(recipe.output_dir) / "ref_logps" / f"{data_key(recipe, self.train, self.evals)}.safetensors"
        if path.is_file():
            logger.info("reference log-probs from %s", path)
            return load_file(str(path))["ref_logps"]
        if eval_only:
            rows = self.evals
        else:
            rows = self.train if self.evals is None else datasets.concatenate_datasets([self.train, self.evals])
            first = {uid: i for i, uid in reversed(list(enumerate(rows["uid"])))}  # a pair a mixture repeats
            if len(first) < len(rows):
                rows = rows.select(sorted(first.values()))
        size = recipe.train.eval_rows
        batches, n_real = eval_shard(len(rows), size, accelerator.num_processes, accelerator.process_index)
        values = torch.zeros(len(batches), size, 2)
        uids = torch.full((len(batches), size), -1, dtype=torch.long)
        model.eval()
        from tqdm.auto import tqdm

        show = accelerator.is_main_process and recipe.log.progress
        for i, idx in enumerate(tqdm(batches, desc="reference log-probs", disable=not show, leave=False)):
            batch = {k: v.to(accelerator.device) for k, v in self.collate([rows[j] for j in idx]).items()}
            with on_out_of_memory(f"reference log-probs: out of GPU memory on a batch of {len(idx)} pairs; lower "
                                  f"train.eval_batch_size (now {size} rows)"):
                logps = self.reference_logps(model, batch).float().cpu()
            if i < n_real:
                values[i, :len(idx)], uids[i, :len(idx)] = logps, batch["uid"].cpu()
        model.train()
        values = accelerator.gather(values.to(accelerator.device)).cpu().view(-1, 2)
        uids = accelerator.gather(uids.to(accelerator.device)).cpu().view(-1)
        # uids index it: a mixture may leave out train pairs (fraction < 1) or repeat them (> 1)
        held = [] if self.evals is None else list(self.evals["uid"])
        table = torch.zeros(1 + max(list(self.train["uid"]) + held), 2)
        table[uids[uids >= 0]] = values[uids >= 0]
        if accelerator.is_main_process and not eval_only:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"ref_logps": table}, str(tmp))
            tmp.rename(path)
            logger.info("reference log-probs of %d pairs cached at %s", len(rows), path)
        accelerator.wait_for_everyone()
        return table

    # ---- the loss

    def unpaired_loss(self, policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor) -> LossOutput:
        """KTO on rows laid out as pairs (`pairs.encode_kto_rows`): column 0 the completion, column 1 a mismatched
        completion under the same prompt. KTO's reference point is their mean log-ratio in this micro-batch over
        all processes (as TRL's), clamped at 0 and not differentiated."""
        log_ratios = (policy[:, 1] - ref[:, 1]).detach()
        totals = torch.stack([log_ratios.sum(), log_ratios.new_tensor(float(len(log_ratios)))])
        if self.reduce is not None:  # every process runs every micro-batch, evaluation's padding ones included
            totals = self.reduce(totals, "sum")
        kl = (totals[0] / totals[1]).clamp(min=0)
        losses, rewards = kto_loss(policy[:, 0], ref[:, 0], desirable, kl, beta=self.cfg.beta,
                                   desirable_weight=self.cfg.desirable_weight,
                                   undesirable_weight=self.cfg.undesirable_weight)
        n = torch.tensor(float(len(losses)), device=losses.device)
        signed = torch.where(desirable.bool(), rewards, -rewards)  # above 0: desirable completions gained
        metrics = {"kl": kl * n, "rewards": rewards.sum(), "rewards/margin": signed.sum(),
                   "logps": policy[:, 0].detach().sum()}
        return LossOutput(loss_sum=losses.sum(), metric_sums=metrics)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossOutput:
        if "label" in batch:
            return self.unpaired_loss(self.unpaired_logps(model, batch), self.reference_logps(model, batch),
                                      batch["label"])
        kinds = self.cfg.loss_types
        weights = self.cfg.loss_weights or [1.0] * len(kinds)
        ref = None if self.cfg.reference_free else self.reference_logps(model, batch)
        policy = self.pair_logps(model, batch, self.head)
        lengths = sequence_lengths(batch["labels"], segment_ids=batch.get("segment_ids")).clamp(min=1).view(2, -1).T
        # RPO's term (Pang et al. 2024): the chosen response's negative log-likelihood per token, pair by pair
        chosen_nll = -policy[:, 0] / lengths[:, 0]
        losses = None
        for i, (kind, weight) in enumerate(zip(kinds, weights, strict=True)):  # TRL's loss list: a weighted sum
            averaged = kind in LENGTH_AVERAGED
            p = policy / lengths if averaged else policy
            r = None if ref is None else ref / lengths if averaged else ref
            term, chosen_rewards, rejected_rewards = dpo_loss(
                p[:, 0], p[:, 1], None if r is None else r[:, 0], None if r is None else r[:, 1],
                beta=self.cfg.beta, loss_type=kind, label_smoothing=self.cfg.label_smoothing, gamma=self.cfg.gamma)
            losses = weight * term if losses is None else losses + weight * term
            if i == 0:  # the rewards and log-probs logged are the first loss's
                logged = chosen_rewards.detach(), rejected_rewards.detach(), p.detach()
        chosen_rewards, rejected_rewards, logps = logged
        # TRL's names; `accuracy` repeats rewards/accuracy so every task with one logs `eval_accuracy`
        accuracy = (chosen_rewards > rejected_rewards).float().sum()
        metrics = {"accuracy": accuracy, "rewards/accuracy": accuracy,
                   "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                   "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
                   "logps/chosen": logps[:, 0].sum(), "logps/rejected": logps[:, 1].sum(),
                   "nll": chosen_nll.detach().sum()}
        if self.cfg.rpo_alpha:
            losses = losses + self.cfg.rpo_alpha * chosen_nll
        return LossOutput(loss_sum=losses.sum(), metric_sums=metrics)

    def extra_eval(self, recipe: Any, accelerator: Any, model: Any) -> dict[str, float]:
        return {}

    def finish(self, model: Any) -> None:
        pass  # nothing added for training alone
