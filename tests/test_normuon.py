"""NorMuon (normuon=True): a per-row second moment after Newton-Schulz.

The oracle here is written from the formula alone (NOTE: [NorMuon] in csrc/muon_step_args.h),
matrix by matrix in float64, sharing nothing with muon_ext.reference but Newton-Schulz itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from muon_ext import Muon, MuonWithAdamW, ops
from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale
from muon_ext.optim import NORMUON_STATE_KEY
from muon_ext.reference import (
    blocks_of,
    muon_step_reference,
    normuon_rows,
    orthogonalize,
)

from .conftest import assert_within_ratio, max_abs_err, ulp

LR, WD, BETA, BETA2, NU_EPS, EPS = 0.02, 0.1, 0.95, 0.95, 1e-8, 1e-7
SCHEDULE = resolve_ns_coefficients((3.4445, -4.775, 2.0315), 5)
STEPS = 4
# wide, tall, a 3-D expert stack and a tall stack; rows of each grad scaled over 4 decades so
# that the per-row second moments differ by 8 decades (what NorMuon is for).
SHAPES = {"wide": (24, 72), "tall": (72, 24), "stack": (3, 16, 40), "tall_stack": (2, 40, 16)}


def _oracle_normuon(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One matrix (rows, cols), float64, straight from the formula; updates v (rows,)."""
    rows, cols = o.shape
    out = torch.empty_like(o)
    for i in range(rows):
        v[i] = BETA2 * v[i] + (1 - BETA2) * sum(float(x) ** 2 for x in o[i]) / cols
        out[i] = o[i] / (v[i].sqrt() + NU_EPS)
    fro_o, fro_hat = o.norm(), out.norm()
    return out * (fro_o / fro_hat) if fro_hat > 0 else torch.zeros_like(o)


def _oracle(params0, grads, update_norms=None):
    """float64 Muon + NorMuon trajectory: momentum, NS in float64, the formula above.
    ``update_norms`` (a list): gets each param's sum over the steps of ||lr scale X||_F."""
    ps = [p.double().clone() for p in params0]
    if update_norms is not None:
        update_norms[:] = [0.0] * len(ps)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros(normuon_rows(p.shape), dtype=torch.float64) for p in ps]
    for step_grads in grads:
        for k_param, (p, m, v, g) in enumerate(zip(ps, ms, vs, step_grads)):
            g = g.double()
            m.lerp_(g, 1 - BETA)
            u = g.lerp(m, BETA)
            x = orthogonalize(u.reshape(-1, *u.shape[-2:]), SCHEDULE, EPS, torch.float64)
            rows = x.size(1)
            for k in range(x.size(0)):
                x[k] = _oracle_normuon(x[k], v[k * rows : (k + 1) * rows])
            scale = update_scale(p.shape[-2], p.shape[-1], None)
            p.mul_(1 - LR * WD).sub_(LR * scale * x.reshape(p.shape))
            if update_norms is not None:
                update_norms[k_param] += LR * scale * x.norm().item()
    return ps, vs


def _make(dtype, seed_shift=0):
    params0, grads = [], []
    for shape in SHAPES.values():
        params0.append(torch.randn(shape).to(dtype))
    for _ in range(STEPS):
        step = []
        for shape in SHAPES.values():
            row_scale = torch.logspace(-3, 1, shape[-2]).view(-1, 1)
            step.append((torch.randn(shape) * row_scale).to(dtype))
        grads.append(step)
    return params0, grads


