"""Deterministic, resumable batch order shared by all processes.

Each epoch is a permutation seeded by (seed, epoch). It is cut into global batches of `batch_size * world_size`
rows and process `rank` takes its contiguous slice, so 2 processes x batch 4 see exactly the rows of 1 process x
batch 8. Resuming starts at any (epoch, batch) without reading the batches before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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


def eval_shard(n_rows: int, batch_size: int, world_size: int, rank: int) -> tuple[list[list[int]], int]:
    """This process's evaluation batches (every row exactly once across processes) and how many of them are real.

    Every process gets the same number of batches, so sharded models run the same collectives on each; the
    padding batches repeat the first one and must be ignored.
    """
    mine = list(range(rank, n_rows, world_size))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(n_rows / world_size) / batch_size)
    return batches + [batches[0]] * (most - len(batches)), len(batches)
