"""One live run per output directory.

Two runs writing to one output_dir (the same command started twice, a job requeued while the old one still runs)
would interleave their checkpoints and metrics, and `overwrite_output_dir` in one would delete the other's
checkpoints. The main process of a training run therefore holds an advisory lock on OUTPUT_DIR/.lock while it
runs; the operating system drops it when the process exits, killed included, so a lock is never left stale.
A POSIX record lock (`lockf`), not `flock`: forked children (DataLoader workers, tokenizing processes) do not
inherit it, so one that outlives a killed run cannot keep its directory locked; and it holds across machines on
NFS.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from typing import IO

from finetune.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no lock (the rest works the same)
    fcntl = None

logger = logging.getLogger("finetune")

LOCK_FILE = ".lock"
_held: dict[Path, IO[str]] = {}  # output_dir -> its open, locked file, while this process runs in it


def claim(output_dir: Path) -> None:
    """Lock `output_dir` for this process, or raise a UserError naming the run that holds it. A lock this process
    still holds from an earlier run (one that raised, in a notebook) is taken over: runs in a process follow
    one another."""
    if fcntl is None:
        return
    release(output_dir)
    handle = open(output_dir / LOCK_FILE, "a+")  # held open until release
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # not "held elsewhere": a filesystem without locks
            handle.close()
            logger.warning("output_dir: cannot lock %s (%s): a second run started there would not be stopped",
                           output_dir, e.strerror or e)
            return
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"output_dir: {output_dir} is in use by another run ({holder}); wait for it to end, or "
                        "set another output_dir") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[output_dir.resolve()] = handle


def release(output_dir: Path) -> None:
    handle = _held.pop(output_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the file drops its lock (and any other fd on it would too: none is opened)
