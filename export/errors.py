"""Typed errors of the export side. Each message says what was wrong and what is allowed."""


class SourceError(ValueError):
    """The model source (GGUF file or Hugging Face folder) cannot be used."""


class UnsupportedArchitectureError(SourceError):
    pass


class UnsupportedTensorTypeError(SourceError):
    pass


class ExportError(RuntimeError):
    """The export itself failed; nothing was written."""


class ParityError(AssertionError):
    """The ONNX model does not compute what the PyTorch reference computes, within tolerance."""


class QuantizationError(ValueError):
    """Bad quantization settings, or a model folder that cannot be quantized as asked."""
