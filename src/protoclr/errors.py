"""User errors: mistakes in what the user asked for, reported by the CLI as one line with exit status 2.

Each message names the culprit (the file, key, dataset or run) and says what to do. ``protoclr`` prints
``protoclr COMMAND: MESSAGE`` without a traceback; ``--debug`` (or ``PROTOCLR_DEBUG=1``) shows it.
Errors that are not the user's (a bug, a diverged run) are not ``UserError``s.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: the message names it and says how."""


class UnknownChoice(UserError, ValueError):
    """A name that is not in the table it must come from (a dataset, split, preset)."""


class ConfigError(UserError, ValueError):
    """A config key that is unknown, has the wrong type, or is out of range (the message names the key)."""


class DatasetNotFound(UserError, FileNotFoundError):
    """A dataset that is neither on disk nor obtainable here."""


class DataError(UserError, ValueError):
    """A dataset that is there but cannot be used as it is: bad image files, a layout without class folders, an
    archive member that climbs out of its folder (the message names the file and what to do)."""


class NotACheckpoint(UserError):
    """A file or folder given as a run or checkpoint that is not one protoclr wrote."""


class NotADatabase(UserError):
    """A file given as ``runs.db`` that is not a protoclr results database (or holds no tables yet)."""


class MissingExtra(UserError, ImportError):
    """An optional package a feature needs is not installed (the message names the ``protoclr[extra]``)."""


__all__ = ["ConfigError", "DataError", "DatasetNotFound", "MissingExtra", "NotACheckpoint", "NotADatabase",
           "UnknownChoice", "UserError"]
