"""torch → ONNX: our op domain (domain.py, torch-free, which the passes and the quantizer read),
the trace with torch.onnx's dynamo exporter (trace.py), one ONNX function per custom op
(functions/), and writing the graph into a model folder (save.py)."""
