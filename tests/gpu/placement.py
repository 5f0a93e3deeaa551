"""Part of the GPU check (tests/gpu/kquants.sh): which execution provider onnxruntime places each
node of a folder's graph on. A node the CUDA provider cannot run (a MatMulNBits width or bit
count its kernels lack, say) silently falls back to the CPU with copies around it; this prints
onnxruntime's own placement summary per folder, the nodes left on the CPU, by op type, and the
host/device copies onnxruntime put in the graph (a graph with any cannot be a CUDA graph).
    python tests/gpu/placement.py OUT.json FOLDER…     (PROVIDER=cpu rehearses it without a GPU)
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def placements(model: Path, provider: str) -> dict:
    """onnxruntime's verbose "Node placements" lines, read from its log on stderr."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 0
    opts.log_verbosity_level = 0
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if provider == "cuda"
        else ["CPUExecutionProvider"]
    )
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            ort.InferenceSession(str(model), opts, providers=providers)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read()
    summary = re.findall(
        r"(All nodes placed on \[\w+\]\. Number of nodes: \d+"
        r"|Node\(s\) placed on \[\w+\]\. Number of nodes: \d+)",
        text,
    )
    # the verbose lines after "placed on [Provider]" name each node: "  Op (name)"
    placed: dict[str, list[str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"placed on \[(\w+)\]", line)
        if not m or "All nodes" in line:
            continue
        for follow in lines[i + 1 :]:
            op = re.search(r"^\s+(\w+) \((.*)\)\s*$", follow.split("]", 1)[-1])
            if not op:
                break
            placed.setdefault(m.group(1), []).append(op.group(1))
    cpu_nodes = placed.get("CPUExecutionProvider", [])
    # copies between host and device: a graph with any cannot be captured as a CUDA graph
    copies = sum(op.startswith("Memcpy") for ops in placed.values() for op in ops)
    by_op = collections.Counter(cpu_nodes)
    graph_ops = collections.Counter(
        n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node
    )
    return {
        "summary": summary,
        "cpu_nodes_by_op": dict(by_op),
        "memcpy_nodes": copies,
        "graph_matmulnbits": graph_ops.get("MatMulNBits", 0),
    }


def main() -> None:
    out, folders = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
    provider = os.environ.get("PROVIDER", "cuda")
    result = {}
    for folder in folders:
        r = placements(folder / "model.onnx", provider)
        result[folder.name] = r
        print(f"{folder.name}: {'; '.join(r['summary']) or 'no placement lines in the log'}")
        if r["cpu_nodes_by_op"]:
            print(f"  on the CPU: {r['cpu_nodes_by_op']}")
        if r["memcpy_nodes"]:
            print(
                f"  {r['memcpy_nodes']} host/device copies in the graph (no CUDA graph with them)"
            )
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