def _run(params0, grads, **kw):
    params = [nn.Parameter(p.clone()) for p in params0]
    opt = Muon(params, lr=LR, weight_decay=WD, momentum=BETA, normuon=True, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_reference_matches_the_formula_oracle(seed):
    params0, grads = _make(torch.float64)
    oracle, oracle_v = _oracle(params0, grads)
    ps = [p.clone() for p in params0]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros(normuon_rows(p.shape), dtype=torch.float64) for p in ps]
    scales = [update_scale(p.shape[-2], p.shape[-1], None) for p in ps]
    for step_grads in grads:
        muon_step_reference(
            ps, step_grads, ms, lr=LR, momentum=BETA, nesterov=True, weight_decay=WD, eps=EPS,
            ns_coefficients=SCHEDULE, update_scales=scales, normuon_buffers=vs,
            normuon_beta2=BETA2, normuon_eps=NU_EPS,
        )
    for p, o, v, ov in zip(ps, oracle, vs, oracle_v):
        # Both float64 end to end: only the summation order differs.
        torch.testing.assert_close(p, o, atol=1e-12, rtol=0)
        torch.testing.assert_close(v, ov, atol=0, rtol=1e-12)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "pure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_trajectory_matches_float64_oracle(seed, fused, dtype):
    params0, grads = _make(dtype)
    params, opt = _run(params0, grads, fused=fused)
    if fused is None:
        assert all(c.fused for c in opt._plans[0][2])
    oracle, oracle_v = _oracle(params0, grads)
    # The reference implementation in the step's precision (fp32 elementwise and NS, params
    # rounded to their dtype once per step) sets the bound (DESIGN.md numerics contract).
    same = [p.clone() for p in params0]
    ms = [torch.zeros(p.shape) for p in same]
    vs = [torch.zeros(normuon_rows(p.shape)) for p in same]
    scales = [update_scale(p.shape[-2], p.shape[-1], None) for p in same]
    for step_grads in grads:
        muon_step_reference(
            same, step_grads, ms, lr=LR, momentum=BETA, nesterov=True, weight_decay=WD,
            eps=EPS, ns_coefficients=SCHEDULE, update_scales=scales, compute_dtype=torch.float32,
            ns_dtype=torch.float32, normuon_buffers=vs, normuon_beta2=BETA2, normuon_eps=NU_EPS,
        )
    for name, p, o, s, v, ov, sv in zip(SHAPES, params, oracle, same, [
        opt.state[p][NORMUON_STATE_KEY] for p in params
    ], oracle_v, vs):
        atol = 4 * ulp(dtype) * max(1.0, o.abs().max().item())
        assert_within_ratio(max_abs_err(p.detach(), o), max_abs_err(s, o), atol, f"param {name}")
        assert v.dtype == torch.float32 and v.shape == ov.shape
        # v normwise, as the params (DESIGN.md numerics contract), plus a few fp32 ulps for its
        # storage. Entry by entry the small rows' errors are fp32 Newton-Schulz cross-talk from
        # the large rows, a different random draw in each fp32 implementation.
        rel = ((v.double() - ov).norm() / ov.norm()).item()
        rel_ref = ((sv.double() - ov).norm() / ov.norm()).item()
        assert_within_ratio(rel, rel_ref, 8 * ulp(torch.float32), f"v of {name}")


def test_normuon_changes_the_update_and_keeps_its_norm(seed):
    """Sanity of the effect: rows get equal RMS-like weight, the Frobenius norm is kept."""
    g = torch.randn(1, 16, 48) * torch.logspace(-3, 1, 16).view(1, -1, 1)
    x = orthogonalize(g, SCHEDULE, EPS, torch.float64)
    v = torch.zeros(1, 16, dtype=torch.float64)
    from muon_ext.reference import normuon_

    y = normuon_(x, v, 0.0, NU_EPS)  # beta2 = 0: v is this step's row mean square
    torch.testing.assert_close(y.norm(), x.norm(), atol=0, rtol=1e-12)
    # Every row gets the same RMS, up to eps: row i's RMS is f r_i / (r_i + eps), r_i that of X.
    row_rms, x_rms = y.square().mean(-1).sqrt(), x.square().mean(-1).sqrt()
    assert (row_rms.max() / row_rms.min()).item() <= 1 + 2 * NU_EPS / x_rms.min().item()
    assert not torch.allclose(y, x)


