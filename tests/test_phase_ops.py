"""The step's phases as ops of their own (NOTE: [Phase ops] in csrc/muon_step_args.h).

The distributed driver runs muon_momentum_ -> (collective) -> muon_orthogonalize_ ->
(collective) -> muon_update_, packing with muon_copy_blocks_. These ops must compute exactly
what the one-call muon_step_ computes, so the composition is compared to it bit for bit; the
step itself is compared to the float64 reference elsewhere (tests/test_ops.py).
"""

from __future__ import annotations

import pytest
import torch

from muon_ext import ops
from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale

FLAT = flat_coefficients(resolve_ns_coefficients("jordan", 5))
# Tall, wide, square, 3-D stacks, a 1xN and an Nx1, an empty one, and a 48x48 (> 2048
# elements: several reduction blocks would need a larger one; 200x200 covers kBlock = 32768).
SHAPES = [(1, 5, 9), (1, 9, 5), (3, 4, 4), (1, 1, 7), (1, 7, 1), (2, 0, 3), (4, 6, 11),
          (1, 200, 200)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(shapes, dtype, device):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    bufs = [torch.randn(s, device=device) for s in shapes]
    scales = [update_scale(s[1], s[2], None) for s in shapes]
    return params, grads, bufs, scales


def _flat_shapes(shapes):
    return [v for s in shapes for v in s]


def _phases(params, grads, bufs, scales, shapes, lr, *, nesterov=True, grad_scale=None,
            found_inf=None, limit=-1):
    device = params[0].device
    out = torch.full((sum(g.numel() for g in grads),), float("nan"), device=device)
    ops.muon_momentum_(grads, bufs, 0.9, nesterov, grad_scale, found_inf, out)
    ops.muon_orthogonalize_(out, _flat_shapes(shapes), FLAT, 1e-7, workspace_limit=limit)
    ops.muon_update_(params, out, lr, 0.1, scales, found_inf)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_phases_compose_to_the_fused_step_bit_for_bit(seed, device, dtype, nesterov):
    params, grads, bufs, scales = _inputs(SHAPES, dtype, device)
    p2, b2 = [p.clone() for p in params], [b.clone() for b in bufs]
    lr = torch.tensor(0.05, dtype=torch.float64)
    gs = torch.tensor(2.0)
    ops.muon_step_(p2, grads, b2, lr, 0.9, nesterov, 0.1, 1e-7, FLAT, scales, gs)
    # The phases take grads of any shape: flattened ones (as the distributed shards are).
    _phases(params, [g.reshape(-1) for g in grads], bufs, scales, SHAPES, lr,
            nesterov=nesterov, grad_scale=gs)
    for a, b in zip(params + bufs, p2 + b2):
        assert torch.equal(a, b)
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normuon_between_the_phases_is_the_fused_normuon_step(seed, dtype):
    """muon_normuon_ (CPU) between orthogonalize and update writes muon_step_'s NorMuon floats,
    params and v; with found_inf set it changes nothing."""
    params, grads, bufs, scales = _inputs(SHAPES, dtype, "cpu")
    vs = [torch.rand(s[0], s[1]) for s in SHAPES]
    p2, b2, v2 = [p.clone() for p in params], [b.clone() for b in bufs], [v.clone() for v in vs]
    lr = torch.tensor(0.05, dtype=torch.float64)
    ops.muon_step_(p2, grads, b2, lr, 0.9, True, 0.1, 1e-7, FLAT, scales,
                   normuon_buffers=v2, normuon_beta2=0.9, normuon_eps=1e-6)
    out = torch.empty(sum(g.numel() for g in grads))
    ops.muon_momentum_(grads, bufs, 0.9, True, None, None, out)
    ops.muon_orthogonalize_(out, _flat_shapes(SHAPES), FLAT, 1e-7)
    before = [v.clone() for v in vs]
    x = out.clone()
    ops.muon_normuon_(x, _flat_shapes(SHAPES), vs, 0.9, 1e-6, torch.tensor(1.0))
    assert torch.equal(x, out) and all(torch.equal(a, b) for a, b in zip(vs, before))
    ops.muon_normuon_(out, _flat_shapes(SHAPES), vs, 0.9, 1e-6)
    ops.muon_update_(params, out, lr, 0.1, scales)
    for a, b in zip(params + bufs + vs, p2 + b2 + v2):
        assert torch.equal(a, b)


def test_phase_ops_take_disjoint_views_of_one_storage(seed):
    """Row blocks of one param may share a momentum / update call (the distributed step's
    blocks); overlapping views may not."""
    p, g, m = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    p2, m2 = p.clone(), m.clone()
    out, whole = torch.empty(24), torch.empty(24)
    ops.muon_momentum_([g[:2], g[2:]], [m[:2], m[2:]], 0.9, True, None, None, out)
    ops.muon_momentum_([g], [m2], 0.9, True, None, None, whole)
    assert torch.equal(out, whole) and torch.equal(m, m2)
    lr = torch.tensor(0.1)
    ops.muon_update_([p[:2], p[2:]], out, lr, 0.1, [1.0, 2.0])
    ops.muon_update_([p2[:2]], out[:8], lr, 0.1, [1.0])
    ops.muon_update_([p2[2:]], out[8:], lr, 0.1, [2.0])
    assert torch.equal(p, p2)
    with pytest.raises(RuntimeError, match="share storage"):
        ops.muon_update_([p[:3], p[2:]], torch.empty(28), lr, 0.1, [1.0, 1.0])


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonalize_in_chunks_is_bit_identical(seed, device):
    shapes = [(5, 9, 7), (3, 7, 9), (1, 64, 32)]
    x = torch.randn(sum(a * b * c for a, b, c in shapes), device=device)
    one, many = x.clone(), x.clone()
    ops.muon_orthogonalize_(one, _flat_shapes(shapes), FLAT, 1e-7)
    ops.muon_orthogonalize_(many, _flat_shapes(shapes), FLAT, 1e-7, workspace_limit=1)
    assert torch.equal(one, many)
    assert not torch.equal(one, x)


def test_orthogonalize_matches_the_newton_schulz_op(seed):
    x = torch.randn(3, 7, 11)
    flat = x.reshape(-1).clone()
    ops.muon_orthogonalize_(flat, [3, 7, 11], FLAT, 1e-7, ns_algorithm="gram")
    assert torch.equal(flat.view(3, 7, 11), ops.newton_schulz(x, FLAT, 1e-7, "gram"))


def test_found_inf_changes_nothing(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32, "cpu")
    before = [t.clone() for t in params + bufs]
    _phases(params, grads, bufs, scales, SHAPES, torch.tensor(0.05), found_inf=torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, before))


