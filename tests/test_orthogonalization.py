"""Newton-Schulz accuracy of each coefficient preset, against exact math in float64.

Newton-Schulz maps each singular value sigma of the normalized input through the composed
odd polynomial p_k(...p_1(sigma)) and keeps the singular vectors, so the exact output is
U diag(p(sigma)) Vᵀ; the polar factor it approximates is U Vᵀ.
"""

from __future__ import annotations

import math

import pytest
import torch

from muon_ext import ops
from muon_ext.coefficients import PRESETS, flat_coefficients, resolve_ns_coefficients
from muon_ext.reference import orthogonalize

SCHEDULES = {name: resolve_ns_coefficients(name, 5) for name in PRESETS}


def _scalar_map(sigma: torch.Tensor, schedule) -> torch.Tensor:
    for a, b, c in schedule:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def _matrix_with_singular_values(s: torch.Tensor, rows: int, cols: int) -> tuple:
    k = s.numel()
    u, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T, u, v


# After 5 iterations, sigma in [1e-3, 1] lands in these ranges (polar_express: Amsel et al.
# 2025 with their 1.01 safety factor; jordan deliberately overshoots to grow small values fast).
EXPECTED_RANGE = {
    "jordan": (0.470, 1.203),
    "polar_express": (0.852, 1.125),
    # The 1.05 safety factor of the Gram path gives up some of the low end for headroom above 1.
    "polar_express_gram": (0.758, 1.124),
    "deepseek_v4": (0.999, 1.001),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scalar_map_of_each_preset(name):
    sigma = torch.logspace(-3, 0, 2001, dtype=torch.float64)
    out = _scalar_map(sigma, SCHEDULES[name])
    lo, hi = EXPECTED_RANGE[name]
    assert lo <= out.min().item() and out.max().item() <= hi, (out.min().item(), out.max().item())


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("rows,cols", [(24, 40), (40, 24), (32, 32)], ids=["wide", "tall", "square"])
def test_fused_newton_schulz_equals_the_exact_polynomial_map(seed, name, rows, cols):
    k = min(rows, cols)
    # Normalized singular values spread over [1e-3, 1] (the Frobenius norm is then 1).
    s = torch.logspace(-3, 0, k, dtype=torch.float64)
    s = s / s.norm()
    x, u, v = _matrix_with_singular_values(s, rows, cols)
    schedule = SCHEDULES[name]
    got = ops.newton_schulz(x.float().unsqueeze(0), flat_coefficients(schedule), 1e-7)[0].double()
    exact = u @ torch.diag(_scalar_map(s, schedule)) @ v.T
    # fp32 iterations: input rounding (~1e-7) is amplified by at most the composed slope at
    # small sigma (prod of a_k, about 5e2 for jordan and 1e3 for polar_express), so ~1e-4;
    # 1e-3 covers that, while a wrong transposition, coefficient order or norm is off by O(1).
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-3)
    # Distance to the polar factor U Vᵀ: exactly max |p(sigma) - 1| for the exact map.
    polar = u @ v.T
    expected = (_scalar_map(s, schedule) - 1).abs().max().item()
    assert abs(torch.linalg.matrix_norm(got - polar, ord=2).item() - expected) <= 1e-3


def test_polar_express_is_closer_to_the_polar_factor_than_jordan(seed):
    s = torch.linspace(0.05, 1.0, 48, dtype=torch.float64)
    s = s / s.norm()
    x, u, v = _matrix_with_singular_values(s, 48, 96)
    polar = u @ v.T
    errs = {}
    for name in ("jordan", "polar_express"):
        got = ops.newton_schulz(x.float().unsqueeze(0), flat_coefficients(SCHEDULES[name]), 1e-7)
        errs[name] = (got[0].double() - polar).norm(p=2).item()
    assert errs["polar_express"] < errs["jordan"], errs


def test_batch_of_matrices_is_orthogonalized_independently(seed):
    x = torch.randn(5, 12, 20)
    x[2] *= 1000.0  # per-matrix normalization: scale of one matrix must not leak into another
    flat = flat_coefficients(SCHEDULES["jordan"])
    batched = ops.newton_schulz(x, flat, 1e-7)
    for i in range(5):
        single = ops.newton_schulz(x[i : i + 1], flat, 1e-7)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-6)


def test_zero_matrix_orthogonalizes_to_zero():
    out = ops.newton_schulz(torch.zeros(2, 3, 5), flat_coefficients(SCHEDULES["jordan"]), 1e-7)
    assert torch.equal(out, torch.zeros(2, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_keeps_input_shape_and_dtype(dtype):
    x = torch.randn(3, 9, 4).to(dtype)
    out = ops.newton_schulz(x, flat_coefficients(SCHEDULES["jordan"]), 1e-7)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert math.isfinite(out.float().abs().max().item())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_singular_values_slightly_above_one_stay_bounded(name):
    """Rounding can push the top normalized singular value a little past 1 (rank-1 matrices sit
    at exactly 1). Without its safety factor polar_express maps 1.001 to 5e20."""
    sigma = torch.linspace(1.0, 1.01, 101, dtype=torch.float64)
    assert _scalar_map(sigma, SCHEDULES[name]).max().item() < 1.25


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("shape", [(1, 37), (37, 1), (17, 29)], ids=["1xN", "Nx1", "17x29"])
def test_bf16_orthogonalization_never_diverges(seed, name, shape):
    schedule = SCHEDULES[name]
    for _ in range(20):
        x = torch.randn(1, *shape)
        y = orthogonalize(x, schedule, 1e-7, torch.bfloat16).float()
        fused = ops.newton_schulz(x.to(torch.bfloat16), flat_coefficients(schedule), 1e-7).float()
        for out in (y, fused):
            assert torch.isfinite(out).all() and torch.linalg.matrix_norm(out[0], ord=2) < 1.25


def test_zero_matrix_with_eps_zero_gives_zero():
    for fn in (lambda x: ops.newton_schulz(x, flat_coefficients(SCHEDULES["jordan"]), 0.0),
               lambda x: orthogonalize(x, SCHEDULES["jordan"], 0.0, torch.float32)):
        assert torch.equal(fn(torch.zeros(2, 3, 5)), torch.zeros(2, 3, 5))
