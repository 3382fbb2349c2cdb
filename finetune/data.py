"""Load rows (local files, hub datasets, builtins), render them, tokenize them and mask the loss.

Supported row formats:
- chat: `messages` = [{role, content}, ...], rendered with the tokenizer's chat template;
- prompt_completion: `prompt`, `completion` strings;
- alpaca: `instruction`, optional `input`, `output` (rendered with the classic Alpaca prompt);
- text: `text`, trained on every token.

Files: JSON lines, JSON, Parquet, and CSV/TSV (cells are text: `margin`, `label` and chat columns are parsed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from finetune.builtin import builtin_rows, is_builtin
from finetune.chat import (
    CHAT_FORMATS,
    apply_template,
    chat_args,
    chat_ids_and_mask,
    chat_prompt_completion_ids,
    check_marked_template,
    check_str,
    conversational_prompt,
    require_chat_template,
    row_messages,
    training_template,
)
from finetune.errors import DataError, count
from finetune.hub import hub_reachable, looks_local
from finetune.losses import IGNORE_INDEX

logger = logging.getLogger("finetune")

DELIMITERS = {".csv": ",", ".tsv": "\t"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", *DELIMITERS)
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass(frozen=True)
class EncodeStats:
    rows: int
    kept: int
    truncated: int
    dropped_no_target: int


# --------------------------------------------------------------------------------------------- loading


class FileRows(list):
    """The rows of a JSON lines, CSV or TSV file, and `numbering`: by the line each one starts on, for messages;
    `text_cells` when every value is text (CSV, TSV), to be typed by `typed_cells`."""

    numbering: Numbering
    text_cells: bool = False


def text_lines(path: Path, expected: str) -> Iterator[str]:
    """The lines of a UTF-8 text file one at a time, with their line endings, so that a large file is never held
    whole beside its parsed rows; a leading byte-order mark (Windows editors) is dropped. Lines end at a newline
    only, as editors count them (`str.splitlines` would also cut at U+2028, which JSON strings may hold)."""
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {offset + e.start}); expected {expected}") from None
            yield line.removeprefix("\ufeff") if offset == 0 else line
            offset += len(raw)


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a `FileRows`) or of a JSON list, parsed by Python so each row keeps its own types."""
    lines: Iterable[str] = text_lines(path, "JSON lines")
    text = "".join(lines) if path.suffix.lower() == ".json" else None  # a JSON list, or JSON lines after all
    if text is not None and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        numbering = ROWS
    else:
        rows, numbers = FileRows(), []
        for n, line in enumerate(lines if text is None else io.StringIO(text), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n} is not valid JSON: {e.msg}") from None
                numbers.append(n)
        numbering = rows.numbering = Numbering(numbers, "line")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{row_name(str(path), i, numbering)}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_delimited_rows(path: Path) -> FileRows:
    """Rows of a CSV (or TSV) file with a header line, read by Python's `csv` as text, cell for cell (where
    `datasets` would infer types and turn a completion of "19" into a number); numbered by the line each row
    starts on, as a quoted cell may span lines. Blank lines are skipped."""
    kind = path.suffix.lower()[1:].upper()
    reader = csv.reader(text_lines(path, kind), delimiter=DELIMITERS[path.suffix.lower()])
    rows, lines, header, header_line = FileRows(), [], None, 0
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}: line {start} is not valid {kind}: {e}") from None
        if cells is None:
            break
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header, header_line = [cell.strip() for cell in cells], start
            named = [name for name in header if name]
            if len(named) < len(header) or len(set(named)) < len(named):
                which = next((n for n in named if named.count(n) > 1), None)
                raise DataError(f"{path}: line {start}: expected a header of distinct column names, got "
                                + (f"{which!r} twice" if which else "a column without a name"))
            continue
        if len(cells) != len(header):
            raise DataError(f"{path}: line {start}: {len(cells)} cells where the header (line {header_line}) names "
                            f"{len(header)} columns (is a quote left open, or a delimiter in an unquoted cell?)")
        rows.append(dict(zip(header, cells, strict=True)))
        lines.append(start)
    rows.numbering, rows.text_cells = Numbering(lines, "line"), True
    return rows


