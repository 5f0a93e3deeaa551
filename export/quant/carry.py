"""Which blocks each weight gets: the source GGUF's own, carried as they are and checked to
dequantize exactly to the fp32 graph's weight, else quantized here (round to nearest, block by
block). `plan` answers per module; the folder's report records the carry errors it measured and
the GGUF tensors it could not carry.

Which GGUF types are carried: every type `blocks.from_gguf` reads, each tensor keeping its own
type — a Q4_K_M file's Q4_K, and the Q6_K, Q5_0 and Q8_0 it mixes in (5- to 8-bit codes in 8-bit
containers, which the native kernels pack into 5-, 6- and 8-bit tiles). One exception: when the
file's main type (the one most of its weights are in) is wider than max(bits asked, 6) — a Q8_0
file, or a Q6_K one whose narrow tensors fell back to Q8_0 — an int4 folder rounds those wider
tensors to 4 bits, since 4 bits is what was asked; int8 (and the 8-bit LM head) carries
everything. Types with no exact form here (Q2_K, Q3_K, IQ*) are quantized again from the
dequantized weight, and said so."""

from __future__ import annotations

import fnmatch
import logging
from typing import TYPE_CHECKING

import numpy as np

from export.errors import QuantizationError
from export.quant.blocks import (
    GGUF_TYPES,
    Blocks,
    from_gguf,
    gguf_bits,
    permute_rows,
    quantize,
)
from export.quant.settings import QuantSettings

if TYPE_CHECKING:
    from runtime.folder import ModelInfo

log = logging.getLogger(__name__)


def _gguf_blocks(info: ModelInfo) -> dict[str, tuple[str, np.ndarray, int, int]]:
    """Our tensor name → (GGUF type name, raw rows, K, heads to unpermute or 0) for the source
    GGUF's carried types; fused tensors (Phi-3's attn_qkv) and Gemma's norms are not carried."""
    prov = info.provenance
    if prov.format != "gguf":
        return {}
    from export.sources.common import check_source

    path = check_source(
        prov, "its blocks cannot be carried: export again, or pass --no-gguf-blocks"
    )
    import gguf

    from export.sources.gguf import config_from_metadata, metadata, tensor_names

    reader = gguf.GGUFReader(path)
    meta = metadata(reader)
    names = tensor_names(reader, config_from_metadata(meta), meta["general.architecture"])
    out = {}
    for t in reader.tensors:
        parts = names.get(t.name, [])
        if len(parts) == 1 and t.tensor_type.name not in ("F32", "F16", "BF16"):
            name, _, heads = parts[0]
            out[name] = (t.tensor_type.name, t.data, int(t.shape[0]), heads)
    return out


def _main_type(carried: dict) -> str:
    """The carried type most of the file's layer tensors are in ("" when none is carried). By
    count, and without the embedding and head, which llama.cpp quantizes on rules of their own
    (Gemma 3 270M's Q4_K_M has a Q8_0 embedding bigger than all its layers together)."""
    counts: dict[str, int] = {}
    for name, (type_name, _, _, _) in carried.items():
        if type_name in GGUF_TYPES and name.startswith("layers."):
            counts[type_name] = counts.get(type_name, 0) + 1
    return max(counts, key=counts.get) if counts else ""


def fp16_rounding(layers: dict[str, Blocks]) -> dict[str, dict]:
    """The carried weights whose scales float16 cannot hold (Q4_K's and Q5_K's d·scale products,
    Q6_K's: fp32 values of up to 17 significant bits), which a graph converted to fp16 rounds:
    module → its GGUF type and the largest |Δ| of a weight that costs. The embedding's
    GatherBlockQuantized also reads a K-quant's offsets as floats (MatMulNBits' offset rows are
    max_abs_offset_error's). Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 keep fp16 scales and offsets in the
    file and lose nothing."""
    half = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    out = {}
    for module, b in layers.items():
        offsets = b.offsets if module == "tok_embeddings" else None
        exact = [np.array_equal(half(x), x) for x in (b.scales, offsets) if x is not None]
        if not b.carried or all(exact):
            continue
        delta = (half(b.scales) - b.scales)[..., None] * b.centred_codes()
        if offsets is not None:
            delta += (half(offsets) - offsets)[..., None]
        out[module] = {
            "gguf_type": b.origin.removeprefix("gguf-"),
            "max_abs_error": float(np.abs(delta).max()),
        }
    return out


