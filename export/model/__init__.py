"""The PyTorch reference model: the architecture as a validated config (config.py), RMSNorm, RoPE
and GQA as custom ops whose eager bodies are the reference math (ops.py), the transformer with
the KV cache as data (transformer.py), and greedy generation for verification (generate.py)."""
