"""Matrix blocks (num_heads, split_sizes, split_dim) and rms_target.

A blocked param must step exactly as its blocks would as separate params: bit for bit on the
CPU, params and momentum, for the fused step (fp32, bf16) and the pure-PyTorch one (float64).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from muon_ext import Muon, MuonWithAdamW, muon_param_groups
from muon_ext.coefficients import matrix_blocks, update_scale
from muon_ext.reference import blocks_of, muon_step_reference

# (fused, dtype): the fused CPU step in fp32 and bf16, the pure-PyTorch path in float64.
CONFIGS = [
    pytest.param(None, torch.float32, id="fused-fp32"),
    pytest.param(None, torch.bfloat16, id="fused-bf16"),
    pytest.param(False, torch.float64, id="pure-fp64"),
]
ADJUST = [None, "match_rms_adamw", "spectral_unclamped"]
STEPS = 3


def _param(t: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().to(dtype))


def _run(opt, params, grads_per_step):
    """Steps ``opt`` with the given grads (one list per step, one grad per param)."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def _mom(opt, p):
    return opt.state[p]["momentum_buffer"]


# ---------------------------------------------------------------------- bit-exact equivalences


@pytest.mark.parametrize("fused,dtype", CONFIGS)
@pytest.mark.parametrize("adjust_lr_fn", ADJUST)
def test_num_heads_equals_3d_param(fused, dtype, adjust_lr_fn):
    torch.manual_seed(0)
    H, d, C = 4, 8, 24
    w, other = torch.randn(H * d, C), torch.randn(H * 6, 16)
    grads = [(torch.randn(H * d, C), torch.randn(H * 6, 16)) for _ in range(STEPS)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn, fused=fused)

    blocked = [_param(w, dtype), _param(other, dtype)]
    stacked = [_param(w.view(H, d, C), dtype), _param(other.view(H, 6, 16), dtype)]
    opt_a = Muon(blocked, num_heads=H, **kw)
    opt_b = Muon(stacked, **kw)
    _run(opt_a, blocked, [[g.to(dtype) for g in gs] for gs in grads])
    _run(opt_b, stacked, [[g.view(s.shape).to(dtype) for g, s in zip(gs, stacked)] for gs in grads])
    for a, b in zip(blocked, stacked):
        assert torch.equal(a.detach().view(b.shape), b.detach())
        assert _mom(opt_a, a).shape == a.shape  # state stays param-shaped
        assert torch.equal(_mom(opt_a, a).view(b.shape), _mom(opt_b, b))
    if fused is None:
        (call,) = opt_a._plans[0][2]
        assert call.fused and call.shapes == sorted(
            [(H, d, C), (H, 6, 16)], key=lambda s: (min(s[1:]), max(s[1:]))
        )


