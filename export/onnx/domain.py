"""Our ONNX op domain: the name of the custom RMSNorm / RotaryEmbedding / GroupQueryAttention
nodes the trace emits and the lowering passes replace. Imports nothing, so that the passes and
the quantizer, which only read it, need neither torch nor onnxscript."""

DOMAIN = "llamaonnx"
DOMAIN_VERSION = 1