def text_columns(folder: Path) -> Any | None:
    """For a directory whose data files are all CSV/TSV: their columns (one header, or a one-line error), all as
    text (`datasets.Features`), so that `datasets` reads the cells as a CSV file is read here rather than
    inferring numbers; else None."""
    import datasets

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    if not files or any(f.suffix.lower() not in DELIMITERS for f in files):
        return None
    headers = {f: next(csv.reader(text_lines(f, "CSV"), delimiter=DELIMITERS[f.suffix.lower()]), [])
               for f in files}
    other = next((f for f in files if headers[f] != headers[files[0]]), None)
    if other is not None:  # datasets reads them all with one set of columns, and fails on the others
        raise DataError(f"{folder}: its CSV files have different columns ({files[0].relative_to(folder)}: "
                        f"{headers[files[0]]}, {other.relative_to(folder)}: {headers[other]}); expected one header "
                        "in all of them")
    return datasets.Features({name: datasets.Value("string") for name in headers[files[0]]}) or None


TEXT_LISTS = ("messages", "conversations")  # chat columns: a CSV cell holds the list as JSON text
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def typed_cells(rows: list[dict[str, str]], source: str, numbering: Numbering) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV file (after `data.columns`) with the values finetune reads as other types than text
    parsed: `margin` a number (an empty cell: none), a KTO `label` true or false (also 1/0, yes/no), a chat's
    `messages` or `conversations` a JSON list."""
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        where = row_name(source, i, numbering)
        if "margin" in row:
            if not row["margin"].strip():
                del row["margin"]
            else:
                try:
                    row["margin"] = float(row["margin"])
                except ValueError:
                    raise DataError(f"{where}: expected 'margin' to be a number, got {row['margin']!r}") from None
        if "label" in row:
            label = row["label"].strip().lower()
            if label not in TRUE + FALSE:
                raise DataError(f"{where}: expected 'label' to be true or false, got {row['label']!r}")
            row["label"] = label in TRUE
        for key in TEXT_LISTS:
            if key in row:
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: expected '{key}' to be a list as JSON text, as a CSV cell holds "
                                    f"it: {e.msg}") from None
        out.append(row)
    return out


def load_rows(source: str, split: str) -> Any:
    """Rows from a builtin name, a local JSONL/JSON/Parquet/CSV/TSV file or directory of them, or a hub dataset
    name; at least one.

    JSON and CSV files become a list of dicts (exact types or text, row numbers in errors); Parquet and hub
    datasets stay `datasets.Dataset`s. Both are sized and yield dict rows.
    """
    rows = _read_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    return rows


def split_subset(source: str) -> tuple[str, str | None]:
    """A dataset directory's or hub dataset's subset (`datasets`' config name), named after a colon:
    `openai/gsm8k:main` -> ("openai/gsm8k", "main"). Builtins and existing paths keep their colons."""
    name, colon, subset = source.rpartition(":")
    if not colon or not name or is_builtin(source) or Path(source).exists() or not re.fullmatch(r"[\w.-]+", subset) \
            or subset.lower().endswith(FILE_SUFFIXES):  # a missing file with a colon in its name, not a subset
        return source, None
    return name, subset


def _load_error(e: Exception, name: str) -> str:
    """`datasets`' error in one line; where a subset must be named, which ones there are."""
    message = str(e)
    if "Config name is missing" in message:
        found = re.search(r"available configs: \[(.*?)\]", message)
        subsets = found.group(1).replace("'", "") if found else "see the dataset card"
        first = subsets.split(",")[0]
        return f"it has subsets ({subsets}): name one after a colon, as {name}:{first}"
    return message.strip().splitlines()[0] if message.strip() else type(e).__name__


def _read_rows(source: str, split: str) -> Any:
    import datasets

    if is_builtin(source):
        try:
            return builtin_rows(source, split)
        except ValueError as e:
            raise DataError(str(e)) from None
    name, subset = split_subset(source)
    path = Path(name)
    if path.is_file():
        if subset is not None:
            raise DataError(f"{source}: a subset after the colon names a part of a dataset directory or hub "
                            f"dataset, not of a file ({name})")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return read_json_rows(path)
        if suffix in DELIMITERS:
            return read_delimited_rows(path)
        if suffix != ".parquet":
            raise DataError(f"{source}: expected a .jsonl, .json, .parquet, .csv or .tsv file")
        try:
            import pyarrow.parquet

            if pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0:  # datasets would say "no data" for "train"
                return []
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # pyarrow raises many types for malformed files
            raise DataError(f"{source}: could not be read as Parquet: {str(e).splitlines()[0]}") from None
    if path.is_dir():  # data files (e.g. a dataset repository cloned locally): datasets reads them and their splits
        text = text_columns(path)
        try:
            rows = datasets.load_dataset(str(path), subset, split=split, **({"features": text} if text else {}))
        except Exception as e:
            raise DataError(f"{source}: a directory that datasets could not load split {split!r} from: "
                            f"{_load_error(e, name)}") from None
        if not text:
            return rows
        cells = FileRows({k: "" if v is None else v for k, v in row.items()} for row in rows)  # empty cells: None
        cells.numbering, cells.text_cells = ROWS, True
        return cells
    if path.suffix.lower() in FILE_SUFFIXES or looks_local(name):
        raise DataError(f"{source}: file not found")
    if not hub_reachable():
        raise DataError(f"{source}: not a local file, and the hub cannot be reached (offline) to fetch a dataset of "
                        "that name; set HF_HUB_OFFLINE=1 to use the local hub cache")
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(f"{source}: not a local file, and the hub dataset could not be loaded: "
                        f"{_load_error(e, name)}") from None


def column_names(rows: Any) -> list[str]:
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) else []