def _split_equivalence(fused, dtype, adjust_lr_fn, shape, sizes, split_dim, num_heads=None):
    """The blocked param vs one separate param per matrix (3-D per block for row heads, 2-D
    per head for column heads), over STEPS steps; params and momentum reassembled."""
    torch.manual_seed(1)
    w = torch.randn(shape)
    extra = torch.randn(sizes[0], 20) if split_dim == 0 else torch.randn(20, sizes[0])
    grads = [(torch.randn(shape), torch.randn(extra.shape)) for _ in range(STEPS)]
    kw = dict(lr=0.03, weight_decay=0.05, adjust_lr_fn=adjust_lr_fn, fused=fused)
    H = num_heads or 1

    def pieces(t):
        out = []
        for block in t.split(list(sizes), split_dim):
            if split_dim == 0:
                out.append(block.reshape(H, block.size(0) // H, block.size(1)) if num_heads else block)
            else:
                out.extend(block.split(block.size(1) // H, 1))
        return [x.contiguous() for x in out]

    def whole(parts):
        if split_dim == 0:
            return torch.cat([x.reshape(-1, x.size(-1)) for x in parts], 0)
        return torch.cat(list(parts), 1)

    blocked = [_param(w, dtype), _param(extra, dtype)]
    # The extra param has no blocks of its own in the separate run: a single block there.
    separate = [_param(x, dtype) for x in pieces(w)]
    extra_sep = _param(extra, dtype)
    opt_a = Muon(
        [{"params": [blocked[0]], "split_sizes": sizes, "split_dim": split_dim,
          "num_heads": num_heads},
         {"params": [blocked[1]]}],
        **kw,
    )
    opt_b = Muon(separate + [extra_sep], **kw)
    _run(opt_a, blocked, [[g.to(dtype) for g in gs] for gs in grads])
    _run(opt_b, separate + [extra_sep],
         [pieces(gs[0].to(dtype)) + [gs[1].to(dtype)] for gs in grads])
    assert torch.equal(blocked[0].detach(), whole([p.detach() for p in separate]))
    assert torch.equal(blocked[1].detach(), extra_sep.detach())
    mom = _mom(opt_a, blocked[0])
    assert mom.shape == blocked[0].shape and mom.is_contiguous()
    assert torch.equal(mom, whole([_mom(opt_b, p) for p in separate]))
    return opt_a, blocked


@pytest.mark.parametrize("fused,dtype", CONFIGS)
@pytest.mark.parametrize("adjust_lr_fn", ADJUST)
def test_row_split_equals_separate_params(fused, dtype, adjust_lr_fn):
    _split_equivalence(fused, dtype, adjust_lr_fn, (48, 20), (32, 8, 8), 0)


@pytest.mark.parametrize("fused,dtype", CONFIGS)
@pytest.mark.parametrize("adjust_lr_fn", ADJUST)
def test_column_split_equals_separate_params(fused, dtype, adjust_lr_fn):
    # HF GPT-2 Conv1D c_attn layout: (in, 3 * out), q/k/v are column blocks.
    opt, (p, _) = _split_equivalence(fused, dtype, adjust_lr_fn, (16, 48), (16, 16, 16), 1)
    if fused is None:
        call = opt._plans[0][2][0]
        assert all(v is None for v in call.param_views)  # strided: through copies
        assert all(v is None for v in call.momentum_views)


@pytest.mark.parametrize("fused,dtype", CONFIGS)
def test_row_split_with_heads_equals_separate_3d_params(fused, dtype):
    # A fused projection cut into blocks of 32, 8, 8 rows, each block into 2 heads.
    _split_equivalence(fused, dtype, "match_rms_adamw", (48, 20), (32, 8, 8), 0, num_heads=2)


@pytest.mark.parametrize("fused,dtype", CONFIGS)
def test_column_split_with_heads_equals_separate_head_params(fused, dtype):
    _split_equivalence(fused, dtype, None, (16, 48), (24, 12, 12), 1, num_heads=3)


@pytest.mark.parametrize("fused,dtype", CONFIGS)
def test_column_heads_without_split(fused, dtype):
    _split_equivalence(fused, dtype, "match_rms_adamw", (12, 32), (32,), 1, num_heads=4)


@pytest.mark.parametrize("fused,dtype", CONFIGS[:1] + CONFIGS[2:])
def test_non_contiguous_param_with_heads(fused, dtype):
    torch.manual_seed(2)
    base = torch.randn(10, 16).to(dtype)
    p_t = nn.Parameter(base.t())  # (16, 10), strided
    twin = nn.Parameter(base.t().contiguous())
    grads = [[torch.randn(16, 10).to(dtype)] for _ in range(STEPS)]
    opt_a, opt_b = Muon([p_t], num_heads=4, fused=fused), Muon([twin], num_heads=4, fused=fused)
    _run(opt_a, [p_t], grads)
    _run(opt_b, [twin], grads)
    assert not p_t.is_contiguous()
    assert torch.equal(p_t.detach(), twin.detach())
    assert torch.equal(_mom(opt_a, p_t), _mom(opt_b, twin))


def test_row_blocks_are_views_without_copies():
    ps = [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(32, 16))]
    opt = Muon(ps, split_sizes=(16, 8, 8), num_heads=2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    # The op takes one written tensor per storage: the k-th blocks of all params form call k.
    calls = opt._plans[0][2]
    assert [c.indices for c in calls] == [[0, 1]] * 3
    assert [c.shapes for c in calls] == [[(2, 8, 16)] * 2, [(2, 4, 16)] * 2, [(2, 4, 16)] * 2]
    for call in calls:
        for i, pv, mv in zip(call.indices, call.param_views, call.momentum_views):
            p, buf = ps[i], _mom(opt, ps[i])
            assert pv is not None and pv.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            assert mv is not None and mv.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def test_workspace_bytes_counts_blocks():
    blocked = nn.Parameter(torch.randn(64, 32))
    separate = [nn.Parameter(torch.randn(16, 32)) for _ in range(4)]
    a, b = Muon([blocked], num_heads=4), Muon(separate)
    assert a.workspace_bytes() == b.workspace_bytes()
    assert a.workspace_bytes() != Muon([nn.Parameter(torch.randn(64, 32))]).workspace_bytes()


# ---------------------------------------------------------------------- reference


def test_reference_blocks_of_and_step():
    t = torch.randn(12, 30)
    views = blocks_of(t, num_heads=2, split_sizes=(6, 12, 12), split_dim=1)
    assert [tuple(v.shape) for v in views] == [(2, 12, 3), (2, 12, 6), (2, 12, 6)]
    assert all(v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for v in views)
    assert torch.equal(views[1][1], t[:, 12:18])
    assert [tuple(v.shape) for v in blocks_of(t)] == [(1, 12, 30)]
    assert [tuple(v.shape) for v in blocks_of(t, num_heads=3)] == [(3, 4, 30)]
    assert matrix_blocks((12, 30), None, (6, 24), 1)[1].start == 6

    torch.manual_seed(3)
    H, d, C = 3, 4, 10
    w, g = torch.randn(H * d, C, dtype=torch.float64), torch.randn(H * d, C, dtype=torch.float64)
    common = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, eps=1e-7,
                  ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 5)
    p_a, m_a = w.clone(), torch.zeros_like(w)
    p_b, m_b = w.clone().view(H, d, C), torch.zeros(H, d, C, dtype=torch.float64)
    scale = update_scale(d, C, "match_rms_adamw")
    muon_step_reference([p_a], [g], [m_a], update_scales=[[scale] * 1], num_heads=H, **common)
    muon_step_reference([p_b], [g.view(H, d, C)], [m_b], update_scales=[scale], **common)
    assert torch.equal(p_a.view(H, d, C), p_b) and torch.equal(m_a.view(H, d, C), m_b)


def test_fused_blocks_match_the_reference():
    torch.manual_seed(4)
    sizes = (8, 16, 8)
    w = torch.randn(12, 32)
    grads = [torch.randn(12, 32) for _ in range(STEPS)]
    p = nn.Parameter(w.clone())
    opt = Muon([p], lr=0.05, split_sizes=sizes, split_dim=1, num_heads=2,
               adjust_lr_fn="match_rms_adamw", rms_target=0.18)
    ref, mom = w.clone().double(), torch.zeros(12, 32, dtype=torch.float64)
    scales = [update_scale(v.size(1), v.size(2), "match_rms_adamw", 0.18)
              for v in blocks_of(ref, 2, sizes, 1)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
        muon_step_reference(
            [ref], [g.double()], [mom], lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.1,
            eps=1e-7, ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 5, update_scales=[scales],
            ns_dtype=torch.float32, num_heads=2, split_sizes=sizes, split_dim=1,
        )
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(_mom(opt, p).double(), mom, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- checkpoints


def _model_params(seed):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16, 48)),
            nn.Parameter(torch.randn(3, 8, 8))]


def _groups(params):
    return [
        {"params": [params[0]], "num_heads": 4},
        {"params": [params[1]], "split_sizes": (16, 16, 16), "split_dim": 1,
         "adjust_lr_fn": "match_rms_adamw", "rms_target": 0.18},
        {"params": [params[2]]},
    ]


@pytest.mark.parametrize("fused", [None, False])
def test_checkpoint_round_trip_and_resume_bit_exact(fused):
    torch.manual_seed(5)
    grads = [[torch.randn(32, 16), torch.randn(16, 48), torch.randn(3, 8, 8)] for _ in range(4)]
    params = _model_params(0)
    opt = Muon(_groups(params), fused=fused)
    _run(opt, params, grads[:2])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    _run(opt, params, grads[2:])

    buf.seek(0)
    saved = torch.load(buf)
    assert saved["opt"]["param_groups"][0]["num_heads"] == 4
    assert saved["opt"]["param_groups"][1]["split_sizes"] == (16, 16, 16)
    assert saved["opt"]["param_groups"][1]["split_dim"] == 1
    assert saved["opt"]["param_groups"][1]["rms_target"] == 0.18
    assert saved["opt"]["param_groups"][2]["num_heads"] is None
    assert saved["opt"]["param_groups"][2]["rms_target"] == 0.2
    for i, s in saved["opt"]["state"].items():
        assert s["momentum_buffer"].shape == saved["params"][i].shape
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    # Built with no block settings: they come back from the checkpoint's param_groups.
    opt2 = Muon([{"params": [p]} for p in resumed], fused=fused)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["num_heads"] == 4
    _run(opt2, resumed, grads[2:])
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(_mom(opt, a), _mom(opt2, b))


def test_checkpoint_without_block_keys_loads_as_before():
    params = _model_params(0)
    opt = Muon(params[:1])
    params[0].grad = torch.randn(32, 16)
    opt.step()
    sd = opt.state_dict()
    for key in ("num_heads", "split_sizes", "split_dim", "rms_target"):
        del sd["param_groups"][0][key]
    opt2 = Muon([nn.Parameter(params[0].detach().clone())])
    opt2.load_state_dict(sd)
    group = opt2.param_groups[0]
    assert (group["num_heads"], group["split_sizes"], group["split_dim"], group["rms_target"]) == (
        None, None, 0, 0.2
    )


def test_hybrid_checkpoint_and_keys():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    groups = muon_param_groups(model, overrides={"0.weight": {"num_heads": 4}})
    opt = MuonWithAdamW(groups, adjust_lr_fn="match_rms_adamw", rms_target=0.18)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    muon, adamw, heads = sd["param_groups"]
    assert heads["num_heads"] == 4 and heads["rms_target"] == 0.18 and muon["num_heads"] is None
    assert "num_heads" not in adamw and "rms_target" not in adamw
    opt2 = MuonWithAdamW(muon_param_groups(model, overrides={"0.weight": {"num_heads": 4}}))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[2]["num_heads"] == 4
    assert "num_heads" not in opt2.param_groups[1]


# ---------------------------------------------------------------------- the plan


def test_plan_is_rebuilt_when_num_heads_changes():
    torch.manual_seed(6)
    p = nn.Parameter(torch.randn(16, 8))
    opt = Muon([p], adjust_lr_fn="match_rms_adamw")
    g = torch.randn(16, 8)
    p.grad = g.clone()
    opt.step()
    plan = opt._plans[0]
    p.grad = g.clone()
    opt.step()
    assert opt._plans[0] is plan
    assert opt._plans[0][2][0].shapes == [(1, 16, 8)]

    opt.param_groups[0]["num_heads"] = 4
    p.grad = g.clone()
    opt.step()
    assert opt._plans[0] is not plan
    assert opt._plans[0][2][0].shapes == [(4, 4, 8)]
    assert opt._plans[0][2][0].update_scales == [update_scale(4, 8, "match_rms_adamw")]
    assert _mom(opt, p).shape == (16, 8)  # the same buffer, whatever the blocks

    plan = opt._plans[0]
    opt.param_groups[0]["split_sizes"] = (8, 8)
    p.grad = g.clone()
    opt.step()
    assert opt._plans[0] is not plan
    assert [c.shapes for c in opt._plans[0][2]] == [[(4, 2, 8)], [(4, 2, 8)]]

    plan = opt._plans[0]
    opt.param_groups[0]["rms_target"] = 0.1
    p.grad = g.clone()
    opt.step()
    assert opt._plans[0] is not plan
    assert [c.update_scales for c in opt._plans[0][2]] == [
        [update_scale(2, 8, "match_rms_adamw", 0.1)]
    ] * 2


def test_changed_num_heads_that_does_not_fit_fails_before_any_write():
    p = nn.Parameter(torch.randn(12, 8))
    q = nn.Parameter(torch.randn(8, 8))
    opt = Muon([q, p])
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.step()
    before = [p.detach().clone(), q.detach().clone()]
    opt.param_groups[0]["num_heads"] = 5
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]: num_heads=5 does not divide its 8 rows"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])


# ---------------------------------------------------------------------- rms_target


def test_rms_target_scale():
    assert update_scale(64, 256, "match_rms_adamw") == 0.2 * math.sqrt(256)
    assert update_scale(64, 256, "match_rms_adamw", 0.18) == 0.18 * math.sqrt(256)
    for fn in (None, "original", "spectral_unclamped"):
        assert update_scale(256, 64, fn, 0.18) == update_scale(256, 64, fn)

    p = nn.Parameter(torch.randn(16, 64))
    opt = Muon([p], adjust_lr_fn="match_rms_adamw", rms_target=0.18)
    assert opt.param_groups[0]["rms_target"] == 0.18 and opt.defaults["rms_target"] == 0.18
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt._plans[0][2][0].update_scales == [0.18 * 8.0]
    # Ignored by the other rules.
    opt2 = Muon([nn.Parameter(torch.randn(16, 64))], rms_target=0.18)
    opt2.param_groups[0]["params"][0].grad = torch.randn(16, 64)
    opt2.step()
    assert opt2._plans[0][2][0].update_scales == [update_scale(16, 64, None)]


def test_rms_target_pure_path_matches_reference():
    torch.manual_seed(7)
    w, g = torch.randn(8, 24, dtype=torch.float64), torch.randn(8, 24, dtype=torch.float64)
    p = nn.Parameter(w.clone())
    opt = Muon([p], lr=0.1, adjust_lr_fn="match_rms_adamw", rms_target=0.18, fused=False)
    p.grad = g.clone()
    opt.step()
    ref, mom = w.clone(), torch.zeros_like(w)
    muon_step_reference(
        [ref], [g], [mom], lr=0.1, momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-7,
        ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 5,
        update_scales=[0.18 * math.sqrt(24)], ns_dtype=torch.float32,
    )
    torch.testing.assert_close(p.detach(), ref, atol=1e-6, rtol=0)
    # and the 0.18 constant moves the update by 0.18 / 0.2 of the default's
    q = nn.Parameter(w.clone())
    opt_default = Muon([q], lr=0.1, weight_decay=0.0, adjust_lr_fn="match_rms_adamw", fused=False)
    r = nn.Parameter(w.clone())
    opt_018 = Muon([r], lr=0.1, weight_decay=0.0, adjust_lr_fn="match_rms_adamw",
                   rms_target=0.18, fused=False)
    q.grad, r.grad = g.clone(), g.clone()
    opt_default.step()
    opt_018.step()
    torch.testing.assert_close((r - w) / (q - w), torch.full_like(w, 0.9), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------- errors


def test_rows_not_divisible_names_the_parameter():
    p = nn.Parameter(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"'blk.attn.q_proj.weight'.*num_heads=4 does not divide its 10 rows"):
        Muon([{"params": [p], "param_names": ["blk.attn.q_proj.weight"], "num_heads": 4}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*num_heads=3"):
        Muon([nn.Parameter(torch.randn(8, 8))], num_heads=3)


def test_split_sizes_errors():
    p = nn.Parameter(torch.randn(12, 30))
    with pytest.raises(ValueError, match=r"split_sizes \(10, 10\) add up to 20.*30 columns"):
        Muon([{"params": [p], "param_names": ["c_attn.weight"], "split_sizes": (10, 10),
               "split_dim": 1}])
    with pytest.raises(ValueError, match=r"'c_attn.weight'.*add up to 30.*12 rows"):
        Muon([{"params": [p], "param_names": ["c_attn.weight"], "split_sizes": (10, 20)}])
    with pytest.raises(ValueError, match=r"num_heads=4 does not divide block 1 \(10 columns"):
        Muon([p], split_sizes=(12, 10, 8), split_dim=1, num_heads=4)


def test_blocks_refused_for_3d_and_conv_params():
    for shape in ((4, 8, 8), (8, 3, 3, 3)):
        with pytest.raises(ValueError, match=r"apply to 2-D parameters only"):
            Muon([nn.Parameter(torch.randn(shape))], num_heads=2)
        with pytest.raises(ValueError, match=r"apply to 2-D parameters only"):
            Muon([nn.Parameter(torch.randn(shape))], split_sizes=(4, 4))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("num_heads", 0, "num_heads must be None or an int >= 1"),
        ("num_heads", True, "num_heads must be None or an int >= 1"),
        ("num_heads", 2.0, "num_heads must be None or an int >= 1"),
        ("split_sizes", (), "split_sizes must be None or a non-empty sequence"),
        ("split_sizes", (8, 0), "split_sizes must be None or a non-empty sequence"),
        ("split_sizes", "8", "split_sizes must be None or a non-empty sequence"),
        ("split_dim", 2, "split_dim must be 0"),
        ("split_dim", True, "split_dim must be 0"),
        ("rms_target", 0.0, "rms_target must be a finite number > 0"),
        ("rms_target", -0.2, "rms_target must be a finite number > 0"),
        ("rms_target", float("nan"), "rms_target must be a finite number > 0"),
        ("rms_target", "0.2", "rms_target must be a finite number > 0"),
    ],
)
def test_bad_settings_name_the_group(key, value, message):
    p = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"^Muon: {message}"):
        Muon([p], **{key: value})
    q = nn.Parameter(torch.randn(8, 8))
    opt = Muon([p])
    with pytest.raises(ValueError, match=rf"^param_groups\[1\]: {message}"):
        opt.add_param_group({"params": [q], key: value})
    assert len(opt.param_groups) == 1
    # set on a live group: caught by the next step, before any write
    opt.param_groups[0][key] = value
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=rf"^param_groups\[0\]: {message}"):
        opt.step()
    assert torch.equal(p, before)