def test_off_by_default_and_numerics_unchanged(seed):
    params0, grads = _make(torch.float32)
    a = [nn.Parameter(p.clone()) for p in params0]
    b = [nn.Parameter(p.clone()) for p in params0]
    opt_a, opt_b = Muon(a, lr=LR), Muon(b, lr=LR, normuon=False)
    assert opt_a.param_groups[0]["normuon"] is False
    for step_grads in grads[:2]:
        for p, q, g in zip(a, b, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert NORMUON_STATE_KEY not in opt_a.state[p]


def _step_pair(opt_a, opt_b, pa, pb, grads_a, grads_b):
    for p, g in zip(pa, grads_a):
        p.grad = g.clone()
    for p, g in zip(pb, grads_b):
        p.grad = g.clone()
    opt_a.step()
    opt_b.step()


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "pure"])
def test_num_heads_equals_3d_stack(seed, fused):
    H, d, C = 4, 6, 40
    w = torch.randn(H * d, C)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.view(H, d, C).clone())
    opt_a = Muon([a], lr=LR, normuon=True, num_heads=H, fused=fused)
    opt_b = Muon([b], lr=LR, normuon=True, fused=fused)
    for _ in range(3):
        g = torch.randn(H * d, C) * torch.logspace(-2, 1, H * d).view(-1, 1)
        _step_pair(opt_a, opt_b, [a], [b], [g], [g.view(H, d, C)])
        assert torch.equal(a.detach().view(H, d, C), b.detach())
        assert torch.equal(opt_a.state[a][NORMUON_STATE_KEY], opt_b.state[b][NORMUON_STATE_KEY])
    assert opt_a.state[a][NORMUON_STATE_KEY].shape == (H * d,)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "pure"])
@pytest.mark.parametrize("split_dim", [0, 1], ids=["rows", "cols"])
def test_split_sizes_equals_separate_params(seed, fused, split_dim):
    sizes = (8, 4, 12)
    other = 20
    shape = (sum(sizes), other) if split_dim == 0 else (other, sum(sizes))
    w = torch.randn(shape)
    whole = nn.Parameter(w.clone())
    parts = [nn.Parameter(t.clone()) for t in w.split(sizes, dim=split_dim)]
    opt_a = Muon([whole], lr=LR, normuon=True, split_sizes=sizes, split_dim=split_dim, fused=fused)
    opt_b = Muon(parts, lr=LR, normuon=True, fused=fused)
    for _ in range(3):
        g = torch.randn(shape) * torch.logspace(-2, 1, shape[0]).view(-1, 1)
        _step_pair(opt_a, opt_b, [whole], parts, [g], list(g.split(sizes, dim=split_dim)))
        assert torch.equal(whole.detach(), torch.cat([p.detach() for p in parts], dim=split_dim))
        v_parts = torch.cat([opt_b.state[p][NORMUON_STATE_KEY] for p in parts])
        assert torch.equal(opt_a.state[whole][NORMUON_STATE_KEY], v_parts)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "pure"])
def test_checkpoint_round_trip_and_resume_bit_exact(seed, fused):
    params0, grads = _make(torch.bfloat16)
    straight, opt = _run(params0, grads, fused=fused)
    half, opt_half = _run(params0, grads[:2], fused=fused)
    sd = opt_half.state_dict()
    resumed = [nn.Parameter(p.detach().clone()) for p in half]
    opt_r = Muon(resumed, lr=LR, weight_decay=WD, momentum=BETA, normuon=True, fused=fused)
    opt_r.load_state_dict(sd)
    for p in resumed:
        v = opt_r.state[p][NORMUON_STATE_KEY]
        assert v.dtype == torch.float32  # not cast to the bf16 param dtype
    assert opt_r.param_groups[0]["normuon"] is True
    for step_grads in grads[2:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt_r.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p][NORMUON_STATE_KEY], opt_r.state[q][NORMUON_STATE_KEY])


def test_muon_with_adamw_takes_normuon():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    from muon_ext import muon_param_groups

    opt = MuonWithAdamW(muon_param_groups(model), normuon=True, normuon_beta2=0.9)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    adamw_group = next(g for g in opt.param_groups if not g["use_muon"])
    assert muon_group["normuon_beta2"] == 0.9 and "normuon" not in adamw_group
    w = model[0].weight
    assert opt.state[w][NORMUON_STATE_KEY].shape == (32,)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"normuon": 1}, "normuon must be a bool"),
        ({"normuon": True, "normuon_beta2": 1.0}, "normuon_beta2 must be a number in"),
        ({"normuon": True, "normuon_beta2": -0.1}, "normuon_beta2 must be a number in"),
        ({"normuon": True, "normuon_eps": 0.0}, "normuon_eps must be a finite number > 0"),
        ({"normuon": True, "normuon_eps": float("nan")}, "normuon_eps must be"),
    ],
)
def test_bad_settings_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        Muon([nn.Parameter(torch.randn(4, 4))], **kw)
    opt = Muon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: " + match):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], **kw})
    assert len(opt.param_groups) == 1


