"""QK-Clip (MuonClip): recording per-head max logits, clipping W_q / W_k, layouts, integration."""

from __future__ import annotations

import copy
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from muon_ext import Muon, MuonWithAdamW, muon_param_groups
from muon_ext import qk_clip as qk_clip_module
from muon_ext.qk_clip import MuonClip, QKClip

from . import _dist_utils as U

NEG_INF = float("-inf")
# Relative slack on "post-clip max <= tau": fp32 weights, fp32 factors, float64 logits.
BOUND_RTOL = 1e-5


# ---------------------------------------------------------------------- helpers


def _linear(d_in: int, d_out: int, bias: bool, dtype=torch.float32) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias, dtype=dtype)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.detach().unflatten(0, (heads, -1))


@torch.no_grad()
def _oracle_logits(x, q_proj, k_proj, heads, kv_heads):
    """float64 ``q @ k^T / sqrt(D)`` per query head, (B, H, L, L)."""
    batch, length, _ = x.shape
    x = x.double()
    q = F.linear(x, q_proj.weight.double(), None if q_proj.bias is None else q_proj.bias.double())
    k = F.linear(x, k_proj.weight.double(), None if k_proj.bias is None else k_proj.bias.double())
    dim = q.shape[-1] // heads
    q = q.view(batch, length, heads, dim).transpose(1, 2)
    k = k.view(batch, length, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    return q @ k.transpose(-1, -2) / math.sqrt(dim)


def _causal_max(logits: torch.Tensor) -> torch.Tensor:
    length = logits.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    return logits.masked_fill(~allowed, NEG_INF).amax(dim=(0, 2, 3))


def _gqa_attention(x, q_proj, k_proj, v_proj, layer, heads, kv_heads):
    batch, length, _ = x.shape
    dim = q_proj.out_features // heads
    q = q_proj(x).view(batch, length, heads, dim).transpose(1, 2)
    k = k_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
    v = v_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
    return layer.attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)


def _tau_between(maxima: torch.Tensor) -> float:
    """A tau in the widest gap of the middle half of the sorted maxima: heads on both sides."""
    s = maxima.double().sort().values
    n = len(s)
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


# ---------------------------------------------------------------------- MHA / GQA / MQA clipping

LAYOUTS = {"mha": (4, 4), "gqa_g2": (8, 4), "gqa_g4": (8, 2), "mqa": (6, 1)}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_clip_bounds_logits_on_same_batch_and_leaves_other_heads(seed, layout, bias):
    heads, kv_heads = LAYOUTS[layout]
    group, dim, d_model = heads // kv_heads, 4, 16
    q_proj, k_proj, v_proj = (
        _linear(d_model, heads * dim, bias),
        _linear(d_model, kv_heads * dim, bias),
        _linear(d_model, kv_heads * dim, bias),
    )
    with (
        torch.no_grad()
    ):  # spread the heads; group 0's query heads all large (a fully clipped group)
        scale = torch.empty(heads).uniform_(0.5, 3.0)
        scale[:group] *= 8.0
        q_proj.weight.mul_(scale.repeat_interleave(dim)[:, None])
        k_proj.weight.mul_(2.0)
    clip = QKClip(tau=1.0)
    layer = clip.add(q_proj, k_proj, num_heads=heads, num_kv_heads=kv_heads)
    x = torch.randn(3, 9, d_model)
    _gqa_attention(x, q_proj, k_proj, v_proj, layer, heads, kv_heads).sum().backward()

    before = _oracle_logits(x, q_proj, k_proj, heads, kv_heads)
    s = _causal_max(before)
    torch.testing.assert_close(layer.max_logit.double(), s, rtol=1e-5, atol=1e-5)
    clip.tau = tau = _tau_between(s)
    over = s > tau
    assert over.any() and (~over).any()
    saved = {
        n: t.detach().clone()
        for n, t in [("q", q_proj.weight), ("k", k_proj.weight), ("v", v_proj.weight)]
    }
    saved_bias = [
        p.detach().clone() for p in (q_proj.bias, k_proj.bias, v_proj.bias) if p is not None
    ]

    clip.apply()

    after = _oracle_logits(x, q_proj, k_proj, heads, kv_heads)
    s_after = _causal_max(after)
    assert (s_after <= tau * (1 + BOUND_RTOL)).all(), (s_after, tau)
    assert (s_after[over] >= tau * (1 - BOUND_RTOL)).all(), "clipped harder than tau / S"
    # Every head's logits scale by exactly its own gamma (1 for heads at or below tau).
    gamma = torch.where(over, tau / s, torch.ones_like(s))
    expect = before * gamma.view(1, heads, 1, 1)
    assert (after - expect).abs().max() <= 1e-5 * before.abs().max()
    torch.testing.assert_close(layer.last_gamma.double(), gamma, rtol=1e-6, atol=0)
    # Unclipped query heads, key heads of groups with an unclipped head, and V: bit-identical.
    q_rows, q_rows0 = _heads(q_proj.weight, heads), _heads(saved["q"], heads)
    k_rows, k_rows0 = _heads(k_proj.weight, kv_heads), _heads(saved["k"], kv_heads)
    assert torch.equal(q_rows[~over], q_rows0[~over])
    assert not torch.equal(q_rows[over], q_rows0[over])
    group_has_unclipped = (~over).view(kv_heads, group).any(dim=1)
    assert torch.equal(k_rows[group_has_unclipped], k_rows0[group_has_unclipped])
    assert torch.equal(v_proj.weight, saved["v"])
    if bias:
        assert torch.equal(v_proj.bias, saved_bias[2])
        assert torch.equal(_heads(q_proj.bias, heads)[~over], _heads(saved_bias[0], heads)[~over])
    # No weight grows; MHA is Kimi's even split.
    assert (q_rows.norm(dim=(1, 2)) <= q_rows0.norm(dim=(1, 2)) * (1 + 1e-6)).all()
    assert (k_rows.norm(dim=(1, 2)) <= k_rows0.norm(dim=(1, 2)) * (1 + 1e-6)).all()
    if group == 1:
        root = layer.last_gamma.sqrt().view(heads, 1, 1)
        assert torch.equal(q_rows, q_rows0 * root) and torch.equal(k_rows, k_rows0 * root)
    # Maxima reset for the next step.
    assert torch.equal(layer.max_logit, torch.full((heads,), NEG_INF))
    torch.testing.assert_close(layer.last_max_logit.double(), s, rtol=1e-5, atol=1e-5)


def test_gqa_fully_clipped_group_shares_the_shrink_with_the_key(seed):
    heads, kv_heads, dim = 4, 2, 3
    q = torch.randn(heads * dim, 5)
    k = torch.randn(kv_heads * dim, 5)
    q0, k0 = q.clone(), k.clone()
    clip = QKClip(tau=10.0)
    layer = clip.add(q, k, num_heads=heads, num_kv_heads=kv_heads)
    # Group 0: both heads over tau (gammas 1/4 and 1/16); group 1: one head over, one under.
    layer.record_logits(torch.tensor([40.0, 160.0, 20.0, 3.0]).view(1, heads, 1, 1))
    clip.apply()
    kappa = math.sqrt(1 / 4)  # sqrt of the group's largest gamma
    torch.testing.assert_close(_heads(k, 2)[0], _heads(k0, 2)[0] * kappa)
    torch.testing.assert_close(_heads(q, 4)[0], _heads(q0, 4)[0] * (1 / 4) / kappa)
    torch.testing.assert_close(_heads(q, 4)[1], _heads(q0, 4)[1] * (1 / 16) / kappa)
    assert torch.equal(_heads(k, 2)[1], _heads(k0, 2)[1])
    torch.testing.assert_close(_heads(q, 4)[2], _heads(q0, 4)[2] * 0.5)
    assert torch.equal(_heads(q, 4)[3], _heads(q0, 4)[3])


def test_fused_qkv_row_slices(seed):
    heads, dim, d_model = 3, 4, 10
    e = heads * dim
    qkv = _linear(d_model, 3 * e, bias=True)
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    clip = QKClip(tau=1.0)
    layer = clip.add(
        qkv.weight[:e],
        qkv.weight[e : 2 * e],
        q_bias=qkv.bias[:e],
        k_bias=qkv.bias[e : 2 * e],
        num_heads=heads,
    )
    layer.record_logits(torch.tensor([5.0, 0.5, 4.0]).view(1, heads, 1, 1))
    clip.apply()
    g = torch.tensor([1 / 5, 1.0, 1 / 4]).sqrt()
    torch.testing.assert_close(
        _heads(qkv.weight[:e], heads), _heads(w0[:e], heads) * g.view(3, 1, 1)
    )
    torch.testing.assert_close(
        _heads(qkv.weight[e : 2 * e], heads), _heads(w0[e : 2 * e], heads) * g.view(3, 1, 1)
    )
    torch.testing.assert_close(_heads(qkv.bias[:e], heads), _heads(b0[:e], heads) * g.view(3, 1))
    assert torch.equal(qkv.weight[2 * e :], w0[2 * e :]) and torch.equal(
        qkv.bias[2 * e :], b0[2 * e :]
    )
    assert torch.equal(_heads(qkv.weight[:e], heads)[1], _heads(w0[:e], heads)[1])


