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


def _oracle(params0, grads, *, nesterov, adjust_lr_fn, compute_dtype, ns_dtype, param_dtype,
            scale_fn=None, hyper=HYPER):
    """The reference trajectory: float64 everything, or the same-precision reference implementation
    (params kept in their dtype, elementwise and NS in ``compute_dtype``/``ns_dtype``).
    ``scale_fn(shape, adjust_lr_fn)`` gives the lr factors (default: ours, ``update_scale``)."""
    store = compute_dtype if param_dtype is None else param_dtype
    params = [p.to(store).clone() for p in params0]
    bufs = [torch.zeros_like(p, dtype=compute_dtype) for p in params]
    if scale_fn is None:
        scales = [update_scale(*matrix_shape(p.shape)[1:], adjust_lr_fn) for p in params]
    else:
        scales = [scale_fn(p.shape, adjust_lr_fn) for p in params]
    for step_grads in grads:
        muon_step_reference(
            params, [g.to(store) for g in step_grads], bufs, nesterov=nesterov,
            ns_coefficients=resolve_ns_coefficients("jordan", 5), update_scales=scales,
            compute_dtype=compute_dtype, ns_dtype=ns_dtype, **hyper,
        )
    return params, bufs


def _torch_scale(shape, adjust_lr_fn):
    """torch.optim.Muon's own lr factor (its ``_adjust_lr``), independent of ``update_scale``."""
    from torch.optim._muon import _adjust_lr

    return _adjust_lr(1.0, adjust_lr_fn, torch.Size(shape))


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


def _torch_knows_adjust_lr_fn(adjust_lr_fn) -> bool:
    """Whether this torch's torch.optim.Muon accepts ``adjust_lr_fn`` (2.13 rejects
    "spectral_unclamped": its _adjust_lr gives it a factor of 1)."""
    if not hasattr(torch.optim, "Muon"):
        return False
    try:
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn=adjust_lr_fn)
    except ValueError:
        return False
    return True


def _skip_unless_torch_knows(adjust_lr_fn) -> None:
    if not _torch_knows_adjust_lr_fn(adjust_lr_fn):
        pytest.skip(f"torch {torch.__version__}'s torch.optim.Muon has no "
                    f"adjust_lr_fn={adjust_lr_fn!r} to compare against")


@torch_muon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw", "spectral_unclamped"])
def test_matches_torch_optim_muon(seed, dtype, nesterov, adjust_lr_fn):
    _skip_unless_torch_knows(adjust_lr_fn)
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
    # The oracle takes torch's own lr factors (torch.optim._muon._adjust_lr), not ours: a wrong
    # scale rule in update_scale cannot hide in an oracle that shares it.
    oracle, _ = _oracle(
        params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
        compute_dtype=torch.float64, ns_dtype=torch.float64, param_dtype=None,
        scale_fn=_torch_scale,
    )
    # What orthogonalizing in bf16 (as torch does) costs, from the reference implementation with
    # bf16 NS: the bound for ours vs torch, measured without torch's result.
    bf16_ns, _ = _oracle(
        params0, grads, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
        compute_dtype=torch.float32, ns_dtype=torch.bfloat16, param_dtype=dtype,
        scale_fn=_torch_scale,
    )
    # torch <= 2.14 with bf16 params and nesterov=False renormalizes its momentum buffer in place
    # (ANCHORS.md; test_bf16_plain_momentum_is_not_renormalized): its params then drift from
    # the algorithm by more than bf16 orthogonalization explains, so only the oracle bound holds.
    torch_renormalizes_buffer = dtype == torch.bfloat16 and not nesterov
    gap_sq = bf16_sq = 0.0
    atol_model = 0.0
    for shape, p, t, o, b in zip(shapes, ours, theirs, oracle, bf16_ns):
        t_err = max_abs_err(t.detach(), o)
        atol = 4 * ulp(dtype) * o.abs().max().item()
        atol_model = max(atol_model, atol)
        # Same update as torch: we are never worse than torch against the oracle (2x slack for
        # the rounding of the bf16 params)...
        assert_within_ratio(max_abs_err(p, o), t_err, atol, f"param {shape} vs oracle")
        gap_sq += float((p.double() - t.detach().double()).square().sum())
        bf16_sq += float((b.double() - o.double()).square().sum())
    # ...and, over the whole model, we differ from torch by no more than bf16 orthogonalization
    # explains (ours is fp32 NS, torch's bf16): the bf16 reference's error, measured without
    # torch, with 2x for rounding order. Over the whole model, not per param: two independent
    # bf16 errors of a 29-element vector can differ by more than 2x, their model-wide norms not.
    if not torch_renormalizes_buffer:  # torch's trajectory follows its bug there
        numel = sum(o.numel() for o in oracle)
        assert_within_ratio(
            gap_sq**0.5, bf16_sq**0.5, atol_model * numel**0.5, "all params vs torch (Frobenius)"
        )
    if torch_renormalizes_buffer:
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


@torch_muon
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral_unclamped"])
def test_scale_rules_match_torchs_own(adjust_lr_fn):
    """update_scale against torch.optim.Muon's _adjust_lr itself, tall, wide and square."""
    _skip_unless_torch_knows(adjust_lr_fn)
    for shape in [(31, 13), (13, 31), (24, 24), (1, 37), (29, 1), (768, 3072)]:
        ours = update_scale(*shape, adjust_lr_fn)
        assert ours == pytest.approx(_torch_scale(shape, adjust_lr_fn), rel=1e-12), shape


