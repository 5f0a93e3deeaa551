"""The reference math of RMSNorm, RoPE and GQA, checked against its definitions."""

import pytest
import torch

from export.model import ops
from export.model.config import LlamaConfig, RopeScaling
from export.model.transformer import Transformer
from tests.tiny import preset

torch.manual_seed(0)


def _tables(dh=16, tmax=64, theta=10000.0):
    inv = theta ** (-torch.arange(0, dh // 2, dtype=torch.float64) * 2 / dh)
    ang = torch.outer(torch.arange(tmax, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def test_rms_norm_is_root_mean_square_without_mean_subtraction():
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, 0.0), want)
    shifted = ops.rms_norm(x + 3.0, w, 1e-5, 0.0)  # LayerNorm is shift-invariant; RMSNorm not
    assert not torch.allclose(shifted, ops.rms_norm(x, w, 1e-5, 0.0), atol=1e-2)


def test_rope_preserves_norms_per_head():
    cos, sin = _tables()
    x = torch.randn(2, 5, 3 * 16)
    pos = torch.randint(0, 64, (2, 5))
    y = ops.rope(x, pos, cos, sin, 3)
    torch.testing.assert_close(y.view(2, 5, 3, 16).norm(dim=-1), x.view(2, 5, 3, 16).norm(dim=-1))


def test_rope_dot_product_depends_only_on_position_difference():
    cos, sin = _tables()
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(pq, pk):
        rq = ops.rope(q, torch.tensor([[pq]]), cos, sin, 1)
        rk = ops.rope(k, torch.tensor([[pk]]), cos, sin, 1)
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(40, 36))
    torch.testing.assert_close(score(10, 10), (q * k).sum())
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_rope_position_zero_is_identity_and_rotates_half_pairs():
    cos, sin = _tables()
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(ops.rope(x, torch.tensor([[0]]), cos, sin, 1), x)
    y = ops.rope(x, torch.tensor([[1]]), cos, sin, 1)
    # pair (x_0, x_8) rotated by angle 1·θ_0 = 1 rad
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(y[0, 0, 0], x[0, 0, 0] * c - x[0, 0, 8] * s)
    torch.testing.assert_close(y[0, 0, 8], x[0, 0, 8] * c + x[0, 0, 0] * s)


def _mha_reference(q, k, v, n_heads, bias, scale):
    b, s, _ = q.shape
    q4, k4, v4 = (t.view(b, s, n_heads, -1).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q4 @ k4.transpose(2, 3) * scale + bias, -1)
    return (p @ v4).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("n_kv", [1, 2, 4])  # MQA, GQA, MHA
def test_gqa_equals_mha_with_repeat_interleaved_kv_heads(n_kv):
    b, s, h, dh = 2, 5, 4, 8
    q, k, v = torch.randn(b, s, h * dh), torch.randn(b, s, n_kv * dh), torch.randn(b, s, n_kv * dh)
    empty = torch.zeros(b, n_kv, 0, dh)
    bias = ops.attention_bias(torch.ones(b, s, dtype=torch.long), s, torch.float32)
    out, pk, pv = ops.gqa(q, k, v, empty, empty, bias, h, n_kv, dh**-0.5, 0.0, 0)
    rep = lambda t: t.view(b, s, n_kv, dh).repeat_interleave(h // n_kv, dim=2).reshape(b, s, -1)
    torch.testing.assert_close(out, _mha_reference(q, rep(k), rep(v), h, bias, dh**-0.5))
    assert pk.shape == (b, n_kv, s, dh)


def test_attention_bias_is_causal_bottom_right_and_masks_padding():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    bias = ops.attention_bias(mask, 2, torch.float32)  # 2 new tokens after 2 cached ones
    allowed = bias == 0
    assert allowed[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert allowed[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]


def test_a_sliding_window_hides_keys_window_or_more_positions_behind():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1]])  # row 1: a right-padded prompt
    bias = ops.window_bias(ops.attention_bias(mask, 2, torch.float32), mask, 2)  # 2 new tokens
    allowed = (bias == 0)[:, 0].tolist()
    # row 0: the query at slot 4 sees slots 3, 4; at slot 5: 4, 5
    assert allowed[0] == [[j in (3, 4) for j in range(6)], [j in (4, 5) for j in range(6)]]
    # row 1 counts positions, not slots: slot 4 is position 2 and sees positions 1, 2 (slots 1, 4)
    assert allowed[1] == [[j in (1, 4) for j in range(6)], [j in (4, 5) for j in range(6)]]


def test_softcap_bounds_the_scores_and_changes_nothing_else():
    b, s, h, dh = 1, 4, 2, 8
    q, k, v = (torch.randn(b, s, h * dh) * 4 for _ in range(3))
    empty = torch.zeros(b, h, 0, dh)
    bias = ops.attention_bias(torch.ones(b, s, dtype=torch.long), s, torch.float32)
    out, _, _ = ops.gqa(q, k, v, empty, empty, bias, h, h, 0.1, 2.0, 0)
    q4, k4, v4 = (t.view(b, s, h, dh).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(torch.tanh(q4 @ k4.transpose(2, 3) * 0.1 / 2.0) * 2.0 + bias, -1)
    torch.testing.assert_close(out, (p @ v4).transpose(1, 2).reshape(b, s, -1))


_SMALL = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, intermediate_size=8)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, vocab_size=10, intermediate_size=8)
    with pytest.raises(ValueError, match="rope scaling type"):
        RopeScaling(type="dynamic")
    with pytest.raises(ValueError, match="activation"):
        LlamaConfig(**_SMALL, activation="relu")
    with pytest.raises(ValueError, match="sliding_window is unset"):
        LlamaConfig(**_SMALL, layer_types=("sliding",))
    with pytest.raises(ValueError, match="layer_types must list 1"):
        LlamaConfig(**_SMALL, sliding_window=4, layer_types=("full", "sliding"))
    with pytest.raises(ValueError, match="longrope rope factors have 2 entries"):
        LlamaConfig(**_SMALL, rope_scaling={"type": "longrope", "short_factor": [1, 1],
                                            "long_factor": [2, 2]})  # fmt: skip
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize("name", ["tiny", "tiny-tied-mqa", "tiny-mha"])
def test_presets_build(name):
    m = Transformer(preset(name))
    assert (m.output.weight is m.tok_embeddings.weight) == preset(name).tie_embeddings
