"""One exception hierarchy for the whole project.

Configuration errors fail fast before any pipeline work starts; data errors
about single rows never raise out of a pipeline: they become rejected rows.
"""


class CatalogIndexError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CatalogIndexError):
    """A flag, path or model is unusable; the message says how to fix it."""


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


def brief(exc: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', cut to ``limit``: TensorFlow errors run to pages."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
