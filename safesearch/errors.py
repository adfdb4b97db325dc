"""The one exception type that reaches users as a single line.

Anything a user can get wrong (a path, a spec field, a flag) raises :class:`UserError` with a message
that names the input and what is wrong with it; the CLI prints it as ``error: <message>`` and exits
non-zero, without a traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, reported as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