def take(rows: Any, indices: list[int]) -> Any:
    return rows.select(indices) if hasattr(rows, "select") else [rows[i] for i in indices]


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of row numbers 0..n-1 into (train, held-out), `fraction` of them held out (at least one)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


@dataclass(frozen=True)
class Numbering:
    """How messages number rows so that a user finds them: as in the source, also for a part of it (a held-out
    split), and in a JSON lines file by line, as an editor counts them."""
    numbers: list[int] | None = None  # each row's number in the source; None: its place
    unit: str = "row"  # row (from 0, as datasets indexes rows) or line (from 1)

    def of(self, i: int) -> str:
        return f"{self.unit} {i if self.numbers is None else self.numbers[i]}"

    def subset(self, indices: list[int]) -> Numbering:
        return Numbering(indices if self.numbers is None else [self.numbers[i] for i in indices], self.unit)


ROWS = Numbering()


class Part(NamedTuple):
    """One data source's raw rows, its name in messages and how they number its rows."""
    rows: Any
    source: str
    numbering: Numbering = ROWS


def row_name(source: str, i: int, numbering: Numbering = ROWS) -> str:
    """How messages name row i: `train.jsonl: line 64`, `train.parquet: row 63`."""
    return f"{source}: {numbering.of(i)}"


def rename_columns(rows: Any, columns: dict[str, str], source: str,
                   numbering: Numbering = ROWS) -> tuple[Any, set[str]]:
    """`data.columns` applied to one source: its columns renamed to the names finetune reads ({"question":
    "prompt"}), and the names it had. A name the source lacks is left to the other sources."""
    if not columns:
        return rows, set()
    if hasattr(rows, "rename_columns"):  # a datasets.Dataset: one schema
        names = set(rows.column_names)
        renames = {old: new for old, new in columns.items() if old in names}
        for old, new in renames.items():
            if new in names and new not in renames:
                raise DataError(f"{source}: data.columns renames {old!r} to {new!r}, a column it already has")
        return (rows.rename_columns(renames) if renames else rows), names
    names, renamed = set(), []
    for i, row in enumerate(rows):  # JSON rows: each its own keys
        names.update(row)
        for old, new in columns.items():
            if old in row and new in row and new not in columns:
                raise DataError(f"{row_name(source, i, numbering)}: data.columns renames {old!r} to {new!r}, a "
                                "column it already has")
        renamed.append({columns.get(k, k): v for k, v in row.items()})
    return renamed, names


