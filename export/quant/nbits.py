"""Weight-only quantization of the ONNX graph, in order: the projections that share an input
fused (fuse_projections.py), every projection written for its blocks (linear.py), the token
embedding (embedding.py), then on llamaonnx's kernels the SwiGLU (swiglu.py), the attention
(attention.py) and the RMSNorms folded into the projections that read them (norm.py). One rewrite
per file; each says why it left a candidate alone.

`choose(module, W)` decides each weight's blocks (carried from the GGUF, or quantized here;
export/quant/carry.py) or None to keep it in float.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from export.passes.graph import MS, ensure_opset, replace_nodes
from export.quant.attention import native_attention
from export.quant.blocks import Blocks
from export.quant.embedding import native_embedding, quantize_embedding
from export.quant.fuse_projections import concat, fusable, fused_names, rewire
from export.quant.graph import Edit, consumers, embedding, linear_weights
from export.quant.linear import LinearWriter
from export.quant.native import DOMAIN, OP8, op_for, supports
from export.quant.norm import fold_norms
from export.quant.swiglu import fuse_swiglu


def quantize_graph(
    model: onnx.ModelProto,
    choose: Callable[[str, np.ndarray], Blocks | None],
    accuracy_level: int,
    embedding_blocks: Callable[[np.ndarray, Blocks | None], Blocks | None],
    k_multiple: int = 1,
    native: bool = False,
    notes: dict | None = None,
) -> dict[str, Blocks]:
    """Rewrites `model` in place; returns module → the Blocks it now holds ("tok_embeddings" for
    the embedding). `embedding_blocks(table, head_blocks)` decides the embedding: when it returns
    the LM head's own Blocks (tied weights), both ops read one copy of the codes. `k_multiple`:
    inputs widened by Q4_1 block sums are kept a multiple of it (8 for CUDA, see `sum_repeats`).
    `native`: 4-bit blocks of 32 go to llamaonnx's own CPU kernel (`ai.llamaonnx.MatMulQ4`, which
    reads Q4_1's offsets directly: no block sums), the rest to MatMulNBits. `notes` gets
    "offset_error" (float type → the largest |Δ| of an offset as the offset rows hold it) where
    offsets went into MatMulNBits rows."""
    g = model.graph
    ensure_opset(model, MS, 1)
    if native:
        ensure_opset(model, DOMAIN, 1)
    edit = Edit(model)
    writer = LinearWriter(edit, accuracy_level, k_multiple, native)
    weights = linear_weights(model)
    chosen = {m: choose(m, w) for m, (_, w) in weights.items()}
    readers = consumers(g)
    done: dict[str, Blocks] = {}

    def same_blocks(group: list[str]) -> bool:
        blocks = [chosen.get(m) for m in group]
        return None not in blocks and len({(b.bits, b.block_size) for b in blocks}) == 1

    for layer, group, kind in fusable(weights, readers, same_blocks):
        nodes = [weights[m][0] for m in group]
        blocks = concat([chosen[m] for m in group])
        base, prefix = fused_names(layer, kind)
        new: list[onnx.NodeProto] = []
        writer.write(new, nodes[0].input[0], blocks, f"{prefix}/out", base, prefix)
        sizes = [b.shape[0] for b in (chosen[m] for m in group)]
        rewire(kind, nodes, f"{prefix}/out", sizes, base, prefix, readers, new, edit.init)
        replace_nodes(g, nodes, new)
        for m in group:
            done[m] = chosen.pop(m)

    for module, blocks in chosen.items():
        if blocks is None:
            continue
        node = weights[module][0]
        new = []
        name = node.name.removesuffix("/MatMul")
        writer.write(new, node.input[0], blocks, node.output[0], name, f"model.{module}")
        replace_nodes(g, [node], new)
        done[module] = blocks

    emb = embedding(model)
    if emb is not None:
        node, table_name = emb
        table = numpy_helper.to_array(next(i for i in g.initializer if i.name == table_name))
        head = done.get("output")
        blocks = embedding_blocks(table, head)
        if blocks is not None:
            head_native = blocks is head and native and supports(head)
            if head_native and op_for(head) == OP8:  # (GatherQ8 reads 8-bit and Q6_K tiles)
                native_embedding(g, node, head)
            else:  # (a 4-bit native head's tiles have no gather: the embedding gets its codes)
                shared = blocks is head and not head_native
                quantize_embedding(g, node, blocks, shared=shared, init=edit.init)
            done["tok_embeddings"] = blocks

    if native:  # (they add no initializers: one commit after them prunes what they replaced)
        fuse_swiglu(g)
        native_attention(g)
        fold_norms(g)
    edit.commit()
    if notes is not None and writer.offset_error is not None:
        notes["offset_error"] = writer.offset_error
    return done
