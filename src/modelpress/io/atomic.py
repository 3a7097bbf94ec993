"""Atomic output: a directory or file appears complete or not at all.

Work happens in a hidden temporary sibling (`.NAME.partial-*`); only after everything is written and flushed
is it renamed into place. An exception (or an interrupt) removes the temporary and leaves any previous output
as it was. A run killed outright (SIGKILL, power loss) leaves its temporary behind; the next run writing the
same NAME removes it (see remove_stale_siblings).

Replacing an existing directory (overwrite=True) is allowed only for one modelpress wrote (it carries one of
OWNED_MARKERS) or an empty one: a typo in --out never deletes someone's work.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from modelpress.errors import ModelpressError

OWNED_MARKERS = ("modelpress.json", "export.json", "gguf_source.json")  # a directory holding one is ours
STALE_KINDS = ("partial", "old")                                          # .NAME.partial-*, .NAME.old-*
PROCESS_START = time.time()   # when this module was imported: the start of this process, near enough


def check_output_dir(target: str | os.PathLike, overwrite: bool = False, what: str = "output") -> None:
    """Refuse, before any work, a directory output that could not be written or must not be replaced."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ModelpressError(f"{what} {target} already exists; choose another path or pass --overwrite")
        check_replaceable(target, what)
    check_writable_parent(target, what)


def check_replaceable(target: Path, what: str = "output") -> None:
    """--overwrite replaces only a directory modelpress wrote (it carries one of OWNED_MARKERS) or an empty one."""
    if target.is_symlink() or not target.is_dir():
        raise ModelpressError(f"{what} {target} exists and is not a directory; --overwrite replaces only a "
                              f"directory modelpress wrote. Remove it yourself or choose another path")
    if any((target / marker).is_file() for marker in OWNED_MARKERS) or not any(target.iterdir()):
        return
    raise ModelpressError(f"refusing to replace {what} {target}: it is not empty and was not written by modelpress "
                          f"(no {' or '.join(OWNED_MARKERS[:2])}); remove it yourself or choose another path")


def check_output_file(target: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, a file output that could not be written."""
    target = Path(target)
    if target.is_dir():
        raise ModelpressError(f"{what} {target} is a directory; give a file name")
    check_writable_parent(target, what)


def check_writable_parent(target: Path, what: str = "output") -> None:
    """The nearest existing ancestor of `target` must be a directory this process may create entries in."""
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ModelpressError(f"{what} {target} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ModelpressError(f"{what} {target} cannot be created: no permission to write in {ancestor}")


def remove_stale_siblings(target: Path) -> None:
    """Remove the `.NAME.partial-*` / `.NAME.old-*` siblings of `target` that killed runs left behind.

    Only those last modified before this process started are removed: a younger one may belong to another
    run writing the same output right now (two runs on one output at once are not supported either way).
    """
    if not target.parent.is_dir():
        return
    for kind in STALE_KINDS:
        for path in target.parent.glob(f"{glob.escape(f'.{target.name}.{kind}-')}*"):
            try:
                if path.lstat().st_mtime >= PROCESS_START:
                    continue
            except FileNotFoundError:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory at `target` atomically; with `overwrite`, replace one modelpress wrote (or an empty one)."""
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator:
    target = Path(target)
    check_output_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
