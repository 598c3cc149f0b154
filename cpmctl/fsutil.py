"""Atomic output: a stage writes into a temporary sibling directory that is renamed into place.

A killed process leaves either the previous output or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cpmctl.errors import UserError


# Whether reads check the recorded CRC-32s (on by default; a command's --no-verify turns it off
# for its own run, see `verification`). A context variable, so that turning it off in one call
# leaves every other caller (a test, a thread, the next pipeline step) verifying.
_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("cpmctl_verify_checksums", default=True)


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Within the block, reads check recorded CRC-32s (`enabled`) or skip the check."""
    token = _VERIFY.set(enabled)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def verifying() -> bool:
    return _VERIFY.get()


CHECKSUMS_FILE = "checksums.json"


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def content_id(path: str | os.PathLike | None) -> str | None:
    """What identifies an input's content for a resume check: a file's CRC-32, a directory's
    index.json's (token shards), else its path."""
    if path is None:
        return None
    path = Path(path)
    for file in (path, path / "index.json"):
        if file.is_file():
            return f"crc32:{file_crc32(file):08x}"
    return str(path)


def write_checksums(directory: Path, names: Iterable[str]) -> None:
    """Record the CRC-32 of each of `names` (files in `directory`) in directory/checksums.json,
    for `verify_checksums` to check on every later read (training states, teacher caches)."""
    record = {"crc32": {name: file_crc32(directory / name) for name in sorted(names)}}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def verify_checksums(directory: Path, what: str) -> None:
    """Check the files directory/checksums.json records (while verification is on): a missing or
    changed file, or a malformed record, is a UserError naming the file. A directory without
    the record (written before there was one) passes."""
    path = Path(directory) / CHECKSUMS_FILE
    if not verifying() or not path.exists():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{what} {directory}: its checksum record {CHECKSUMS_FILE} is unreadable; the {what} is damaged") from None
    crcs = record.get("crc32") if isinstance(record, dict) else None
    if not isinstance(crcs, dict) or not all(isinstance(k, str) and type(v) is int and 0 <= v < 2**32 for k, v in crcs.items()):
        raise UserError(f"{what} {directory}: its checksum record {CHECKSUMS_FILE} is malformed; the {what} is damaged")
    for name, expected in sorted(crcs.items()):
        file = Path(directory) / name
        if Path(name).name != name or not file.is_file():
            raise UserError(f"{what} {directory} is missing {name}; the {what} is damaged")
        if file_crc32(file) != expected:
            raise UserError(f"checksum mismatch in {file}: the {what} is corrupt")


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


def check_free_space(out: str | os.PathLike, needed: int) -> None:
    """A UserError, before anything is written, when the file system `out` goes to has fewer than
    `needed` bytes free (a write that fails on a full disk is caught too, but later)."""
    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise UserError(f"cannot write {out}: no space left on the device ({needed:,} bytes needed, {free:,} free)")


def check_apart_from_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """A UserError when `out` is, lies inside, or contains one of `inputs` (symbolic links
    resolved): writing there could replace or bury what the command reads."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise UserError(f"output {out} is the input {given}; write to a new path")
        if source.is_relative_to(target):
            raise UserError(f"output {out} contains the input {given}; write to a path outside it")
        if target.is_relative_to(source):
            raise UserError(f"output {out} is inside the input {given}; write to a path outside it")


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                 ours: Callable[[Path], bool] | None = None, keep: bool = False) -> None:
    """The one check before a command writes `out` (every command runs it, see cpmctl.commands):

    - `out` equal to, inside or containing any of `inputs` is a UserError, whatever `overwrite` says;
    - `keep`: `out` is continued, not replaced (a resumed run): nothing more to check;
    - an existing `out` is a UserError unless `overwrite`;
    - and with `overwrite`, it is replaced only when empty or when `ours(out)` says it is an
      earlier output of the same command: anything else would be deleted by mistake.
    """
    check_apart_from_inputs(out, inputs)
    path = Path(out)
    if keep or not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"output {out} already exists; choose a new path or ask for it to be replaced", option="overwrite")
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"output {out} is a file, not an earlier output of this command; remove it yourself or choose a new path")
    if any(path.iterdir()) and not (ours is not None and ours(path)):
        raise UserError(f"output {out} holds files that are not an earlier output of this command, and replacing it "
                        "would delete them; remove it yourself or choose a new path")


def recorded_stage(directory: Path) -> str | None:
    """The `stage` a cpmctl checkpoint directory's cpmctl.json records, or None."""
    try:
        data = json.loads((directory / "cpmctl.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stage = data.get("stage") if isinstance(data, dict) else None
    return stage if isinstance(stage, str) else None


def written_by(*stages: str) -> Callable[[Path], bool]:
    """An `ours` test for check_output: a checkpoint whose cpmctl.json records one of `stages`."""
    return lambda directory: recorded_stage(directory) in stages


def holding(*names: str) -> Callable[[Path], bool]:
    """An `ours` test for check_output: a directory holding every one of `names`."""
    return lambda directory: all((directory / name).exists() for name in names)


def any_of(*tests: Callable[[Path], bool]) -> Callable[[Path], bool]:
    return lambda directory: any(test(directory) for test in tests)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temporary_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-"


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `out` (`.OUT.tmp-PID-*`, `.OUT.old-PID-*`) whose writer,
    the process PID in their name, is gone: a killed run's leftovers, possibly a whole model.
    Only those names, and only with a dead writer: a running writer's directory stays."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    if not parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        prefix = _temporary_prefix(out, kind)
        for entry in parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix):].partition("-")[0]
            if not pid_text.isdigit() or _process_alive(int(pid_text)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_as_umask_allows(root: Path) -> None:
    """mkdtemp makes directories 0700; an output is made as any other would be under the umask."""
    os.chmod(root, 0o777 & ~current_umask())


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out` in one rename.

    If `out` exists and `overwrite` is false this is a UserError raised before anything is
    written. On any exception the temporary directory is removed and `out` is untouched. The
    temporary directory carries this process's id in its name (`.OUT.tmp-PID-*`), so that the
    leftovers of a killed writer are recognised and removed by the next writer of `out`
    (remove_stale_temporaries). An OSError without a file name (a write to a full disk) gets
    `out`'s, so that the error names where it happened.
    """
    out = Path(out)
    check_new_output(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(out, 'tmp')}{os.getpid()}-", dir=parent))
    try:
        _share_as_umask_allows(tmp)
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            # Move the old output aside first so the swap is two renames, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(out, 'old')}{os.getpid()}-", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(out)
        raise