def sources(value: str | list[str] | dict[str, float]) -> list[str]:
    """`data.train` / `data.eval`: one source, or a list of them (or a mapping of them to fractions) whose rows
    are used one after another."""
    return [value] if isinstance(value, str) else list(value)


def fractions(value: str | list[str] | dict[str, float]) -> list[float]:
    """How much of each source's (training) rows a mixture takes: its fractions, else all of each."""
    return list(value.values()) if isinstance(value, dict) else [1.0] * len(sources(value))


def resampled(n: int, fraction: float, seed: int) -> list[int]:
    """Row indices for `fraction` of n rows: every row once per whole part, then a seeded subset (in file
    order) for the rest; 2.5 is every row twice and half of them a third time."""
    import random

    whole, rest = divmod(fraction, 1.0)
    return list(range(n)) * int(whole) + sorted(random.Random(seed).sample(range(n), round(rest * n)))


def train_eval_rows(d: Any, seed: int) -> tuple[list[Part], list[Part] | None]:
    """The raw rows of each training source, and of each held-out one (`data.eval`, or a seeded
    `data.eval_fraction` of every training source). Sources stay apart, so each is read in its own format,
    tokenized and cached on its own, and named in messages about its rows."""
    seen: set[str] = set()

    def read(source: str, split: str) -> Part:
        raw = load_rows(source, split)
        numbering = raw.numbering if isinstance(raw, FileRows) else ROWS
        rows, names = rename_columns(raw, d.columns, source, numbering)
        if getattr(raw, "text_cells", False):
            rows = typed_cells(rows, source, numbering)
        seen.update(names)
        return Part(rows, source, numbering)

    train = [read(source, d.split) for source in sources(d.train)]
    held = [read(source, d.eval_split) for source in sources(d.eval)] if d.eval else None
    # a file is the same rows whatever the split; a builtin or hub dataset is when the splits are the same
    both = [s for s in sources(d.eval or []) if s in sources(d.train)
            and (Path(s).exists() or d.split == d.eval_split)]
    if both:
        logger.warning("data.eval: %s is also trained on, so its scores measure memorisation, not how the model does "
                       "on rows it has not seen; hold some out instead (data.eval_fraction)", both[0])
    missing = sorted(set(d.columns) - seen)
    if missing:
        raise DataError(f"data.columns: no data source has a column {missing[0]!r} (they have {sorted(seen)})")
    if not d.eval and d.eval_fraction > 0:
        split = [(holdout_indices(len(part.rows), d.eval_fraction, seed), part) for part in train]
        train = [Part(take(part.rows, kept), part.source, part.numbering.subset(kept)) for (kept, _), part in split]
        held = [Part(take(part.rows, out), f"{part.source} (held-out {d.eval_fraction:g})",
                     part.numbering.subset(out)) for (_, out), part in split]
    for key, parts, shares in (("data.train", train, fractions(d.train)), ("data.eval", held, None)):
        shares = shares or [1.0] * len(parts or ())
        if parts and (len(parts) > 1 or shares != [1.0]):  # a mixture: what each source brings, before tokenizing
            logger.info("%s: %s", key, ", ".join(f"{part.source} {count(len(part.rows), 'row')}" + (
                f" x {share:g}" if share != 1 else "") for part, share in zip(parts, shares, strict=True)))
    return train, held