def test_state_of_other_blocking_is_refused_by_name(seed):
    p = nn.Parameter(torch.randn(12, 20))
    opt = Muon([p], lr=LR, normuon=True)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    opt2 = Muon([q], lr=LR, normuon=True)
    opt2.load_state_dict(sd)  # the groups come from the checkpoint: change the blocking after
    opt2.param_groups[0].update(split_sizes=(10, 10), split_dim=1)  # 2 x 12 rows
    before = q.detach().clone()
    q.grad = torch.randn_like(q)
    with pytest.raises(RuntimeError, match=r"normuon_v of parameter .* expected \(24,\)"):
        opt2.step()
    assert torch.equal(q.detach(), before)


# ---------------------------------------------------------------------- the op itself


def _op_args(shapes, dtype=torch.float32):
    ps = [torch.randn(s).to(dtype) for s in shapes]
    gs = [torch.randn(s).to(dtype) * torch.logspace(-2, 1, s[1]).view(1, -1, 1).to(dtype)
          for s in shapes]
    ms = [torch.zeros(s) for s in shapes]
    vs = [torch.zeros(s[0], s[1]) for s in shapes]
    return ps, gs, ms, vs


def _op_step(ps, gs, ms, vs, **kw):
    ops.muon_step_(
        ps, gs, ms, torch.tensor(LR), BETA, True, WD, EPS, flat_coefficients(SCHEDULE),
        [1.0] * len(ps), normuon_buffers=vs, **kw,
    )


def test_op_chunking_does_not_change_results(seed):
    shapes = [(3, 16, 40), (2, 40, 16), (1, 16, 40)]
    a = _op_args(shapes)
    b = [[t.clone() for t in ts] for ts in a]
    for _ in range(2):
        _op_step(*a)
        _op_step(*b, workspace_limit=1)  # one matrix per chunk
    for x, y in zip(a[0] + a[3], b[0] + b[3]):
        assert torch.equal(x, y)


def test_op_found_inf_leaves_v_alone(seed):
    ps, gs, ms, vs = _op_args([(1, 8, 12)])
    _op_step(ps, gs, ms, vs)
    v0, p0 = vs[0].clone(), ps[0].clone()
    _op_step(ps, gs, ms, vs, found_inf=torch.tensor(1.0))
    assert torch.equal(vs[0], v0) and torch.equal(ps[0], p0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda vs: [vs[0].view(-1)], r"normuon_buffers\[0\] has shape"),
        (lambda vs: [vs[0].double()], r"normuon_buffers\[0\] must be float32"),
        (lambda vs: vs + vs, "normuon_buffers has 2 tensors but params has 1"),
        (lambda vs: [vs[0].t().contiguous().t()] if vs[0].size(0) > 1 else None, "contiguous"),
    ],
)
def test_op_bad_buffers_are_refused_before_any_write(seed, bad, match):
    ps, gs, ms, vs = _op_args([(2, 8, 12)])
    vs_bad = bad(vs)
    p0 = ps[0].clone()
    with pytest.raises(RuntimeError, match=match):
        _op_step(ps, gs, ms, vs_bad)
    assert torch.equal(ps[0], p0) and not ms[0].any()


def test_op_refuses_bad_beta2_and_eps_and_aliasing(seed):
    ps, gs, ms, vs = _op_args([(1, 8, 12)])
    with pytest.raises(RuntimeError, match="normuon_beta2 must be in"):
        _op_step(ps, gs, ms, vs, normuon_beta2=1.0)
    with pytest.raises(RuntimeError, match="normuon_eps must be a finite number > 0"):
        _op_step(ps, gs, ms, vs, normuon_eps=0.0)
    alias = [ms[0].view(-1)[: 8].view(1, 8)]
    with pytest.raises(RuntimeError, match="share storage"):
        _op_step(ps, gs, ms, alias)


