"""The tokenized-rows cache: reused only while everything the tokens depend on is unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import finetune.data
import finetune.pairs
from finetune.builtin import preference_rows, task_rows
from finetune.config import load_recipe
from finetune.pairs import build_pair_data
from finetune.tasks.sft import SFTTask


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    """A cache of its own (the session's builtin model stays where it is: it is resolved before this)."""
    folder = tmp_path / "home"
    monkeypatch.setattr("finetune.tokenized.cache_root", lambda: folder / "tokenized")
    return folder / "tokenized"


@pytest.fixture()
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_data(train: Path, tok, **data):
    recipe = load_recipe({"data": {"train": str(train), "max_length": 40, **data}, "log": {"progress": False}})
    built = SFTTask().build_data(recipe, tok)
    return built.train["input_ids"], built.train["labels"]


def test_sft_rows_are_tokenized_once_and_again_when_what_they_depend_on_changes(tmp_path, home, tok, monkeypatch,
                                                                                  caplog):
    calls = count_calls(monkeypatch, finetune.data, "encode_row")
    rows = task_rows("train")[:40]
    train = write_rows(tmp_path / "train.jsonl", rows)
    first = sft_data(train, tok)
    assert calls[0] == 40 and len(list(home.iterdir())) == 1
    truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert truncated  # max_length 40 cuts some rows: said on the first run ...

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert sft_data(train, tok) == first and calls[0] == 40  # ... read back, not tokenized
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "truncated" in m] == truncated  # ... and said again
    assert any("40 tokenized rows from the cache" in m for m in said)

    # each of these changes what the tokens are: tokenized again, in an entry of its own
    assert sft_data(train, tok, max_length=64) != first and calls[0] == 80
    sft_data(train, tok, completion_only_loss=False)
    assert calls[0] == 120
    write_rows(train, [rows[1], *rows[1:]])  # one row's content
    sft_data(train, tok)
    assert calls[0] == 160
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    sft_data(train, tok)
    assert calls[0] == 200 and len(list(home.iterdir())) == 5
    sft_data(train, tok, cache_tokenized=False)  # off: tokenized, nothing stored
    assert calls[0] == 240 and len(list(home.iterdir())) == 5


def test_an_unreadable_entry_is_tokenized_again(tmp_path, home, tok, monkeypatch, caplog):
    calls = count_calls(monkeypatch, finetune.data, "encode_row")
    train = write_rows(tmp_path / "train.jsonl", task_rows("train")[:16])
    first = sft_data(train, tok)
    (entry,) = home.iterdir()
    for arrow in entry.rglob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])  # as if the disk filled while it was written by hand
    assert sft_data(train, tok) == first and calls[0] == 32
    assert any("ignoring unreadable tokenized cache" in r.getMessage() for r in caplog.records)
    assert sft_data(train, tok) == first and calls[0] == 32  # written again, readable


def test_preference_pairs_are_cached_with_their_uids(tmp_path, home, tok, monkeypatch):
    calls = count_calls(monkeypatch, finetune.pairs, "encode_pair")
    rows = preference_rows("train")[:24]
    train, evals = write_rows(tmp_path / "train.jsonl", rows[:16]), write_rows(tmp_path / "eval.jsonl", rows[16:])
    recipe = load_recipe({"task": "dpo", "data": {"train": str(train), "eval": str(evals), "max_length": 48},
                          "log": {"progress": False}})
    first_train, first_eval, _, _ = build_pair_data(recipe, tok, progress=False)
    again_train, again_eval, _, _ = build_pair_data(recipe, tok, progress=False)
    assert calls[0] == 24 and len(list(home.iterdir())) == 2
    assert again_train.to_dict() == first_train.to_dict() and again_eval.to_dict() == first_eval.to_dict()
    assert again_eval["uid"] == list(range(16, 24))  # numbered after the train pairs, as when tokenized


def test_a_cache_that_cannot_be_written_only_costs_the_tokenizing(tmp_path, tok, monkeypatch, caplog):
    import errno

    calls = count_calls(monkeypatch, finetune.data, "encode_row")
    train = write_rows(tmp_path / "train.jsonl", task_rows("train")[:16])
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setattr("finetune.tokenized.cache_root", lambda: blocked / "tokenized")  # under a file: no mkdir
    first = sft_data(train, tok)
    assert any("could not cache the tokenized rows" in r.getMessage() for r in caplog.records)

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", no_room)  # the fingerprint writes the tokenizer's files
    assert sft_data(train, tok) == first and calls[0] == 32
    assert any("tokenizing without the cache (No space left on device)" in r.getMessage() for r in caplog.records)


def test_a_killed_writers_temporary_entry_is_removed_once_stale(tmp_path, home, tok):
    import os
    import time

    from finetune.tokenized import STALE_SECONDS

    home.mkdir(parents=True)
    stale, live = home / ".tmp-abc-123", home / ".tmp-def-456"
    for folder in (stale, live):
        (folder / "rows").mkdir(parents=True)
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    sft_data(write_rows(tmp_path / "train.jsonl", task_rows("train")[:8]), tok)  # stores an entry
    assert not stale.exists() and live.exists()  # a writer that may still be running keeps its folder


def test_least_recently_used_entries_are_removed_beyond_the_size_limit(tmp_path, home, tok, monkeypatch, caplog):
    import os

    import finetune.tokenized as tokenized
    from finetune.errors import UserError

    monkeypatch.setattr(tokenized, "_in_use", set())
    files = [write_rows(tmp_path / f"{i}.jsonl", task_rows("train")[i * 8:(i + 1) * 8]) for i in range(4)]
    for f in files[:3]:
        sft_data(f, tok)
        for entry in home.iterdir():  # entries of the earlier steps look older
            os.utime(entry, (entry.stat().st_mtime - 100, entry.stat().st_mtime - 100))
    entries = sorted(home.iterdir(), key=lambda e: e.stat().st_mtime)
    sizes = [tokenized._size(e) for e in entries]
    sft_data(files[0], tok)  # a hit: the oldest becomes the most recently used
    tokenized._in_use.clear()  # as in a later run
    monkeypatch.setenv("FINETUNE_CACHE_MAX_GB", str((sizes[0] + sizes[2] + 1.2 * max(sizes)) / 1e9))
    with caplog.at_level(logging.INFO, logger="finetune"):
        sft_data(files[3], tok)  # stores a fourth: the least recently used (the second) must go
    assert [e.exists() for e in entries] == [True, False, True]
    assert len(list(home.iterdir())) == 3
    assert "removed 1 least recently used tokenized entry" in caplog.text
    # entries this process uses are never removed, even when they alone exceed the limit
    monkeypatch.setenv("FINETUNE_CACHE_MAX_GB", "1e-9")
    sft_data(files[1], tok)
    assert len(list(home.iterdir())) == 2 and entries[0].exists() is False  # files[3]'s entry and files[1]'s
    monkeypatch.setenv("FINETUNE_CACHE_MAX_GB", "lots")
    with pytest.raises(UserError, match="FINETUNE_CACHE_MAX_GB: expected a number of gigabytes above 0, got 'lots'"):
        sft_data(files[0], tok)
