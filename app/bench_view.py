"""The Benchmarks tab: the latest `llamaonnx bench --json` results as a table and a chart."""

from __future__ import annotations

from runtime.bench.report import chart, table


def bench_markdown(data: dict) -> str:
    s = data.get("settings", {})
    head = (
        f"Machine: {data.get('machine', {}).get('cpu', '?')}, "
        f"{s.get('threads')} threads; prompt {s.get('prompt_tokens')} tokens, "
        f"{s.get('new_tokens')} new tokens, median of {s.get('runs')} runs "
        f"({data.get('date', '')})."
    )
    return head + "\n\n" + table(data, markdown=True)


def bench_chart(data: dict) -> str:
    import tempfile
    from pathlib import Path

    out = Path(tempfile.gettempdir()) / "llamaonnx-bench.png"
    chart(data, out)
    return str(out)
