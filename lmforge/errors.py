"""User-facing errors.

Anything a user can cause (bad config, bad data, missing files) raises `LmforgeError` with a
one-line message that names the file, line or key and says what to do. The CLI prints it as
`error: <message>` and exits non-zero without a traceback; everything else is a bug and keeps
its traceback.
"""


class LmforgeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(LmforgeError):
    pass


class DataError(LmforgeError):
    pass


class CheckpointError(LmforgeError):
    pass
