"""torch.onnx.export (dynamo) of the reference model into the graph of shared/DESIGN.md.

Inputs: input_ids (B, S), attention_mask (B, T), position_ids (B, S), past_key_values.{i}.key|value
(B, Hkv, P, Dh). Outputs: logits (B, S, V), present.{i}.key|value (B, Hkv, T, Dh). B, S, P and T
are dynamic, so one graph serves prefill (P = 0) and decode (S = 1).

torch.export specializes a dimension whose example size is 0 or 1, so the trace uses B = 2, S = 3,
P = 4 (Optimum's dynamo work hit the same).
"""

from __future__ import annotations

import ast
import logging
import re
import warnings

import onnx
import torch
from torch import nn

from export.model.transformer import Transformer
from export.onnx import functions as onnx_functions

log = logging.getLogger(__name__)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


class _Flat(nn.Module):
    """The reference model with its cache flattened into plain tensor arguments and results."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        past = list(zip(past_key_values[0::2], past_key_values[1::2], strict=True))
        logits, present = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in present for t in kv])


def trace(model: Transformer) -> onnx.ModelProto:
    """The dynamo export with our custom nodes, before any lowering."""
    c = model.config
    b, s, p = 2, 3, 4
    dh = c.resolved_head_dim
    past = [torch.zeros(b, c.n_kv_heads, p, dh) for _ in range(2 * c.n_layers)]
    args = (
        torch.randint(0, c.vocab_size, (b, s)),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s).expand(b, -1).contiguous(),
        past,
    )
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    past_len = torch.export.Dim("past_sequence_length")
    total = torch.export.Dim("total_sequence_length")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [{0: batch, 2: past_len}] * (2 * c.n_layers),
    }
    # torch.onnx logs one line per torchvision op it cannot register; they are noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Flat(model.eval()),
            args,
            dynamo=True,
            opset_version=onnx_functions.common.ONNX_OPSET,
            dynamic_shapes=dynamic,
            custom_translation_table=onnx_functions.translation_table(),
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    _finish(proto, c.n_layers)
    return proto


def _finish(proto: onnx.ModelProto, n_layers: int) -> None:
    inputs, outputs = io_names(n_layers)
    rename = {v.name: new for v, new in zip(proto.graph.input, inputs, strict=True)}
    rename.update({v.name: new for v, new in zip(proto.graph.output, outputs, strict=True)})
    _rename_values(proto.graph, rename)
    _name_nodes(proto.graph)
    onnx_functions.install(proto)
    proto.producer_name = "llamaonnx"


def _rename_values(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = rename.get(v.name, v.name)
    for n in graph.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]


_SHORT = {"RMSNorm": "norm", "RotaryEmbedding": "rope", "GroupQueryAttention": "gqa"}


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Hierarchical names for our nodes, from the module path torch recorded on each node:
    /model/layers.3/attention_norm, /model/layers.3/attn/rope_q, /model/layers.3/attn/gqa,
    /model/layers.3/attn/q_norm (Qwen3), /model/layers.3/post_ffn_norm (Gemma), /model/norm.
    """
    seen: dict[str, int] = {}
    _name_linears(graph)
    for n in graph.node:
        if n.domain != onnx_functions.DOMAIN:
            continue
        scope = _scope(n)
        layer = re.search(r"layers\.(\d+)", scope)
        prefix = f"/model/layers.{layer.group(1)}" if layer else "/model"
        if n.op_type == "RMSNorm":
            qk = re.search(r"attention\.(q_norm|k_norm)", scope)  # Qwen3's per-head norms
            module = re.search(r"layers\.\d+\.(\w*norm)\b", scope)  # attention_norm, ffn_norm,
            if qk:  # and Gemma's post_attention_norm, post_ffn_norm
                which = f"attn/{qk.group(1)}"
            else:
                which = module.group(1) if module else "norm"
            name = f"{prefix}/{which}"
        elif n.op_type == "RotaryEmbedding":
            k = seen.get(prefix + "/rope", 0)
            seen[prefix + "/rope"] = k + 1
            name = f"{prefix}/attn/rope_{'qk'[k] if k < 2 else k}"
        else:
            name = f"{prefix}/attn/{_SHORT[n.op_type]}"
        n.name = name


def _name_linears(graph: onnx.GraphProto) -> None:
    """Every linear projection gets its module path: node `/model/layers.3/attention/wq/MatMul`
    whose weight initializer is `model.layers.3.attention.wq.weight_T` ([in, out]); the tied LM head
    reads `Transpose(model.output.weight)`, node `/model/output/MatMul`. The quantizer finds the
    source tensor of each projection by these names."""
    initializers = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    for n in graph.node:
        if n.op_type not in ("MatMul", "Transpose", "Gather"):
            continue
        scopes = _scopes(n)
        if len(scopes) < 2 or not scopes[-2].startswith("model."):
            continue
        module = scopes[-2]
        n.name = "/" + module.replace(".", "/").replace("/layers/", "/layers.") + f"/{n.op_type}"
        w = n.input[1] if n.op_type == "MatMul" else None
        if w in initializers and users[w] == 1:
            _rename_values(graph, {w: f"{module}.weight_T"})
            initializers[w].name = f"{module}.weight_T"


def _scopes(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(p.value)
    return []


def _scope(node: onnx.NodeProto) -> str:
    for p in node.metadata_props:
        if p.key in ("pkg.torch.onnx.name_scopes", "namespace"):
            return p.value
    return ""
