"""Deterministic, resumable batch order shared by all processes.

Each epoch is a permutation seeded by (seed, epoch). It is cut into global batches of `batch_size * world_size`
rows and process `rank` takes its contiguous slice, so 2 processes x batch 4 see exactly the rows of 1 process x
batch 8. Resuming starts at any (epoch, batch) without reading the batches before it.

With a token budget (`TokenBudgetBatches`), micro-batches are instead bins of whole rows packed best-fit-decreasing
up to the budget, shuffled per epoch; global batch b is bins b * world_size .. b * world_size + world_size - 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import torch


class EpochBatches:
    """Index lists of one process's micro-batches for one epoch, from batch `start` on (a DataLoader batch_sampler)."""

    def __init__(self, n_rows: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                 start: int = 0, shuffle: bool = True):
        self.n_rows, self.batch_size, self.world_size, self.rank = n_rows, batch_size, world_size, rank
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    @staticmethod
    def per_epoch(n_rows: int, batch_size: int, world_size: int) -> int:
        return n_rows // (batch_size * world_size)  # the last partial global batch is dropped

    def __len__(self) -> int:
        return self.per_epoch(self.n_rows, self.batch_size, self.world_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n_rows, generator=gen).tolist()
        else:
            order = list(range(self.n_rows))
        g = self.batch_size * self.world_size
        for b in range(self.start, self.per_epoch(self.n_rows, self.batch_size, self.world_size)):
            lo = b * g + self.rank * self.batch_size
            yield order[lo:lo + self.batch_size]


def best_fit_decreasing(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of row indices, each summing to at most `capacity` tokens: rows longest first (ties in `order`), each
    into the fullest bin it still fits, else a new bin. Within a bin rows keep that longest-first order."""
    ranked = sorted(order, key=lambda i: -lengths[i])  # stable: equal lengths keep the given (random) order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for i in ranked:
        if lengths[i] > capacity:
            raise ValueError(f"row {i} has {lengths[i]} tokens, more than the bin capacity {capacity}")
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = free.pop(at)
            bins[b].append(i)
            left -= lengths[i]
        if left:
            bisect.insort(free, (left, b))
    return bins


class TokenBudgetBatches:
    """One process's micro-batches for one epoch when micro-batches are token budgets rather than row counts.

    The epoch's rows (seeded permutation) are packed best-fit-decreasing into bins of at most `max_tokens`
    tokens, and the bins are shuffled with the same generator; process `rank` takes bin b * world_size + rank of
    global batch b. The number of bins depends only on the lengths, so it is the same every epoch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, world_size: int, rank: int, seed: int, epoch: int,
                 start: int = 0, shuffle: bool = True):
        self.lengths, self.max_tokens, self.world_size, self.rank = lengths, max_tokens, world_size, rank
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    @staticmethod
    def per_epoch(lengths: Sequence[int], max_tokens: int, world_size: int) -> int:
        return len(best_fit_decreasing(range(len(lengths)), lengths, max_tokens)) // world_size

    def bins(self) -> list[list[int]]:
        if not self.shuffle:
            return best_fit_decreasing(range(len(self.lengths)), self.lengths, self.max_tokens)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        bins = best_fit_decreasing(torch.randperm(len(self.lengths), generator=gen).tolist(), self.lengths,
                                   self.max_tokens)
        return [bins[i] for i in torch.randperm(len(bins), generator=gen).tolist()]

    def __len__(self) -> int:
        return self.per_epoch(self.lengths, self.max_tokens, self.world_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        bins = self.bins()
        for b in range(self.start, len(bins) // self.world_size):
            yield bins[b * self.world_size + self.rank]


def eval_shard(n_rows: int, batch_size: int, world_size: int, rank: int,
               start: int = 0) -> tuple[list[list[int]], int]:
    """This process's evaluation batches of rows start .. start + n_rows - 1 (every row exactly once across
    processes) and how many of them are real.

    Every process gets the same number of batches, so sharded models run the same collectives on each; the
    padding batches repeat the first one (or the first row, where a process has none) and must be ignored.
    """
    mine = list(range(start + rank, start + n_rows, world_size))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(n_rows / world_size) / batch_size)
    return batches + [batches[0] if batches else [start]] * (most - len(batches)), len(batches)
