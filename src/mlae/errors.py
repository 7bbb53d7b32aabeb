"""The package's error classes.

Every error that a user can fix (an option, a file, a dataset, a run folder) derives from :class:`MLAEError`,
so that the command line prints exactly those as one ``mlae: error:`` line and lets anything else, a bug,
show its traceback. Each class also derives from the builtin that was raised before it existed (ValueError,
FileNotFoundError, ...), so that code catching those keeps working.
"""
from __future__ import annotations

import errno

__all__ = ["MLAEError", "MLAEWarning", "InputError", "MissingFileError", "NotMergeableError", "RunDirError",
           "TrainingError", "os_error_message"]


class MLAEError(Exception):
    """Base class of the errors a user can fix; the message says what is wrong and what to do."""


class MLAEWarning(UserWarning):
    """A warning of mlae's own (a setting that has no effect, a file read in a legacy way, ...): the command line
    prints these as one ``mlae: warning:`` line, and other libraries' warnings in Python's format."""


class InputError(MLAEError, ValueError):
    """An option, argument, config or file content that cannot be used as given."""


class MissingFileError(MLAEError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class NotMergeableError(MLAEError, TypeError):
    """The adapter's update depends on the input (MoLE's gates): it has no merged or plain LoRA form."""


class RunDirError(MLAEError, RuntimeError):
    """An output folder that must not be written: it holds a run to keep, or another process writes it."""


class TrainingError(MLAEError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); files already written are kept."""


# The operating system refusing a write is the user's environment, not a bug: say what and where, and what to do.
_OS_HINTS = {errno.ENOSPC: "free some space or choose another --out (files already written are kept)",
             errno.EDQUOT: "the disk quota is used up: free some space or choose another --out",
             errno.EROFS: "the file system is read-only: choose another --out",
             errno.EACCES: "choose a folder you may write to, or fix its permissions",
             errno.EPERM: "choose a folder you may write to, or fix its permissions"}


def os_error_message(err: OSError) -> str:
    """One line for an OSError from the operating system: its reason, the file, and a hint for the common ones."""
    where = f": {err.filename}" if err.filename else ""
    hint = _OS_HINTS.get(err.errno)
    return f"{err.strerror or err}{where}" + (f"; {hint}" if hint else "")
