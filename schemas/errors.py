"""One exception hierarchy for the whole project.

Configuration errors fail fast before any pipeline work starts; data errors
about single rows never raise out of a pipeline: they become rejected rows.
"""


class CatalogIndexError(Exception):
    """Base class of every error this project raises on purpose.

    ``exit_status`` is what the CLI exits with: 2 for usage and configuration
    (fix the command), 1 for data and run failures (fix the input, or retry).
    """

    exit_status = 1


class ConfigError(CatalogIndexError):
    """A flag, path or model is unusable; the message says how to fix it."""

    exit_status = 2


class UsageError(ConfigError):
    """The command line itself is wrong (unknown flag, missing argument)."""


class CatalogSchemaError(ConfigError):
    """A catalog file's schema cannot be read (missing or mistyped column)."""


class EncoderError(ConfigError):
    """An encoder or fusion model cannot be loaded or does not fit the others."""


class DataError(CatalogIndexError):
    """A single input row (or its image) is unusable; carries a stable reason code."""

    reason = "invalid_row"

    def __init__(self, message, reason=None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class PublicationError(CatalogIndexError):
    """The run produced output that must not be published (failed checks or limits)."""


class VerificationError(PublicationError):
    """A published version does not match its manifest (missing, changed or extra file)."""


class LeaseHeldError(PublicationError):
    """Another run holds the output root's publication lease; the message names it."""


_NOISE = ("Detected at node", "<stack traces", "[[", "Graph execution error")


def brief(exc: BaseException, limit: int = 300) -> str:
    """'Type: the telling line of the message', cut to ``limit``.

    TensorFlow errors run to pages and open with a generic header ("Graph
    execution error:") and node traces; the line that says what went wrong
    comes after them.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(_NOISE)]
    text = f"{type(exc).__name__}: {(telling or lines or [''])[0]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
