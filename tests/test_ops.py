"""The ops themselves (torch.ops.muon_ext.*): registration, opcheck, argument errors, AMP flags."""

from __future__ import annotations

import pytest
import torch

import muon_ext
from muon_ext import ops
from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale
from muon_ext.reference import muon_step_reference

COEFFS = resolve_ns_coefficients("jordan", 5)
FLAT = flat_coefficients(COEFFS)
SHAPES = [(1, 5, 9), (1, 9, 5), (3, 4, 4), (1, 1, 7), (2, 0, 3)]


def _inputs(dtype=torch.float32, shapes=SHAPES):
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    bufs = [torch.randn(s) for s in shapes]
    scales = [update_scale(s[1], s[2], None) for s in shapes]
    return params, grads, bufs, scales


def _step(params, grads, bufs, scales, lr=0.05, grad_scale=None, found_inf=None, **kw):
    args = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "eps": 1e-7}
    args.update(kw)
    ops.muon_step_(params, grads, bufs, torch.tensor(lr), args["momentum"], args["nesterov"],
                   args["weight_decay"], args["eps"], FLAT, scales, grad_scale, found_inf)


def test_build_info_and_registration():
    info = muon_ext.build_info()
    assert info["available"] and info["torch_version"] == torch.__version__.split("+")[0]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon_ext::muon_step_", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon_ext::newton_schulz", "CPU")


@pytest.mark.parametrize(
    ("built", "running", "warns"),
    [("2.14.1", "2.14.1", False), ("2.14.1", "2.14.1+cu130", False),
     ("2.13.0", "2.13.0+cpu", False), ("2.14.1", "2.15.0+cu130", True), ("2.14.1", "2.13.0+cpu", True), ("2.14.1", "2.14.0", True),
     (None, "2.14.1", False)],
)
def test_info_warns_when_running_torch_differs_from_build_torch(built, running, warns):
    from muon_ext.info import torch_mismatch_warning

    warning = torch_mismatch_warning(built, running)
    if not warns:
        assert warning is None
        return
    assert warning is not None and warning.startswith("warning:")
    assert f"built against torch {built}" in warning and f"torch {running} is running" in warning


def test_info_main_prints_the_mismatch_warning(monkeypatch, capsys):
    from muon_ext import info

    real = info.collect()
    assert info.torch_mismatch_warning(real["build"]["torch_version"], torch.__version__) is None
    fake = {**real, "build": {**real["build"], "torch_version": "1.0.0"}}
    monkeypatch.setattr(info, "collect", lambda: fake)
    info.main()
    err = capsys.readouterr().err
    assert "built against torch 1.0.0" in err and torch.__version__ in err


def test_opcheck_muon_step(seed):
    params, grads, bufs, scales = _inputs()
    args = (params, grads, bufs, torch.tensor(0.02), 0.95, True, 0.1, 1e-7, FLAT, scales)
    torch.library.opcheck(torch.ops.muon_ext.muon_step_.default, args)
    gs, fi = torch.tensor(4.0), torch.tensor(0.0)
    torch.library.opcheck(torch.ops.muon_ext.muon_step_.default, (*args, gs, fi))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_newton_schulz(seed, dtype):
    x = torch.randn(3, 7, 11).to(dtype)
    torch.library.opcheck(torch.ops.muon_ext.newton_schulz.default, (x, FLAT, 1e-7))


def test_poisoned_workspaces_do_not_leak(seed):
    """With deterministic mode, torch fills every at::empty with NaN: an element the step forgot
    to write would turn into NaN in the params."""
    params, grads, bufs, scales = _inputs(shapes=[(1, 6, 9), (2, 9, 6), (1, 13, 13), (1, 1, 4)])
    expected = [p.double() for p in params]
    ref_bufs = [b.double() for b in bufs]
    muon_step_reference(expected, [g.double() for g in grads], ref_bufs, lr=0.05, momentum=0.9,
                        nesterov=True, weight_decay=0.1, eps=1e-7, ns_coefficients=COEFFS,
                        update_scales=scales)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all(), "poisoning is not active"
        _step(params, grads, bufs, scales)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=0, atol=1e-5)


def test_found_inf_skips_everything_even_with_nan_grads(seed):
    params, grads, bufs, scales = _inputs()
    grads[0].view(-1)[0] = float("nan")
    grads[1].view(-1)[-1] = float("inf")
    before = [t.clone() for t in params + bufs]
    _step(params, grads, bufs, scales, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, params + bufs))


def test_found_inf_zero_and_grad_scale_equal_unscaled_grads(seed):
    params, grads, bufs, scales = _inputs()
    twin = [t.clone() for t in params], [t.clone() for t in bufs]
    scale = 2.0**14  # a power of two: unscaling is exact, so the two runs must agree bit for bit
    _step(params, [g * scale for g in grads], bufs, scales, grad_scale=torch.tensor(scale),
          found_inf=torch.tensor(0.0))
    _step(twin[0], grads, twin[1], scales)
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, twin[0] + twin[1]))


