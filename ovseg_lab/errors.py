"""User-facing errors.

A :class:`SetupError` means the run cannot start or continue because of something the user can fix
(missing data or weights, a bad file, an incompatible config). Entry points print its message as one
paragraph and exit non-zero, without a traceback.
"""


class SetupError(RuntimeError):
    """Something the user must fix; the message says what and how."""


class DataError(SetupError):
    """A data file or folder is missing or malformed; the message names it."""


class RunFolderBusy(SetupError):
    """Another live run holds the run folder; nothing of this run may be written there (not even error.txt)."""


def user_error(err: BaseException) -> SetupError | None:
    """The :class:`SetupError` behind ``err``, if any.

    Hydra wraps whatever a ``_target_`` raises in ``InstantiationException("Error in call to target ...")``: a
    missing ``clip.weights`` file or BERT offline would reach the user (and error.txt, which make_table quotes)
    as that wrapper (``raise ... from e``): its ``__cause__`` chain still holds our own one-paragraph error. (Not
    ``__context__``: an unrelated bug raised while a SetupError was being handled must keep its traceback.)
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SetupError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None
