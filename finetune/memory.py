"""Handing freed host memory back to the OS during CPU training (`train.trim_memory`).

On CPU every activation lives in the C heap. With micro-batches of varying shapes, glibc's allocator reuses freed
blocks poorly: holes of the wrong sizes accumulate and peak RSS climbs step after step although the live
tensors do not grow (measured on the benchmark model: 1.0 GB after 2 steps, 1.9 GB after 30). `malloc_trim(0)`
returns the free pages, including those inside the heap, to the OS; the next micro-batch faults them back in,
which costs time. GPU memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("finetune")


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