def test_zero_grads_and_momentum_give_a_zero_update(seed):
    shapes = [(1, 5, 9), (2, 4, 4)]
    params, _, _, scales = _inputs(shapes, torch.float32, "cpu")
    grads = [torch.zeros(s) for s in shapes]
    bufs = [torch.zeros(s) for s in shapes]
    before = [p.clone() for p in params]
    out = _phases(params, grads, bufs, scales, shapes, torch.tensor(0.05))
    assert torch.equal(out, torch.zeros_like(out))
    for p, b in zip(params, before):
        assert torch.equal(p, b * (1 - 0.05 * 0.1))


def test_copy_blocks_moves_strided_blocks(seed):
    whole = torch.randn(6, 10)
    # Row shards (as FSDP2's Shard(0)) and column shards (Shard(1)) packed one after the other.
    rows = whole[2:5].reshape(-1)
    cols = whole[:, 3:7].reshape(-1)
    packed = torch.cat([rows, cols])
    dst = torch.full((120,), float("nan"))
    ops.muon_copy_blocks_(packed, dst, [0, 10, 20, 10, 3, 10,  # rows 2-4 of matrix 0
                                        30, 4, 60 + 3, 10, 6, 4])  # columns 3-6 of matrix 1
    assert torch.equal(dst[20:50], whole[2:5].reshape(-1))
    assert torch.equal(dst[60:].view(6, 10)[:, 3:7], whole[:, 3:7])
    assert dst[:20].isnan().all() and dst[50:60].isnan().all()
    back = torch.empty_like(packed)
    ops.muon_copy_blocks_(dst, back, [20, 10, 0, 10, 3, 10, 63, 10, 30, 4, 6, 4])
    assert torch.equal(back, packed)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: ops.muon_copy_blocks_(t["a"], t["b"], [0, 1, 0, 1, 1]), "6-tuples"),
        (lambda t: ops.muon_copy_blocks_(t["a"], t["b"], [0, 5, 0, 5, 4, 4]), "beyond"),
        (lambda t: ops.muon_copy_blocks_(t["a"], t["b"], [0, 2, 0, 4, 2, 4]), "stride"),
        (lambda t: ops.muon_copy_blocks_(t["a"], t["a"], [0, 4, 0, 4, 1, 4]), "share storage"),
        (lambda t: ops.muon_copy_blocks_(t["a"], t["b"].double(), []), "src is Float"),
        (lambda t: ops.muon_momentum_([t["g"]], [t["m"]], 1.0, True), "momentum must be"),
        (lambda t: ops.muon_momentum_([t["g"]], [t["m"].view(-1)[:5]], 0.9, True), "has 12 elements"),
        (lambda t: ops.muon_momentum_([t["g"]], [t["m"].double()], 0.9, True),
         "momentum_buffers\\[0\\] must be float32"),
        (lambda t: ops.muon_momentum_([t["g"]], [t["m"]], 0.9, True, out=torch.empty(11)),
         "out has 11 elements"),
        (lambda t: ops.muon_momentum_([t["g"]], [t["m"]], 0.9, True, out=t["m"].view(-1)),
         "share storage"),
        (lambda t: ops.muon_orthogonalize_(t["a"], [1, 3, 3], FLAT), "describe 9 elements"),
        (lambda t: ops.muon_orthogonalize_(t["a"], [1, 4], FLAT), "triples"),
        (lambda t: ops.muon_orthogonalize_(t["a"].double(), [1, 4, 4], FLAT), "float32"),
        (lambda t: ops.muon_orthogonalize_(t["a"], [1, 4, 4], FLAT, ns_algorithm="x"),
         "ns_algorithm"),
        (lambda t: ops.muon_update_([t["p"]], t["a"][:5], torch.tensor(0.1), 0.0, [1.0]),
         "x has 5 elements"),
        (lambda t: ops.muon_update_([t["p"]], t["a"][:12], torch.tensor(0.1), 0.0, []),
         "update_scales has 0"),
        (lambda t: ops.muon_update_([t["p"]], t["p"].view(-1), torch.tensor(0.1), 0.0, [1.0]),
         "share storage"),
        (lambda t: ops.muon_update_([t["p"]], t["a"][:12], torch.ones(2), 0.0, [1.0]),
         "lr must be a 1-element"),
        (lambda t: ops.muon_normuon_(t["a"][:12], [1, 3, 4], [torch.zeros(4)]), "has 4 elements"),
        (lambda t: ops.muon_normuon_(t["a"][:12], [1, 3, 4], []), "normuon_v has 0"),
        (lambda t: ops.muon_normuon_(t["a"][:12], [1, 3, 4], [t["a"][10:13]]), "share storage"),
        (lambda t: ops.muon_normuon_(t["a"][:12], [1, 3, 4], [torch.zeros(3)], 1.0),
         "normuon_beta2"),
    ],
)
def test_bad_arguments_are_named_and_change_nothing(call, match):
    t = {"a": torch.randn(16), "b": torch.randn(16), "g": torch.randn(3, 4), "m": torch.randn(3, 4),
         "p": torch.randn(3, 4)}
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(RuntimeError, match=match):
        call(t)
    assert all(torch.equal(t[k], before[k]) for k in t)


