"""Typed errors; each message says what was wrong and what is allowed.

Every error a user can cause derives from `LlamaonnxError`, so the CLI, the app and the server can
tell a user's mistake (a message, exit code 2) from a bug in llamaonnx (a traceback). The second
base class keeps the familiar Python meaning (`ValueError` for bad input, ...) for callers that
catch those.
"""


class LlamaonnxError(Exception):
    """Something the user gave or has (a file, an option, a text) cannot be used as asked."""


class ModelFolderError(LlamaonnxError, ValueError):
    """The model folder is missing, incomplete or inconsistent."""


class IntegrityError(ModelFolderError):
    """A file of the model folder differs from the sha256 recorded when it was written."""


class OutputFolderError(LlamaonnxError, ValueError):
    """The output folder cannot be written or replaced as asked; nothing was changed."""


class ContextLengthError(LlamaonnxError, ValueError):
    """The prompt (plus new tokens) does not fit the context."""


class ProviderError(LlamaonnxError, RuntimeError):
    """The requested execution provider is not available."""


class OptionError(LlamaonnxError, ValueError):
    """A setting is out of its allowed range (or not a finite number)."""


class InvalidTextError(LlamaonnxError, ValueError):
    """A prompt or message is not valid Unicode text (a lone surrogate, say)."""


class ChatTemplateError(LlamaonnxError, ValueError):
    """The model's chat template failed to render, or exceeded its bound on work, time or size."""


class NumericalError(LlamaonnxError, RuntimeError):
    """The model computed NaN or infinite logits: its weights or inputs are broken."""


class Terminated(BaseException):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP); cleanup runs as it unwinds.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class QueueFullError(LlamaonnxError, RuntimeError):
    """The serving engine's queue is full: the request was refused, not dropped (retry later)."""


class EngineClosedError(LlamaonnxError, RuntimeError):
    """The serving engine is shutting down or stopped: it takes no new requests."""
