"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""


class StaterankError(Exception):
    """Base class of every error caused by input the user can fix (paths, data, options)."""


class ModelLoadError(StaterankError):
    """A model that cannot be found, read or understood."""


class UnsupportedModelError(StaterankError):
    """A model whose architecture no adapter supports."""


class DataError(StaterankError):
    """A corpus that is missing, empty or malformed."""


class OutputExistsError(StaterankError):
    """An output path that exists while --overwrite was not given."""


class StaterankWarning(UserWarning):
    """Something the user should know that does not stop the run. The CLI prints it on one line."""
