"""The one exception type that means "the user asked for something wrong".

The CLI prints a `UserError` as a single line and exits with code 2; any other exception is a
bug and keeps its traceback (shown with `--debug`, summarised otherwise).
"""


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad option, a mismatched checkpoint."""
