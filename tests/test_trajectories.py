"""K-step trajectories of params and momentum: muon_ext.Muon against the float64 reference and
against torch.optim.Muon, for every dtype, Nesterov setting, scale rule and awkward shape."""

from __future__ import annotations

import pytest
import torch

from muon_ext import Muon
from muon_ext.coefficients import matrix_shape, resolve_ns_coefficients, update_scale
from muon_ext.reference import muon_step_reference

from .conftest import assert_within_ratio, max_abs_err, ulp

# Awkward on purpose: row/column vectors, primes, tall and wide, expert stacks, convs, empty.
SHAPES = {
    "1xN": (1, 37),
    "Nx1": (29, 1),
    "prime_wide": (13, 31),
    "prime_tall": (31, 13),
    "square": (24, 24),
    "stack3d": (3, 17, 11),
    "conv4d": (8, 3, 3, 3),
    "empty": (0, 16),
    "empty_stack": (2, 0, 5),
}
HYPER = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "eps": 1e-7}
STEPS = 4


def _make(shapes, dtype):
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(STEPS)]
    return params, grads


def _oracle(params0, grads, *, nesterov, adjust_lr_fn, compute_dtype, ns_dtype, param_dtype):
    """The reference trajectory: float64 everything, or the same-precision reference implementation
    (params kept in their dtype, elementwise and NS in ``compute_dtype``/``ns_dtype``)."""
    store = compute_dtype if param_dtype is None else param_dtype
    params = [p.to(store).clone() for p in params0]
    bufs = [torch.zeros_like(p, dtype=compute_dtype) for p in params]
    scales = [update_scale(*matrix_shape(p.shape)[1:], adjust_lr_fn) for p in params]
    for step_grads in grads:
        muon_step_reference(
            params, [g.to(store) for g in step_grads], bufs, nesterov=nesterov,
            ns_coefficients=resolve_ns_coefficients("jordan", 5), update_scales=scales,
            compute_dtype=compute_dtype, ns_dtype=ns_dtype, **HYPER,
        )
    return params, bufs