def eval_sources(d: Any, parts: list[Any]) -> list[tuple[str, int]] | None:
    """The held-out sources' names in metric names and their tokenized rows' counts, in order (`parts`, as
    `concatenate` joins them), when there are several (`data.eval`, or the training sources of an
    `eval_fraction`): `eval_chat_loss` for `data/chat.jsonl`, `eval_tasks_loss` for `builtin:tasks`."""
    if len(parts) < 2:
        return None
    names: list[str] = []
    for source in sources(d.eval or d.train):
        path = source.split(":", 1)[1] if is_builtin(source) else split_subset(source)[0]
        stem = Path(path.rstrip("/")).name
        stem = stem[:-len(Path(stem).suffix)] if stem.lower().endswith(FILE_SUFFIXES) else stem
        name = re.sub(r"\W+", "_", stem).strip("_").lower() or "data"
        names.append(name if name not in names else f"{name}_{len(names) + 1}")
    return list(zip(names, (len(part) for part in parts), strict=True))


def concatenate(parts: list[Any], shares: list[float] | None = None, seed: int = 0) -> Any:
    """The tokenized parts of a split (one per source) as one `datasets.Dataset`, in order; with `shares`
    (`fractions(data.train)`), each part resampled to its fraction first."""
    import datasets

    if shares:
        parts = [part if share == 1 else part.select(resampled(len(part), share, seed + i))
                 for i, (part, share) in enumerate(zip(parts, shares, strict=True))]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def detect_format(columns: list[str], source: str, wanted: str = "auto") -> str:
    required = {"chat": {"messages"}, "sharegpt": {"conversations"}, "prompt_completion": {"prompt", "completion"},
                "alpaca": {"instruction", "output"}, "text": {"text"}}
    if wanted != "auto":
        missing = required[wanted] - set(columns)
        if missing:
            raise DataError(f"{source}: data.format={wanted} needs column(s) {sorted(missing)}; found {columns}")
        return wanted
    for fmt, cols in required.items():
        if cols <= set(columns):
            return fmt
    raise DataError(f"{source}: cannot tell the format from columns {columns}; expected 'messages', "
                    "'conversations' (ShareGPT), 'prompt'+'completion', 'instruction'+'output' or 'text' "
                    "(data.columns can rename yours)")


# --------------------------------------------------------------------------------------------- rendering


def prompt_and_completion(row: dict[str, Any], fmt: str, where: str) -> tuple[str, str]:
    """The prompt text and the target text of a prompt_completion or alpaca row."""
    if fmt == "prompt_completion":
        return check_str(row["prompt"], "'prompt'", where), check_str(row["completion"], "'completion'", where)
    for key in ("history", "system"):  # LLaMA-Factory's alpaca: turns before, and a system prompt, for a chat
        if row.get(key):                 # template to render; the Alpaca prompt has no place for them
            raise DataError(f"{where}: an alpaca row with '{key}' (LLaMA-Factory's multi-turn alpaca), which the "
                            "Alpaca prompt has no place for; write such rows as chat messages (data.format: chat)")
    extra = check_str(row.get("input") or "", "'input'", where)
    prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                  instruction=check_str(row["instruction"], "'instruction'", where),
                                  input=f"### Input:\n{extra}\n\n" if extra else "")
    return prompt, check_str(row["output"], "'output'", where)


def encode_row(row: dict[str, Any], fmt: str, tokenizer: Any, max_length: int, completion_only: bool,
               where: str, template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize one row into `input_ids` and `labels` (IGNORE_INDEX where no loss), truncated on the right.
    `template_kwargs`: data.chat_template_kwargs."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    conversation = conversational_prompt(row, fmt, where)
    if fmt in CHAT_FORMATS:
        messages, args = row_messages(row, fmt, where), chat_args(row, where, tokenizer, template_kwargs)
        if completion_only:
            training = training_template(tokenizer)  # as TRL's SFTTrainer with assistant_only_loss
            ids, mask = chat_ids_and_mask(tokenizer, messages, where,
                                          {**args, "chat_template": training} if training else args)
        else:  # every token trains: no assistant turn needs finding
            require_chat_template(tokenizer, where, "chat rows", messages, args)
            out = apply_template(tokenizer, messages, where, tokenize=True, return_dict=True, **args)
            ids, mask = list(out["input_ids"]), [1] * len(out["input_ids"])
    elif conversation is not None:
        ids, mask = chat_prompt_completion_ids(tokenizer, *conversation, where,
                                               chat_args(row, where, tokenizer, template_kwargs))
    elif fmt == "text":
        ids = tokenizer(check_str(row["text"], "'text'", where))["input_ids"] + eos
        mask = [1] * len(ids)
    else:
        prompt, completion = prompt_and_completion(row, fmt, where)
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids, mask = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
    if not completion_only:
        mask = [1] * len(ids)
    # the first token is never a target (nothing predicts it)
    untruncated_targets = sum(mask[1:])
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "n_targets": sum(mask[1:]),
            "untruncated_targets": untruncated_targets}


