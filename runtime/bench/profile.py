"""Where a step goes: one generation under onnxruntime's profiler, summed per op type.

`profile(folder, ids, new, threads)` runs the prompt `ids` and `new` greedy tokens through the
runtime's Generator on a session with profiling on, and returns, for the prefill run and per
decode step (the median step's share of each op type), microseconds and calls per op type, the
sum of the kernels and the step's wall time (the difference is onnxruntime's own work between
kernels, and the profiler's). `llamaonnx bench --profile` adds it to each llamaonnx row, so
docs/benchmarks.md shows it per CPU and per kernel path.
"""

from __future__ import annotations

import bisect
import collections
import json
import statistics
import tempfile
from pathlib import Path


def profile(folder: str | Path, ids: list[int], new: int, threads: int) -> dict:
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    with tempfile.TemporaryDirectory(prefix="llamaonnx-profile-") as tmp:
        session = Session(folder, provider="cpu", threads=threads, check_files=False,
                          profile=str(Path(tmp) / "ort"))  # fmt: skip
        Generator(session).generate_ids([ids], GenerationConfig(max_new_tokens=new,
                                                                stop_token_ids=()))  # fmt: skip
        events = json.loads(Path(session.session.end_profiling()).read_text())
    return summarize(events)


def summarize(events: list[dict]) -> dict:
    """onnxruntime's profile events → {"prefill": …, "decode": …}, each {"wall_us", "kernels_us",
    "ops": {op type: {"us", "calls"}}}; decode per step (medians over the steps)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])  # fmt: skip
    if len(runs) < 2:
        raise ValueError("a profile needs the prefill and at least one decode step")
    per_run: list[collections.defaultdict] = [collections.defaultdict(lambda: [0.0, 0])
                                              for _ in runs]  # fmt: skip
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1  # the run it belongs to
        if i < 0:
            continue
        cell = per_run[i][e.get("args", {}).get("op_name", "?")]
        cell[0] += e["dur"]
        cell[1] += 1

    def part(indices: list[int]) -> dict:
        ops = {op for i in indices for op in per_run[i]}
        table = {
            op: {"us": statistics.median(per_run[i][op][0] for i in indices),
                 "calls": statistics.median(per_run[i][op][1] for i in indices)}
            for op in ops
        }  # fmt: skip
        return {
            "wall_us": statistics.median(runs[i]["dur"] for i in indices),
            "kernels_us": statistics.median(
                sum(c[0] for c in per_run[i].values()) for i in indices
            ),
            "steps": len(indices),
            "ops": dict(sorted(table.items(), key=lambda kv: -kv[1]["us"])),
        }

    return {"prefill": part([0]), "decode": part(list(range(1, len(runs))))}


def markdown(rows: list[dict], top: int = 8) -> list[str]:
    """One table: the decode step's op types (rows) by engine (columns), µs per step."""
    rows = [r for r in rows if r.get("profile")]
    if not rows:
        return []
    first = rows[0]["profile"]["decode"]["ops"]
    ops = list(first)[:top]
    out = [
        "",
        "Where a decode step goes (onnxruntime's profiler, `bench --profile`: one generation of "
        "the same prompt, median step; µs per step and share of the kernels' time):",
        "",
        "| op | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for op in ops:
        cells = []
        for r in rows:
            d = r["profile"]["decode"]
            us = d["ops"].get(op, {}).get("us", 0.0)
            cells.append(f"{us:.0f} ({100 * us / d['kernels_us']:.0f} %)")
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    out.append("| all kernels | " + " | ".join(
        f"{r['profile']['decode']['kernels_us']:.0f}" for r in rows) + " |")  # fmt: skip
    out.append("| the step (wall) | " + " | ".join(
        f"{r['profile']['decode']['wall_us']:.0f}" for r in rows) + " |")  # fmt: skip
    return out
