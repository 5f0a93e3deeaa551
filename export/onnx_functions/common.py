"""The domain name and the opsets every function body is written against."""

from onnxscript import opset23
from onnxscript.values import Opset

DOMAIN = "llamaonnx"
DOMAIN_VERSION = 1
OPSET = Opset(DOMAIN, DOMAIN_VERSION)
ONNX_OPSET = 23  # the model's default-domain opset; function bodies must use the same version
op = opset23


def float_input(name: str, doc: str = ""):
    import onnx

    return onnx.defs.OpSchema.FormalParameter(name, "T", doc)
