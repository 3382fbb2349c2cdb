"""The one exception type for user mistakes (the CLI prints it as a single line and exits with code 2), the
wording of counts in messages, and running out of GPU memory said as such a line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input that the user must fix: a recipe key, a data row, a model path, an output directory."""


class DataError(UserError):
    """Bad data the user must fix: a row, a data source, a chat template that cannot render a row."""


class SaidByMainProcess(UserError):
    """The main process of a distributed run found a user error and says it; the others stop quietly (exit 2)."""


def count(n: int, noun: str, plural: str = "") -> str:
    """`1 row`, `2 rows`; `plural` where adding an s is wrong (`2 processes`)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


@contextmanager
def on_out_of_memory(message: str) -> Iterator[None]:
    """Running out of GPU memory in the block stops the run with `message` (which names the keys that make the
    batch fit), one line, instead of torch's traceback."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(message) from None
