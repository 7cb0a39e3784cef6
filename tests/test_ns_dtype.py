"""``ns_dtype``: the element type the CUDA step's Newton-Schulz iterates in (bf16 or fp16).

NOTE: [Newton-Schulz dtype] in csrc/muon_step_args.h. On CPU the step iterates in fp32 whatever
``ns_dtype`` says, so the CPU tests check the plumbing: validation with errors naming the group
or the argument, dtype objects stored by name, checkpoints (older ones load as "bfloat16"),
MuonWithAdamW, the ops' trailing argument, and that the CPU result does not depend on it. The
CUDA tests (``@pytest.mark.cuda``) hold fp16 and bf16 to the float64 standard reference under
the ratio rule of DESIGN.md, standard and Gram, and run a loss-scaled (65536) fp16 grad.
"""

from __future__ import annotations

import pytest
import torch

from muon_ext import Muon, MuonWithAdamW, ops
from muon_ext._extension import extension_available
from muon_ext.coefficients import (
    NS_DTYPE_CHOICES,
    flat_coefficients,
    resolve_ns_coefficients,
    resolve_ns_dtype,
)
from muon_ext.reference import orthogonalize, orthogonalize_packed_, resolve_gram_restarts

from .test_gram_ns import INPUTS, _rel

pytestmark = pytest.mark.skipif(not extension_available(), reason="needs the compiled extension")

JORDAN5 = resolve_ns_coefficients("jordan", 5)
FLAT = flat_coefficients(JORDAN5)


# ---------------------------------------------------------------------- the option (CPU)


def test_resolve_ns_dtype_accepts_names_and_dtypes():
    assert NS_DTYPE_CHOICES == ("bfloat16", "float16")
    assert resolve_ns_dtype("bfloat16") == "bfloat16"
    assert resolve_ns_dtype(torch.float16) == "float16"
    assert resolve_ns_dtype(torch.bfloat16) == "bfloat16"
    for bad in ("fp16", "half", "float32", torch.float32, None, 16):
        with pytest.raises(ValueError, match="ns_dtype"):
            resolve_ns_dtype(bad)


def test_option_is_validated_with_the_group_named():
    p = [torch.nn.Parameter(torch.randn(16, 48))]
    for bad in ("fp16", "", torch.float32, None):
        with pytest.raises(ValueError, match=r"Muon: ns_dtype"):
            Muon(p, ns_dtype=bad)
    opt = Muon(p)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: ns_dtype"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 8))],
                             "ns_dtype": "float64"})
    assert len(opt.param_groups) == 1  # a rejected group leaves the optimizer as it was
    with pytest.raises(ValueError, match=r"MuonWithAdamW: ns_dtype"):
        MuonWithAdamW([{"params": p, "use_muon": True}], ns_dtype="int8")


def test_dtype_objects_are_stored_by_name_and_checkpointed():
    p = [torch.nn.Parameter(torch.randn(16, 48))]
    opt = Muon(p, ns_dtype=torch.float16)
    assert opt.param_groups[0]["ns_dtype"] == "float16"
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 8))],
                         "ns_dtype": torch.bfloat16})
    assert opt.param_groups[1]["ns_dtype"] == "bfloat16"
    for q in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
        q.grad = torch.randn_like(q)
    opt.step()
    sd = opt.state_dict()
    assert [g["ns_dtype"] for g in sd["param_groups"]] == ["float16", "bfloat16"]

    other = Muon([torch.nn.Parameter(torch.randn(16, 48))])
    other.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 8))]})
    other.load_state_dict(sd)
    assert [g["ns_dtype"] for g in other.param_groups] == ["float16", "bfloat16"]

    # A checkpoint from before the option (or torch.optim.Muon's) loads as bf16.
    old = {"state": {}, "param_groups": [dict(sd["param_groups"][0])]}
    del old["param_groups"][0]["ns_dtype"]
    fresh = Muon([torch.nn.Parameter(torch.randn(16, 48))], ns_dtype="float16")
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["ns_dtype"] == "bfloat16"


def test_muon_with_adamw_takes_the_option():
    hybrid = MuonWithAdamW(
        [{"params": [torch.nn.Parameter(torch.randn(16, 48))], "use_muon": True},
         {"params": [torch.nn.Parameter(torch.randn(8))], "use_muon": False}],
        ns_dtype=torch.float16,
    )
    assert hybrid.param_groups[0]["ns_dtype"] == "float16"
    assert hybrid.defaults["ns_dtype"] == "float16"
    for g in hybrid.param_groups:
        for q in g["params"]:
            q.grad = torch.randn_like(q)
    hybrid.step()
    assert hybrid.state_dict()["param_groups"][0]["ns_dtype"] == "float16"


