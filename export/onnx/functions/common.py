"""The domain name and the opsets every function body is written against."""

from onnxscript import opset23
from onnxscript.values import Opset

from export.onnx.domain import DOMAIN, DOMAIN_VERSION

OPSET = Opset(DOMAIN, DOMAIN_VERSION)
ONNX_OPSET = 23  # the model's default-domain opset; function bodies must use the same version
op = opset23
