"""The PyTorch reference as a `llamaonnx bench` peer, contributed to the runtime's engine registry
through the `llamaonnx.bench_engines` entry point (runtime/bench/engines.py)."""

from __future__ import annotations

import time


class TorchEngine:
    def __init__(self, path: str, threads: int, provider: str):
        import torch

        from export.sources import build_model, load_source

        torch.set_num_threads(threads)
        self.torch, self.model = torch, build_model(load_source(path or None))

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        torch, model = self.torch, self.model
        with torch.no_grad():
            x = torch.tensor([ids])
            mask = torch.ones_like(x)
            t0 = time.perf_counter()
            logits, past = model(x, mask, torch.arange(len(ids))[None], model.empty_cache(1))
            tok = logits[0, -1].argmax()
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
            for k in range(new - 1):
                mask = torch.ones((1, len(ids) + k + 1), dtype=torch.long)
                pos = torch.tensor([[len(ids) + k]])
                logits, past = model(tok.view(1, 1), mask, pos, past)
                tok = logits[0, -1].argmax()
        return ttft, time.perf_counter() - t1, new
