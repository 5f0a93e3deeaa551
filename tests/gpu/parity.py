"""Part of the GPU check (tests/gpu/kquants.sh): where a folder's CUDA run departs from its CPU run.
  1. steps: the same 16 prompt tokens, then 12 decode steps fed the same tokens, on the CPU and the
     CUDA provider: each step's largest logit difference (a prefill that agrees and decode steps
     that do not point at the cache or attention, not the weights);
  2. nodes: one MatMulNBits of each shape and kind alone, its own initializers, on 1 and 8 rows
     of random activations, CPU against CUDA, relative to the output's largest value, with bits,
     block size, K and N.
Prints a table and writes JSON: python tests/gpu/parity.py OUT.json FOLDER…
PROVIDER=cpu rehearses it without a GPU (both sides on the CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.session import Session  # noqa: E402

DEVICE = os.environ.get("PROVIDER", "cuda")
PROMPT, STEPS = 16, 12


def steps(folder: Path) -> list[float]:
    """Largest |Δlogit| of the prefill (first entry), then of each decode step."""
    cpu, dev = Session(folder, provider="cpu"), Session(folder, provider=DEVICE)
    ids = np.arange(100, 100 + PROMPT, dtype=np.int64)[None] % cpu.info.vocab_size
    caches = [s.new_cache(1, PROMPT + STEPS + 1) for s in (cpu, dev)]
    deltas, mask = [], np.ones((1, PROMPT), np.int64)
    positions = np.arange(PROMPT, dtype=np.int64)[None]
    for _ in range(STEPS + 1):
        a, b = (s.forward(ids, mask, positions, c) for s, c in zip((cpu, dev), caches, strict=True))
        deltas.append(float(np.abs(a[:, -1] - b[:, -1]).max()))
        ids = a[:, -1].argmax(-1)[:, None].astype(np.int64)
        positions = np.array([[mask.shape[1]]], np.int64)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return deltas


def nodes(folder: Path) -> list[dict]:
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    rows, seen = [], set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not all(name in inits for name in node.input[1:] if name):
            continue  # a weight computed in the graph: not one node alone
        key = (attrs.get("bits", 4), attrs["block_size"], attrs["K"], attrs["N"], len(node.input))
        if key in seen:
            continue  # one node of each shape and kind
        seen.add(key)
        scales = inits[node.input[2]]
        ftype = scales.data_type
        np_type = np.float16 if ftype == onnx.TensorProto.FLOAT16 else np.float32
        a = helper.make_tensor_value_info("A", ftype, ["M", attrs["K"]])
        y = helper.make_tensor_value_info("Y", ftype, ["M", attrs["N"]])
        one = helper.make_node(
            "MatMulNBits", ["A", *node.input[1:]], ["Y"], domain="com.microsoft", **attrs
        )
        graph = helper.make_graph([one], "one", [a], [y], [inits[n] for n in node.input[1:] if n])
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        m.ir_version = 10
        data = m.SerializeToString()
        dev_providers = ["CUDAExecutionProvider"] if DEVICE == "cuda" else ["CPUExecutionProvider"]
        ref_s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        dev_s = ort.InferenceSession(data, providers=dev_providers)
        errs = []
        for m_rows in (1, 8):
            x = rng.standard_normal((m_rows, attrs["K"])).astype(np_type)
            ref = ref_s.run(None, {"A": x})[0].astype(np.float32)
            dev = dev_s.run(None, {"A": x})[0].astype(np.float32)
            errs.append(float(np.abs(ref - dev).max() / max(np.abs(ref).max(), 1e-30)))
        rows.append(
            {
                "name": node.name,
                "bits": attrs.get("bits", 4),
                "block": attrs["block_size"],
                "K": attrs["K"],
                "N": attrs["N"],
                "zero_points": len(node.input) > 3 and bool(node.input[3]),
                "type": "fp16" if np_type is np.float16 else "fp32",
                "rel_err_1row": errs[0],
                "rel_err_8rows": errs[1],
            }
        )
    return rows


def main(out: str, folders: list[str]) -> int:
    result = {}
    for f in map(Path, folders):
        r = {}
        try:
            r["steps"] = steps(f)
            print(
                f"{f.name}: |Δlogit| prefill {r['steps'][0]:.3g}, decode steps "
                + " ".join(f"{d:.3g}" for d in r["steps"][1:])
            )
        except Exception as e:  # report and go on to the nodes
            r["steps_error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{f.name}: steps failed: {r['steps_error']}")
        r["nodes"] = nodes(f)
        worst: dict[tuple, float] = {}
        for n in r["nodes"]:
            key = (n["type"], n["bits"], n["block"], n["K"], n["N"], n["zero_points"])
            worst[key] = max(worst.get(key, 0.0), n["rel_err_1row"], n["rel_err_8rows"])
        for key, err in sorted(worst.items()):
            print(
                f"  MatMulNBits {key[0]} bits {key[1]} block {key[2]} K {key[3]} N {key[4]} "
                f"zero points {key[5]}: worst relative error {err:.3g}"
            )
        result[f.name] = r
    Path(out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