def _trajectory(ns_dtype, fused=True, steps=3):
    torch.manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in ((24, 96), (96, 24), (2, 16, 40))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    opt = Muon(params, lr=0.02, ns_dtype=ns_dtype, ns_algorithm="gram", fused=fused)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_iterates_in_fp32_whatever_ns_dtype_says(fused):
    """NOTE: [fp32 Newton-Schulz on CPU]: fp16 and bf16 give the same bits on CPU."""
    for a, b in zip(_trajectory("bfloat16", fused), _trajectory("float16", fused)):
        assert torch.equal(a, b)


def test_ops_take_and_check_the_trailing_argument():
    x = torch.randn(2, 12, 40)
    ref = ops.newton_schulz(x, FLAT, 1e-7, "gram", [2])
    for name in ("float16", torch.float16, "bfloat16"):
        assert torch.equal(ops.newton_schulz(x, FLAT, 1e-7, "gram", [2], ns_dtype=name), ref)
    with pytest.raises(RuntimeError, match="ns_dtype must be 'bfloat16' or 'float16'"):
        ops.newton_schulz(x, FLAT, 1e-7, "gram", [2], ns_dtype="fp16")
    with pytest.raises(RuntimeError, match="ns_dtype"):
        torch.ops.muon_ext.muon_orthogonalize_(
            x.reshape(-1).clone(), [2, 12, 40], FLAT, 1e-7, "standard", [2], -1, "half"
        )
    with pytest.raises(RuntimeError, match="ns_dtype"):
        ops.muon_step_workspace_bytes([x], -1, "standard", False, "float32")
    probes = [torch.empty(()).expand(1, 64, 256)]
    assert ops.muon_step_workspace_bytes(probes, -1, "gram", False, "float16") == (
        ops.muon_step_workspace_bytes(probes, -1, "gram", False, "bfloat16")
    )
    # muon_step_ rejects a bad ns_dtype before touching anything.
    p, g, m = torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.zeros(1, 8, 16)
    before = p.clone()
    with pytest.raises(RuntimeError, match="ns_dtype"):
        ops.muon_step_([p], [g], [m], torch.tensor(0.02), 0.95, True, 0.0, 1e-7, FLAT, [1.0],
                       ns_dtype="float8")
    assert torch.equal(p, before) and not m.any()
    # The packed x of the orthogonalize op, in place; fp32 either way on CPU.
    a, b = x.reshape(-1).clone(), x.reshape(-1).clone()
    ops.muon_orthogonalize_(a, [2, 12, 40], FLAT, 1e-7, ns_dtype="bfloat16")
    ops.muon_orthogonalize_(b, [2, 12, 40], FLAT, 1e-7, ns_dtype=torch.float16)
    assert torch.equal(a, b)


def test_pure_pytorch_packed_orthogonalize_takes_ns_dtype():
    x = torch.randn(2 * 12 * 40)
    a, b = x.clone(), x.clone()
    orthogonalize_packed_(a, [2, 12, 40], JORDAN5, 1e-7, "standard", None, "bfloat16")
    orthogonalize_packed_(b, [2, 12, 40], JORDAN5, 1e-7, "standard", None, "float16")
    assert torch.equal(a, b)  # fp32 on CPU


# ---------------------------------------------------------------------- CUDA

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _cuda_ns(x, algorithm, ns_dtype):
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    out = ops.newton_schulz(
        x3.float().cuda(), FLAT, 1e-7, algorithm, resolve_gram_restarts(None, 5), ns_dtype
    ).cpu()
    return out if x.dim() == 3 else out.squeeze(0)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", sorted(INPUTS))
def test_cuda_half_iterations_against_float64(seed, family, ns_dtype, algorithm):
    """Ratio rule (DESIGN.md): the CUDA result's error against float64 standard NS within 2x
    that of the pure-PyTorch reference iterating in the same half type (same algorithm), plus
    2^-9 relative (near-ties of the final rounding). All finite."""
    x = INPUTS[family]()
    ref = orthogonalize(x, JORDAN5)
    same = orthogonalize(x, JORDAN5, 1e-7, HALF[ns_dtype], algorithm=algorithm,
                         gram_restarts=resolve_gram_restarts(None, 5))
    got = _cuda_ns(x, algorithm, ns_dtype)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) <= 2 * _rel(same, ref) + 2**-9, (family, ns_dtype, algorithm)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["gauss_wide", "gauss_tall", "gauss_8x128", "batched"])