def test_blocks_of_and_state_layout():
    assert normuon_rows((24, 40)) == 24
    assert normuon_rows((3, 16, 40)) == 48
    assert normuon_rows((8, 3, 3, 3)) == 8
    assert normuon_rows((24, 40), num_heads=4) == 24
    assert normuon_rows((24, 40), split_sizes=(10, 30), split_dim=1) == 48
    assert normuon_rows((24, 40), num_heads=2, split_sizes=(10, 30), split_dim=1) == 96
    t = torch.randn(24, 40)
    assert sum(v.size(0) * v.size(1) for v in blocks_of(t, 2, (10, 30), 1)) == 96


def test_op_workspace_bytes_counts_normuon():
    """CPU: NorMuon's row multipliers (n floats per matrix of the largest chunk) are counted only
    when asked for; the optimizer asks when its group has normuon=True."""
    probes = [torch.empty(()).expand(3, 16, 40), torch.empty(()).expand(2, 40, 16)]
    plain = ops.muon_step_workspace_bytes(probes)
    assert ops.muon_step_workspace_bytes(probes, -1, "standard", normuon=False) == plain
    assert ops.muon_step_workspace_bytes(probes, -1, "standard", normuon=True) == plain + 5 * 40 * 4
    params = [nn.Parameter(torch.randn(3, 16, 40)), nn.Parameter(torch.randn(2, 40, 16))]
    assert Muon(params, normuon=True).workspace_bytes() == plain + 5 * 40 * 4
    assert Muon(params).workspace_bytes() == plain


# ---------------------------------------------------------------------- the CUDA fused step
# NorMuon on the CUDA kernels (NOTE: [NorMuon on CUDA] in csrc/cuda/kernels/elementwise.cu):
# Newton-Schulz in bf16, so the ratio rule's yardstick is the bf16 reference implementation
# (muon_step_reference with ns_dtype=bfloat16, fp32 elementwise, on the same GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_trajectory_matches_float64_oracle(seed, dtype):
    params0, grads = _make(dtype)
    cuda_grads = [[g.cuda() for g in step] for step in grads]
    params, opt = _run([p.cuda() for p in params0], cuda_grads, fused=True)
    assert all(c.fused for c in opt._plans[0][2])
    update_norms: list[float] = []
    oracle, oracle_v = _oracle(params0, grads, update_norms)
    same = [p.cuda() for p in params0]
    ms = [torch.zeros(p.shape, device="cuda") for p in same]
    vs = [torch.zeros(normuon_rows(p.shape), device="cuda") for p in same]
    scales = [update_scale(p.shape[-2], p.shape[-1], None) for p in same]
    for step_grads in cuda_grads:
        muon_step_reference(
            same, step_grads, ms, lr=LR, momentum=BETA, nesterov=True, weight_decay=WD,
            eps=EPS, ns_coefficients=SCHEDULE, update_scales=scales, compute_dtype=torch.float32,
            ns_dtype=torch.bfloat16, normuon_buffers=vs, normuon_beta2=BETA2,
            normuon_eps=NU_EPS,
        )
    for name, p, o, s, v, ov, sv, un in zip(SHAPES, params, oracle, same, [
        opt.state[p][NORMUON_STATE_KEY] for p in params
    ], oracle_v, vs, update_norms):
        p, s, v, sv = p.detach().cpu(), s.cpu(), v.cpu(), sv.cpu()
        assert torch.isfinite(p).all() and torch.isfinite(v).all(), name
        # Normwise, as in tests/test_cuda_step.py, per step: one ulp of the param dtype at the
        # param's magnitude (the final rounding may land on either neighbour), and half a bf16
        # ulp (2^-9) of the update (X is rounded to bf16 by both, near-ties either way).
        atol = STEPS * ulp(dtype) * o.norm().item() + 2.0**-9 * un
        err = (p.double() - o).norm().item()
        err_ref = (s.double() - o).norm().item()
        assert_within_ratio(err, err_ref, atol, f"param {name}")
        assert v.dtype == torch.float32 and v.shape == ov.shape
        # v normwise: a few fp32 ulps for its storage, and 2^-8 relative for the same near-ties
        # (q_i is quadratic in X).
        rel = ((v.double() - ov).norm() / ov.norm()).item()
        rel_ref = ((sv.double() - ov).norm() / ov.norm()).item()
        assert_within_ratio(rel, rel_ref, 8 * ulp(torch.float32) + 2.0**-8, f"v of {name}")


