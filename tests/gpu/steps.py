"""Part of the GPU check (tests/gpu/run.sh): for each model folder, on CUDA,
  1. CUDA-graph decode gives the same greedy tokens as plain CUDA decode, for several prompts in
     turn (a captured graph is replayed across generations on the session's kept buffers), and
  2. where a decode step's time goes: the bare onnxruntime step (replayed graph, or a plain run on
     the same bound buffers) against the whole step of the Python generator (sampling, mask,
     copies).
Prints a table and writes JSON: python tests/gpu/steps.py OUT.json FOLDER…
PROVIDER=cpu rehearses it without a GPU (static decode buffers in place of the graph).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.errors import OptionError  # noqa: E402
from runtime.generator import GenerationConfig, Generator  # noqa: E402
from runtime.session import Session  # noqa: E402
from tests.gpu.kernels import bare_ms, decode_step  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
NEW = 64
STEPS = 300


def encode(gen: Generator, prompt: list[dict]) -> list[int]:
    """The chat through the folder's template; a folder without one (a test GGUF) gets the
    message's text as it is."""
    try:
        return gen.encode(prompt)
    except OptionError:
        return gen.encode(prompt[-1]["content"])


def tokens(session: Session, prompt) -> list[int]:
    gen = Generator(session)
    ids = encode(gen, prompt)
    return gen.generate_ids([ids], GenerationConfig(max_new_tokens=NEW, stop_token_ids=()))[0]


def bare_step_ms(session: Session) -> float:
    """Median ms of one decode step run straight on the kept static buffers: no Python sampling."""
    ids = encode(Generator(session), PROMPTS[0])
    return bare_ms(decode_step(session, ids), n=STEPS, warmup=0)


def generator_step_ms(session: Session) -> float:
    gen = Generator(session)
    ids = encode(gen, PROMPTS[0])
    runs = []
    for _ in range(5):
        gen.generate_ids([ids], GenerationConfig(max_new_tokens=128, stop_token_ids=()))
        runs.append(1000 * gen.stats.decode_seconds / (gen.stats.new_tokens - 1))
    return float(np.median(runs))


def main(out: str, folders: list[str]) -> int:
    results, ok = {}, True
    for folder in folders:
        name = Path(folder).name
        provider = os.environ.get("PROVIDER", "cuda")
        cuda = provider == "cuda"
        plain = Session(folder, provider=provider)
        graph = Session(folder, provider=provider, cuda_graph=cuda, static_decode=True)
        static = Session(folder, provider=provider, static_decode=True)
        want = [tokens(plain, p) for p in PROMPTS]
        got = [tokens(graph, p) for p in PROMPTS + PROMPTS[:1]]  # the first again, replayed
        same = got == want + want[:1]
        ok &= same
        r = {
            "graph_tokens_match_plain": same,
            "first_difference": [
                next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), None)
                for g, w in zip(got, want + want[:1], strict=True)
            ],
            "bare_step_ms_graph": bare_step_ms(graph),
            "bare_step_ms_static_no_graph": bare_step_ms(static),
            "generator_step_ms_graph": generator_step_ms(graph),
            "generator_step_ms_plain": generator_step_ms(plain),
        }
        results[name] = r
        print(
            f"{name}: graph tokens match plain: {same} {r['first_difference']} | bare step "
            f"{r['bare_step_ms_graph']:.3f} ms graph, {r['bare_step_ms_static_no_graph']:.3f} ms "
            f"no graph | generator step {r['generator_step_ms_graph']:.3f} ms graph "
            f"({1000 / r['generator_step_ms_graph']:.0f} tok/s), "
            f"{r['generator_step_ms_plain']:.3f} ms plain",
            flush=True,
        )
    Path(out).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