BAD_CALLS = [
    ("2-D param", lambda p, g, m: ([p[0][0]], [g[0][0]], [m[0][0]]), "must be a 3-D"),
    ("dtype mix", lambda p, g, m: ([p[0], p[1].double()], g[:2], m[:2]), "params\\[1\\]"),
    ("grad shape", lambda p, g, m: (p[:2], [g[1], g[0]], m[:2]), "grads\\[0\\] has shape"),
    # On CUDA the grads are read untyped through the pointer table: a bf16 grad of fp32 params
    # would be read as garbage, so the op itself must refuse it.
    ("grad dtype", lambda p, g, m: (p[:2], [g[0], g[1].bfloat16()], m[:2]),
     "grads\\[1\\] is BFloat16 but params are Float"),
    ("momentum dtype", lambda p, g, m: (p[:1], g[:1], [m[0].double()]), "momentum_buffers\\[0\\]"),
    ("length", lambda p, g, m: (p[:2], g[:1], m[:2]), "grads has 1 tensors"),
    ("alias", lambda p, g, m: ([p[0], p[0]], [g[0], g[0]], [m[0], m[0].clone()]), "share storage"),
    # SHAPES[0] is (1, 5, 9) and SHAPES[1] (1, 9, 5): one buffer viewed as both.
    ("momentum alias", lambda p, g, m: (p[:2], g[:2], [m[0], m[0].view(1, 9, 5)]),
     "momentum_buffers\\[1\\] and momentum_buffers\\[0\\]"),
    ("grad is param", lambda p, g, m: (p[:1], [p[0]], m[:1]), "grads\\[0\\] and params\\[0\\]"),
    ("non-contiguous", lambda p, g, m: ([p[2].transpose(1, 2)], g[2:3], m[2:3]), "contiguous"),
]


@pytest.mark.parametrize("name,make,match", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_op_arguments_are_named_and_change_nothing(name, make, match):
    params, grads, bufs, _ = _inputs()
    before = [t.clone() for t in params + bufs]
    ps, gs, ms = make(params, grads, bufs)
    with pytest.raises(RuntimeError, match=match):
        _step(ps, gs, ms, [1.0] * len(ps))
    assert all(torch.equal(a, b) for a, b in zip(before, params + bufs))


@pytest.mark.parametrize(
    "kw,match",
    [({"momentum": 1.0}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"),
     ({"eps": float("nan")}, "eps")],
    ids=["momentum", "weight_decay", "eps"],
)
def test_bad_op_scalars_are_named(kw, match):
    params, grads, bufs, scales = _inputs()
    with pytest.raises(RuntimeError, match=match):
        _step(params, grads, bufs, scales, **kw)


def test_bad_coefficients_and_lr_are_named():
    params, grads, bufs, scales = _inputs()
    with pytest.raises(RuntimeError, match="ns_coefficients"):
        torch.ops.muon_ext.muon_step_(params, grads, bufs, torch.tensor(0.1), 0.9, True, 0.0, 1e-7,
                                      FLAT[:4], scales, None, None)
    with pytest.raises(RuntimeError, match="lr must have exactly one element"):
        torch.ops.muon_ext.muon_step_(params, grads, bufs, torch.ones(2), 0.9, True, 0.0, 1e-7,
                                      FLAT, scales, None, None)
    with pytest.raises(RuntimeError, match="update_scales"):
        torch.ops.muon_ext.muon_step_(params, grads, bufs, torch.tensor(0.1), 0.9, True, 0.0, 1e-7,
                                      FLAT, scales[:1], None, None)
    with pytest.raises(RuntimeError, match="newton_schulz: x must be a 3-D"):
        ops.newton_schulz(torch.randn(4, 4), FLAT)


def test_nan_grads_without_found_inf_propagate_like_the_reference(seed):
    """No silent skip: NaN grads (without GradScaler's found_inf) give NaN params, as in torch."""
    params, grads, bufs, scales = _inputs(shapes=[(1, 5, 9), (1, 6, 6)])
    grads[0].view(-1)[3] = float("nan")
    _step(params, grads, bufs, scales)
    assert torch.isnan(params[0]).all() and torch.isfinite(params[1]).all()
    ref = [torch.randn(5, 9, dtype=torch.float64)]
    g = torch.randn(5, 9, dtype=torch.float64)
    g[0, 3] = float("nan")
    muon_step_reference(ref, [g], [torch.zeros_like(g)], lr=0.05, momentum=0.9, nesterov=True,
                        weight_decay=0.1, eps=1e-7, ns_coefficients=COEFFS, update_scales=[1.0])
    assert torch.isnan(ref[0]).all()
