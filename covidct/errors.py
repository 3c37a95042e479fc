"""Errors a user can cause. Each message names the file or config key and says what to do."""


class CovidCTError(Exception):
    """Base class for user-facing errors (printed without a deep traceback by the CLIs)."""


class ConfigError(CovidCTError, ValueError):
    """A configuration value is invalid. The message names the config key (e.g. ``loss.gamma``)."""


class DataError(CovidCTError):
    """Input data is missing, unreadable or inconsistent. The message names the file or folder."""
