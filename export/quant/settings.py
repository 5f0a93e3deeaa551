"""What `quantize` is asked to do: precision, blocks, what to keep in float, the provider and
accuracy level, and which kernel runs int4 on the CPU. Validated when made; the errors name the
allowed values."""

from __future__ import annotations

import dataclasses
import re

from export.errors import QuantizationError
from export.quant.blocks import check_settings

PRECISIONS = ("int4", "int8", "fp16")
PROVIDERS = ("cpu", "cuda")
# MatMulNBits accuracy_level: 4 = int8 activations with int32 accumulation (CPU's fast path);
# 0 = activations in their own type (CUDA ignores the level).
ACCURACY_LEVEL = {"cpu": 4, "cuda": 0}
KERNELS = ("auto", "native", "nbits")
KV_CACHES = ("auto", "float32", "float16")
# 'layers.-K' in a --keep or --precise pattern: the K-th layer from the last
_FROM_LAST = re.compile(r"(?:^|(?<=\.))layers\.-(\d+)(?=\.|$)")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    precision: str  # int4 | int8 | fp16
    block_size: int = 32
    symmetric: bool = False  # blocks quantized here: symmetric, or asymmetric with zero points
    gguf_blocks: bool = True  # carry the source GGUF's blocks where their bits match
    head_bits: int = 8  # the LM head (and a tied embedding)
    embedding: bool = True  # the token embedding as GatherBlockQuantized
    keep: tuple[str, ...] = ()  # fnmatch patterns of modules kept in float (e.g. "layers.0.*")
    # fnmatch patterns of llamaonnx-kernel projections whose activations go in two int8 digits
    # (float activations' quality at twice the integer work; export/quant/native.py two_digits),
    # each with an optional '=B': the second digit on each row's B blocks of largest scale only
    precise: tuple[str, ...] = ()
    provider: str = "cpu"  # picks the accuracy level
    accuracy_level: int | None = None  # MatMulNBits accuracy_level; None: the provider's
    fp16_activations: bool = False  # int4/int8: fp16 activations and cache (always on CUDA)
    # int4 on CPU: "native" (ai.llamaonnx ops), "nbits" (MatMulNBits), "auto" (native where fast)
    kernel: str = "auto"
    # the KV cache's type: float16 on llamaonnx's CPU attention (auto: wherever it runs) halves
    # the cache's memory and the bytes a decode step reads, as llama.cpp's default f16 cache does
    # (docs/quantization.md, `--kv-cache`); float32 elsewhere
    kv_cache: str = "auto"

    def __post_init__(self):
        if self.provider == "cuda" and self.precision in ("int4", "int8"):
            # onnxruntime's CUDA GroupQueryAttention takes float16 (or bfloat16) only: in a
            # float32 graph it falls back to the CPU and decoding departs (runtime/session.py
            # cuda_refusal). So a CUDA folder's activations and cache are float16.
            object.__setattr__(self, "fp16_activations", True)
        if self.precision not in PRECISIONS:
            raise QuantizationError(
                f"unknown precision {self.precision!r}; choose one of {PRECISIONS}"
            )
        if self.provider not in PROVIDERS:
            raise QuantizationError(
                f"unknown provider {self.provider!r}; choose one of {PROVIDERS}"
            )
        if self.precision != "fp16":
            check_settings(self.bits, self.block_size)
            check_settings(self.head_bits, self.block_size)
        if self.kernel not in KERNELS:
            raise QuantizationError(f"unknown kernel {self.kernel!r}; choose one of {KERNELS}")
        if self.kernel == "native" and not self.native_applies:
            raise QuantizationError(
                "--kernel native is llamaonnx's CPU kernels (int8 activations): they need "
                "--precision int4 or int8, --for-provider cpu, accuracy level 4 and float32 "
                "activations"
            )
        if self.precise:
            from export.quant.native import precise_pattern

            for spec in self.precise:
                precise_pattern(spec)  # a QuantizationError before any work
        if self.precise and not (self.native_applies and self.kernel != "nbits"):
            raise QuantizationError(
                "--precise runs activations in two int8 digits on llamaonnx's CPU kernels: it "
                "needs --precision int4 or int8, --for-provider cpu, accuracy level 4 and "
                "--kernel auto or native"
            )
        if self.kv_cache not in KV_CACHES:
            raise QuantizationError(
                f"unknown KV cache type {self.kv_cache!r}; choose one of {KV_CACHES}"
            )
        if self.kv_cache == "float16" and self.float_type == "float32" and not self.native:
            raise QuantizationError(
                "--kv-cache float16 on a float32 graph needs llamaonnx's CPU attention kernel, "
                "which reads an fp16 cache: --precision int4 with --kernel native (or auto where "
                "runtime/native is built); an fp16 model (--precision fp16) has an fp16 cache "
                "already"
            )
        if self.provider == "cuda" and self.kv_cache == "float32":
            raise QuantizationError(
                "--kv-cache float32 with --for-provider cuda: onnxruntime's CUDA attention takes "
                "float16 (or bfloat16) only, so a CUDA folder's cache is float16; leave "
                "--kv-cache auto"
            )
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QuantizationError(
                f"accuracy level must be 0-4 (0: activations in float, 4: int8), "
                f"not {self.accuracy_level}"
            )

    @property
    def level(self) -> int:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return ACCURACY_LEVEL[self.provider]

    @property
    def native_applies(self) -> bool:
        return (
            self.bits in (4, 8)
            and self.provider == "cpu"
            and self.level == 4
            and not self.fp16_activations
        )

    @property
    def native(self) -> bool:
        """Whether the blocks go to llamaonnx's own kernels (`export/quant/native.py`: 4-, 5-, 6-
        and 8-bit tiles; what they do not hold stays on MatMulNBits).
        auto: wherever the kernel library is built, whatever the exporting CPU has: the tiles are
        the same for every path, and the machine that runs the folder picks its best one (AVX-512
        VNNI, AVX2, else portable C, which the session warns is slow)."""
        if self.kernel == "nbits" or not self.native_applies:
            return False
        if self.kernel == "native":
            return True
        from runtime import native

        return native.available()

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}.get(self.precision, 0)

    @property
    def float_type(self) -> str:
        return "float16" if self.precision == "fp16" or self.fp16_activations else "float32"

    @property
    def kv_dtype(self) -> str:
        """The type of the folder's past/present tensors: an fp16 graph's own; else, with auto,
        float16 where llamaonnx's kernels run (quantize keeps float32 if a layer's attention
        stays onnxruntime's), float32 where they do not."""
        if self.float_type == "float16":
            return "float16"
        if self.kv_cache == "auto":
            return "float16" if self.native else "float32"
        return self.kv_cache


def from_last(pattern: str, n_layers: int, option: str) -> str:
    """`pattern` with each 'layers.-K' (K ≥ 1) made the model's layer K from the last:
    'layers.-1.*' is 'layers.29.*' on a model of 30 layers, so one pattern serves every depth.
    A K past the first layer is an error that names `option` and the range."""

    def layer(m: re.Match) -> str:
        k = int(m.group(1))
        if not 1 <= k <= n_layers:
            raise QuantizationError(
                f"{option} {pattern!r}: layers.-{k} is not a layer of this model; it has "
                f"{n_layers} (layers.0 to layers.{n_layers - 1}, or layers.-{n_layers} to "
                "layers.-1 counted from the last)"
            )
        return f"layers.{n_layers - k}"

    return _FROM_LAST.sub(layer, pattern)


def counted_from_last(settings: QuantSettings, n_layers: int) -> QuantSettings:
    """`settings` with its --keep and --precise patterns' 'layers.-K' resolved (from_last)."""
    return dataclasses.replace(
        settings,
        keep=tuple(from_last(p, n_layers, "--keep") for p in settings.keep),
        precise=tuple(from_last(p, n_layers, "--precise") for p in settings.precise),
    )