def plan(settings: QuantSettings, info: ModelInfo):
    """→ (choose(module, W), embedding_blocks(table, head)) closures and the carry log."""
    carried = _gguf_blocks(info) if settings.gguf_blocks else {}
    main_type = _main_type(carried)
    arch = info.architecture
    notes: dict = {"max_abs_carry_error": 0.0}

    def carry(tensor: str, w: np.ndarray, bits: int) -> Blocks | None:
        if tensor not in carried:
            return None
        type_name, raw, k, heads = carried[tensor]
        if type_name not in GGUF_TYPES:  # Q2_K, Q3_K, IQ*: no exact form here
            return None
        wide = max(bits, 6)
        if gguf_bits(type_name) > wide and gguf_bits(main_type) > wide:
            return None  # a Q8_0 file in an int4 folder: rounded to the bits asked
        blocks = from_gguf(type_name, raw, k)
        if heads:  # llama.cpp permuted the rows of a llama GGUF's q and k
            from export.sources.gguf import unpermute

            blocks = permute_rows(blocks, lambda a: unpermute(a, heads))
        err = float(np.abs(blocks.dequantize() - w).max())
        if err > 1e-6 * max(1.0, float(np.abs(w).max())):
            raise QuantizationError(
                f"the GGUF blocks of {tensor} do not reproduce the fp32 graph's weight "
                f"(max |Δ| {err:.2e}); the folder and its source disagree"
            )
        notes["max_abs_carry_error"] = max(notes["max_abs_carry_error"], err)
        return blocks

    def blocks_for(tensor: str, w: np.ndarray, bits: int) -> Blocks:
        blocks = carry(tensor, w, bits)
        if blocks is not None:
            return blocks
        blocks = quantize(w, bits, settings.block_size, settings.symmetric)
        type_name = carried.get(tensor, ("",))[0]
        if type_name and type_name not in GGUF_TYPES:
            # a second rounding of an already quantized weight: said, with what it cost
            err = float(
                np.sqrt(((blocks.dequantize() - w) ** 2).mean() / max((w**2).mean(), 1e-30))
            )
            notes.setdefault("requantized_gguf_tensors", {})[tensor] = {
                "gguf_type": type_name,
                "quantized_to": f"{bits}-bit blocks of {settings.block_size}",
                "relative_rms_error": round(err, 5),
            }
            log.warning(
                "%s is %s in the GGUF, a type that is not carried (carried: %s): quantized again "
                "to %d bits from its dequantized weight (relative RMS error %.2e)",
                tensor, type_name, ", ".join(GGUF_TYPES), bits, err,
            )  # fmt: skip
        return blocks

    def choose(module: str, w: np.ndarray) -> Blocks | None:
        if any(fnmatch.fnmatchcase(module, p) for p in settings.keep):
            return None
        bits = settings.head_bits if module == "output" else settings.bits
        tensor = f"{module}.weight"
        if module == "output" and arch.tie_embeddings:
            tensor = "tok_embeddings.weight"
        return blocks_for(tensor, w, bits)

    def embedding_blocks(table: np.ndarray, head: Blocks | None) -> Blocks | None:
        if not settings.embedding or any(
            fnmatch.fnmatchcase("tok_embeddings", p) for p in settings.keep
        ):
            return None
        if head is not None and arch.tie_embeddings:
            return head  # one copy of the codes serves the LM head and the embedding
        return blocks_for("tok_embeddings.weight", table, settings.head_bits)

    return choose, embedding_blocks, notes