ROWS_PER_WORKER = 1000  # fewer rows than this per worker process: forking would cost more than it saves
# what forked workers encode (encode, rows, source, numbering): inherited, not pickled
_JOB: tuple[Callable[[Any, str], dict], Any, str, Numbering] | None = None


class TokenColumns:
    """Tokenized rows gathered into Arrow columns a chunk of rows at a time, token lists as int32: 4 bytes a token,
    where Python lists of ints take 36 (and `Dataset.from_dict` copies them all again). Measured, the SFT data
    of 50,000 chat rows (73M tokens, tokenized in one process): a peak RSS of 6.5 GB with lists and `from_dict`,
    1.2 GB with these columns (and the file read line by line)."""

    CHUNK_ROWS, CHUNK_TOKENS = 8192, 1 << 28  # each chunk's int32 offsets stay far below 2**31

    def __init__(self, *token_columns: str) -> None:
        self.token_columns = set(token_columns)
        self.pending: dict[str, list] = {}
        self.chunks: dict[str, list] = {}
        self.rows = self.pending_rows = self.pending_tokens = 0

    def __len__(self) -> int:
        return self.rows

    def append(self, **values: Any) -> None:
        import numpy as np

        for key, value in values.items():
            if key in self.token_columns:
                value = np.asarray(value, dtype=np.int32)
                self.pending_tokens += len(value)
            self.pending.setdefault(key, []).append(value)
        self.rows += 1
        self.pending_rows += 1
        if self.pending_rows >= self.CHUNK_ROWS or self.pending_tokens >= self.CHUNK_TOKENS:
            self._flush()

    def _flush(self) -> None:
        import numpy as np
        import pyarrow as pa

        for key, values in self.pending.items():
            if key in self.token_columns:
                offsets = np.zeros(len(values) + 1, dtype=np.int32)
                np.cumsum([len(v) for v in values], out=offsets[1:])
                column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values)))
            else:
                column = pa.array(values)
            self.chunks.setdefault(key, []).append(column)
        self.pending, self.pending_rows, self.pending_tokens = {}, 0, 0

    def dataset(self) -> Any:
        """The rows as a `datasets.Dataset` (in memory); at least one row must have been appended."""
        import datasets
        import pyarrow as pa

        self._flush()
        table = pa.table({key: pa.chunked_array(chunks) for key, chunks in self.chunks.items()})
        # a fingerprint given: without one, datasets hashes the whole table, serialising it (2 GB more at peak for
        # 73M tokens); finetune's own cache has its key (`tokenized.fingerprint`)
        return datasets.Dataset(table, fingerprint=datasets.fingerprint.generate_random_fingerprint())


