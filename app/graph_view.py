"""A picture of one decoder layer, drawn from the ONNX file itself (not a static image).

The nodes whose names start with `/model/layers.{i}/` are laid out by data-flow depth (longest path
from the layer's inputs), one row per depth, and drawn with matplotlib: RMSNorm, RoPE and attention
nodes in colour, whatever op each target lowered them to.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

ROLES = {  # op type → (role, colour)
    "RMSNorm": ("RMSNorm", "#4c78a8"),
    "RMSNormalization": ("RMSNorm", "#4c78a8"),
    "SimplifiedLayerNormalization": ("RMSNorm", "#4c78a8"),
    "SkipSimplifiedLayerNormalization": ("RMSNorm + residual", "#4c78a8"),
    "RotaryEmbedding": ("RoPE", "#f58518"),
    "GroupQueryAttention": ("GQA", "#54a24b"),
    "Attention": ("GQA", "#54a24b"),
    "MatMul": ("projection", "#bab0ac"),
    "MatMulNBits": ("projection (n-bit)", "#bab0ac"),
    "MatMulQ4": ("projection (llamaonnx 4-bit)", "#bab0ac"),
    "MatMulQ4SwiGLU": ("gate/up + SwiGLU (llamaonnx 4-bit)", "#bab0ac"),
    "MatMulQ8": ("projection (llamaonnx 8-bit)", "#bab0ac"),
    "MatMulQ8SwiGLU": ("gate/up + SwiGLU (llamaonnx 8-bit)", "#bab0ac"),
}
NATIVE_MATMULS = ("MatMulQ4", "MatMulQ4SwiGLU", "MatMulQ8", "MatMulQ8SwiGLU")


def layer_nodes(model_path: Path, layer: int) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, op_type, inputs, outputs) of the layer's nodes, in graph order: those named
    /model/layers.{layer}/… and those torch recorded inside that module (the SwiGLU's ops)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    prefix = f"/model/layers.{layer}/"
    scope = f"'model.layers.{layer}'"
    out = []
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key.endswith("name_scopes")), "")
        if n.name.startswith(prefix) or scope in scopes:
            op = n.op_type
            if op == "GroupQueryAttention" and any(
                a.name == "do_rotary" and a.i for a in n.attribute
            ):
                op = "GroupQueryAttention+RoPE"
            elif op in NATIVE_MATMULS and len(n.input) > 2 and n.input[2]:
                op = f"{op}+RMSNorm"  # the norm in front, folded in (export/quant/norm.py)
            out.append((n.name, op, list(n.input), list(n.output)))
    return out


def _label(name: str, op: str, layer: int) -> str:
    role = ROLES.get(op.split("+")[0], (None,))[0]
    if op.endswith("+RoPE"):
        role = "GQA + RoPE, fused"
    elif op.endswith("+RMSNorm"):
        role = f"RMSNorm + residual + {role}, fused"
    short = name.removeprefix(f"/model/layers.{layer}/")
    return f"{op}\n{short}" if role is None else f"{op}\n{short}\n[{role}]"


@functools.lru_cache(maxsize=16)
def _picture(model_path: str, mtime: float, layer: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = layer_nodes(Path(model_path), layer)
    made_by = {o: i for i, (_, _, _, outs) in enumerate(nodes) for o in outs}
    depth: list[int] = []
    for _, _, ins, _ in nodes:  # graph order is topological
        depth.append(1 + max((depth[made_by[x]] for x in ins if x in made_by), default=-1))
    rows: dict[int, list[int]] = {}
    for i, d in enumerate(depth):
        rows.setdefault(d, []).append(i)
    width = max(len(r) for r in rows.values())
    fig_h = 1.1 * len(rows) + 1
    fig, ax = plt.subplots(figsize=(max(8, 3.2 * width), fig_h), dpi=100)
    pos = {}
    for d, members in rows.items():
        for k, i in enumerate(members):
            pos[i] = ((k - (len(members) - 1) / 2) * 3.2, -d * 1.1)
    for i, (_, _, ins, _) in enumerate(nodes):
        for x in ins:
            if x in made_by:
                (x0, y0), (x1, y1) = pos[made_by[x]], pos[i]
                ax.annotate(
                    "",
                    xy=(x1, y1 + 0.32),
                    xytext=(x0, y0 - 0.32),
                    arrowprops=dict(arrowstyle="->", color="#888", lw=1),
                )
    for i, (name, op, _, _) in enumerate(nodes):
        colour = ROLES.get(op.split("+")[0], (None, "#eeeeee"))[1]
        x, y = pos[i]
        ax.text(
            x,
            y,
            _label(name, op, layer),
            ha="center",
            va="center",
            fontsize=8,
            bbox=dict(boxstyle="round,pad=0.4", fc=colour, ec="#333", alpha=0.9),
        )
    ax.set_xlim(-1.8 * width - 1, 1.8 * width + 1)
    ax.set_ylim(-1.1 * len(rows), 0.8)
    ax.axis("off")
    ax.set_title(f"{Path(model_path).parent.name}: decoder layer {layer} ({len(nodes)} nodes)")
    out = Path(tempfile.gettempdir()) / f"llamaonnx-layer-{abs(hash((model_path, mtime)))}.png"
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return str(out)


def layer_picture(model_path: Path, layer: int = 0) -> str:
    """PNG path of the picture of `layer` (cached per file and modification time)."""
    model_path = Path(model_path)
    return _picture(str(model_path.resolve()), model_path.stat().st_mtime, layer)
