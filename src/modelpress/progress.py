"""The one progress-bar helper: tqdm on stderr, silent when MODELPRESS_QUIET is set or stderr is no tty
and MODELPRESS_PROGRESS is not forced."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("MODELPRESS_QUIET"):
        return False
    return bool(os.environ.get("MODELPRESS_PROGRESS")) or sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    return iter(tqdm(items, desc=desc, total=total, disable=not progress_enabled(), leave=False, file=sys.stderr))
