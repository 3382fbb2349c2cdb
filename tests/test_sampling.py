"""Batch order: row batches, best-fit-decreasing token-budget bins, and training on token budgets."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import small_recipe

import finetune
from finetune.config import ConfigError, load_recipe
from finetune.sampling import EpochBatches, TokenBudgetBatches, best_fit_decreasing


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing written the slow, obvious way: scan every bin for the least room that still fits."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_the_slow_reference(seed: int):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 400))]
    bins = best_fit_decreasing(range(len(lengths)), lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sorted(map(sorted, bins)) == sorted(map(sorted, reference_bfd(lengths, 512)))
    lower_bound = math.ceil(sum(lengths) / 512)
    assert len(bins) <= 11 / 9 * lower_bound + 1  # BFD's worst case bound against the optimum


def test_best_fit_decreasing_refuses_a_row_longer_than_a_bin():
    with pytest.raises(ValueError, match="row 1 has 600 tokens"):
        best_fit_decreasing(range(2), [10, 600], 512)


def test_token_budget_batches_cover_an_epoch_across_processes():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(300)]
    per_epoch = TokenBudgetBatches.per_epoch(lengths, 400, 2)
    ranks = [list(TokenBudgetBatches(lengths, 400, 2, r, seed=3, epoch=0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == per_epoch > 0
    seen = [i for rank in ranks for b in rank for i in b]
    assert len(seen) == len(set(seen))  # no row twice in an epoch
    assert all(sum(lengths[i] for i in b) <= 400 for rank in ranks for b in rank)
    again = list(TokenBudgetBatches(lengths, 400, 2, 0, seed=3, epoch=0))
    assert again == ranks[0]  # deterministic
    assert list(TokenBudgetBatches(lengths, 400, 2, 0, seed=3, epoch=1)) != ranks[0]  # reshuffled per epoch
    assert list(TokenBudgetBatches(lengths, 400, 2, 0, seed=3, epoch=0, start=4)) == ranks[0][4:]  # resumable
    # one process sees global batch b as the bins the two processes saw at b
    single = TokenBudgetBatches(lengths, 400, 1, 0, seed=3, epoch=0).bins()
    assert single[:2 * per_epoch:2] == ranks[0] and single[1:2 * per_epoch:2] == ranks[1]
    assert len(single) - 2 * per_epoch < 2  # only the last, incomplete global batch is dropped
    assert sorted(seen + [i for b in single[2 * per_epoch:] for i in b]) == list(range(300))


def test_row_batches_split_across_processes():
    one = list(EpochBatches(100, 8, 1, 0, seed=1, epoch=2))
    two = [list(EpochBatches(100, 4, 2, r, seed=1, epoch=2)) for r in range(2)]
    assert [a + b for a, b in zip(*two, strict=True)] == one


def test_batch_tokens_needs_packing_and_room_for_the_longest_row():
    with pytest.raises(ConfigError, match="train.batch_tokens: token-budget micro-batches need data.packing"):
        load_recipe({"train": {"batch_tokens": 4096}})
    with pytest.raises(ConfigError, match="cannot hold the longest row"):
        load_recipe({"train": {"batch_tokens": 100}, "data": {"packing": True, "max_length": 128}})
    with pytest.raises(ConfigError, match="cannot hold the longest pair"):
        load_recipe({"task": "dpo", "train": {"batch_tokens": 200}, "data": {"packing": True, "max_length": 128}})
    load_recipe({"task": "dpo", "train": {"batch_tokens": 256}, "data": {"packing": True, "max_length": 128}})


def test_token_budget_training_resumes_exactly(tmp_path: Path, chat_files):
    """Micro-batches of at most 300 tokens; interrupted after step 2 and resumed, it equals the whole run."""
    train, evals = chat_files
    recipe = small_recipe(tmp_path, train, evals, data={"packing": True},
                          train={"max_steps": 5, "batch_tokens": 300, "grad_accum": 2, "save_every": 2,
                                 "keep_checkpoints": 5})
    full = finetune.train(recipe)
    events = [e for e in full.history if "loss" in e]
    assert all(0 < b["tokens_seen"] - a["tokens_seen"] <= 2 * 300
               for a, b in zip([{"tokens_seen": 0}, *events], events, strict=False))
    for ckpt in (tmp_path / "checkpoints").iterdir():
        if ckpt.name != "step-0000002":
            shutil.rmtree(ckpt)
    resumed = finetune.train(recipe)
    assert [(e["step"], e["loss"]) for e in resumed.history if "loss" in e] == [(e["step"], e["loss"])
                                                                                 for e in events]
    assert resumed.metrics["eval_loss"] == full.metrics["eval_loss"]


@pytest.mark.parametrize("n_rows, world", [(10, 2), (3, 4), (1, 2), (7, 3)])
def test_eval_shards_cover_each_row_once_in_step(n_rows: int, world: int):
    """Every row of start .. start + n_rows - 1 in exactly one real batch; every process as many batches (padding
    ones after its real ones, also for a process with no row)."""
    from finetune.sampling import eval_shard

    shards = [eval_shard(n_rows, 2, world, rank, start=5) for rank in range(world)]
    real = sorted(i for batches, n_real in shards for batch in batches[:n_real] for i in batch)
    assert real == list(range(5, 5 + n_rows))
    assert len({len(batches) for batches, _ in shards}) == 1
    assert all(i in range(5, 5 + n_rows) for batches, _ in shards for batch in batches for i in batch)
