"""`llamaonnx bench MODEL_DIR… [--peer llama.cpp|genai|torch]`: time to first token, prefill and
decode tokens/s, peak resident memory and size, side by side with the peers that are installed.

Every engine runs in its own worker process (`python -m runtime.bench.worker …`, JSON lines on
stdin/stdout), so thread pools never compete inside one process and each peak RSS is its own. All
engines get the same prompt token ids (a chat prompt cut from the shipped evaluation text), decode
greedily without stopping at end-of-sequence, and are run interleaved — one run of each engine in
turn, `runs` times after a warm-up — because this kind of machine drifts by 10-20 % within minutes;
medians and spreads are reported. A sweep decodes at growing context lengths to show how speed
falls as the cache grows.

The package: `prompt` (the shared prompt ids), `engines` (one adapter per engine, and the registry
that other packages extend through the `llamaonnx.bench_engines` entry point), `worker` (the
process that serves runs), `harness` (starting workers, interleaving, statistics, the machine),
`report` (the text table, markdown and chart).
"""

from runtime.bench.harness import SWEEP, PeerError, bench, machine, versions
from runtime.bench.prompt import prompt_ids
from runtime.bench.report import chart, report_markdown, table

__all__ = [
    "SWEEP",
    "PeerError",
    "bench",
    "chart",
    "machine",
    "prompt_ids",
    "report_markdown",
    "table",
    "versions",
]
