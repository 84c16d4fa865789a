"""The errors a user can cause by input (config, files): entry points print them in one line."""

from dsr_lightning.data.base import DataError
from dsr_lightning.models.checkpoint import CheckpointError


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


class ResultsError(ValueError):
    """A results file (or its settings record) that cannot be read, trusted or written; the message
    names the file (and the line) and says what to do."""


class TrainingError(RuntimeError):
    """Training that cannot go on (e.g. a non-finite loss); the message says where it came from."""


USER_ERRORS = (ConfigError, ResultsError, TrainingError, CheckpointError, DataError,
               FileNotFoundError)