def _run_muon(params0, grads, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = Muon(params, **HYPER, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params], opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw", "spectral_unclamped"])
def test_fused_matches_float64_reference(seed, dtype, nesterov, adjust_lr_fn):
    shapes = list(SHAPES.values())
    params0, grads = _make(shapes, dtype)
    ours, our_bufs, opt = _run_muon(params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    assert all(call.fused for call in opt._plans[0][2]), "the fused CPU step was not used"
    oracle, oracle_bufs = _oracle(
        params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
        compute_dtype=torch.float64, ns_dtype=torch.float64, param_dtype=None,
    )
    same_precision, _ = _oracle(
        params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
        compute_dtype=torch.float32, ns_dtype=torch.float32, param_dtype=dtype,
    )
    for name, p, o, s in zip(SHAPES, ours, oracle, same_precision):
        # atol: a few ulps of the param dtype at the param's magnitude: each step rounds the param
        # once, and a different summation order can land on the other side of a rounding boundary.
        atol = 4 * ulp(dtype) * max(1.0, o.abs().max().item() if o.numel() else 1.0)
        assert_within_ratio(max_abs_err(p, o), max_abs_err(s, o), atol, f"param {name}")
    for name, m, o in zip(SHAPES, our_bufs, oracle_bufs):
        assert m.dtype == torch.float32
        # Momentum is an fp32 EMA of grads that are exact in every dtype: fp32 rounding only.
        torch.testing.assert_close(m.double(), o, rtol=1e-5, atol=1e-6, msg=f"momentum {name}")


def test_several_param_groups_use_their_own_hyperparameters(seed):
    a0, b0 = torch.randn(16, 8), torch.randn(8, 20)
    ga, gb = torch.randn(16, 8), torch.randn(8, 20)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = Muon([{"params": [a]}, {"params": [b], "lr": 0.1, "nesterov": False,
                                  "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0}],
               lr=0.01, weight_decay=0.2)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    for p0, g, p, kw in [
        (a0, ga, a, {"lr": 0.01, "weight_decay": 0.2, "nesterov": True, "fn": None}),
        (b0, gb, b, {"lr": 0.1, "weight_decay": 0.0, "nesterov": False, "fn": "match_rms_adamw"}),
    ]:
        ref = [p0.double().clone()]
        muon_step_reference(
            ref, [g.double()], [torch.zeros_like(ref[0])], lr=kw["lr"], momentum=0.95,
            nesterov=kw["nesterov"], weight_decay=kw["weight_decay"], eps=1e-7,
            ns_coefficients=resolve_ns_coefficients("jordan", 5),
            update_scales=[update_scale(*p0.shape, kw["fn"])],
        )
        torch.testing.assert_close(p.detach().double(), ref[0], rtol=0, atol=1e-5)


def test_float64_params_use_the_pure_pytorch_path(seed):
    params0, grads = _make([(12, 7), (5, 9)], torch.float64)
    ours, bufs, opt = _run_muon(params0, grads)
    assert not any(call.fused for call in opt._plans[0][2])
    assert all(b.dtype == torch.float64 for b in bufs)
    oracle, _ = _oracle(params0, grads, nesterov=True, adjust_lr_fn=None,
                        compute_dtype=torch.float64, ns_dtype=torch.float64, param_dtype=None)
    for p, o in zip(ours, oracle):
        # NS runs in fp32 on CPU in this path: fp32-level agreement.
        torch.testing.assert_close(p, o, rtol=0, atol=1e-5)


def test_unfused_path_matches_fused_path(seed):
    params0, grads = _make([(12, 7), (2, 5, 9), (4, 2, 3, 3)], torch.float32)
    fused, fused_bufs, _ = _run_muon(params0, grads, fused=True)
    loop, loop_bufs, _ = _run_muon(params0, grads, fused=False)
    for a, b in zip(fused + fused_bufs, loop + loop_bufs):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon absent")


@torch_muon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw", "spectral_unclamped"])
def test_matches_torch_optim_muon(seed, dtype, nesterov, adjust_lr_fn):
    # torch.optim.Muon takes only 2-D params; it orthogonalizes in bf16, we in fp32 on CPU.
    shapes = [(1, 37), (29, 1), (13, 31), (31, 13), (24, 24)]
    params0, grads = _make(shapes, dtype)
    ours, our_bufs, _ = _run_muon(params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    theirs = [torch.nn.Parameter(p.clone()) for p in params0]
    topt = torch.optim.Muon(theirs, **HYPER, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    for step_grads in grads:
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        topt.step()
    oracle, _ = _oracle(
        params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
        compute_dtype=torch.float64, ns_dtype=torch.float64, param_dtype=None,
    )
    for shape, p, t, o in zip(shapes, ours, theirs, oracle):
        t_err = max_abs_err(t.detach(), o)
        atol = 4 * ulp(dtype) * o.abs().max().item()
        # Same update as torch: we are never worse than torch against the oracle (2x slack for
        # the rounding of the bf16 params)...
        assert_within_ratio(max_abs_err(p, o), t_err, atol, f"param {shape} vs oracle")
        # ...and we agree with torch to within torch's own error.
        assert_within_ratio(max_abs_err(p, t.detach()), t_err, atol, f"param {shape} vs torch")
    if dtype == torch.bfloat16 and not nesterov:
        return  # torch's own buffer is renormalized there (see the regression test below)
    for p, t in zip(theirs, our_bufs):
        tb = topt.state[p]["momentum_buffer"]
        torch.testing.assert_close(t.to(tb.dtype), tb, rtol=0, atol=ulp(tb.dtype) * 4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_bf16_plain_momentum_is_not_renormalized(seed, fused):
    """Regression: torch <= 2.14 with bf16 params and nesterov=False divides the momentum buffer by
    its norm in place (the bf16 cast aliases it). Ours must hold the plain EMA of the grads."""
    p = torch.nn.Parameter(torch.randn(6, 10).to(torch.bfloat16))
    opt = Muon([p], nesterov=False, momentum=0.9, fused=fused)
    g1, g2 = torch.randn(6, 10).to(torch.bfloat16), torch.randn(6, 10).to(torch.bfloat16)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    expected = (0.1 * 0.9) * g1.float() + 0.1 * g2.float()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=1e-6, atol=1e-6)