def list_lengths(dataset: Any, column: str) -> list[int]:
    """The length of each row's list in a column of a tokenized `datasets.Dataset`, by Arrow (row order and any
    selection of rows respected): reading the column row by row builds a Python list per row (1.7 s for 50,000
    rows, 2 ms this way)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def tokenizer_workers(num_proc: int) -> int:
    """`data.num_proc`: 0 means one per CPU this process may use, at most 8, in the first process of a machine
    only: the others wait for it and read its tokens from the cache (or, without the cache, share the CPUs)."""
    if num_proc:
        return num_proc
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return 1
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _encode_range(bounds: tuple[int, int]) -> list[dict]:
    encode, rows, source, numbering = _JOB
    return [encode(rows[i], row_name(source, i, numbering)) for i in range(*bounds)]


def map_rows(encode: Callable[[Any, str], dict], rows: Any, source: str, progress: bool,
             workers: int = 1, numbering: Numbering = ROWS) -> Iterator[dict]:
    """`encode(row, where)` of every row, in order, with a progress bar (`where`: the row's `row_name`). With
    `workers` > 1 (and enough rows) the rows are encoded by that many forked processes, which inherit `encode`
    and the rows rather than receive them pickled; the first bad row in order is the one reported, as when
    encoding in this process."""
    global _JOB
    from tqdm.auto import tqdm

    n = len(rows)
    workers = min(workers, n // ROWS_PER_WORKER)
    bar = tqdm(total=n, desc=f"Tokenizing {source}", disable=not progress, leave=False, dynamic_ncols=True)
    if workers <= 1 or not sys.platform.startswith("linux"):  # fork is safe to rely on only there
        for i in range(n):
            yield encode(rows[i], row_name(source, i, numbering))
            bar.update()
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else each forked worker warns about it
        chunk = -(-n // (workers * 8))  # several chunks per worker: an even finish, a steady progress bar
        _JOB = (encode, rows, source, numbering)
        # an executor, not a multiprocessing Pool: a worker killed (e.g. out of memory) breaks it instead of
        # leaving the run waiting forever for that worker's rows
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            for part in pool.map(_encode_range, [(s, min(s + chunk, n)) for s in range(0, n, chunk)]):
                yield from part
                bar.update(len(part))
        except BrokenProcessPool:
            raise DataError(f"{source}: a tokenizing process died (out of memory?); set data.num_proc lower, "
                            "e.g. 1") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # after a bad row, the other chunks are not needed
            _JOB = None
    bar.close()


def encode_dataset(rows: Any, source: str, fmt: str, tokenizer: Any, max_length: int, completion_only: bool,
                   progress: bool = True, workers: int = 1, numbering: Numbering = ROWS,
                   template_kwargs: dict[str, Any] | None = None) -> tuple[Any, EncodeStats]:
    """Tokenize every row into a `datasets.Dataset`, report truncation, drop rows left with no target token.
    `numbering`: how messages number the rows (`Part.numbering`); `template_kwargs`: data.chat_template_kwargs."""

    fmt = detect_format(column_names(rows), source, fmt)
    kept, truncated = TokenColumns("input_ids", "labels"), 0
    # rows dropped for having no target: none to begin with, or all cut off by max_length
    no_target: list[int] = []
    cut_off: list[int] = []

    def encode(row: Any, where: str) -> dict:
        return encode_row(row, fmt, tokenizer, max_length, completion_only, where, template_kwargs)

    if completion_only and fmt in CHAT_FORMATS:
        check_marked_template(tokenizer, source)  # before any worker forks

    for i, enc in enumerate(map_rows(encode, rows, source, progress, workers, numbering)):
        truncated += enc["truncated"]
        if enc["n_targets"] > 0:
            kept.append(input_ids=enc["input_ids"], labels=enc["labels"])
        else:
            (cut_off if enc["untruncated_targets"] else no_target).append(i)
    stats = EncodeStats(rows=len(rows), kept=len(kept), truncated=truncated, dropped_no_target=len(rows) - len(kept))
    if stats.truncated:
        logger.warning("%s: %d of %d rows truncated to data.max_length=%d", source, stats.truncated, stats.rows,
                       max_length)
    if no_target:
        what = "no assistant message" if fmt in CHAT_FORMATS else "an empty completion"
        logger.warning("%s: dropped %d of %d rows with no token to train on (%s; first: %s)", source,
                       len(no_target), stats.rows, what, numbering.of(no_target[0]))
    if cut_off:
        logger.warning("%s: dropped %d of %d rows whose every trained token lies beyond data.max_length=%d "
                       "(first: %s)", source, len(cut_off), stats.rows, max_length, numbering.of(cut_off[0]))
    if not kept:
        raise DataError(f"{source}: no row has a trainable token (all {stats.rows} dropped); check data.format, "
                        f"data.max_length={max_length} and data.completion_only_loss")
    return kept.dataset(), stats
