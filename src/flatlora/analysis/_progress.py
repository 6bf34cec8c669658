"""One tqdm progress bar per diagnostic (or none)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def bar(progress: bool, total: int, desc: str) -> Iterator[object | None]:
    """A tqdm bar of ``total`` batch evaluations when ``progress`` is true, else ``None``; closed afterwards."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    pbar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    try:
        yield pbar
    finally:
        pbar.close()
