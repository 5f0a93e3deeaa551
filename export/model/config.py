"""The Llama architecture as one frozen, validated dataclass.

Covers Llama 2/3-style decoders: grouped-query attention (MHA and MQA as the special cases
n_kv_heads == n_heads and n_kv_heads == 1), SwiGLU, RMSNorm, RoPE with optional linear or
llama3 frequency scaling [Llama 3 report, sec. 3.2; transformers' `_compute_llama3_parameters`].
"""

from __future__ import annotations

import dataclasses
import math

from export.errors import ConfigError

ROPE_SCALING_TYPES = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched for long context. `type="none"` leaves them alone."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope scaling type {self.type!r} is not one of {ROPE_SCALING_TYPES}")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


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
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)

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
        for name in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.rope_scaling, dict):  # allow dicts from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for tok in (self.bos_token_id, self.pad_token_id, *self.eos_token_ids):
            if tok is not None and (not isinstance(tok, int) or not 0 <= tok < self.vocab_size):
                raise ConfigError(
                    f"special token id {tok} is outside the vocabulary 0..{self.vocab_size - 1}"
                )

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
        return cls(**d)


def rope_inv_freq(config: LlamaConfig) -> list[float]:
    """Inverse frequencies θ_i = theta^(-2i/Dh), with the configured scaling applied."""
    dh = config.resolved_head_dim
    inv = [config.rope_theta ** (-2 * i / dh) for i in range(dh // 2)]
    s = config.rope_scaling
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
