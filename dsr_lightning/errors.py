"""Every error a user can cause by input (a config value, a file, an argument). Entry points print
one of these as one `error:` line and exit with status 2. This module imports nothing of the
package, so every layer can raise them."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and says what to change."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its architecture; the message names the
    file and, for mismatches, the keys."""


class DataError(ValueError):
    """A data set file that is missing, unreadable or malformed; the message names the file."""


class ResultsError(ValueError):
    """A results file (or its settings record) that cannot be read, trusted or written; the message
    names the file (and the line) and says what to do."""


class TrainingError(RuntimeError):
    """Training that cannot go on (e.g. a non-finite loss); the message says where it came from."""


class WriteError(RuntimeError):
    """A file that cannot be written (a full or read-only disk, no permission, a path that runs
    through a file); the message names the file and the cause, says what to do, and that the file
    that was there before is whole."""


class Interrupted(Exception):
    """A job stopped by SIGTERM (a cluster preempting it) or Ctrl-C: what was written is kept; the
    message says how to resume. Entry points exit with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


USER_ERRORS = (ConfigError, ResultsError, TrainingError, CheckpointError, DataError, WriteError,
               FileNotFoundError)
