"""Typed errors of the export side. Each message says what was wrong and what is allowed.

All derive from the runtime's `LlamaonnxError` (runtime/errors.py), so the CLI tells them from a
bug in llamaonnx."""

from runtime.errors import LlamaonnxError


class SourceError(LlamaonnxError, ValueError):
    """The model source (GGUF file or Hugging Face folder) cannot be used."""


class UnsupportedArchitectureError(SourceError):
    pass


class UnsupportedTensorTypeError(SourceError):
    pass


class ConfigError(SourceError):
    """The model's configuration is inconsistent or out of range."""


class SourceChangedError(SourceError):
    """The source a folder was exported from is gone or differs from its recorded sha256."""


class CorruptWeightsError(SourceError):
    """The weights compute nonsense: a perplexity no trained model has."""


class ExportError(LlamaonnxError, RuntimeError):
    """The export itself failed; nothing was written."""


class LoweringError(ExportError):
    """A graph cannot be lowered to the target asked for; the message says which target can."""


class ParityError(LlamaonnxError):
    """The ONNX model does not compute what the PyTorch reference computes, within tolerance.
    Not an AssertionError: a failed `assert` in llamaonnx is a bug, and is reported as one."""


class QuantizationError(LlamaonnxError, ValueError):
    """Bad quantization settings, or a model folder that cannot be quantized as asked."""
