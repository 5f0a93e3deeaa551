"""Weight-only quantization of the ONNX graph: each linear projection's MatMul becomes
`com.microsoft.MatMulNBits`, the token embedding's Gather becomes `GatherBlockQuantized`.

Projections are found by the names the exporter gives them (`/model/layers.3/attention/wq/MatMul`
reading `model.layers.3.attention.wq.weight_T`, the tied head reading `Transpose(model.output.
weight)`). `choose(module, W)` decides each weight's blocks (carried from the GGUF, or quantized
here) or None to keep it in float.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.passes.graph import ensure_opset, producers, prune, replace_nodes
from export.quant.blocks import FINE, Blocks, offset_rows, sum_repeats
from export.quant.native import ATTENTION, DOMAIN, GATHER8, OP, SWIGLU, op_for, pack, supports

MS = "com.microsoft"
_LINEAR = re.compile(r"^/model/(.+)/MatMul$")


def _module(node_name: str) -> str | None:
    """'/model/layers.3/attention/wq/MatMul' → 'layers.3.attention.wq'."""
    m = _LINEAR.match(node_name)
    return m.group(1).replace("/", ".") if m else None


def linear_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray]]:
    """module → (its MatMul node, W [N, K] as float32), for every projection with a constant
    weight."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    made_by = producers(g)
    found = {}
    for n in g.node:
        module = _module(n.name) if n.op_type == "MatMul" else None
        if module is None:
            continue
        b = n.input[1]
        if b in inits:
            found[module] = (n, numpy_helper.to_array(inits[b]).T)
        elif b in made_by and made_by[b].op_type == "Transpose" and made_by[b].input[0] in inits:
            found[module] = (n, numpy_helper.to_array(inits[made_by[b].input[0]]))
    return found


def embedding(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str] | None:
    """The token embedding's Gather and its table's initializer name."""
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name == "/model/tok_embeddings/Gather" and n.input[0] in inits:
            return n, n.input[0]
    return None


