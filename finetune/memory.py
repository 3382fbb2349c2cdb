"""Keeping host memory flat during CPU training: bounded kernel caches, and `train.trim_memory`.

On CPU, peak RSS used to climb step after step although the live tensors did not grow (benchmark model, SFT
packed: 1.46 GB after 8 steps, 2.15 GB after 30). Most of it was kernel caches: torch's bf16 matmuls run on
oneDNN, and both oneDNN's primitive cache and ideep's LRU cache keep a compiled kernel with its buffers (about a
megabyte here) for every matmul shape, up to 1024 shapes each. Packed or padded micro-batches have a new length
nearly every step, so the caches only fill. `bound_kernel_caches` caps them. The rest is glibc's heap holding
freed blocks of the wrong sizes, which `malloc_trim` hands back (`train.trim_memory`) at a cost in time. GPU
memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("finetune")

# Entries each kernel cache keeps. A micro-batch's layers share their few matmul shapes: on the benchmark model,
# 8 entries already hit as often as 1024 within a micro-batch (counted with ONEDNN_VERBOSE=profile_create), and
# there are no hits across micro-batches whose lengths differ. Measured, 30 steps of packed SFT: peak RSS 2.15 ->
# 1.27 GB, tokens/s unchanged. (Both at 0 crashed here: keep at least one entry.)
KERNEL_CACHE_ENTRIES = "16"


def bound_kernel_caches() -> None:
    """Cap oneDNN's and ideep's kernel caches unless the user set them (ONEDNN_PRIMITIVE_CACHE_CAPACITY,
    LRU_CACHE_CAPACITY). Each library reads its variable once, at its first matmul in the process: called
    before that, it bounds them; after (a notebook that already ran bf16 matmuls), it changes nothing."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, KERNEL_CACHE_ENTRIES)


def heap_trimmer(device: torch.device) -> Callable[[], None] | None:
    """A function returning freed heap pages to the OS, or None (with a warning) where it cannot act: on an
    accelerator, or without glibc."""
    if device.type != "cpu":
        logger.warning("train.trim_memory: acts on CPU training only; ignored on %s", device.type)
        return None
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        logger.warning("train.trim_memory: this C library has no malloc_trim (glibc only); ignored")
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def release() -> None:
        trim(0)

    return release
