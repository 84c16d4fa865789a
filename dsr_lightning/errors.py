"""The errors a user can cause by input (config, files): entry points print them in one line."""

from dsr_lightning.data import DataError
from dsr_lightning.models import CheckpointError
from dsr_lightning.tasks.networks import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, DataError, FileNotFoundError)
