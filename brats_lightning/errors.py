"""User errors: bad input that a person can fix, reported as one message and exit code 2, never a traceback.

Raise :class:`UserError` (or a subclass) for anything the user gave us that we cannot use: a missing file, a
broken case, a wrong option. The message names the case and file, says what was found and what was
expected, and gives the fix. Internal errors (bugs) stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input; ``str(error)`` is the whole message shown to the user (``brats-lightning`` exits 2)."""