def test_cuda_gram_fp16_is_more_accurate_than_bf16(seed, family):
    """fp16 rounds 8x finer than bf16; on well-conditioned inputs Gram NS shows it."""
    x = INPUTS[family]()
    ref = orthogonalize(x, JORDAN5)
    fp16 = _rel(_cuda_ns(x, "gram", "float16"), ref)
    bf16 = _rel(_cuda_ns(x, "gram", "bfloat16"), ref)
    assert fp16 < bf16, (fp16, bf16)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
def test_cuda_loss_scaled_fp16_grad_stays_finite(seed, algorithm):
    """A GradScaler-style step: fp16 params, grads scaled by 65536 (far past fp16's 65504 once
    momentum accumulates them as fp32), grad_scale 65536 handed to the step, Newton-Schulz in
    fp16. Phase 2 divides by the norm in fp32 before the cast, so nothing overflows: the result
    is finite and equals (to the ratio rule) the unscaled step. Then grad_scale 1 with the same
    scaled grads (U ~ 65536x): finite too, and the update is scale-invariant."""
    scale = 65536.0
    shapes = ((64, 256), (256, 64), (2, 32, 96))
    torch.manual_seed(seed)
    p0 = [torch.randn(*s, device="cuda") * 0.1 for s in shapes]
    g = [torch.randn(*s, device="cuda") * 1e-2 for s in shapes]

    def run(dtype, grads, grad_scale):
        params = [torch.nn.Parameter(p.clone().to(dtype)) for p in p0]
        opt = Muon(params, lr=0.02, ns_dtype="float16", ns_algorithm=algorithm)
        if grad_scale is not None:
            opt.grad_scale = torch.tensor(grad_scale, device="cuda")
        for p, gi in zip(params, grads):
            p.grad = gi.to(dtype)
        opt.step()
        return [p.detach().float() for p in params], opt

    plain, _ = run(torch.float32, g, None)
    scaled, opt = run(torch.float32, [gi * scale for gi in g], scale)
    for a, b in zip(plain, scaled):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)  # G * 2^16 / 2^16 is exact: the same U, the same bits
    for p in opt.param_groups[0]["params"]:
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()
    big, _ = run(torch.float32, [gi * scale for gi in g], None)
    ref = [
        p.double() * (1 - 0.02 * 0.1)
        - 0.02 * max(1, p.shape[-2] / p.shape[-1]) ** 0.5
        * orthogonalize(gi.double().cpu() * scale, JORDAN5).to(p.device).reshape(p.shape)
        for p, gi in zip(p0, g)
    ]
    same = [
        p.double() * (1 - 0.02 * 0.1)
        - 0.02 * max(1, p.shape[-2] / p.shape[-1]) ** 0.5
        * orthogonalize(gi.double().cpu() * scale, JORDAN5, 1e-7, torch.float16,
                        algorithm=algorithm).double().to(p.device).reshape(p.shape)
        for p, gi in zip(p0, g)
    ]
    for got, r, s in zip(big, ref, same):
        assert torch.isfinite(got).all()
        assert _rel(got, r) <= 2 * _rel(s, r) + 2**-9
    # fp16 params and grads: the loss-scaled grad itself must be representable, as GradScaler's
    # inf check would otherwise skip the step; a 1e-2 * 65536 grad is (|g| < 65504).
    half, _ = run(torch.float16, [gi * scale for gi in g], scale)
    for b in half:
        assert torch.isfinite(b).all()


@pytest.mark.cuda
def test_cuda_changing_ns_dtype_between_steps_takes_effect(seed):
    """The cached plan does not hold ns_dtype: a group switched to fp16 steps as one built so."""
    torch.manual_seed(seed)
    p0 = torch.randn(64, 192, device="cuda")
    grads = [torch.randn(64, 192, device="cuda") for _ in range(2)]

    def run(first, second):
        p = torch.nn.Parameter(p0.clone())
        opt = Muon([p], lr=0.02, ns_dtype=first, ns_algorithm="gram")
        for k, gk in enumerate(grads):
            if k == 1:
                opt.param_groups[0]["ns_dtype"] = second
            p.grad = gk
            opt.step()
        return p.detach()

    assert not torch.equal(run("bfloat16", "float16"), run("bfloat16", "bfloat16"))
