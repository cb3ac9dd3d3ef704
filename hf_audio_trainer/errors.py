"""Mistakes a user can make (configuration, data, paths, resume), told apart from bugs.

A recipe ends a `UserError` with one line, `<recipe>.py: error: <what and the fix>`, and exit status 2, as argparse
does; any other exception is a bug in this package or below it and keeps its traceback. Each class also derives from
the built-in exception the caller would expect (`ValueError`, `FileNotFoundError` ...), so code that catches those
keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A bad configuration value, data content or run setting."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder or checkpoint that should exist does not."""


class ExistsError(UserError, FileExistsError):
    """Something in the way: an output folder of another run, a file where a folder should be."""


class LockedError(UserError, RuntimeError):
    """Another run holds the output folder."""


class WriteError(UserError, OSError):
    """A checkpoint or model could not be written (disk full, quota, permissions); nothing earlier was touched."""


class RemoteError(UserError, RuntimeError):
    """The Hub refused or could not be reached (credentials, permissions, network)."""


def check(condition: bool, message: str) -> None:
    """Raise a `ConfigError` with `message` unless `condition` holds (config sections validate with this)."""
    if not condition:
        raise ConfigError(message)