@pytest.mark.cuda
def test_cuda_op_chunking_found_inf_and_determinism(seed):
    shapes = [(3, 16, 40), (2, 40, 16), (1, 16, 40), (1, 300, 70)]
    a = [[t.cuda() for t in ts] for ts in _op_args(shapes)]
    b = [[t.clone() for t in ts] for ts in a]
    c = [[t.clone() for t in ts] for ts in a]
    for _ in range(2):
        _op_step(*a)
        _op_step(*b, workspace_limit=1)  # one matrix per chunk: boundaries inside the stacks
        _op_step(*c)
    for x, y, z in zip(a[0] + a[3], b[0] + b[3], c[0] + c[3]):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a[3])
    ps, gs, ms, vs = a
    p0, m0, v0 = [t.clone() for t in ps], [t.clone() for t in ms], [t.clone() for t in vs]
    gs[0].view(-1)[0] = float("inf")
    _op_step(ps, gs, ms, vs, found_inf=torch.ones((), device="cuda"))  # read on the device
    for x, y in zip(ps + ms + vs, p0 + m0 + v0):
        assert torch.equal(x, y)


@pytest.mark.cuda
def test_cuda_workspace_bytes_counts_normuon():
    probes = [torch.empty((), device="cuda").expand(3, 16, 40),
              torch.empty((), device="cuda").expand(2, 40, 16)]
    plain = ops.muon_step_workspace_bytes(probes)
    # One region of n floats per matrix, 256-byte aligned: 5 * 40 * 4 = 800 -> 1024 bytes.
    assert ops.muon_step_workspace_bytes(probes, normuon=True) == plain + 1024
    params = [nn.Parameter(torch.randn(3, 16, 40, device="cuda")),
              nn.Parameter(torch.randn(2, 40, 16, device="cuda"))]
    assert Muon(params, normuon=True).workspace_bytes() == plain + 1024


def test_distributed_normuon_fallback_matches_the_op_and_honours_found_inf():
    """The distributed step's NorMuon off the CPU op (CUDA, the pure-PyTorch route) is the ATen
    formula: it agrees with muon_normuon_ and leaves x and v alone when found_inf is set."""
    from muon_ext import distributed as mdist

    shapes = [2, 5, 3, 1, 4, 7]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2 * 5 * 3 + 4 * 7, generator=gen)
    vs = [torch.rand(10, generator=gen), torch.rand(4, generator=gen)]
    sc = mdist._Scalars(beta=0.9, nesterov=True, eps=1e-7, weight_decay=0.0, flat=[], schedule=[],
                        ns_algorithm="standard", gram_restarts=[], workspace_limit=-1,
                        ns_dtype="bfloat16", lr=0.1,
                        grad_scale=None, found_inf=torch.tensor(1.0), normuon=True,
                        normuon_beta2=0.9, normuon_eps=1e-6)
    x1, v1 = x.clone(), [v.clone() for v in vs]
    mdist._normuon("reference", x1, shapes, v1, sc)
    assert torch.equal(x1, x) and all(torch.equal(a, b) for a, b in zip(v1, vs))
    sc.found_inf = torch.tensor(0.0)
    mdist._normuon("reference", x1, shapes, v1, sc)
    x2, v2 = x.clone(), [v.clone() for v in vs]
    ops.muon_normuon_(x2, shapes, v2, 0.9, 1e-6)
    torch.testing.assert_close(x1, x2, rtol=1e-6, atol=1e-7)
    for a, b in zip(v1, v2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
