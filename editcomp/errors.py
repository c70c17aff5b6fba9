"""User-facing errors.

Anything raised as an ``EditcompError`` is a problem with the user's input (a file, a flag, a
checkpoint), not a bug: the CLI prints its message on one line and exits non-zero, without a
traceback. Messages name the file, line and field involved so the user can fix the input.
"""


class EditcompError(Exception):
    """An error the user can fix; its message is shown as-is."""


class CheckpointError(EditcompError):
    """A checkpoint directory is missing, incomplete, corrupt or unsupported."""


class DataError(EditcompError):
    """A text, calibration or facts file is malformed or too short."""


class ConfigError(EditcompError):
    """A flag, recipe key or configuration value is invalid."""


class NumericalError(EditcompError):
    """A NaN or Inf appeared during calibration or training; nothing was written."""