# Above the CPU step's 32K-element blocks (kBlock = 1 << 15): one matrix spans several blocks of
# every per-matrix reduction (the norm) and elementwise pass; a stack spans them per matrix.
LARGE_SHAPES = {"two_blocks": (181, 367), "tall_blocks": (367, 181), "stack_blocks": (2, 190, 180)}


@pytest.mark.parametrize("grad_scale", [1.0, 1e-9], ids=["unit", "tiny"])
def test_large_and_tiny_matrices_match_float64_reference(seed, grad_scale):
    """Matrices above 32K elements, and grads of norm below eps (1e-9 x randn: ||G|| ~ 3e-7 for
    the largest, ~1e-8 for the small ones), where max(||U||, eps) and ||U|| + eps differ by O(1)."""
    shapes = [*LARGE_SHAPES.values(), (13, 31), (24, 24)]
    params0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * grad_scale for s in shapes] for _ in range(2)]
    ours, our_bufs, opt = _run_muon(params0, grads)
    assert all(call.fused for call in opt._plans[0][2])
    kw = {"nesterov": True, "adjust_lr_fn": None}
    oracle, oracle_bufs = _oracle(params0, grads, compute_dtype=torch.float64,
                                  ns_dtype=torch.float64, param_dtype=None, **kw)
    same, _ = _oracle(params0, grads, compute_dtype=torch.float32, ns_dtype=torch.float32,
                      param_dtype=torch.float32, **kw)
    for shape, p, o, s, m, ob in zip(shapes, ours, oracle, same, our_bufs, oracle_bufs):
        atol = 4 * ulp(torch.float32) * max(1.0, o.abs().max().item())
        assert_within_ratio(max_abs_err(p, o), max_abs_err(s, o), atol, f"param {shape}")
        torch.testing.assert_close(m.double(), ob, rtol=1e-5, atol=1e-6 * grad_scale,
                                   msg=f"momentum {shape}")


def _run_changing(params0, grads, first, second, change_at):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = Muon(params, **HYPER, **first)
    for k, step_grads in enumerate(grads):
        if k == change_at:
            for group in opt.param_groups:
                group.update(second)
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    ("first", "second"),
    [({"adjust_lr_fn": None}, {"adjust_lr_fn": "match_rms_adamw"}),
     ({"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "spectral_unclamped"}),
     ({"fused": True}, {"fused": False}), ({"fused": False}, {"fused": True})],
    ids=["original->rms", "rms->spectral", "fused->loop", "loop->fused"],
)
def test_changing_group_options_between_steps_matches_a_fresh_optimizer(seed, first, second):
    """The plan cache must follow adjust_lr_fn and fused: after the change the step is the one a
    fresh optimizer with the new options takes from the same params and momentum."""
    shapes = [(13, 31), (31, 13), (2, 5, 9)]
    params0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    changed, opt = _run_changing(params0, grads, first, second, change_at=1)
    # Fresh: step 1 with the first options, then a new optimizer with the second for step 2.
    fresh, fopt = _run_changing(params0, grads[:1], first, first, change_at=-1)
    fresh_opt = Muon(fresh, **HYPER, **{**first, **second})
    fresh_opt.load_state_dict(fopt.state_dict())
    for group in fresh_opt.param_groups:
        group.update(second)
    for p, g in zip(fresh, grads[1]):
        p.grad = g.clone()
    fresh_opt.step()
    # Fused and loop steps agree to fp32 rounding, so the path taken is compared as well.
    assert [c.fused for c in opt._plans[0][2]] == [c.fused for c in fresh_opt._plans[0][2]]
    for a, b in zip(changed, fresh):
        # fused and loop agree to 2e-6 (test_unfused_path_matches_fused_path); same path: exact.
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-6)


@torch_muon
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_bf16_checkpoints_move_both_ways_with_torch(seed, direction):
    """torch.optim.Muon keeps bf16 momentum for bf16 params; ours float32. A checkpoint of either
    loads into the other, and the next steps match a run that never left torch / ours."""
    shapes = [(13, 31), (31, 13)]
    params0 = [torch.randn(s).bfloat16() for s in shapes]
    grads = [[torch.randn(s).bfloat16() for s in shapes] for _ in range(3)]
    src_cls, dst_cls = (torch.optim.Muon, Muon) if direction == "torch_to_ours" else (Muon, torch.optim.Muon)

    def steps(cls, params, step_grads, state=None):
        opt = cls(params, **HYPER)
        if state is not None:
            opt.load_state_dict(state)
        for gs in step_grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return opt

    src = [torch.nn.Parameter(p.clone()) for p in params0]
    saved = steps(src_cls, src, grads[:1]).state_dict()
    dst = [torch.nn.Parameter(p.detach().clone()) for p in src]
    dst_opt = steps(dst_cls, dst, grads[1:], state=saved)
    if dst_cls is Muon:
        assert all(dst_opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in dst)
    # Continuing in the destination class from its own first step: the loaded momentum (bf16 ->
    # fp32 exact; fp32 -> bf16 one rounding) may differ by one bf16 rounding of the buffer.
    ref = [torch.nn.Parameter(p.clone()) for p in params0]
    steps(dst_cls, ref, grads)
    for p, r in zip(dst, ref):
        # Two steps of lr * scale * X with |X| <= ~1: a buffer rounding perturbs X by ~ulp(bf16),
        # plus the param's own bf16 rounding at its magnitude.
        atol = 2 * ulp(torch.bfloat16) * max(1.0, r.detach().abs().max().item()) * 2
        torch.testing.assert_close(p.detach().float(), r.detach().float(), rtol=0, atol=atol)