def test_hybrid_refuses_block_settings_on_adamw_groups():
    w, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=r"AdamW group .* Muon-only option\(s\) \['num_heads'\]"):
        MuonWithAdamW([{"params": [w], "use_muon": True},
                       {"params": [b], "use_muon": False, "num_heads": 2}])
    with pytest.raises(ValueError, match=r"Muon-only option\(s\) \['rms_target'\]"):
        MuonWithAdamW([{"params": [w], "use_muon": True},
                       {"params": [b], "use_muon": False, "rms_target": 0.18}])


def test_distributed_step_takes_blocks_and_normuon():
    # Checked at the step there (tests/test_distributed.py): only column blocks of params sharded
    # among ranks and NorMuon on expert-sharded stacks are refused, by name.
    p = nn.Parameter(torch.randn(8, 8))
    Muon([p], num_heads=2, split_sizes=(4, 4), normuon=True, distributed_mode="owner")
    MuonWithAdamW([{"params": [p], "use_muon": True, "split_sizes": (4, 4), "split_dim": 1}],
                  distributed_mode="owner")
    Muon([p], rms_target=0.18, adjust_lr_fn="match_rms_adamw", distributed_mode="owner")


# ---------------------------------------------------------------------- routing


class _Attn(nn.Module):
    def __init__(self, d=32, n_q=4, n_kv=2, head=8):
        super().__init__()
        self.q_proj = nn.Linear(d, n_q * head, bias=False)
        self.qkv = nn.Linear(d, (n_q + 2 * n_kv) * head, bias=False)
        self.o_proj = nn.Linear(n_q * head, d, bias=False)
        self.norm = nn.LayerNorm(d)


