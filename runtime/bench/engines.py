"""One adapter per engine, each run inside its own worker process: `Engine(path, threads,
provider)` loads the model, `run(ids, new)` → (time to first token, decode seconds, new tokens).

The runtime's own (llamaonnx, onnxruntime-genai, llama.cpp) are here; other packages add theirs
through the `llamaonnx.bench_engines` entry point (the PyTorch reference lives on the export side,
export/bench_torch.py), so the runtime never names a package above it.
"""

from __future__ import annotations

import json
import time

from runtime import plugins
from runtime.errors import OptionError

ENGINES_GROUP = "llamaonnx.bench_engines"


class _Ours:
    def __init__(self, path: str, threads: int, provider: str):
        from runtime.session import Session

        graph = provider == "cuda-graph"
        self.threads = threads
        self.session = Session(  # the parent checked the folder's files once
            path,
            provider="cuda" if graph else provider,
            threads=threads,
            cuda_graph=graph,
            check_files=False,
        )

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        from runtime.generator import GenerationConfig, Generator

        gen = Generator(self.session)
        gen.generate_ids([ids], GenerationConfig(max_new_tokens=new, stop_token_ids=()))
        s = gen.stats
        return s.time_to_first_token, s.decode_seconds, s.new_tokens

    def profile(self, ids: list[int], new: int) -> dict:
        from runtime.bench.profile import profile

        return profile(self.session.info.folder, ids, new, self.threads)


class _Genai:
    def __init__(self, path: str, threads: int, provider: str):
        import onnxruntime_genai as og

        config = og.Config(path)
        config.clear_providers()
        if provider.startswith("cuda"):
            config.append_provider("cuda")
            if provider == "cuda-graph":
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        config.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            )
        )
        self.og, self.model = og, og.Model(config)

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False
        )
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.get_next_tokens()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = 1
        while n < new and not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            n += 1
        return ttft, time.perf_counter() - t1, n


class _LlamaCpp:
    def __init__(self, path: str, threads: int, provider: str):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=path,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=8192,
            n_batch=512,
            n_gpu_layers=-1 if provider.startswith("cuda") else 0,
            verbose=False,
        )

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        self.llm.reset()
        t0 = time.perf_counter()
        n = 0
        for _ in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            n += 1
            if n == 1:
                ttft = time.perf_counter() - t0
                t1 = time.perf_counter()
            if n == new:
                break
        return ttft, time.perf_counter() - t1, n


BUILTIN = {"llamaonnx": _Ours, "genai": _Genai, "llama.cpp": _LlamaCpp}


def names() -> tuple[str, ...]:
    """Every engine this install can run: the runtime's and those of the entry point group."""
    return tuple(dict.fromkeys((*BUILTIN, *plugins.declared(ENGINES_GROUP))))


def load(name: str):
    if name in BUILTIN:
        return BUILTIN[name]
    target = plugins.declared(ENGINES_GROUP).get(name)
    if target is None:
        raise OptionError(f"unknown engine {name!r}; this install has {names()}")
    return plugins.load(target)
