"""Tokenized datasets cached on disk: a second run on the same data, a resumed run, and every process after the
first load the tokens instead of tokenizing again (about a millisecond per chat row on one core, so minutes for
a real dataset, paid again by every process and every restart).

The key covers everything the tokens depend on: the rows' content and the name they are reported under, the
tokenizer's saved files (vocabulary, chat template, special tokens), the encoding settings, the source of the
encoding code, and the versions of transformers and tokenizers; a change to any of them is a new entry, never a
stale read. What the encoding warned about (truncated or dropped rows) is stored with the tokens and said again
on a hit. Entries are written under a temporary name and renamed when complete; one that cannot be read is
ignored with a warning and written again. The cache is kept under FINETUNE_CACHE_MAX_GB (default 20) by removing
the least recently used entries after each write, never one this process uses."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from finetune.errors import UserError

logger = logging.getLogger("finetune")
STALE_SECONDS = 24 * 3600  # a temporary entry this old was left by a killed writer
DEFAULT_MAX_GB = 20.0
_in_use: set[Path] = set()  # entries this process read or wrote: never pruned under it


def cache_root() -> Path:
    from finetune.builtin import home

    return home() / "tokenized"


def fingerprint(rows: Any, source: str, tokenizer: Any, settings: dict[str, Any]) -> str:
    import tokenizers
    import transformers
    import trl

    from finetune import chat, data, pairs

    h = hashlib.sha256()
    for module in (chat, data, pairs):  # the encoding code itself: editing it invalidates every entry
        h.update(Path(module.__file__).read_bytes())
    # trl: its training chat templates (`chat.training_template`)
    h.update(json.dumps([source, settings, transformers.__version__, tokenizers.__version__, trl.__version__],
                        sort_keys=True, default=str).encode())
    with tempfile.TemporaryDirectory() as folder:  # everything that shapes its output, as transformers saves it
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            h.update(path.name.encode() + path.read_bytes())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _warnings_said() -> Iterator[list[str]]:
    collect = _Collect()
    logger.addHandler(collect)
    try:
        yield collect.messages
    finally:
        logger.removeHandler(collect)


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    import datasets as bars

    was_disabled = bars.are_progress_bars_disabled()
    bars.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            bars.enable_progress_bars()


def _load(folder: Path) -> tuple[Any, list[str]] | None:
    import datasets

    if not folder.is_dir():
        return None
    try:
        warnings = json.loads((folder / "warnings.json").read_text())
        return datasets.load_from_disk(str(folder / "rows")), warnings
    except Exception as e:  # truncated or edited by hand: tokenize again
        logger.warning("ignoring unreadable tokenized cache %s (%s); tokenizing again", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _remove_stale(root: Path) -> None:
    """Temporary entries of writers killed midway (a live writer's is minutes old at most)."""
    for left in root.glob(".tmp-*"):
        with suppress(OSError):  # e.g. another process removed it first
            if time.time() - left.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(left)


def max_bytes() -> int:
    raw = os.environ.get("FINETUNE_CACHE_MAX_GB", "")
    try:
        gigabytes = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = -1
    if not gigabytes > 0:
        raise UserError(f"FINETUNE_CACHE_MAX_GB: expected a number of gigabytes above 0, got {raw!r}")
    return int(gigabytes * 1e9)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _prune(root: Path, limit: int) -> None:
    """Remove the least recently used entries (by their folder's time, set on every read) beyond `limit` bytes."""
    total, removed, freed, entries = 0, 0, 0, []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and not folder.name.startswith(".tmp-"):
            with suppress(OSError):  # another process may be removing it
                entries.append((folder.stat().st_mtime, _size(folder), folder))
    for _, size, folder in sorted(entries, reverse=True):  # newest first: they stay while they fit
        if total + size > limit and folder not in _in_use:
            shutil.rmtree(folder, ignore_errors=True)
            removed, freed = removed + 1, freed + size
        else:
            total += size
    if removed:
        logger.info("removed %d least recently used tokenized entr%s (%.2f GB) to keep %s under "
                    "FINETUNE_CACHE_MAX_GB=%g", removed, "y" if removed == 1 else "ies", freed / 1e9, root,
                    limit / 1e9)


def _store(folder: Path, dataset: Any, warnings: list[str]) -> None:
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        with _no_progress_bar():  # a fraction of a second; a bar would only clutter the start of a run
            dataset.save_to_disk(str(tmp / "rows"))
        (tmp / "warnings.json").write_text(json.dumps(warnings))
        os.rename(tmp, folder)
    except OSError as e:
        if not folder.is_dir():  # not another process that wrote the same entry first
            logger.warning("could not cache the tokenized rows in %s (%s); they will be tokenized again next time",
                           folder.parent, e.strerror or e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(rows: Any, source: str, tokenizer: Any, settings: dict[str, Any], encode: Callable[[], Any],
           enabled: bool = True) -> Any:
    """`encode()`'s dataset for these rows, tokenizer and settings: from the cache when it holds them, else
    encoded and stored (with `enabled` false, always encoded and never stored)."""
    if not enabled:
        return encode()
    limit = max_bytes()
    try:
        folder = cache_root() / fingerprint(rows, source, tokenizer, settings)
    except OSError as e:  # e.g. no room in the temporary directory for the tokenizer's files
        logger.warning("%s: tokenizing without the cache (%s)", source, e.strerror or e)
        return encode()
    _in_use.add(folder)
    hit = _load(folder)
    if hit is not None:
        with suppress(OSError):  # marks it used, for pruning by least recent use
            os.utime(folder)
        dataset, warnings = hit
        for message in warnings:
            logger.warning(message)
        logger.info("%s: %d tokenized rows from the cache (%s)", source, len(dataset), folder)
        return dataset
    with _warnings_said() as warnings:
        dataset = encode()
    if logger.isEnabledFor(logging.WARNING):  # a process that logs nothing would store no warnings to say again
        _store(folder, dataset, warnings)
        _prune(folder.parent, limit)
    return dataset
