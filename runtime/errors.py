"""Typed runtime errors; each message says what was wrong and what is allowed."""


class ModelFolderError(ValueError):
    """The model folder is missing, incomplete or inconsistent."""


class ContextLengthError(ValueError):
    """The prompt (plus new tokens) does not fit the context."""


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""
