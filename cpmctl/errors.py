"""The one exception type that means "the user asked for something wrong".

The CLI prints a `UserError` as a single line and exits with code 2; any other exception is a
bug and keeps its traceback (shown with `--debug`, summarised otherwise).

The library never names a command-line flag: its errors say what is wrong in its own terms. When
one setting decides the error, the library names it with `option=` (its own parameter name, e.g.
"kernels", "overwrite"), and the command layer (cpmctl.commands) adds the flag that sets it on the
command that failed: `unknown MoE kernels 'x'; expected auto, torch or triton (--kernels)`.
"""


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad option, a mismatched checkpoint.

    option: the setting that decides this error, by the library's name for it (a parameter name);
    None when no single setting does."""

    def __init__(self, *args: object, option: str | None = None) -> None:
        super().__init__(*args)
        self.option = option
