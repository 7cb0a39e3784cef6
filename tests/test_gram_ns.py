"""Gram Newton-Schulz (reference.gram_newton_schulz) against the standard iteration.

In exact arithmetic the two evaluate the same polynomials, so in float64 they agree to rounding
times the growth of the recurrence; in lower precision they differ by how rounding in R = X Xᵀ
is amplified, which the restarts bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from muon_ext.coefficients import PRESETS, resolve_ns_coefficients
from muon_ext.reference import (
    gram_flops,
    gram_newton_schulz,
    muon_step_reference,
    orthogonalize,
    standard_flops,
    resolve_gram_restarts,
    validate_gram_restarts,
)

SCHEDULES = {name: resolve_ns_coefficients(name, 5) for name in PRESETS}
RESTARTS = [None, (), (2,), (1, 3)]  # None: the default, NOTE: [Default Gram restarts]
U64 = 2.0**-53


def _with_singular_values(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, s.numel(), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, s.numel(), dtype=torch.float64))
    return u @ torch.diag(s) @ v.T


def _low_rank(rows: int, cols: int, rank: int) -> torch.Tensor:
    a = torch.randn(rows, rank, dtype=torch.float64)
    return a @ torch.randn(rank, cols, dtype=torch.float64)


INPUTS = {
    "gauss_wide": lambda: torch.randn(32, 64, dtype=torch.float64),
    "gauss_tall": lambda: torch.randn(64, 32, dtype=torch.float64),
    "gauss_8x128": lambda: torch.randn(8, 128, dtype=torch.float64),
    "rank8": lambda: _low_rank(64, 32, 8),
    "rank1": lambda: _low_rank(32, 64, 1),
    "spread_1_to_1e-6": lambda: _with_singular_values(
        torch.logspace(0, -6, 32, dtype=torch.float64), 32, 64
    ),
    "scaled_1e-30": lambda: torch.randn(32, 64, dtype=torch.float64) * 1e-30,
    "zeros": lambda: torch.zeros(32, 64, dtype=torch.float64),
    "4xN": lambda: torch.randn(4, 96, dtype=torch.float64),
    "Nx4": lambda: torch.randn(96, 4, dtype=torch.float64),
    "batched": lambda: torch.randn(3, 16, 40, dtype=torch.float64),
}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if ref.abs().max() == 0:
        return got.abs().max().item()  # zero input: exact zero expected
    return ((got - ref).norm() / ref.norm()).item()


def _segment_growth(schedule, restarts) -> float:
    """The largest factor by which an error in R can grow between two measurements of R.

    R <- H R H with H = p(sigma)/sigma ~ a near sigma = 0 (where rounding noise sits, and where
    a negative noise eigenvalue of R, which X Xᵀ itself cannot have, lives): each update scales
    it by about a², until a restart recomputes R from X.
    """
    restarts = resolve_gram_restarts(restarts, len(schedule))
    growth = best = 1.0
    for i, (a, _, _) in enumerate(schedule, start=1):
        if i in restarts and i < len(schedule):
            growth = 1.0
        elif i < len(schedule):
            growth *= a * a
            best = max(best, growth)
    return best


@pytest.mark.parametrize("restarts", RESTARTS, ids=str)
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("family", list(INPUTS))
def test_float64_gram_equals_standard(seed, family, name, restarts):
    x = INPUTS[family]()
    schedule = SCHEDULES[name]
    ref = orthogonalize(x, schedule)
    got = orthogonalize(x, schedule, algorithm="gram", gram_restarts=restarts)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    # Same polynomial in exact arithmetic, so only rounding differs: the float64 unit roundoff
    # times the growth of an R error between restarts (_segment_growth: 2e4 for jordan and
    # 2e5 for polar_express without restarts, so ~1e-11; 1.6e9 for deepseek_v4's eight
    # jordan steps) times a small dimension factor (16). Measured: <= 2.5e-11 for the 5-step
    # presets, 1.2e-8 for deepseek_v4 without restarts. 1e-10 is the floor: well below any
    # real difference (a wrong coefficient or transpose is off by O(1)).
    bound = max(1e-10, 16 * U64 * _segment_growth(schedule, restarts))
    assert _rel(got, ref) <= bound, (_rel(got, ref), bound)


# fp32 Gram cases measured above the 2e-3 target: relative Frobenius error against float64
# standard NS over 5 seeds, and fp32 *standard* NS for comparison. The cause is R = X Xᵀ
# squaring the condition number: an fp32 rounding of R (~6e-8 of ||R||) is a relative error
# of 1e-4 or more on the small or zero eigenvalues of a rank-deficient input, and it grows by
# ~a² per R update until a restart (NOTE: [Gram safety factor] in coefficients.py). Kept at
# the target as (non-strict) xfail so the gap stays visible; the default restart (2,) brings
# the 5-step presets to <= 3.5e-4.
_FP32_OVER_TARGET = {
    ("rank8", "polar_express", ()): "2.7e-3..9.6e-3 (fp32 standard 2.1e-5)",
    ("rank1", "polar_express", ()): "5.9e-3..1.2e-2 (fp32 standard 8.0e-5)",
    ("spread_1_to_1e-6", "polar_express", ()): "1.7e-3..2.2e-3 (fp32 standard 1.4e-5)",
    ("rank8", "polar_express_gram", ()): "1.8e-3..6.0e-3 (fp32 standard 1.8e-5)",
    ("rank1", "polar_express_gram", ()): "4.6e-3..6.3e-3 (fp32 standard 7.1e-5)",
    ("spread_1_to_1e-6", "polar_express_gram", ()): "1.5e-3..1.8e-3 (fp32 standard 1.2e-5)",
    # deepseek_v4: 10 steps, 8 of them jordan (a² = 11.9 per R update).
    ("rank8", "deepseek_v4", ()): "1e11..5e17 (fp32 standard 1.7e-3)",
    ("rank1", "deepseek_v4", ()): "Inf/NaN (fp32 standard 6.3e-3)",
    ("spread_1_to_1e-6", "deepseek_v4", ()): "5e10..1e14 (fp32 standard 4.3e-4)",
    ("rank8", "deepseek_v4", (2,)): "1.1e-2..1.9e-2 (fp32 standard 1.7e-3)",
    ("rank1", "deepseek_v4", (2,)): "1.0e-2..1.7e-2 (fp32 standard 6.3e-3)",
    ("spread_1_to_1e-6", "deepseek_v4", (2,)): "1.1e-1..1.5e-1 (fp32 standard 4.3e-4)",
    ("rank8", "deepseek_v4", (1, 3)): "2.9e-3..3.6e-3 (fp32 standard 1.7e-3)",
    ("rank1", "deepseek_v4", (1, 3)): "4.6e-3..5.4e-3 (fp32 standard 6.3e-3)",
    ("spread_1_to_1e-6", "deepseek_v4", (1, 3)): "1.1e-2..1.4e-2 (fp32 standard 4.3e-4)",
}


def _fp32_params():
    for family in INPUTS:
        for name in PRESETS:
            for restarts in RESTARTS:
                why = _FP32_OVER_TARGET.get((family, name, restarts))
                marks = [pytest.mark.xfail(reason=f"measured {why}", strict=False)] if why else []
                yield pytest.param(family, name, restarts, marks=marks,
                                   id=f"{family}-{name}-{restarts}")


@pytest.mark.parametrize("family,name,restarts", list(_fp32_params()))
def test_float32_gram_close_to_float64_standard(seed, family, name, restarts):
    x = INPUTS[family]()
    schedule = SCHEDULES[name]
    ref = orthogonalize(x, schedule)
    got = orthogonalize(x, schedule, 1e-7, torch.float32, algorithm="gram", gram_restarts=restarts)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    bound = 2e-3
    if restarts is None and name == "deepseek_v4":
        # With the default restarts (2, 5, 8) the 10-step schedule is as accurate as fp32
        # *standard* NS, which itself misses 2e-3 on rank-deficient inputs (up to 6.3e-3 on
        # rank 1): the ratio rule of DESIGN.md, 2x the error of the standard algorithm.
        standard = orthogonalize(x, schedule, 1e-7, torch.float32)
        bound = max(bound, 2 * _rel(standard, ref))
    assert _rel(got, ref) <= bound, (_rel(got, ref), bound)


# How much worse Gram NS without a restart is than with one, in fp16 on a rank-8 64x256
# input: the smallest ratio over 20 seeds was 3.1 (jordan), 29 (polar_express) and 23
# (polar_express_gram); the bound leaves room for other seeds.
_NO_RESTART_AT_LEAST = {"jordan": 2.0, "polar_express": 10.0, "polar_express_gram": 10.0}


@pytest.mark.parametrize("name", list(_NO_RESTART_AT_LEAST))
def test_fp16_low_rank_needs_the_restart(seed, name):
    """Rank 8 on 64x256 in fp16: R's zero eigenvalues are rounding noise of either sign, and
    a negative one grows by ~a² per R update (no X Xᵀ re-measurement clamps it to >= 0).

    Measured over 20 seeds, relative error against float64 standard NS: fp16 standard NS
    0.04 (jordan) / 0.06..0.08 (polar_express*); Gram with the default restart the same
    (0.033..0.091, at most 1.18x standard); Gram without it 0.11..0.15 (jordan) and
    1.2..9.3 (polar_express*, largest entry up to 1.5 where the restarted result has 0.11).
    No Inf/NaN at this size: fp16 blows up the error, not the range. (bf16, not tested here:
    without the restart polar_express* entries reach 1e4..2e6; with it the error matches
    standard bf16 NS.)
    """
    x = _low_rank(64, 256, 8)
    schedule = SCHEDULES[name]
    ref = orthogonalize(x, schedule)
    err_std = _rel(orthogonalize(x, schedule, 1e-7, torch.float16), ref)
    restarted = orthogonalize(x, schedule, 1e-7, torch.float16, algorithm="gram")
    plain = orthogonalize(x, schedule, 1e-7, torch.float16, algorithm="gram", gram_restarts=())
    assert torch.isfinite(restarted).all()
    # DESIGN.md ratio contract: within 2x the error of standard NS in the same precision.
    err_restarted = _rel(restarted, ref)
    assert err_restarted <= 2 * err_std + 1e-3, (err_restarted, err_std)
    # Non-finite counts as worse.
    err_plain = _rel(plain, ref) if torch.isfinite(plain).all() else math.inf
    assert err_plain > _NO_RESTART_AT_LEAST[name] * err_restarted, (err_plain, err_restarted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_scaled_input_gives_finite_half_precision_gram(seed, dtype):
    # A gradient still multiplied by a loss scale (65536): entries of std 5e5, which (and whose
    # squares) overflow fp16. The norm is taken in fp32 before the cast, so the iteration only
    # ever sees |x| <= 1.
    x = torch.randn(32, 64) * 65536 * 8
    assert x.abs().max() > 65504  # not representable in fp16 as is
    got = orthogonalize(x, SCHEDULES["polar_express_gram"], 1e-7, dtype, algorithm="gram")
    ref = orthogonalize(x.double(), SCHEDULES["polar_express_gram"])
    assert got.dtype == dtype and torch.isfinite(got).all()
    # Full-rank Gaussian: half-precision rounding amplified by the small-sigma slope (~1e2).
    assert _rel(got, ref) <= 0.1, _rel(got, ref)


def test_gram_newton_schulz_keeps_dtype_and_empty_schedule_is_identity():
    x = torch.randn(2, 8, 16, dtype=torch.float32)
    x = x / x.norm(dim=(1, 2), keepdim=True)
    assert gram_newton_schulz(x, SCHEDULES["jordan"]).dtype == torch.float32
    assert torch.equal(gram_newton_schulz(x, []), x)


def test_restarts_past_the_schedule_are_ignored(seed):
    x = torch.randn(16, 40, dtype=torch.float64)
    sched = SCHEDULES["jordan"][:2]
    a = orthogonalize(x, sched, algorithm="gram", gram_restarts=(2, 5))
    b = orthogonalize(x, sched, algorithm="gram", gram_restarts=())
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad", [(0,), (-1,), (2, 2), (3, 1), (1.0,), (True,), ("2",), 2, "2"], ids=repr
)
def test_validate_gram_restarts_rejects(bad):
    with pytest.raises(ValueError, match="gram_restarts"):
        validate_gram_restarts(bad)
    with pytest.raises(ValueError, match="gram_restarts"):
        orthogonalize(torch.randn(4, 8), SCHEDULES["jordan"], algorithm="gram", gram_restarts=bad)


def test_default_restarts():
    # NOTE: [Default Gram restarts]: after iteration 2, then every 3 (only (2,) for 5 steps).
    assert resolve_gram_restarts(None, 5) == (2,)
    assert resolve_gram_restarts(None, 10) == (2, 5, 8)
    assert resolve_gram_restarts(None, 2) == ()
    assert resolve_gram_restarts((1, 3), 10) == (1, 3)


def test_validate_gram_restarts_accepts():
    assert validate_gram_restarts(()) == ()
    assert validate_gram_restarts([1, 3]) == (1, 3)
    assert validate_gram_restarts((2,)) == (2,)


@pytest.mark.parametrize("bad", ["auto", "Gram", "", None])
def test_unknown_algorithm_is_rejected(bad):
    with pytest.raises(ValueError, match="algorithm"):
        orthogonalize(torch.randn(4, 8), SCHEDULES["jordan"], algorithm=bad)


def test_flop_formulas():
    m = 64
    for alpha in (1, 2, 4, 8):
        n = alpha * m
        # 5 iterations, one restart after 2: 8 m x n GEMMs and 14 m x m ones for Gram.
        assert gram_flops(m, n, 5, (2,)) == 8 * alpha * m**3 + 28 * m**3
        assert standard_flops(m, n, 5) == 20 * alpha * m**3 + 10 * m**3
        assert gram_flops(n, m, 5, (2,)) == gram_flops(m, n, 5, (2,))  # tall = its transpose
    ratio = {a: round(gram_flops(m, a * m, 5, (2,)) / standard_flops(m, a * m, 5), 2)
             for a in (2, 4)}
    assert ratio == {2: 0.88, 4: 0.67}
    assert gram_flops(m, m, 5, (2, 9)) == gram_flops(m, m, 5, (2,))  # 9 >= 5: ignored
    assert gram_flops(m, m, 0, ()) == standard_flops(m, m, 0) == 0


def _count_flops(m: int, n: int, schedule, restarts) -> int:
    """Counts the GEMMs gram_newton_schulz really issues, by wrapping bmm/baddbmm/matmul."""
    total = 0
    real = {"matmul": torch.Tensor.__matmul__, "baddbmm": torch.baddbmm}

    def mm(a, b):
        nonlocal total
        total += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return real["matmul"](a, b)

    def baddbmm(c, a, b, **kw):
        nonlocal total
        total += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return real["baddbmm"](c, a, b, **kw)

    x = torch.randn(1, m, n, dtype=torch.float64)
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.Tensor, "__matmul__", mm)
    mp.setattr(torch, "baddbmm", baddbmm)
    try:
        gram_newton_schulz(x / x.norm(), schedule, restarts)
    finally:
        mp.undo()
    return total


@pytest.mark.parametrize("restarts", RESTARTS, ids=str)
@pytest.mark.parametrize("name", list(PRESETS))
def test_gram_flops_matches_the_gemms_issued(name, restarts):
    schedule = SCHEDULES[name]
    assert _count_flops(8, 24, schedule, restarts) == gram_flops(8, 24, len(schedule), restarts)


def test_muon_step_reference_gram_matches_standard(seed):
    shapes = [(48, 16), (16, 48), (3, 8, 20)]
    runs = {}
    for algo in ("standard", "gram"):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        bufs = [torch.zeros_like(p) for p in params]
        for _ in range(3):
            grads = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
            muon_step_reference(
                params, grads, bufs, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                eps=1e-7, ns_coefficients=SCHEDULES["polar_express"], update_scales=[1.0] * 3,
                ns_algorithm=algo,
            )
        runs[algo] = params
    for a, b in zip(runs["standard"], runs["gram"], strict=True):
        # lr 0.02 times the per-step float64 bound above (1e-10 relative): far below 1e-12.
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
