"""The decoder architecture as one frozen, validated dataclass: Llama, configured per family.

Covers Llama 2/3-style decoders: grouped-query attention (MHA and MQA as the special cases
n_kv_heads == n_heads and n_kv_heads == 1), a gated MLP, RMSNorm, RoPE with optional linear,
llama3 [Llama 3 report, sec. 3.2; transformers' `_compute_llama3_parameters`] or longrope
[Phi-3 report; transformers' `_compute_longrope_parameters`] frequency scaling. The family
switches below turn the one model into Qwen2/3, Mistral, Gemma 2/3 or Phi-3 (shared/DESIGN.md,
"Model families"); their defaults are Llama's.
"""

from __future__ import annotations

import dataclasses
import math

from export.errors import ConfigError

ROPE_SCALING_TYPES = ("none", "linear", "llama3", "longrope", "yarn", "factors")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched for long context. `type="none"` leaves them alone."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # longrope (Phi-3.5): per-frequency divisors below / beyond original_max_position, and the
    # factor cos and sin are multiplied by (None: sqrt(1 + ln(factor) / ln(original)))
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None
    # factors: a divisor per frequency, as a GGUF's rope_freqs tensor stores llama3 scaling
    freq_factors: tuple[float, ...] = ()
    # yarn [arxiv/2309.00071]: frequencies ramp from interpolated (/ factor) to kept between the
    # dimensions that turn beta_slow and beta_fast times over the original context; cos and sin
    # × attention_factor (None: 0.1 ln(factor) + 1)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope scaling type {self.type!r} is not one of {ROPE_SCALING_TYPES}")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))
        if self.type == "factors" and not all(
            f > 0 and math.isfinite(f) for f in self.freq_factors or (0.0,)
        ):
            raise ConfigError(
                "rope frequency factors must be a non-empty list of finite values > 0"
            )
        if self.type == "longrope":
            if not self.short_factor or len(self.short_factor) != len(self.long_factor):
                raise ConfigError(
                    "longrope scaling needs short_factor and long_factor lists "
                    "of the same length (head_dim / 2)"
                )
            if not all(f > 0 and math.isfinite(f) for f in self.short_factor + self.long_factor):
                raise ConfigError("longrope factors must be finite and > 0")

    @property
    def cos_sin_factor(self) -> float:
        """What longrope and yarn multiply cos and sin by (1 for every other type)."""
        if self.type not in ("longrope", "yarn"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        if self.type == "yarn":
            return 0.1 * math.log(self.factor) + 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    intermediate_size: int
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # family switches (shared/DESIGN.md, "Model families"): one model, configured per family
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2 / 2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # every RMSNorm scales by (offset + w): Gemma's 1 + w
    embed_scale: float = 1.0  # embeddings are multiplied by it: Gemma's sqrt(dim)
    activation: str = "silu"  # of the gate: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    sandwich_norm: bool = False  # RMSNorm also after attention and after the MLP (Gemma 2/3)
    query_scale: float | None = None  # attention scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores → cap · tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits → cap · tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None  # a query sees the last `sliding_window` keys only
    # per layer, "full" or "sliding" (needs sliding_window); None: every layer sliding if a
    # window is set (Mistral), else full. Gemma 2 alternates; Gemma 3 has 5 sliding per full.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # theta of the sliding layers (Gemma 3), no scaling

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves a whole group of query heads"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if not (0 < self.norm_eps < 1):
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not isinstance(self.max_position, int) or self.max_position <= 0:
            raise ConfigError(f"max_position must be > 0, got {self.max_position}")
        for name in ("qkv_bias", "qk_norm", "sandwich_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_family_switches()
        if isinstance(self.rope_scaling, dict):  # allow dicts from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        s = self.rope_scaling
        factors = {"longrope": s.short_factor, "factors": s.freq_factors}.get(s.type)
        if factors is not None and len(factors) != self.resolved_head_dim // 2:
            raise ConfigError(
                f"{s.type} rope factors have {len(factors)} entries; head_dim "
                f"{self.resolved_head_dim} needs {self.resolved_head_dim // 2}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for tok in (self.bos_token_id, self.pad_token_id, *self.eos_token_ids):
            if tok is not None and (not isinstance(tok, int) or not 0 <= tok < self.vocab_size):
                raise ConfigError(
                    f"special token id {tok} is outside the vocabulary 0..{self.vocab_size - 1}"
                )

    def _check_family_switches(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        for name in ("norm_offset", "embed_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")
        for name in ("query_scale", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be > 0 or unset, got {value}")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise ConfigError(f"sliding_window must be a positive int or unset, got {w!r}")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)
            if len(types) != self.n_layers or not set(types) <= set(LAYER_TYPES):
                raise ConfigError(
                    f"layer_types must list {self.n_layers} entries of {LAYER_TYPES}, got {types}"
                )
            if "sliding" in types and w is None:
                raise ConfigError("layer_types has sliding layers but sliding_window is unset")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to everything."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.resolved_head_dim**-0.5

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def rope_inv_freq(config: LlamaConfig, local: bool = False, long: bool = False) -> list[float]:
    """Inverse frequencies θ_i = theta^(-2i/Dh), with the configured scaling applied.

    local: those of the sliding layers (Gemma 3's own theta, never scaled). long: longrope's
    frequencies beyond its original context (its short ones otherwise)."""
    dh = config.resolved_head_dim
    if local and config.rope_local_theta is not None:
        return [config.rope_local_theta ** (-2 * i / dh) for i in range(dh // 2)]
    inv = [config.rope_theta ** (-2 * i / dh) for i in range(dh // 2)]
    s = config.rope_scaling
    if s.type == "longrope":
        return [f / d for f, d in zip(inv, s.long_factor if long else s.short_factor, strict=True)]
    if s.type == "factors":
        return [f / d for f, d in zip(inv, s.freq_factors, strict=True)]
    if s.type == "yarn":
        return _yarn(inv, config)
    if s.type == "linear":
        return [f / s.factor for f in inv]
    if s.type == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / s.factor)
            else:
                smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor
                )
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out
    return inv


def _yarn(inv: list[float], config: LlamaConfig) -> list[float]:
    """YaRN's blend: dimension i keeps its frequency where it turns more than beta_fast times over
    the original context, is divided by the factor where it turns fewer than beta_slow times, and
    ramps linearly between (transformers' `_compute_yarn_parameters`)."""
    s, dh = config.rope_scaling, config.resolved_head_dim

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        turns = s.original_max_position / (rotations * 2 * math.pi)
        return dh * math.log(turns) / (2 * math.log(config.rope_theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dh - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(inv):
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / s.factor * (1 - keep) + f * keep)
    return out