def test_muon_param_groups_overrides():
    model = nn.Sequential(_Attn(), _Attn())
    groups = muon_param_groups(
        model,
        muon_lr=0.01,
        overrides={
            "*.q_proj.weight": {"num_heads": 4},
            "*.qkv.weight": {"split_sizes": (32, 16, 16)},
        },
    )
    assert [g["use_muon"] for g in groups] == [True, False, True, True]
    assert groups[0]["param_names"] == ["0.o_proj.weight", "1.o_proj.weight"]
    assert groups[2]["param_names"] == ["0.q_proj.weight", "1.q_proj.weight"]
    assert groups[2]["num_heads"] == 4 and groups[2]["lr"] == 0.01
    assert groups[3]["param_names"] == ["0.qkv.weight", "1.qkv.weight"]
    opt = MuonWithAdamW(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = sorted(s for c in opt._plans[3][2] for s in c.shapes)
    assert shapes == [(1, 16, 32)] * 4 + [(1, 32, 32)] * 2
    assert sorted(s for c in opt._plans[2][2] for s in c.shapes) == [(4, 8, 32)] * 2


def test_muon_param_groups_override_errors():
    model = _Attn()
    with pytest.raises(ValueError, match=r"pattern '\*\.k_proj\.weight' matches no parameter"):
        muon_param_groups(model, overrides={"*.k_proj.weight": {"num_heads": 2}})
    with pytest.raises(ValueError, match=r"matches no parameter routed to Muon"):
        muon_param_groups(model, overrides={"norm.weight": {"num_heads": 2}})
    with pytest.raises(ValueError, match=r"sets \['use_muon'\]"):
        muon_param_groups(model, overrides={"q_proj.weight": {"use_muon": False}})
    with pytest.raises(TypeError, match=r"overrides must be a mapping"):
        muon_param_groups(model, overrides=[("q_proj.weight", {})])
    # settings are checked by the optimizer, naming the parameter
    groups = muon_param_groups(model, overrides={"q_proj.weight": {"num_heads": 5}})
    with pytest.raises(ValueError, match=r"'q_proj.weight'.*num_heads=5 does not divide"):
        MuonWithAdamW(groups)


def test_gpt2_style_conv1d_c_attn_column_split():
    # HF GPT-2 Conv1D stores (in, out): c_attn (d, 3d), q/k/v are column blocks.
    d = 24
    c_attn = nn.Parameter(torch.randn(d, 3 * d))
    sep = [nn.Parameter(t.contiguous().clone()) for t in c_attn.detach().split(d, 1)]
    opt = Muon([c_attn], split_sizes=(d, d, d), split_dim=1, adjust_lr_fn="match_rms_adamw")
    ref = Muon(sep, adjust_lr_fn="match_rms_adamw")
    g = torch.randn(d, 3 * d)
    c_attn.grad = g.clone()
    for s, t in zip(sep, g.split(d, 1)):
        s.grad = t.contiguous()
    opt.step()
    ref.step()
    assert torch.equal(c_attn.detach(), torch.cat([s.detach() for s in sep], 1))