@pytest.mark.parametrize(
    "value",
    [0.0, -3.0, NEG_INF, float("nan"), float("inf"), 1.0],
    ids=["zero", "neg", "neg_inf", "nan", "pos_inf", "at_tau"],
)
def test_max_at_or_below_tau_or_non_finite_changes_nothing(seed, value):
    q, k = torch.randn(8, 6), torch.randn(4, 6)
    q0, k0 = q.clone(), k.clone()
    clip = QKClip(tau=1.0)
    layer = clip.add(q, k, num_heads=4, num_kv_heads=2)
    layer.record_logits(torch.full((2, 4, 3, 3), value))
    clip.apply()
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert not layer.last_gamma.isnan().any()
    assert torch.equal(layer.last_gamma, torch.ones(4))


def test_never_recorded_layer_is_untouched_and_apply_without_layers_is_a_noop(seed):
    QKClip().apply()
    q, k = torch.randn(8, 6), torch.randn(8, 6)
    q0 = q.clone()
    clip = QKClip(tau=1e-3)
    layer = clip.add(q, k, num_heads=2)
    clip.apply()
    assert torch.equal(q, q0) and layer.max_logit is None
    assert torch.equal(layer.last_max_logit, torch.full((2,), NEG_INF))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_weights(seed, dtype):
    heads, dim = 4, 8
    q, k = torch.randn(heads * dim, 16).to(dtype), torch.randn(heads * dim, 16).to(dtype)
    q0, k0 = q.clone(), k.clone()
    clip = QKClip(tau=2.0)
    layer = clip.add(q, k, num_heads=heads)
    layer.record_logits(torch.tensor([8.0, 1.0, 2.0, 3.0]).view(1, heads, 1, 1))
    clip.apply()
    untouched = torch.tensor([False, True, True, False])
    assert torch.equal(_heads(q, heads)[untouched], _heads(q0, heads)[untouched])
    assert torch.equal(_heads(k, heads)[untouched], _heads(k0, heads)[untouched])
    g = torch.tensor([2 / 8, 1.0, 1.0, 2 / 3]).sqrt().double().view(heads, 1, 1)
    expect = _heads(q0, heads).double() * g
    tol = torch.finfo(dtype).eps
    assert ((_heads(q, heads).double() - expect).abs() <= tol * expect.abs() + 1e-30).all()


def test_untouched_rows_survive_flush_to_zero(seed):
    """Rows of unclipped heads are selected, not multiplied by 1.0: subnormals survive FTZ."""
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    q[2:] = torch.tensor(1e-40)  # subnormal in float32: head 1's rows
    q0 = q.clone()
    clip = QKClip(tau=1.0)
    layer = clip.add(q, k, num_heads=2)
    layer.record_logits(torch.tensor([4.0, 0.5]).view(1, 2, 1, 1))
    if not torch.set_flush_denormal(True):
        pytest.skip("flush-to-zero mode is not available on this CPU")
    try:
        clip.apply()
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(q[2:], q0[2:])
    torch.testing.assert_close(q[:2], q0[:2] * 0.5)


# ---------------------------------------------------------------------- recording


MASKS = ["none", "causal", "bool", "float", "bool_per_batch", "float_row_broadcast"]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_recorded_max_matches_oracle_over_allowed_positions(seed, monkeypatch, mask_kind, chunked):
    if chunked:
        monkeypatch.setattr(qk_clip_module, "_CHUNK_ELEMENTS", 40)  # a few query rows per chunk
    batch, heads, kv_heads, q_len, k_len, dim = 2, 6, 2, 11, 13, 5
    q = torch.randn(batch, heads, q_len, dim)
    k = torch.randn(batch, kv_heads, k_len, dim)
    # Keys 11 and 12 are hot and every mask kind below excludes them (causal: q_len = 11 rows,
    # so neither is ever allowed): recording them would show.
    k[:, :, 11:] *= 30.0
    logits = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 0.3
    allowed = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    mask = None
    if mask_kind == "causal":
        allowed = allowed & torch.ones(q_len, k_len, dtype=torch.bool).tril()
    elif mask_kind in ("bool", "float"):
        allowed = allowed & (torch.rand(q_len, k_len) < 0.5)
        allowed[..., 0], allowed[..., 11:] = True, False
        mask = allowed[0, 0]
    elif mask_kind == "bool_per_batch":
        allowed = allowed & (torch.rand(batch, 1, q_len, k_len) < 0.5)
        allowed[..., 11:] = False
        mask = allowed[:, :1]
    elif mask_kind == "float_row_broadcast":
        allowed = allowed & (torch.rand(batch, 1, 1, k_len) < 0.5)
        allowed[..., 0], allowed[..., 11:] = True, False
        mask = allowed[:, :1, :1]
    if mask is not None and "float" in mask_kind:
        mask = torch.zeros(mask.shape).masked_fill(~mask, NEG_INF) + torch.randn(mask.shape)
    expect = logits.masked_fill(~allowed, NEG_INF).amax(dim=(0, 2, 3))
    if mask_kind != "none":  # the mask must matter, or this test could not fail
        assert not torch.equal(expect, logits.amax(dim=(0, 2, 3)))
    clip = QKClip()
    layer = clip.add(
        torch.randn(heads * dim, 4),
        torch.randn(kv_heads * dim, 4),
        num_heads=heads,
        num_kv_heads=kv_heads,
    )
    layer.record(q, k, attn_mask=mask, is_causal=mask_kind == "causal", scale=0.3)
    torch.testing.assert_close(layer.max_logit.double(), expect, rtol=1e-5, atol=1e-5)
    # Keys already repeated to every query head give the same maxima.
    clip.reset()
    layer.record(
        q, k.repeat_interleave(3, 1), attn_mask=mask, is_causal=mask_kind == "causal", scale=0.3
    )
    torch.testing.assert_close(layer.max_logit.double(), expect, rtol=1e-5, atol=1e-5)


