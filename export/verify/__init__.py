"""Verification: the ONNX folder against the PyTorch reference on the same inputs (parity.py),
the tolerances per precision chosen from typed fields (tolerances.py), and the quality table of
the README from the folders' reports (report.py)."""
