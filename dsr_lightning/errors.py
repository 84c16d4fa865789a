"""Every error a user can cause by input (a config value, a file, an argument). Entry points print
one of these as one `error:` line and exit with status 2. This module imports nothing of the
package, so every layer can raise them.

Each keeps its one message when PyTorch carries it out of a DataLoader worker: the main process
re-raises it as `type(msg)` with msg = "Caught <Type> in DataLoader worker process k.\nOriginal
Traceback ...: <the worker's traceback text>"; the constructor takes the original message back
out of that text (`_original`), so the user reads one line, not a traceback."""

_WRAPPED = "\nOriginal Traceback (most recent call last):"


def _original(cls: type, message):
    """The worker's own message if `message` is PyTorch's re-raise text for an error of `cls`
    (the part after the traceback's last "<module>.<Class>: "), else `message` unchanged."""
    if not (isinstance(message, str) and message.startswith("Caught ") and _WRAPPED in message):
        return message
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    return message[at + len(marker):].rstrip("\n") if at >= 0 else message


class _OneMessage:
    """Mixin: the message of an error re-raised from a DataLoader worker is the original one."""

    def __init__(self, *args):
        super().__init__(*((_original(type(self), args[0]), *args[1:]) if args else args))


class ConfigError(_OneMessage, ValueError):
    """A configuration that cannot work; the message names the key and says what to change."""


class CheckpointError(_OneMessage, ValueError):
    """A checkpoint that cannot be read or does not fit its architecture; the message names the
    file and, for mismatches, the keys."""


class DataError(_OneMessage, ValueError):
    """A data set file that is missing, unreadable or malformed, or images and labels that cannot
    be certified or trained on (non-finite, outside [0, 1], of the wrong shape); the message names
    the file or the argument."""


class NetworkError(_OneMessage, ValueError):
    """A network whose outputs certification cannot use (non-finite values on noisy inputs, no
    label); the message names what it gave and what to check."""


class ResultsError(_OneMessage, ValueError):
    """A results file (or its settings record) that cannot be read, trusted or written; the message
    names the file (and the line) and says what to do."""


class TrainingError(_OneMessage, RuntimeError):
    """Training that cannot go on (e.g. a non-finite loss); the message says where it came from."""


class WriteError(_OneMessage, RuntimeError):
    """A file that cannot be written (a full or read-only disk, no permission, a path that runs
    through a file); the message names the file and the cause, says what to do, and that the file
    that was there before is whole."""


class Interrupted(_OneMessage, Exception):
    """A job stopped by SIGTERM (a cluster preempting it) or Ctrl-C: what was written is kept; the
    message says how to resume. Entry points exit with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)  # (_OneMessage: the original message out of a worker's)
        self.exit_code = 128 + int(signum)


USER_ERRORS = (ConfigError, ResultsError, TrainingError, CheckpointError, DataError,
               NetworkError, WriteError, FileNotFoundError)