def test_max_over_micro_batches_detached_and_not_in_no_grad(seed):
    heads, dim = 3, 4
    clip = QKClip()
    layer = clip.add(torch.randn(heads * dim, 2), torch.randn(heads * dim, 2), num_heads=heads)
    q1, k1 = torch.randn(2, heads, 5, dim, requires_grad=True), torch.randn(2, heads, 5, dim)
    q2, k2 = torch.randn(1, heads, 7, dim) * 3, torch.randn(1, heads, 7, dim)
    v1, v2 = torch.randn(2, heads, 5, dim), torch.randn(1, heads, 7, dim)
    out = layer.attention(q1, k1, v1)
    layer.attention(q2, k2, v2)
    with torch.no_grad():
        layer.attention(q2 * 100, k2, v2)  # evaluation: not recorded
    assert not layer.max_logit.requires_grad and layer.max_logit.grad_fn is None
    out.sum().backward()  # the graph does not see the recording
    assert q1.grad is not None

    def oracle(q, k):
        return (q.detach().double() @ k.double().transpose(-1, -2) / 2).amax(dim=(0, 2, 3))

    expect = torch.maximum(oracle(q1, k1), oracle(q2, k2))
    torch.testing.assert_close(layer.max_logit.double(), expect, rtol=1e-5, atol=1e-5)
    clip.record_in_no_grad = True
    with torch.no_grad():
        layer.attention(q2 * 100, k2, v2)
    torch.testing.assert_close(layer.max_logit.double(), oracle(q2 * 100, k2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_attention_is_sdpa(seed, gqa):
    heads, kv_heads = (8, 2) if gqa else (4, 4)
    clip = QKClip()
    layer = clip.add(
        torch.randn(heads * 4, 2),
        torch.randn(kv_heads * 4, 2),
        num_heads=heads,
        num_kv_heads=kv_heads,
    )
    q = torch.randn(2, heads, 6, 4, requires_grad=True)
    k, v = torch.randn(2, kv_heads, 6, 4), torch.randn(2, kv_heads, 6, 4)
    mask = torch.rand(6, 6) < 0.7
    mask[:, 0] = True
    kwargs = {"attn_mask": mask, "scale": 0.7, "enable_gqa": gqa}
    out = layer.attention(q, k, v, **kwargs)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.sum(), q)
    (g_ref,) = torch.autograd.grad(ref.sum(), q)
    assert torch.equal(g, g_ref)


def test_record_rejects_mismatched_shapes():
    clip = QKClip()
    layer = clip.add(torch.randn(8, 2), torch.randn(4, 2), num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="heads"):
        layer.record(torch.randn(1, 3, 5, 2), torch.randn(1, 3, 5, 2))
    with pytest.raises(ValueError, match="key"):
        layer.record(torch.randn(1, 4, 5, 2), torch.randn(1, 3, 5, 2))
    with pytest.raises(ValueError, match="heads"):
        layer.record_logits(torch.randn(1, 3, 5, 5))


def test_registration_validation():
    with pytest.raises(ValueError, match="tau"):
        QKClip(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        QKClip(tau=float("nan"))
    clip = QKClip()
    with pytest.raises(ValueError, match="multiple"):
        clip.add(torch.randn(12, 2), torch.randn(8, 2), num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="head dim"):
        clip.add(torch.randn(12, 2), torch.randn(6, 2), num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="split"):
        clip.add(torch.randn(10, 2), torch.randn(10, 2), num_heads=4)
    with pytest.raises(ValueError, match="bias"):
        clip.add_mla(
            nn.Linear(4, 12),
            nn.Linear(4, 8, bias=False),
            num_heads=2,
            qk_nope_head_dim=4,
            qk_rope_head_dim=2,
        )
    with pytest.raises(ValueError, match="rows per head"):
        clip.add_mla(
            torch.randn(12, 4),
            torch.randn(10, 4),
            num_heads=2,
            qk_nope_head_dim=4,
            qk_rope_head_dim=2,
            v_head_dim=3,
        )
    with pytest.raises(ValueError, match="add_bias_kv"):
        clip.add_multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert clip.layers == []


# ---------------------------------------------------------------------- MLA


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = positions[:, None].to(x.dtype) * freq
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class _MLA(nn.Module):
    """DeepSeek-V3-style attention: per-head [nope | rope] queries, kv up-projection [k_nope | v],
    one rotary key shared by all heads from the down-projection."""

    def __init__(self, d_model=20, heads=4, d_nope=6, d_rope=4, d_v=5, kv_rank=8, kv_heads=None):
        super().__init__()
        self.heads, self.d_nope, self.d_rope, self.d_v = heads, d_nope, d_rope, d_v
        self.kv_heads = heads if kv_heads is None else kv_heads  # grouped keys if fewer
        self.wq = nn.Linear(d_model, heads * (d_nope + d_rope), bias=False)
        self.wkv_a = nn.Linear(d_model, kv_rank + d_rope, bias=False)
        self.wkv_b = nn.Linear(kv_rank, self.kv_heads * (d_nope + d_v), bias=False)
        self.kv_rank = kv_rank
        self.scale = 1.0 / math.sqrt(d_nope + d_rope)

    def qk(self, x):
        b, length, _ = x.shape
        pos = torch.arange(length)
        q = self.wq(x).view(b, length, self.heads, self.d_nope + self.d_rope)
        q = torch.cat([q[..., : self.d_nope], _rope(q[..., self.d_nope :], pos[:, None])], -1)
        kv_a = self.wkv_a(x)
        c_kv, k_rope = kv_a[..., : self.kv_rank], _rope(kv_a[..., self.kv_rank :], pos)
        kv = self.wkv_b(c_kv).view(b, length, self.kv_heads, self.d_nope + self.d_v)
        k_rope = k_rope[:, :, None, :].expand(b, length, self.kv_heads, self.d_rope)
        k = torch.cat([kv[..., : self.d_nope], k_rope], -1)
        return q.transpose(1, 2), k.transpose(1, 2), kv[..., self.d_nope :].transpose(1, 2)

    def register(self, clip: QKClip, name=None):
        return clip.add_mla(
            self.wq,
            self.wkv_b,
            num_heads=self.heads,
            qk_nope_head_dim=self.d_nope,
            qk_rope_head_dim=self.d_rope,
            v_head_dim=self.d_v,
            num_kv_heads=self.kv_heads,
            name=name,
        )


def _mla_logits(mla: _MLA, q, k):
    return q @ k.repeat_interleave(mla.heads // mla.kv_heads, 1).transpose(-1, -2) * mla.scale


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mla", "grouped_g2", "grouped_g4"])
def test_mla_layout(seed, kv_heads):
    torch.set_default_dtype(torch.float64)  # the oracle logits come from the module itself
    try:
        mla = _MLA(kv_heads=kv_heads)
        with torch.no_grad():
            spread = torch.empty(mla.heads).uniform_(0.3, 4.0)
            mla.wq.weight.view(mla.heads, -1, 20).mul_(spread[:, None, None])
        clip = QKClip(tau=1.0)
        layer = mla.register(clip)
        x = torch.randn(2, 7, 20)
        q, k, v = mla.qk(x)
        grouped = kv_heads != mla.heads
        layer.attention(q, k, v, is_causal=True, scale=mla.scale, enable_gqa=grouped)
        before = _mla_logits(mla, q, k).detach()
        s = _causal_max(before)
        torch.testing.assert_close(layer.max_logit.double(), s, rtol=1e-5, atol=1e-5)
        clip.tau = tau = _tau_between(s)
        over = s > tau
        wq0, a0, b0 = (
            w.detach().clone() for w in (mla.wq.weight, mla.wkv_a.weight, mla.wkv_b.weight)
        )
        clip.apply()
        with torch.no_grad():
            q, k, _ = mla.qk(x)
        after = _mla_logits(mla, q, k)
        s_after = _causal_max(after)
        assert (s_after <= tau * (1 + BOUND_RTOL)).all()
        assert (s_after[over] >= tau * (1 - BOUND_RTOL)).all()
        gamma = torch.where(over, tau / s, torch.ones_like(s))
        assert (after - before * gamma.view(1, -1, 1, 1)).abs().max() <= 1e-5 * before.abs().max()
        h, dn = mla.heads, mla.d_nope
        q_rows, q_rows0 = _heads(mla.wq.weight, h), _heads(wq0, h)
        kv_rows, kv_rows0 = _heads(mla.wkv_b.weight, kv_heads), _heads(b0, kv_heads)
        torch.testing.assert_close(  # q rope by gamma (the rotary key is shared, never scaled)
            q_rows[:, dn:],
            q_rows0[:, dn:] * gamma.view(h, 1, 1).to(q_rows.dtype),
            rtol=1e-6,
            atol=0,
        )
        assert torch.equal(kv_rows[:, dn:], kv_rows0[:, dn:])  # values
        assert torch.equal(mla.wkv_a.weight, a0)  # shared rotary key and the latent
        assert torch.equal(q_rows[~over], q_rows0[~over])
        group = h // kv_heads
        group_has_unclipped = (~over).view(kv_heads, group).any(dim=1)
        assert torch.equal(kv_rows[group_has_unclipped], kv_rows0[group_has_unclipped])
        # No row grows (grouped keys: kappa = sqrt(max gamma) on k, gamma / kappa on q nope).
        assert (q_rows.norm(dim=2) <= q_rows0.norm(dim=2) * (1 + 1e-12)).all()
        assert (kv_rows.norm(dim=2) <= kv_rows0.norm(dim=2) * (1 + 1e-12)).all()
        if grouped:
            kappa = gamma.view(kv_heads, group).amax(dim=1).sqrt()
            torch.testing.assert_close(
                kv_rows[:, :dn], kv_rows0[:, :dn] * kappa.view(-1, 1, 1), rtol=1e-6, atol=0
            )
            return
        # Row by row: q nope by sqrt(gamma), q rope by gamma, k nope by sqrt(gamma), the rest kept.
        root = gamma.sqrt().view(h, 1, 1)
        torch.testing.assert_close(
            q_rows[:, :dn], q_rows0[:, :dn] * root.to(q_rows.dtype), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            kv_rows[:, :dn], kv_rows0[:, :dn] * root.to(q_rows.dtype), rtol=1e-6, atol=0
        )
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------- nn.MultiheadAttention


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate"])
def test_multihead_attention_hook(seed, batch_first, kdim):
    e, heads, b, length = 12, 3, 2, 7
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
    with torch.no_grad():
        w = mha.in_proj_weight if kdim is None else mha.q_proj_weight
        w[:e].mul_(torch.tensor([6.0, 0.5, 2.0]).repeat_interleave(e // heads)[:, None])
    clip = QKClip(tau=1.0)
    layer = clip.add_multihead_attention(mha)
    query = torch.randn(b, length, e)
    key = torch.randn(b, length, kdim or e)
    attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: not allowed
    padding = torch.zeros(b, length, dtype=torch.bool)
    padding[0, -2:] = True
    key[0, -2:] *= 30.0  # hot keys, hidden by the padding mask: recording them would show

    def run():
        args = (
            (query, key, key)
            if batch_first
            else (query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1))
        )
        return mha(*args, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]

    @torch.no_grad()
    def oracle():
        wq = mha.in_proj_weight[:e] if kdim is None else mha.q_proj_weight
        wk = mha.in_proj_weight[e : 2 * e] if kdim is None else mha.k_proj_weight
        q = F.linear(query.double(), wq.double(), mha.in_proj_bias[:e].double())
        k = F.linear(key.double(), wk.double(), mha.in_proj_bias[e : 2 * e].double())
        q = q.view(b, length, heads, -1).transpose(1, 2)
        k = k.view(b, length, heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(e // heads)
        allowed = ~attn_mask & ~padding[:, None, None, :]
        return logits, logits.masked_fill(~allowed, NEG_INF).amax(dim=(0, 2, 3))

    run().sum().backward()
    before, s = oracle()
    torch.testing.assert_close(layer.max_logit.double(), s, rtol=1e-5, atol=1e-5)
    assert not torch.equal(s, before.amax(dim=(0, 2, 3)))  # the masks matter
    clip.tau = tau = _tau_between(s)
    v_rows = (mha.in_proj_weight[2 * e :] if kdim is None else mha.v_proj_weight).detach().clone()
    out0 = mha.out_proj.weight.detach().clone()
    clip.apply()
    _, s_after = oracle()
    over = s > tau
    assert (s_after <= tau * (1 + BOUND_RTOL)).all()
    assert (s_after[over] >= tau * (1 - BOUND_RTOL)).all()
    torch.testing.assert_close(s_after[~over], s[~over], rtol=0, atol=0)
    assert torch.equal(mha.in_proj_weight[2 * e :] if kdim is None else mha.v_proj_weight, v_rows)
    assert torch.equal(mha.out_proj.weight, out0)
    layer.remove()
    run()
    assert clip.layers == [] and torch.equal(layer.max_logit, torch.full((heads,), NEG_INF))


# ---------------------------------------------------------------------- optimizer integration


def _tiny_step_setup():
    torch.manual_seed(1234)
    q, k = nn.Parameter(torch.randn(8, 6) * 3), nn.Parameter(torch.randn(8, 6) * 3)
    for p in (q, k):
        p.grad = torch.randn_like(p)
    return q, k


def test_attach_runs_apply_once_after_each_step(seed, monkeypatch):
    q, k = _tiny_step_setup()
    clip = QKClip(tau=1.0)
    layer = clip.add(q, k, num_heads=2)
    opt = Muon([q, k], lr=0.05)
    handle = clip.attach(opt)
    calls = []
    real_apply = clip.apply
    monkeypatch.setattr(clip, "apply", lambda: (calls.append(1), real_apply())[1])
    layer.record_logits(torch.tensor([5.0, 0.5]).view(1, 2, 1, 1))

    # Expected: Muon's step, then the clip, on copies.
    q2, k2 = nn.Parameter(q.detach().clone()), nn.Parameter(k.detach().clone())
    q2.grad, k2.grad = q.grad.clone(), k.grad.clone()
    clip2 = QKClip(tau=1.0)
    clip2.add(q2, k2, num_heads=2).record_logits(torch.tensor([5.0, 0.5]).view(1, 2, 1, 1))
    Muon([q2, k2], lr=0.05).step()
    clip2.apply()

    opt.step()
    assert calls == [1]
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert torch.equal(layer.max_logit, torch.full((2,), NEG_INF))
    handle.remove()
    layer.record_logits(torch.tensor([5.0, 0.5]).view(1, 2, 1, 1))
    opt.step()
    assert torch.equal(layer.max_logit, torch.tensor([5.0, 0.5]))  # no longer attached


def test_muonclip_optimizer(seed):
    q, k = _tiny_step_setup()
    clip = QKClip(tau=1.0)
    layer = clip.add(q, k, num_heads=2)
    calls = []
    opt = MuonClip([q, k], lr=0.05, qk_clip=clip)
    opt.register_step_post_hook(lambda *a: calls.append(1))
    layer.record_logits(torch.tensor([5.0, 0.5]).view(1, 2, 1, 1))
    q2, k2 = nn.Parameter(q.detach().clone()), nn.Parameter(k.detach().clone())
    q2.grad, k2.grad = q.grad.clone(), k.grad.clone()
    clip2 = QKClip(tau=1.0)
    clip2.add(q2, k2, num_heads=2).record_logits(torch.tensor([5.0, 0.5]).view(1, 2, 1, 1))
    Muon([q2, k2], lr=0.05).step()
    clip2.apply()
    opt.step()
    assert calls == [1]  # hooks run once per step
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert isinstance(opt, Muon) and set(opt.state_dict()["state"][0]) == {"momentum_buffer"}
    with pytest.raises(TypeError, match="QKClip"):
        MuonClip([q], qk_clip=None)


def test_attach_works_with_muon_with_adamw(seed, one_thread):
    tokens = torch.randint(0, 32, (4, 8))

    def setup():
        torch.manual_seed(seed)
        clip = QKClip(tau=1.0)
        model = _TinyAttention(clip)
        opt = MuonWithAdamW(muon_param_groups(model), lr=0.05, adamw_lr=1e-2)
        model(tokens).square().mean().backward()
        return clip, model, opt

    clip, model, opt = setup()
    clip.tau = _tau_between(model.qk.max_logit)
    calls = []
    real_apply = clip.apply
    clip.apply = lambda: (calls.append(1), real_apply())[1]
    clip.attach(opt)
    opt.step()
    ref_clip, ref_model, ref_opt = setup()
    ref_clip.tau = clip.tau
    ref_opt.step()
    ref_clip.apply()
    assert calls == [1]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    assert (model.qk.last_gamma < 1).any() and (model.qk.last_gamma == 1).any()


# ---------------------------------------------------------------------- training


class _TinyAttention(nn.Module):
    """One causal GQA layer over frozen random embeddings; the task (running max of the tokens
    so far) rewards ever sharper attention, so the logits keep growing under a high lr."""

    def __init__(self, clip: QKClip, vocab=32, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, d // heads
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(False)
        self.q = nn.Linear(d, heads * self.dim, bias=False)
        self.k = nn.Linear(d, kv_heads * self.dim, bias=False)
        self.v = nn.Linear(d, kv_heads * self.dim, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, vocab, bias=False)
        self.qk = clip.add(self.q, self.k, num_heads=heads, num_kv_heads=kv_heads)

    def forward(self, tokens):
        x = self.emb(tokens)
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.dim).transpose(1, 2)
        k = self.k(x).view(b, length, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v(x).view(b, length, self.kv_heads, self.dim).transpose(1, 2)
        a = self.qk.attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(self.o(a.transpose(1, 2).reshape(b, length, -1)))


def _train(seed: int, use_clip: bool, tau: float, steps: int = 50, lr: float = 0.1):
    torch.manual_seed(seed)
    clip = QKClip(tau=tau)
    model = _TinyAttention(clip)
    opt = Muon([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if use_clip:
        clip.attach(opt)
    maxima = []
    for _ in range(steps):
        tokens = torch.randint(0, 32, (16, 16))
        target = torch.cummax(tokens, dim=1).values
        loss = F.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        maxima.append(model.qk.max_logit.max().item())
        opt.step()
        if not use_clip:
            clip.reset()
    return maxima


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_high_lr_training_logits_bounded_with_clip_and_growing_without(seed, one_thread):
    tau = 5.0
    free = _train(seed, use_clip=False, tau=tau)
    clipped = _train(seed, use_clip=True, tau=tau)
    assert free[-1] > 3 * tau, f"without QK-Clip the logits should grow: {free[-5:]}"
    # Each step's forward sees the weights clipped after the previous step plus one update.
    assert max(clipped) < 2.5 * tau, f"with QK-Clip the logits should stay near tau: {clipped}"
    assert max(clipped[-10:]) < free[-1] / 2


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_record_and_apply_never_sync(seed):
    device = torch.device("cuda")
    heads, kv_heads, dim, d_model = 8, 2, 16, 64
    q_proj = nn.Linear(d_model, heads * dim, device=device)
    k_proj = nn.Linear(d_model, kv_heads * dim, device=device)
    mla = _MLA().to(device)
    clip = QKClip(tau=0.5)
    layer = clip.add(q_proj, k_proj, num_heads=heads, num_kv_heads=kv_heads)
    mla_layer = clip.add_mla(
        mla.wq,
        mla.wkv_b,
        num_heads=mla.heads,
        qk_nope_head_dim=mla.d_nope,
        qk_rope_head_dim=mla.d_rope,
        v_head_dim=mla.d_v,
    )
    x = torch.randn(2, 32, d_model, device=device)
    with torch.no_grad():
        q = q_proj(x).view(2, 32, heads, dim).transpose(1, 2)
        k = k_proj(x).view(2, 32, kv_heads, dim).transpose(1, 2)
        mq, mk, _ = mla.qk(torch.randn(2, 32, 20, device=device))
    layer.record(q, k, is_causal=True)  # allocates the running maxima
    before = q_proj.weight.detach().clone()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.record(q, k, is_causal=True)
        mla_layer.record(mq, mk, is_causal=True, scale=mla.scale)
        clip.apply()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    expect = q.double() @ k.double().repeat_interleave(4, 1).transpose(-1, -2) / 4
    expect = _causal_max(expect.cpu())
    torch.testing.assert_close(layer.last_max_logit.cpu().double(), expect, rtol=1e-3, atol=1e-3)
    gamma = torch.where(expect > 0.5, 0.5 / expect, torch.ones_like(expect))
    assert torch.equal(layer.last_gamma.cpu() == 1, gamma == 1)
    assert not torch.equal(q_proj.weight, before)


# ---------------------------------------------------------------------- distributed (gloo)
#
# Scenarios run on spawned gloo ranks (tests/_dist_utils.py: one spawn per world size for all
# of them); each compares against a single-process run computed inside the worker.

DIST_WORLDS = (2, 3)
DIST_BATCH = 6  # divisible by every world size
D_MODEL = 12


class _ShardedAttention(nn.Module):
    """Every registration kind, with row counts that FSDP2 shards unevenly at 2 and 3 ranks:
    GQA 9/3 heads x 5 (q 45 rows, k 15, with biases: heads split at 2 ranks), GQA 8/2 x 4
    (q 32, k 8: split at 3 ranks), MQA 2/1 x 2 (k 2 rows: an empty shard at 3 ranks), MLA with
    5 heads (q 50, kv 55 rows), MLA with grouped keys (4 heads, 2 key heads) and a packed
    ``nn.MultiheadAttention`` (in_proj 36 rows, split inside the k rows at 2 ranks)."""

    GQA = {"gqa9": (9, 3, 5, True), "gqa8": (8, 2, 4, False), "mqa": (2, 1, 2, True)}

    def __init__(self):
        super().__init__()
        for name, (heads, kv, dim, bias) in self.GQA.items():
            setattr(self, name + "_q", nn.Linear(D_MODEL, heads * dim, bias=bias))
            setattr(self, name + "_k", nn.Linear(D_MODEL, kv * dim, bias=bias))
        self.mla = _MLA(d_model=D_MODEL, heads=5)
        self.mla_grouped = _MLA(d_model=D_MODEL, heads=4, kv_heads=2)
        self.mha = nn.MultiheadAttention(D_MODEL, 3, batch_first=True)
        with torch.no_grad():  # spread the heads, so one tau has heads on both sides
            for w, heads in self._q_weights():
                spread = torch.linspace(0.3, 3.0, heads)[torch.randperm(heads)]
                w.view(heads, -1, w.shape[-1]).mul_(spread[:, None, None])

    def _q_weights(self):
        for name, (heads, *_rest) in self.GQA.items():
            yield getattr(self, name + "_q").weight, heads
        yield self.mla.wq.weight, 5
        yield self.mla_grouped.wq.weight, 4
        yield self.mha.in_proj_weight[:D_MODEL], 3

    def register(self, clip: QKClip) -> None:
        self.layers = {}
        for name, (heads, kv, _dim, _bias) in self.GQA.items():
            q, k = getattr(self, name + "_q"), getattr(self, name + "_k")
            self.layers[name] = clip.add(q, k, num_heads=heads, num_kv_heads=kv, name=name)
        self.layers["mla"] = self.mla.register(clip, "mla")
        self.layers["mla_grouped"] = self.mla_grouped.register(clip, "mla_grouped")
        self.layers["mha"] = clip.add_multihead_attention(self.mha, name="mha")

    def forward(self, x):
        b, length, _ = x.shape
        out = self.mha(x, x, x, need_weights=False, is_causal=False)[0].sum()
        for name, (heads, kv, dim, _bias) in self.GQA.items():
            q = getattr(self, name + "_q")(x).view(b, length, heads, dim).transpose(1, 2)
            k = getattr(self, name + "_k")(x).view(b, length, kv, dim).transpose(1, 2)
            self.layers[name].record(q, k, is_causal=True)
            out = out + q.sum() + k.sum()
        for name in ("mla", "mla_grouped"):
            mla = getattr(self, name)
            q, k, v = mla.qk(x)
            self.layers[name].record(q, k, is_causal=True, scale=mla.scale)
            out = out + q.sum() + k.sum() + v.sum()
        return out


def _dist_batch(step: int = 0, length: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(U.SEED + 100 + step)
    return torch.randn(DIST_BATCH, length, D_MODEL, generator=g)


def _slices(x: torch.Tensor, world: int):
    per = x.shape[0] // world
    return [x[r * per : (r + 1) * per] for r in range(world)]


def _fully_shard_children(model: nn.Module, world: int) -> None:
    """``fully_shard`` on every ``nn.Linear`` / ``nn.MultiheadAttention`` (not the linear inside
    a ``MultiheadAttention``: its forward reads that weight directly), then on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    inside_mha = {
        id(m)
        for mha in model.modules()
        if isinstance(mha, nn.MultiheadAttention)
        for m in mha.modules()
        if m is not mha
    }
    for child in list(model.modules()):
        if child is not model and id(child) not in inside_mha:
            if isinstance(child, (nn.Linear, nn.MultiheadAttention)):
                fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _straddling(layers) -> list[str]:
    """Registered weights whose local shard starts or ends inside a head on this rank."""
    out = []
    for layer in layers:
        for what, rows, heads in (
            ("q", layer._q_weight, layer.num_heads),
            ("k", layer._k_weight, layer.num_kv_heads),
        ):
            per_head = rows.rows() // heads
            first, held = qk_clip_module._dim0_local_range(rows.get())
            first, last = first - rows.start, first - rows.start + held
            cuts = [c for c in (first, last) if 0 < c < rows.rows()]
            if held and any(c % per_head for c in cuts):
                out.append(f"{layer.name}.{what}")
    return out


@torch.no_grad()
def _maxima64(state: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head max logits of every layer on ``x``, in float64, for weights ``state``."""
    torch.manual_seed(0)
    model = _ShardedAttention().double()
    model.load_state_dict({n: t.double() for n, t in state.items()})
    clip = QKClip(tau=1.0, record_in_no_grad=True)
    model.register(clip)
    model(x.double())
    return {n: layer.max_logit.double() for n, layer in model.layers.items()}


def _count_comms(fn):
    from torch.distributed.tensor.debug import CommDebugMode

    calls = {"all_reduce": 0}
    groups = []
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls["all_reduce"] += 1
        group = kwargs.get("group", args[2] if len(args) > 2 else None)
        groups.append(dist.get_process_group_ranks(group or dist.group.WORLD))
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        with CommDebugMode() as comm:
            fn()
    finally:
        dist.all_reduce = real
    calls["dtensor_collectives"] = comm.get_total_counts()
    return calls, groups


def fsdp_apply(rank, world, tmp):
    """FSDP2-sharded weights clipped shard by shard vs the same clip on whole weights."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(U.SEED)
    ref = _ShardedAttention()
    model = copy.deepcopy(ref)
    _fully_shard_children(model, world)
    clip_ref, clip = QKClip(tau=1.0), QKClip(tau=1.0)
    ref.register(clip_ref)
    model.register(clip)
    x = _dist_batch()
    for part in _slices(x, world):  # what every rank records, folded as micro-batches
        ref(part)
    model(_slices(x, world)[rank]).backward()  # the backward reshards the parameters
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    local_rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    before = _maxima64(ref.state_dict(), x)
    recorded = torch.cat([layer.max_logit for layer in ref.layers.values()])
    clip.tau = clip_ref.tau = tau = float(recorded.median())
    comms, _groups = _count_comms(clip.apply)
    clip_ref.apply()
    full = {n: U.full(p.detach()) for n, p in model.named_parameters()}
    mismatched = [n for n, p in ref.named_parameters() if not torch.equal(full[n], p.detach())]
    after = _maxima64(full, x)
    bound_err = max(
        float(((after[n] - before[n].clamp(max=tau)).abs() / before[n].abs().clamp(min=tau)).max())
        for n in before
    )
    return {
        "sharded": sharded,
        "mismatched": mismatched,
        "straddling": _straddling(clip.layers),
        "empty_shards": sum(1 for n in local_rows.values() if n == 0),
        "same_maxima": all(
            torch.equal(a.last_max_logit, b.last_max_logit)
            for a, b in zip(clip.layers, clip_ref.layers)
        ),
        "clipped": int(sum(int((layer.last_gamma < 1).sum()) for layer in clip.layers)),
        "unclipped": int(sum(int((layer.last_gamma == 1).sum()) for layer in clip.layers)),
        "bound_err": bound_err,
        "comms": comms,
    }


def replicated(rank, world, tmp):
    """Whole weights on every rank (DDP), different data: every rank applies the MAX."""
    torch.manual_seed(U.SEED)
    model = _ShardedAttention()
    clip = QKClip(tau=1.0)
    model.register(clip)
    torch.manual_seed(U.SEED + 1 + rank)  # different data on every rank
    model(torch.randn(2, 5, D_MODEL) * (1 + rank))
    local = torch.cat([layer.max_logit for layer in clip.layers])
    seen = local.clone()
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    clip.tau = float(seen.median())  # one tau, some heads above it and some below
    clip.apply()
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    reduced = torch.cat([layer.last_max_logit for layer in clip.layers])
    return {
        "locals_differ": not all(torch.equal(gathered[0], g) for g in gathered),
        "reduced_is_max": torch.equal(reduced, torch.stack(gathered).amax(dim=0)),
        "clipped": int(sum(int((layer.last_gamma < 1).sum()) for layer in clip.layers)),
        "unclipped": int(sum(int((layer.last_gamma == 1).sum()) for layer in clip.layers)),
        "identical_on_ranks": U.ranks_identical(list(model.parameters())),
    }


def tensor_parallel(rank, world, tmp):
    """Heads split over ``tp`` ranks, each registering its local heads as plain modules, and
    the maxima MAX-reduced over the data-parallel group only (ranks holding the same heads)."""
    tp = 2 if world % 2 == 0 else world
    dp = world // tp
    t, d = rank % tp, rank // tp
    groups = [dist.new_group([t2 + tp * i for i in range(dp)]) for t2 in range(tp)]
    heads, kv_heads, dim = 12, 6, 3
    torch.manual_seed(U.SEED)
    q_full, k_full = nn.Linear(D_MODEL, heads * dim), nn.Linear(D_MODEL, kv_heads * dim)
    with torch.no_grad():
        q_full.weight.view(heads, dim, -1).mul_(torch.linspace(0.3, 3.0, heads)[:, None, None])
    x = torch.randn(2 * dp, 5, D_MODEL)

    def record(layer, q_proj, k_proj, part, h, kv):
        b, length, _ = part.shape
        q = q_proj(part).view(b, length, h, dim).transpose(1, 2)
        k = k_proj(part).view(b, length, kv, dim).transpose(1, 2)
        layer.record(q, k, is_causal=True)

    def by_rank(whole):  # the projection as the tp ranks compute it, slice by slice
        def project(part):
            ws, bs = whole.weight.chunk(tp), whole.bias.chunk(tp)
            return torch.cat([F.linear(part, w, b) for w, b in zip(ws, bs)], dim=-1)

        return project

    ref = QKClip(tau=1.0)
    ref_layer = ref.add(q_full, k_full, num_heads=heads, num_kv_heads=kv_heads)
    for part in x.chunk(dp):
        record(ref_layer, by_rank(q_full), by_rank(k_full), part, heads, kv_heads)
    ref.tau = float(ref_layer.max_logit.median())

    def local_run(group):
        hl, kvl = heads // tp, kv_heads // tp
        q = nn.Linear(D_MODEL, hl * dim)
        k = nn.Linear(D_MODEL, kvl * dim)
        with torch.no_grad():
            for mine, whole, n in ((q, q_full, hl), (k, k_full, kvl)):
                rows = slice(t * n * dim, (t + 1) * n * dim)
                mine.weight.copy_(whole.weight[rows])
                mine.bias.copy_(whole.bias[rows])
        clip = QKClip(tau=ref.tau, process_group=group)
        layer = clip.add(q, k, num_heads=hl, num_kv_heads=kvl)
        record(layer, q, k, x.chunk(dp)[d], hl, kvl)
        clip.apply()
        return q, k, layer

    q, k, layer = local_run(groups[t])
    q_w, _ = local_run(None)[:2]  # the whole world's group mixes other ranks' heads
    ref.apply()
    hl, kvl = heads // tp, kv_heads // tp
    q_rows = slice(t * hl * dim, (t + 1) * hl * dim)
    k_rows = slice(t * kvl * dim, (t + 1) * kvl * dim)
    return {
        "tp": tp,
        "dp": dp,
        "equal": all(
            torch.equal(mine, whole[rows])
            for mine, whole, rows in (
                (q.weight, q_full.weight, q_rows),
                (q.bias, q_full.bias, q_rows),
                (k.weight, k_full.weight, k_rows),
                (k.bias, k_full.bias, k_rows),
            )
        ),
        "gamma_equal": torch.equal(layer.last_gamma, ref_layer.last_gamma[t * hl : (t + 1) * hl]),
        "world_group_differs": not torch.equal(q_w.weight, q_full.weight[q_rows]),
        "clipped": int((ref_layer.last_gamma < 1).sum()),
    }


TP_DP_HEADS = (10, 2, 3)  # heads, key heads, head dim: per tp rank 5 / 1 heads, 15 / 3 rows


def tp_dp(rank, world, tmp):
    """4 ranks on a 2 x 2 (dp, tp) mesh: the heads split over tp (each tp rank's local q / k
    rows of its 5 query heads and their key head in its own ``nn.Linear``), each local module
    ``fully_shard``-ed over dp (15 q rows: 8 + 7, 3 k rows: 2 + 1, so both dp shards start or
    end inside a head), and the maxima MAX-reduced over the dp group only. Compared with
    QK-Clip on the whole weights, recorded on the same micro-batches with the same per-tp-rank
    projections."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_mesh, tp = mesh["dp"], 2
    d, t = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    heads, kv_heads, dim = TP_DP_HEADS
    hl, kvl = heads // tp, kv_heads // tp
    torch.manual_seed(U.SEED)
    q_full, k_full = nn.Linear(D_MODEL, heads * dim), nn.Linear(D_MODEL, kv_heads * dim)
    with torch.no_grad():  # spread the heads, so one tau has heads on both sides
        spread = torch.linspace(0.3, 3.0, heads)[torch.randperm(heads)]
        q_full.weight.view(heads, dim, -1).mul_(spread[:, None, None])
    b, length = 2, 5
    # dp rank d sees parts[d]: b sequences of length tokens, flattened (a 2-D input makes
    # nn.Linear return a fresh tensor, not a view, which FSDP2's backward hook prefers)
    parts = torch.randn(2 * b * length, D_MODEL).chunk(2)

    def record(layer, q, k, h, kv):
        q = q.view(b, length, h, dim).transpose(1, 2)
        k = k.view(b, length, kv, dim).transpose(1, 2)
        layer.record(q, k, is_causal=True)

    ref = QKClip(tau=1.0)
    ref_layer = ref.add(q_full, k_full, num_heads=heads, num_kv_heads=kv_heads)
    def by_tp_rank(whole, part):  # the projection as the tp ranks compute it, slice by slice
        pieces = zip(whole.weight.chunk(tp), whole.bias.chunk(tp))
        return torch.cat([F.linear(part, w, bias) for w, bias in pieces], dim=-1)

    for part in parts:
        record(ref_layer, by_tp_rank(q_full, part), by_tp_rank(k_full, part), heads, kv_heads)
    ref.tau = float(ref_layer.max_logit.median())
    q_rows = slice(t * hl * dim, (t + 1) * hl * dim)
    k_rows = slice(t * kvl * dim, (t + 1) * kvl * dim)
    mine = slice(t * hl, (t + 1) * hl)  # this tp rank's heads

    def local_run(group):
        q, k = nn.Linear(D_MODEL, hl * dim), nn.Linear(D_MODEL, kvl * dim)
        with torch.no_grad():
            for mine, whole, rows in ((q, q_full, q_rows), (k, k_full, k_rows)):
                mine.weight.copy_(whole.weight[rows])
                mine.bias.copy_(whole.bias[rows])
        local = nn.ModuleDict({"q": q, "k": k})
        for m in (q, k):
            fully_shard(m, mesh=dp_mesh)
        clip = QKClip(tau=ref.tau, process_group=group)
        layer = clip.add(q, k, num_heads=hl, num_kv_heads=kvl)
        qx, kx = q(parts[d]), k(parts[d])
        record(layer, qx, kx, hl, kvl)
        (qx.sum() + kx.sum()).backward()  # the backward reshards the parameters
        comms, groups = _count_comms(clip.apply)
        return local, clip, layer, comms, groups

    local, clip, layer, comms, groups = local_run(dp_mesh.get_group())
    sharded = all(isinstance(p, DTensor) for p in local.parameters())
    straddling = _straddling([layer])
    mixed = local_run(None)[0]  # the whole world's group mixes the other tp rank's heads in
    ref.apply()
    whole = {
        "q.weight": q_full.weight[q_rows], "q.bias": q_full.bias[q_rows],
        "k.weight": k_full.weight[k_rows], "k.bias": k_full.bias[k_rows],
    }
    gathered = {n: U.full(p.detach()) for n, p in local.named_parameters()}
    gathered_mixed = {n: U.full(p.detach()) for n, p in mixed.named_parameters()}
    return {
        "coordinate": [d, t],
        "sharded": sharded,
        "local_rows": {n: p.to_local().shape[0] for n, p in local.named_parameters()},
        "straddling": straddling,
        "mismatched": [n for n, w in whole.items() if not torch.equal(gathered[n], w)],
        "same_maxima": torch.equal(layer.last_max_logit, ref_layer.last_max_logit[mine]),
        "gamma_equal": torch.equal(layer.last_gamma, ref_layer.last_gamma[mine]),
        "clipped": int((layer.last_gamma < 1).sum()),
        "unclipped": int((layer.last_gamma == 1).sum()),
        "comms": comms,
        "reduce_groups": groups,
        "dp_ranks": dist.get_process_group_ranks(dp_mesh.get_group()),
        "world_group_differs": any(not torch.equal(gathered_mixed[n], w) for n, w in whole.items()),
    }


class _TinyGQA(nn.Module):
    """Two causal GQA layers (9/3 and 8/2 heads of 4) with residuals, for a training run."""

    LAYERS = ((9, 3), (8, 2))

    def __init__(self, clip: QKClip, vocab=32, d=16, dim=4):
        super().__init__()
        self.dim = dim
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        self.handles = []
        for heads, kv in self.LAYERS:
            block = nn.ModuleDict(
                {
                    "q": nn.Linear(d, heads * dim, bias=False),
                    "k": nn.Linear(d, kv * dim, bias=False),
                    "v": nn.Linear(d, kv * dim, bias=False),
                    "o": nn.Linear(heads * dim, d, bias=False),
                }
            )
            with torch.no_grad():
                block["q"].weight.mul_(3.0)
            self.blocks.append(block)
            self.handles.append(clip.add(block["q"], block["k"], num_heads=heads, num_kv_heads=kv))
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        b, length, _ = x.shape
        for block, handle, (heads, kv) in zip(self.blocks, self.handles, self.LAYERS):
            q = block["q"](x).view(b, length, heads, self.dim).transpose(1, 2)
            k = block["k"](x).view(b, length, kv, self.dim).transpose(1, 2)
            v = block["v"](x).view(b, length, kv, self.dim).transpose(1, 2)
            a = handle.attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + block["o"](a.transpose(1, 2).reshape(b, length, -1))
        return self.out(x)


TRAIN_STEPS = 5
TRAIN_TAU = 2.0


def _train_batch(step: int):
    g = torch.Generator().manual_seed(U.SEED + 200 + step)
    tokens = torch.randint(0, 32, (DIST_BATCH, 8), generator=g)
    return tokens, torch.cummax(tokens, dim=1).values


def _loss(model, tokens, target):
    return F.cross_entropy(model(tokens).flatten(0, 1), target.flatten())


def _micro_batch_grads(model, tokens, target, world):
    """Sets the grads FSDP2's reduce-scatter gives ``world`` ranks: each rank's micro-batch
    gradient (the ranks' own forward and backward, here one after the other), averaged.

    Two ranks' average ``(g0 + g1) / 2`` does not depend on the reduction order and halving
    is exact, so at 2 ranks these are FSDP2's gradients bit for bit; at 3 the order of the
    sum is gloo's, and these differ by rounding. The forwards record each micro-batch's
    maxima, which fold to the MAX the ranks all-reduce.
    """
    per_rank = []
    for tk, tg in zip(_slices(tokens, world), _slices(target, world)):
        for p in model.parameters():
            p.grad = None
        _loss(model, tk, tg).backward()
        per_rank.append([p.grad for p in model.parameters()])
    for p, grads in zip(model.parameters(), zip(*per_rank)):
        p.grad = sum(grads[1:], grads[0]) / world


def _fsdp_train(rank, world, dtype):
    """MuonWithAdamW + clip.attach on FSDP2 over 5 steps vs a single process, whose grads are
    the ranks' micro-batch grads averaged (_micro_batch_grads)."""
    runs = {}
    for kind in ("ref", "fsdp"):
        torch.manual_seed(U.SEED)
        clip = QKClip(tau=TRAIN_TAU)
        model = _TinyGQA(clip).to(dtype)
        if kind == "fsdp":
            _fully_shard_children(model, world)
        # Groups by name, the same for both models.
        hidden = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
        groups = [
            {"params": hidden, "use_muon": True},
            {"params": [model.emb.weight], "use_muon": False},
        ]
        opt = MuonWithAdamW(groups, lr=0.05, adamw_lr=1e-2)
        clip.attach(opt)
        runs[kind] = (model, opt, clip)
    (ref, ref_opt, ref_clip), (model, opt, clip) = runs["ref"], runs["fsdp"]
    rel, clipped, ref_clipped, same_grads = [], [], [], []
    for step in range(TRAIN_STEPS):
        tokens, target = _train_batch(step)
        ref_opt.zero_grad(set_to_none=True)
        _micro_batch_grads(ref, tokens, target, world)
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        _loss(model, _slices(tokens, world)[rank], _slices(target, world)[rank]).backward()
        same_grads.append(
            all(
                torch.equal(U.full(p.grad), q.grad)
                for p, q in zip(model.parameters(), ref.parameters())
            )
        )
        opt.step()
        clipped.append(int(sum(int((h.last_gamma < 1).sum()) for h in clip.layers)))
        ref_clipped.append(int(sum(int((h.last_gamma < 1).sum()) for h in ref_clip.layers)))
        per_param = {
            n: float((U.full(p.detach()) - q.detach()).abs().max() / q.detach().abs().max())
            for (n, p), q in zip(model.named_parameters(), ref.parameters())
        }
        rel.append(max(per_param.values()))
    return {
        "rel_diff": rel,
        "last_by_param": per_param,
        "same_grads": same_grads,
        "clipped": clipped,
        "ref_clipped": ref_clipped,
        "straddling": _straddling(clip.layers),
    }


def fsdp_train(rank, world, tmp):
    return _fsdp_train(rank, world, torch.float32)


def fsdp_train64(rank, world, tmp):
    return _fsdp_train(rank, world, torch.float64)


SCENARIOS = {
    f.__name__: f
    for f in (replicated, fsdp_apply, tensor_parallel, fsdp_train, fsdp_train64, tp_dp)
}
TP_DP_WORLD = 4  # tp_dp needs its 2 x 2 mesh, and runs alone there


@pytest.fixture(scope="module")
def dist_results():
    """Every scenario, once per world size: {world: {scenario: [metrics of each rank]}}."""
    value = int(os.environ.get("MUON_EXT_TEST_SEED", random.randrange(2**31)))
    print(f"\n[test_qk_clip distributed] seed={value} (rerun with MUON_EXT_TEST_SEED={value})")
    only = {w: tuple(n for n in SCENARIOS if n != "tp_dp") for w in DIST_WORLDS}
    only[TP_DP_WORLD] = ("tp_dp",)
    # 9 workers at once: a longer deadline than the default, for loaded 2-core machines
    return U.run_workers(DIST_WORLDS + (TP_DP_WORLD,), SCENARIOS, value, timeout=240, only=only)


dist_worlds = pytest.mark.parametrize("world", DIST_WORLDS, ids=lambda w: f"world{w}")


@pytest.mark.distributed
@dist_worlds
def test_replicated_ranks_apply_the_max_of_their_maxima(dist_results, world):
    for m in U.rank_metrics(dist_results, world, "replicated"):
        assert m["locals_differ"] and m["reduced_is_max"] and m["identical_on_ranks"]
        assert m["clipped"] > 0 and m["unclipped"] > 0


@pytest.mark.distributed
@dist_worlds
def test_fsdp2_clip_equals_single_process_bit_for_bit(dist_results, world):
    per_rank = U.rank_metrics(dist_results, world, "fsdp_apply")
    for m in per_rank:
        assert m["sharded"]
        assert m["mismatched"] == [], m["mismatched"]
        assert m["same_maxima"]
        assert m["clipped"] > 0 and m["unclipped"] > 0
    # Heads really straddle shard boundaries, and (3 ranks) the 2-row MQA key leaves one empty.
    assert any(m["straddling"] for m in per_rank)
    if world == 3:
        assert sum(m["empty_shards"] for m in per_rank) > 0


@pytest.mark.distributed
@dist_worlds
def test_fsdp2_clip_bounds_each_head_at_min_of_before_and_tau(dist_results, world):
    for m in U.rank_metrics(dist_results, world, "fsdp_apply"):
        assert m["bound_err"] <= BOUND_RTOL, m["bound_err"]


@pytest.mark.distributed
@dist_worlds
def test_fsdp2_clip_is_one_all_reduce_and_no_gather(dist_results, world):
    for m in U.rank_metrics(dist_results, world, "fsdp_apply"):
        assert m["comms"] == {"all_reduce": 1, "dtensor_collectives": 1}, m["comms"]


@pytest.mark.distributed
@dist_worlds
def test_tensor_parallel_local_heads_reduce_over_data_parallel_group(dist_results, world):
    per_rank = U.rank_metrics(dist_results, world, "tensor_parallel")
    for m in per_rank:
        assert m["equal"] and m["gamma_equal"] and m["clipped"] > 0
    # The group matters: a MAX over the whole world mixes other ranks' heads into the factors.
    assert any(m["world_group_differs"] for m in per_rank)


@pytest.mark.distributed
def test_tensor_parallel_x_fsdp2_on_2x2_mesh_equals_single_process_bit_for_bit(dist_results):
    """4 ranks, (dp, tp) = 2 x 2: heads split over tp, each tp rank's q / k FSDP2-sharded over
    dp (a head split by the shard boundary), the maxima MAX-reduced over dp only."""
    per_rank = U.rank_metrics(dist_results, TP_DP_WORLD, "tp_dp")
    assert sorted(tuple(m["coordinate"]) for m in per_rank) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank, m in enumerate(per_rank):
        assert m["sharded"], m
        assert m["local_rows"] == (
            {"q.weight": 8, "q.bias": 8, "k.weight": 2, "k.bias": 2}
            if m["coordinate"][0] == 0
            else {"q.weight": 7, "q.bias": 7, "k.weight": 1, "k.bias": 1}
        ), m["local_rows"]
        assert sorted(m["straddling"]) == ["layer0.k", "layer0.q"], m["straddling"]
        assert m["mismatched"] == [], m["mismatched"]
        assert m["same_maxima"] and m["gamma_equal"]
        # Exactly one all-reduce per apply, over this rank's dp group (the ranks holding the
        # same heads), and nothing else: no gather of the sharded weights.
        assert m["comms"] == {"all_reduce": 1, "dtensor_collectives": 1}, m["comms"]
        assert m["reduce_groups"] == [m["dp_ranks"]], (m["reduce_groups"], m["dp_ranks"])
        assert len(m["dp_ranks"]) == 2 and rank in m["dp_ranks"]
    assert sum(m["clipped"] for m in per_rank) > 0 and sum(m["unclipped"] for m in per_rank) > 0
    # The group matters: a MAX over the whole world mixes the other tp rank's heads in.
    assert any(m["world_group_differs"] for m in per_rank)


def _check_training(per_rank, world):
    for m in per_rank:
        # The clip must act (the 3x query init puts the first step's logits far above tau;
        # later steps may fall under it, depending on the seed) and act on the same heads as in
        # the single process: a head whose maximum sits within rounding of tau could flip, so
        # the count may differ by one per step, never more.
        assert m["clipped"][0] > 0 and m["ref_clipped"][0] > 0, (m["clipped"], m["ref_clipped"])
        assert all(abs(c - r) <= 1 for c, r in zip(m["clipped"], m["ref_clipped"])), (
            m["clipped"],
            m["ref_clipped"],
        )
        # The comparison starts from the same gradients: at 2 ranks FSDP2's average of two
        # micro-batch grads is the reference's bit for bit (later steps start from params
        # that already carry the optimizer steps' rounding).
        if world == 2:
            assert m["same_grads"][0], m["same_grads"]
    assert any(m["straddling"] for m in per_rank)


@pytest.mark.distributed
@dist_worlds
def test_fsdp2_training_float64_within_1e_6_of_single_process(dist_results, world):
    """The issue's target (1e-6 relative over 5 MuonWithAdamW + QK-Clip steps of a small GQA
    model), in float64: both runs take the pure-PyTorch Muon step (the fused op has no
    float64), so what is compared is QK-Clip under FSDP2 and the distributed step's logic,
    not two fp32 implementations' rounding. Measured: bit-identical at 2 ranks; at 3 ranks
    0 to 4e-17 (the AdamW embedding, from gloo's order of the 3-rank gradient sum)."""
    per_rank = U.rank_metrics(dist_results, world, "fsdp_train64")
    _check_training(per_rank, world)
    for m in per_rank:
        assert max(m["rel_diff"]) <= 1e-6, (m["rel_diff"], m["last_by_param"])


@pytest.mark.distributed
@dist_worlds
def test_fsdp2_training_with_muon_with_adamw_matches_single_process(dist_results, world):
    per_rank = U.rank_metrics(dist_results, world, "fsdp_train")
    _check_training(per_rank, world)
    # fp32. QK-Clip adds no difference (same maxima give bit-identical rows, see above; the
    # float64 run above is bit-identical), and the distributed Muon step runs the single-process
    # step's phase ops (bit-identical given the same gradients: test_distributed.py). At 3 ranks
    # the reference's gradients differ from FSDP2's in rounding (gloo's order of a 3-term sum),
    # which Newton-Schulz amplifies in near-singular directions: 1e-5, the bound of
    # test_distributed.py, guards against real errors; the 1e-6 target is the next test.
    for m in per_rank:
        assert max(m["rel_diff"]) <= 1e-5, (m["rel_diff"], m["last_by_param"])


@pytest.mark.distributed
def test_fsdp2_training_fp32_within_1e_6_of_single_process(dist_results):
    """The issue's target in fp32, at 2 ranks, where the reference sees FSDP2's gradients bit for
    bit: met since the distributed step equals the single-process step given the same gradients
    (before that rewrite: 1.0e-6 .. 5.8e-6 over 25 seeds; QK-Clip's part is bit-identical)."""
    for m in U.rank_metrics(dist_results, 2, "fsdp_train"):
        assert max(m["rel_diff"]) <= 1e-6, (m["rel_diff"], m["last_by_param"])


@pytest.mark.parametrize(
    "size,chunks", [(9, 2), (45, 2), (32, 3), (2, 3), (0, 2), (7, 7), (5, 8)]
)
def test_chunk_range_is_torch_chunk(size, chunks):
    pieces = torch.arange(size).chunk(chunks) if size else ()
    for index in range(chunks):
        first, length = qk_clip_module._chunk_range(size, chunks, index)
        if index < len(pieces):
            assert (first, length) == (int(pieces[index][0]), len(pieces[index]))
        else:  # torch.chunk returns fewer pieces: this rank's shard is empty
            assert length == 0 and first == size


_MESHES = [
    ((2,), "S0", 45),
    ((3,), "S0", 32),
    ((3,), "S0", 2),  # one empty shard
    ((3,), "S1", 10),  # rows whole, columns sharded
    ((2, 3), "R,S0", 27),  # HSDP: replicated across the first mesh dim
    ((2, 3), "S0,S0", 27),  # nested: chunks of chunks
    ((2, 2), "S1,S0", 9),
]


@pytest.mark.parametrize(
    "mesh_shape,spec,rows", _MESHES, ids=[f"{m}-{s}-{r}" for m, s, r in _MESHES]
)
def test_dim0_local_range_matches_dtensor_on_every_rank(mesh_shape, spec, rows):
    """The helper's (offset, rows) equal DTensor's own layout and the local shard's size, for
    every rank of the mesh (a fake process group stands in for each rank in turn)."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    placements = [Replicate() if p == "R" else Shard(int(p[1])) for p in spec.split(",")]
    world = math.prod(mesh_shape)
    for rank in range(world):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", mesh_shape)
            t = distribute_tensor(torch.randn(rows, 6), mesh, placements)
            first, held = qk_clip_module._dim0_local_range(t)
            shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
            assert held == t.to_local().shape[0] == shape[0], (rank, held, shape)
            if held:
                assert first == offset[0], (rank, first, offset)
        finally:
            dist.destroy_process_group()


def test_dtensor_row_interleaved_sharding_is_refused_with_the_reason():
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.tensor import DTensor, init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        strided = DTensor.from_local(
            torch.randn(4, 4), mesh, [_StridedShard(0, split_factor=2)], run_check=False
        )
        clip = QKClip(tau=1.0)
        with pytest.raises(NotImplementedError, match="k_proj weight.*contiguous row range"):
            clip.add(torch.randn(8, 4), strided, num_heads=2)
        assert clip.layers == []
    finally:
        dist.destroy_process_group()