def quantize_graph(
    model: onnx.ModelProto,
    choose: Callable[[str, np.ndarray], Blocks | None],
    accuracy_level: int,
    embedding_blocks: Callable[[np.ndarray, Blocks | None], Blocks | None],
    k_multiple: int = 1,
    native: bool = False,
) -> dict[str, Blocks]:
    """Rewrites `model` in place; returns module → the Blocks it now holds ("tok_embeddings" for
    the embedding). `embedding_blocks(table, head_blocks)` decides the embedding: when it returns
    the LM head's own Blocks (tied weights), both ops read one copy of the codes. `k_multiple`:
    inputs widened by Q4_1 block sums are kept a multiple of it (8 for CUDA, see `sum_repeats`).
    `native`: 4-bit blocks of 32 go to llamaonnx's own CPU kernel (`ai.llamaonnx.MatMulQ4`, which
    reads Q4_1's offsets directly: no block sums), the rest to MatMulNBits."""
    g = model.graph
    ensure_opset(model, MS, 1)
    if native:
        ensure_opset(model, DOMAIN, 1)
    new_inits: list[onnx.TensorProto] = []
    done: dict[str, Blocks] = {}
    block_sums: dict[tuple[str, int], str] = {}  # (input, block size) → [x, S_0, S_0/FINE, …]

    def init(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    weights = linear_weights(model)
    chosen = {m: choose(m, w) for m, (_, w) in weights.items()}
    consumers = _consumers(g)

    def emit(nodes_out: list, x: str, blocks: Blocks, out: str, name: str, prefix: str) -> None:
        """MatMulNBits(x) → out; with Q4_1 offsets, MatMulNBits([x, block sums of x])."""
        n_out, k = blocks.shape
        if native and supports(blocks):
            op = op_for(blocks)
            nodes_out.append(
                helper.make_node(
                    op,
                    [x, init(f"{prefix}.tiles", pack(blocks))],
                    [out],
                    name=f"{name}/{op}",
                    domain=DOMAIN,
                )
            )
            return
        if blocks.offsets is not None:
            repeats = sum_repeats(k, blocks.block_size, k_multiple)
            x = with_block_sums(nodes_out, x, k, blocks.block_size, name, repeats)
            blocks, k = offset_rows(blocks, repeats)
        inputs = [
            x,
            init(f"{prefix}.qweight", blocks.packed()),
            init(f"{prefix}.scales", blocks.scales),
        ]
        zp = blocks.packed_zero_points()
        if zp is not None:
            inputs.append(init(f"{prefix}.zero_points", zp))
        nodes_out.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{name}/MatMulNBits",
                domain=MS,
                K=k,
                N=n_out,
                bits=blocks.bits,
                block_size=blocks.block_size,
                accuracy_level=accuracy_level,
            )
        )

    def with_block_sums(
        nodes_out: list, x: str, k: int, block_size: int, name: str, repeats: int
    ) -> str:
        """Concat(x, S_0, S_0/FINE, S_1, …), S_b the sum of x over block b (`offset_rows`), built
        once per input: x's blocks [.., nb, bs] times the [bs, 2] matrix [1, 1/FINE], flattened.
        The sums go `repeats` times (no extra op: Concat lists them again). One MatMul for both
        digits: one kernel fewer per input than ReduceSum, then Mul (a [K, 2·nb] 0/1 matrix over
        all of x did it in one op too, but is re-read from memory on every call: slower)."""
        key = (x, block_size)
        if key not in block_sums:
            sums = f"{name}/block_sums"  # named after its first reader
            shape = init(f"{sums}/blocks_shape", np.array([0, 0, k // block_size, -1], np.int64))
            flat = init(f"{sums}/flat_shape", np.array([0, 0, -1], np.int64))
            digits = np.stack([np.ones(block_size), np.full(block_size, 1 / FINE)], axis=1)
            nodes_out += [
                helper.make_node("Reshape", [x, shape], [f"{sums}/blocks"], name=f"{sums}/Reshape"),
                helper.make_node(
                    "MatMul",
                    [f"{sums}/blocks", init(f"{sums}/digits", digits.astype(np.float32))],
                    [f"{sums}/pairs"],
                    name=f"{sums}/MatMul",
                ),
                helper.make_node(
                    "Reshape", [f"{sums}/pairs", flat], [sums], name=f"{sums}/Flatten"
                ),
                helper.make_node(
                    "Concat",
                    [x] + [sums] * repeats,
                    [f"{sums}/input"],
                    name=f"{sums}/Concat",
                    axis=-1,
                ),
            ]
            block_sums[key] = f"{sums}/input"
        return block_sums[key]

    def same_blocks(group: list[str]) -> bool:
        blocks = [chosen.get(m) for m in group]
        return None not in blocks and len({(b.bits, b.block_size) for b in blocks}) == 1

    for layer, group, kind in _fusable(weights, consumers, same_blocks):
        nodes = [weights[m][0] for m in group]
        blocks = concat([chosen[m] for m in group])
        base, prefix = _fused_names(layer, kind)
        new: list[onnx.NodeProto] = []
        emit(new, nodes[0].input[0], blocks, f"{prefix}/out", base, prefix)
        sizes = [b.shape[0] for b in (chosen[m] for m in group)]
        _rewire(kind, nodes, f"{prefix}/out", sizes, base, prefix, consumers, new, init)
        replace_nodes(g, nodes, new)
        for m in group:
            done[m] = chosen.pop(m)

    for module, blocks in chosen.items():
        if blocks is None:
            continue
        node = weights[module][0]
        new = []
        emit(
            new,
            node.input[0],
            blocks,
            node.output[0],
            node.name.removesuffix("/MatMul"),
            f"model.{module}",
        )
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
            if head_native and head.bits == 8:
                _native_embedding(g, node, head)
            else:  # (a 4-bit native head's tiles have no gather: the embedding gets its codes)
                shared = blocks is head and not head_native
                _quantize_embedding(g, node, blocks, shared=shared, init=init)
            done["tok_embeddings"] = blocks

    g.initializer.extend(new_inits)
    if native:
        _fuse_swiglu(g)
        _native_attention(g)
    prune(model)
    return done


def _native_attention(g: onnx.GraphProto) -> int:
    """onnxruntime's GroupQueryAttention (packed QKV, rotary from cos/sin tables, shared KV
    buffer) → llamaonnx's, which computes the same (tests/test_native.py checks it against
    onnxruntime's) in a fraction of the time at decode. Other configurations stay as they are."""
    done = 0
    for n in list(g.node):
        if n.op_type != "GroupQueryAttention" or n.domain != MS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = set(attrs) <= {
            "num_heads",
            "kv_num_heads",
            "scale",
            "do_rotary",
            "rotary_interleaved",
        }
        ins = list(n.input) + [""] * (9 - len(n.input))
        if not (
            plain
            and attrs.get("do_rotary") == 1
            and attrs.get("rotary_interleaved", 0) == 0
            and ins[1] == ins[2] == ""
            and all(ins[i] for i in (0, 3, 4, 5, 6, 7, 8))
            and len(n.input) == 9
        ):
            continue
        kept = {k: v for k, v in attrs.items() if k in ("num_heads", "kv_num_heads", "scale")}
        new = helper.make_node(
            ATTENTION,
            [ins[0], ins[3], ins[4], ins[5], ins[6], ins[7], ins[8]],
            list(n.output),
            name=n.name,
            domain=DOMAIN,
            **kept,
        )
        replace_nodes(g, [n], [new])
        done += 1
    return done


def _fuse_swiglu(g: onnx.GraphProto) -> int:
    """A native gate/up projection, Split, then silu(gate)·up (Sigmoid, Mul, Mul) → one
    MatMulQ4SwiGLU computing that product. Returns how many were fused."""
    made_by = producers(g)
    users = _consumers(g)

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    fused = 0
    for mm in [n for n in g.node if n.op_type == OP and n.name.endswith("/w13/MatMulQ4")]:
        split = only_user(mm.output[0], "Split")
        if split is None or len(split.output) != 2:
            continue
        gate, up = split.output
        sig = next((n for n in users.get(gate, []) if n.op_type == "Sigmoid"), None)
        silu = sig and only_user(sig.output[0], "Mul")
        if silu is None or sorted(silu.input) != sorted([gate, sig.output[0]]):
            continue
        if len(users.get(gate, [])) != 2:  # the Sigmoid and the silu Mul only
            continue
        prod = only_user(silu.output[0], "Mul")
        if prod is None or sorted(prod.input) != sorted([silu.output[0], up]):
            continue
        if len(users.get(up, [])) != 1 or made_by.get(up) is not split:
            continue
        new = helper.make_node(
            SWIGLU,
            list(mm.input),
            [prod.output[0]],
            name=mm.name.replace(OP, SWIGLU),
            domain=DOMAIN,
        )
        replace_nodes(g, [mm, split, sig, silu, prod], [new])
        fused += 1
    return fused


def fuse_float_projections(model: onnx.ModelProto) -> int:
    """q/k/v (into GroupQueryAttention's packed input) and gate/up (then Split) as one float
    MatMul each, as the int4 path does (`quantize_graph`): at batch 1 on a GPU every MatMul is a
    kernel of a few µs whatever its width, so 7 per layer cost a third more than 4. Returns how
    many groups were fused."""
    g = model.graph
    weights = linear_weights(model)
    consumers = _consumers(g)
    new_inits: list[onnx.TensorProto] = []

    def init(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    fused = 0
    for layer, group, kind in _fusable(weights, consumers, lambda group: True):
        nodes = [weights[m][0] for m in group]
        base, prefix = _fused_names(layer, kind)
        w_t = np.concatenate([weights[m][1].T for m in group], axis=1)  # [K, ΣN]
        new = [
            helper.make_node(
                "MatMul",
                [nodes[0].input[0], init(f"{prefix}.weight_T", w_t)],
                [f"{prefix}/out"],
                name=f"{base}/MatMul",
            )
        ]
        sizes = [weights[m][1].shape[0] for m in group]
        _rewire(kind, nodes, f"{prefix}/out", sizes, base, prefix, consumers, new, init)
        replace_nodes(g, nodes, new)
        fused += 1
    g.initializer.extend(new_inits)
    prune(model)
    return fused


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def _fused_names(layer: int, kind: str) -> tuple[str, str]:
    base = f"/model/layers.{layer}/{'attention/qkv' if kind == 'qkv' else 'feed_forward/w13'}"
    return base, base.removeprefix("/").replace("/", ".")


def _rewire(kind, nodes, out, sizes, base, prefix, consumers, new, init) -> None:
    """After one op computes a fused group into `out`: GroupQueryAttention reads the packed
    [B, S, (Nq + 2·Nkv)·Dh] QKV as its first input; gate and up are split apart again."""
    if kind == "qkv":
        gqa = consumers[nodes[0].output[0]][0]
        gqa.input[0], gqa.input[1], gqa.input[2] = out, "", ""
        return
    new.append(
        helper.make_node(
            "Split",
            [out, init(f"{prefix}/split", np.array(sizes, np.int64))],
            [n.output[0] for n in nodes],
            name=f"{base}/Split",
            axis=-1,
        )
    )


def _fusable(weights, consumers, usable: Callable[[list[str]], bool]):
    """(layer, modules, "qkv" | "gate_up") for projections that read one input and can be one
    op: q/k/v when onnxruntime's GroupQueryAttention consumes them (it takes a packed QKV
    input), and the SwiGLU's gate (w1) and up (w3); `usable(modules)` says whether their
    weights can be stacked."""
    layers = sorted({int(m.split(".")[1]) for m in weights if m.startswith("layers.")})
    for i in layers:
        for kind, names in (("qkv", ("wq", "wk", "wv")), ("gate_up", ("w1", "w3"))):
            sub = "attention" if kind == "qkv" else "feed_forward"
            group = [f"layers.{i}.{sub}.{n}" for n in names]
            if not all(m in weights for m in group) or not usable(group):
                continue
            nodes = [weights[m][0] for m in group]
            if len({n.input[0] for n in nodes}) != 1:
                continue
            if kind == "qkv":
                users = [consumers.get(n.output[0], []) for n in nodes]
                gqa = users[0][0] if len(users[0]) == 1 else None
                if not (
                    gqa is not None
                    and gqa.op_type == "GroupQueryAttention"
                    and gqa.domain == MS
                    and all(len(u) == 1 and u[0] is gqa for u in users)
                    and list(gqa.input[:3]) == [n.output[0] for n in nodes]
                ):
                    continue
            yield i, group, kind


def concat(parts: list[Blocks]) -> Blocks:
    """Blocks of several weights with one input, stacked along N (one MatMulNBits for all)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    mid = 1 << (first.bits - 1)
    zps = [b.zero_points for b in parts]
    offs = [b.offsets for b in parts]
    return Blocks(
        first.bits,
        first.block_size,
        np.concatenate([b.codes for b in parts]),
        np.concatenate([b.scales for b in parts]),
        None
        if all(z is None for z in zps)
        else np.concatenate(
            [
                np.full(b.scales.shape, mid, np.uint8) if z is None else z
                for b, z in zip(parts, zps, strict=True)
            ]
        ),
        None
        if all(o is None for o in offs)
        else np.concatenate(
            [np.zeros_like(b.scales) if o is None else o for b, o in zip(parts, offs, strict=True)]
        ),
        "+".join(sorted({b.origin for b in parts})),
    )


def _native_embedding(g, node, head: Blocks) -> None:
    """The tied embedding as GatherQ8 rows of the LM head's own MatMulQ8 tiles: one copy of the
    codes serves both."""
    gather = helper.make_node(
        GATHER8,
        ["model.output.tiles", node.input[1]],
        [node.output[0]],
        name="/model/tok_embeddings/GatherQ8",
        domain=DOMAIN,
    )
    replace_nodes(g, [node], [gather])


def _quantize_embedding(g, node, blocks: Blocks, shared: bool, init) -> None:
    """Gather(table, ids) → Reshape(GatherBlockQuantized(codes [V, nb, bs·bits/8], ids), [.., D]),
    plus the gathered Q4_1 offsets where there are any."""
    prefix = "model.tok_embeddings"
    v, nb, _ = blocks.codes.shape
    data = "model.output.qweight" if shared else init(f"{prefix}.qweight", blocks.packed())
    inputs = [data, node.input[1], init(f"{prefix}.scales", blocks.scales[..., None])]
    if blocks.zero_points is not None:
        zp = blocks.zero_points[..., None]
        inputs.append(init(f"{prefix}.zero_points", zp))
    out = node.output[0]
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [f"{prefix}/blocks"],
            name="/model/tok_embeddings/GatherBlockQuantized",
            domain=MS,
            bits=blocks.bits,
            block_size=blocks.block_size,
            gather_axis=0,
            quantize_axis=2,
        )
    ]
    blocked = f"{prefix}/blocks"
    if blocks.offsets is not None:
        nodes += [
            helper.make_node(
                "Gather",
                [init(f"{prefix}.offsets", blocks.offsets[..., None]), node.input[1]],
                [f"{prefix}/offsets"],
                name="/model/tok_embeddings/offsets_Gather",
            ),
            helper.make_node(
                "Add",
                [blocked, f"{prefix}/offsets"],
                [f"{prefix}/blocks_m"],
                name="/model/tok_embeddings/Add",
            ),
        ]
        blocked = f"{prefix}/blocks_m"
    shape = init(f"{prefix}/shape", np.array([0, 0, -1], np.int64))
    nodes.append(
        helper.make_node("Reshape", [blocked, shape], [out], name="/model/tok_embeddings/Reshape")
    )
    index = list(g.node).index(node)
    g.node.remove(node)
    for j, n in enumerate(nodes):
        g.node.insert(index + j, n)
