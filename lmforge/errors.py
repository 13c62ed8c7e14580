"""User-facing errors.

Anything a user can cause (bad config, bad data, missing files) raises `LmforgeError` with a
one-line message that names the file, line or key and says what to do. The CLI prints it as
`error: <message>` and exits non-zero without a traceback; everything else is a bug and keeps
its traceback.
"""

from importlib.util import find_spec


class LmforgeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(LmforgeError):
    pass


class DataError(LmforgeError):
    pass


class CheckpointError(LmforgeError):
    pass


def missing_extra(key: str, extra: str) -> LmforgeError:
    """The one line for a feature whose optional extra (pyproject.toml) is not installed."""
    return LmforgeError(f'{key}: needs the \'{extra}\' extra; pip install "lmforge[{extra}]"')


def use_extra(setting: bool | None, key: str, module: str, extra: str) -> bool:
    """Whether to use a feature that an optional extra provides (`module` is its import name):
    True needs it (missing_extra when it is not installed), None uses it when it is installed,
    False never does. Looks the module up without importing it."""
    if setting is False:
        return False
    installed = find_spec(module) is not None
    if setting and not installed:
        raise missing_extra(key, extra)
    return installed
