"""Part of the GPU check: where a CUDA decode step's time goes, kernel by kernel.

For each model folder (ours, or one built by onnxruntime-genai) it runs decode steps on the CUDA
provider without a graph — the same kernels a captured graph replays — under torch.profiler, whose
CUPTI tracing sees every kernel in the process, onnxruntime's included. It prints kernels per step,
kernel time per step and the kernels that take it, and writes JSON:
    python tests/gpu/kernels.py OUT.json FOLDER…
Then, for our folders, the bare step of a replayed CUDA graph under variants (SiLU as QuickGelu,
flash attention off).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
STEPS = 40


def _prompt_ids(folder: str) -> list[int]:
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder).encode_chat(PROMPT)


def decode_step(session, ids: list[int]):
    """→ one bare decode step on a static-decode session's kept buffers (the prompt prefilled):
    no Python sampling, the graph replayed if the session captures one."""
    from runtime.generator import GenerationConfig, Generator

    Generator(session).generate_ids([ids], GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    binding, *_, options = session.new_cache(1, len(ids) + 4).static  # the same kept cache
    return lambda: session.session.run_with_iobinding(binding, options)


def ours(folder: str, ids: list[int], graph: bool = False):
    from runtime.session import Session

    return decode_step(Session(folder, provider="cuda", static_decode=True, cuda_graph=graph), ids)


def genai(folder: str, ids: list[int]):
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    config.append_provider("cuda")
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2 * STEPS + 64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    return lambda: (gen.generate_next_token(), gen.get_next_tokens())


def kernels(step) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    count, time_us = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "kernel":
            name = e["name"][:90]
            count[name] += 1
            time_us[name] += e["dur"]
    total = sum(time_us.values())
    return {
        "kernels_per_step": sum(count.values()) / STEPS,
        "kernel_us_per_step": total / STEPS,
        "top": [
            {"kernel": k, "per_step": count[k] / STEPS, "us_per_step": t / STEPS}
            for k, t in time_us.most_common(14)
        ],
    }


def bare_ms(step, n: int = 300, warmup: int = 10) -> float:
    """Median ms of `step` over n calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def with_quick_gelu(folder: str) -> str:
    """A copy of the folder whose x·Sigmoid(x) pairs are one com.microsoft.QuickGelu (α = 1)."""
    import onnx
    from onnx import helper

    out = tempfile.mkdtemp() + "/qg"
    shutil.copytree(folder, out)
    m = onnx.load(out + "/model.onnx", load_external_data=False)
    g = m.graph
    sig = {n.output[0]: n for n in g.node if n.op_type == "Sigmoid"}
    fused, drop = 0, []
    for n in list(g.node):
        if n.op_type == "Mul" and len(n.input) == 2:
            a, b = n.input
            s = sig.get(b) if b in sig else sig.get(a)
            x = a if b in sig else b
            if s is not None and s.input[0] == x:
                i = list(g.node).index(n)
                g.node.insert(
                    i,
                    helper.make_node(
                        "QuickGelu", [x], [n.output[0]], domain="com.microsoft", alpha=1.0
                    ),
                )
                drop += [n, s]
                fused += 1
    for n in drop:
        if n in g.node:
            g.node.remove(n)
    onnx.save(m, out + "/model.onnx")
    print(f"  QuickGelu variant: {fused} SiLUs fused", flush=True)
    return out


def _env(name: str, make):
    os.environ[name] = "1"  # read when the session's kernels are made
    try:
        return make()
    finally:
        del os.environ[name]


def main(out: str, folders: list[str]) -> int:
    results: dict = {"kernels": {}, "variants": {}}
    ids = _prompt_ids(next(f for f in folders if (Path(f) / "llamaonnx.json").exists()))
    for folder in folders:
        name = Path(folder).name
        is_ours = (Path(folder) / "llamaonnx.json").exists()
        try:
            r = kernels(ours(folder, ids) if is_ours else genai(folder, ids))
        except Exception as e:  # one engine failing must not hide the others
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            continue
        results["kernels"][name] = r
        print(
            f"{name}: {r['kernels_per_step']:.0f} kernels/step, "
            f"{r['kernel_us_per_step']:.0f} us of kernels/step",
            flush=True,
        )
        for t in r["top"]:
            print(f"  {t['per_step']:6.1f}/step {t['us_per_step']:7.1f} us  {t['kernel']}")
    for folder in [f for f in folders if (Path(f) / "llamaonnx.json").exists()]:
        name = Path(folder).name
        variants = {"default": lambda f=folder: ours(f, ids, graph=True)}
        variants["quick_gelu"] = lambda f=folder: ours(with_quick_gelu(f), ids, graph=True)
        variants["no_flash_attention"] = lambda f=folder: _env(
            "ORT_DISABLE_FLASH_ATTENTION", lambda: ours(f, ids, graph=True)
        )
        for v, make in variants.items():
            try:
                ms = bare_ms(make())
            except Exception as e:
                print(f"{name} {v}: {type(e).__name__}: {e}", flush=True)
                continue
            results["variants"][f"{name} {v}"] = ms
            print(f"{name} {v}: bare graph step {ms:.3f} ms", flush=True)
    Path(out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
