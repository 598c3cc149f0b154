"""The one exception type that means "the user asked for something wrong".

The CLI prints a `UserError` as a single line and exits with code 2; any other exception is a
bug and keeps its traceback (shown with `--debug`, summarised otherwise).

The library never names a command-line flag: its errors say what is wrong in its own terms. When
one setting decides the error, the library names it with `option=` (its own parameter name, e.g.
"kernels", "overwrite"), and the command layer (cpmctl.commands) adds the flag that sets it on the
command that failed: `unknown MoE kernels 'x'; expected auto, torch or triton (--kernels)`.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad option, a mismatched checkpoint.

    option: the setting that decides this error, by the library's name for it (a parameter name);
    None when no single setting does."""

    def __init__(self, *args: object, option: str | None = None) -> None:
        super().__init__(*args)
        self.option = option


_ENVIRONMENT = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class EnvironmentProblem(UserError):
    """The machine refused: a full disk, a read-only file system, a forbidden path."""


def environment_error(exc: OSError, needed_bytes: int | None = None) -> UserError | None:
    """`exc` as one line naming the path (and, for a full disk, the bytes needed when known), or
    None when it is not a problem of the environment (then it is a bug and keeps its traceback)."""
    reason = _ENVIRONMENT.get(exc.errno or -1)
    if reason is None:
        return None
    where = exc.filename if exc.filename is not None else "the output"
    needed = f" ({needed_bytes:,} bytes needed)" if needed_bytes and exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return EnvironmentProblem(f"cannot write {where}: {reason}{needed}" if exc.errno not in (errno.EACCES, errno.EPERM)
                              else f"cannot access {where}: {reason}")
