"""User-facing errors.

A :class:`SetupError` means the run cannot start or continue because of something the user can fix
(missing data or weights, a bad file, an incompatible config). Entry points print its message as one
paragraph and exit non-zero, without a traceback.
"""


class SetupError(RuntimeError):
    """Something the user must fix; the message says what and how."""


class DataError(SetupError):
    """A data file or folder is missing or malformed; the message names it."""
