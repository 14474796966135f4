"""The one exception type that the CLI turns into a clear one-line error (exit 1, no traceback)."""


class UserError(Exception):
    """Bad input or a failed precondition the user can fix: the message says what and where."""