def test_injected_failure_leaves_x_unchanged(seed, monkeypatch):
    x = torch.randn(2 * 5 * 9)
    before = x.clone()
    monkeypatch.setenv("MUON_EXT_TEST_FAIL_BEFORE_WRITE", "1")
    with pytest.raises(RuntimeError, match="failure injected"):
        ops.muon_orthogonalize_(x, [2, 5, 9], FLAT)
    assert torch.equal(x, before)


def test_opcheck_phase_ops(seed):
    shapes = [(1, 5, 9), (2, 4, 4)]
    params, grads, bufs, scales = _inputs(shapes, torch.float32, "cpu")
    out = torch.empty(sum(g.numel() for g in grads))
    torch.library.opcheck(torch.ops.muon_ext.muon_momentum_.default,
                          (grads, bufs, 0.9, True, torch.tensor(2.0), torch.tensor(0.0), out))
    torch.library.opcheck(torch.ops.muon_ext.muon_orthogonalize_.default,
                          (out, _flat_shapes(shapes), FLAT, 1e-7))
    torch.library.opcheck(torch.ops.muon_ext.muon_update_.default,
                          (params, out, torch.tensor(0.05), 0.1, scales))
    torch.library.opcheck(torch.ops.muon_ext.muon_copy_blocks_.default,
                          (out, torch.empty(8), [0, 9, 0, 4, 2, 4]))
    torch.library.opcheck(torch.ops.muon_ext.muon_normuon_.default,
                          (out, _flat_shapes(shapes), [torch.zeros(5), torch.zeros(8)], 0.95, 1e-8))
