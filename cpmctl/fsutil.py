"""Atomic output: a stage writes into a temporary sibling directory that is renamed into place.

A killed process leaves either the previous output or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cpmctl.errors import UserError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory below `root` to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def check_new_output(out: str | os.PathLike, overwrite: bool) -> None:
    """A UserError when `out` exists and replacing it was not asked for (`overwrite`)."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose a new path or ask for it to be replaced", option="overwrite")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out` in one rename.

    If `out` exists and `overwrite` is false this is a UserError raised before anything is
    written. On any exception the temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    check_new_output(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            # Move the old output aside first so the swap is two renames, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
