"""The fused CUDA step: torch.ops.muon_ext.muon_step_ and newton_schulz on CUDA tensors.

Every numeric check follows DESIGN.md's ratio rule: the fused result's error against the
float64 reference (``muon_step_reference`` / ``orthogonalize`` in float64) must stay within 2x
the error of the bf16 reference implementation (``ns_dtype=torch.bfloat16``,
``compute_dtype=torch.float32``, run on the same GPU) plus a small atol whose reason is given
where it is computed. Inputs are fresh random data (the ``seed`` fixture prints the seed;
MUON_EXT_TEST_SEED replays it).
"""

from __future__ import annotations

import math

import pytest
import torch

import muon_ext  # loads the compiled ops, CUDA kernels included
from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale
from muon_ext.reference import muon_step_reference, orthogonalize

from .conftest import assert_within_ratio

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
JORDAN = resolve_ns_coefficients("jordan", 5)
FLAT = flat_coefficients(JORDAN)
HP = {"momentum": 0.95, "weight_decay": 0.1, "eps": 1e-7}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, rows, cols), awkward on purpose: 1xN and Nx1, primes, a wide and a tall tensor that
# share a bucket (13x17 / 17x13), 3-D stacks, a tall matrix longer than one 256-row strip, a
# stack whose second matrix starts unaligned (257*301 is odd) and spans several 32K chunks,
# and empty tensors (zero rows, zero batch).
SHAPES = [
    (1, 1, 37),
    (1, 41, 1),
    (1, 13, 17),
    (3, 17, 13),
    (2, 64, 64),
    (1, 96, 257),
    (1, 300, 71),
    (4, 5, 7),
    (1, 0, 7),
    (0, 4, 4),
    (2, 257, 301),
    (1, 128, 512),
]


# ----------------------------------------------------------------------------- helpers


def _lr(value: float = 0.02, device: str = DEVICE) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def _inputs(shapes, dtype, device=DEVICE):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    bufs = [0.1 * torch.randn(s, device=device) for s in shapes]
    scales = [update_scale(s[1], s[2], None) for s in shapes]
    return params, grads, bufs, scales


def _clone(ts):
    return [t.clone() for t in ts]


def _fused(
    params,
    grads,
    bufs,
    scales,
    lr,
    *,
    nesterov=True,
    coeffs=FLAT,
    grad_scale=None,
    found_inf=None,
    **overrides,
):
    hp = {**HP, **overrides}
    torch.ops.muon_ext.muon_step_(
        params,
        grads,
        bufs,
        lr,
        hp["momentum"],
        nesterov,
        hp["weight_decay"],
        hp["eps"],
        list(coeffs),
        list(scales),
        grad_scale,
        found_inf,
    )


def _references(params, grads, bufs, scales, lr, *, nesterov=True, grad_scale=None, **overrides):
    """(float64 oracle params, oracle momentum, bf16-reference params) from the same inputs."""
    hp = {**HP, **overrides}
    common = {
        "lr": float(lr),
        "momentum": hp["momentum"],
        "nesterov": nesterov,
        "weight_decay": hp["weight_decay"],
        "eps": hp["eps"],
        "ns_coefficients": JORDAN,
        "update_scales": scales,
        "grad_scale": grad_scale,
    }
    p64, b64 = [p.double() for p in params], [b.double() for b in bufs]
    muon_step_reference(
        p64, [g.double() for g in grads], b64, compute_dtype=torch.float64, **common
    )
    p16, b16 = _clone(params), _clone(bufs)
    muon_step_reference(
        p16, _clone(grads), b16, compute_dtype=torch.float32, ns_dtype=torch.bfloat16, **common
    )
    return p64, b64, p16


def _fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.vector_norm(a.double() - b.double()).item()


def _param_atol(p_ref: torch.Tensor, dtype: torch.dtype, update_norm: float) -> float:
    # (1) One ulp of the param dtype per element at the param's magnitude: the final rounding
    #     to bf16/fp16 may land on either neighbour, independently of the reference's rounding.
    # (2) Half a bf16 ulp (2^-9, relative) of the update lr*scale*X: the fused and the
    #     reference NS both round X to bf16, and after different accumulation orders a
    #     near-tie may round either way.
    ulp = torch.finfo(dtype).eps
    return ulp * torch.linalg.vector_norm(p_ref).item() + 2.0**-9 * update_norm


def _check_step(
    params0,
    grads0,
    bufs0,
    scales,
    out_params,
    out_bufs,
    lr,
    *,
    nesterov=True,
    grad_scale=None,
    what="",
    **overrides,
):
    p64, b64, p16 = _references(
        params0, grads0, bufs0, scales, lr, nesterov=nesterov, grad_scale=grad_scale, **overrides
    )
    decay = 1 - float(lr) * {**HP, **overrides}["weight_decay"]
    for i, (p0, out, ref, ref16, scale) in enumerate(zip(params0, out_params, p64, p16, scales)):
        name = f"{what} tensor {i} {tuple(p0.shape)} {p0.dtype}"
        if p0.numel() == 0:
            continue
        assert torch.isfinite(out).all(), f"{name}: non-finite params"
        update_norm = torch.linalg.vector_norm(p0.double() * decay - ref).item()
        assert_within_ratio(
            _fro(out, ref), _fro(ref16, ref), _param_atol(ref, p0.dtype, update_norm), name
        )
        # fp32 momentum: a few fp32 roundings of values of magnitude |M| + |G|.
        torch.testing.assert_close(
            out_bufs[i].double(),
            b64[i],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name} momentum: {m}",
        )


# ----------------------------------------------------------------------------- registration


def test_cuda_kernels_registered():
    for op in ("muon_ext::muon_step_", "muon_ext::newton_schulz"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert muon_ext.build_info()["with_cuda"]


# ----------------------------------------------------------------------------- the step


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_matches_reference(seed, dtype, nesterov):
    params, grads, bufs, scales = _inputs(SHAPES, dtype)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    lr = _lr()
    _fused(params, grads, bufs, scales, lr, nesterov=nesterov)
    for g, g_before in zip(grads, g0):
        assert torch.equal(g, g_before), "grads must never be written"
    _check_step(p0, g0, b0, scales, params, bufs, lr, nesterov=nesterov, what="step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_matrices_of_mixed_shapes(seed, dtype):
    """More tensors than one launch's slot table holds (several launches per phase), many
    buckets, tall and wide members of the same bucket, repeated shapes."""
    gen = torch.Generator().manual_seed(seed)
    dims = [1, 2, 3, 7, 16, 31, 64, 100]
    shapes = []
    for _ in range(130):
        r, c = (dims[int(i)] for i in torch.randint(len(dims), (2,), generator=gen))
        shapes.append((int(torch.randint(1, 3, (1,), generator=gen)), r, c))
    shapes += [(1, 0, 5), (0, 3, 3)]
    params, grads, bufs, scales = _inputs(shapes, dtype)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    lr = _lr(0.05)
    _fused(params, grads, bufs, scales, lr)
    _check_step(p0, g0, b0, scales, params, bufs, lr, what="mixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_sized_shapes(seed, dtype):
    """Real-model bucket shapes (GPT-2 small), so cuBLASLt runs its production kernels."""
    shapes = [(4, 768, 768), (2, 768, 3072), (2, 3072, 768)]
    params, grads, bufs, scales = _inputs(shapes, dtype)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    lr = _lr()
    _fused(params, grads, bufs, scales, lr)
    _check_step(p0, g0, b0, scales, params, bufs, lr, what="model")


def test_guard_bands_and_unaligned_views(seed):
    """Params and momentum as views into larger buffers, one element past an aligned start (so
    every vector path is refused and the scalar walks run), surrounded by sentinels: nothing
    outside the views may be written."""
    shapes = [(2, 33, 65), (1, 70, 9), (3, 8, 8)]
    sentinel = 1234.5
    pad = 37
    params, grads, bufs, scales = [], [], [], []
    p_bases, b_bases = [], []
    for s in shapes:
        n = math.prod(s)
        pb = torch.full((n + 2 * pad + 1,), sentinel, device=DEVICE, dtype=torch.bfloat16)
        bb = torch.full((n + 2 * pad + 1,), sentinel, device=DEVICE)
        p = pb[pad + 1 : pad + 1 + n].view(s)
        b = bb[pad + 1 : pad + 1 + n].view(s)
        p.copy_(torch.randn(s, device=DEVICE))
        b.copy_(0.1 * torch.randn(s, device=DEVICE))
        params.append(p)
        bufs.append(b)
        grads.append(torch.randn(s, device=DEVICE).to(torch.bfloat16))
        scales.append(update_scale(s[1], s[2], None))
        p_bases.append(pb)
        b_bases.append(bb)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    before = _clone(p_bases + b_bases)
    lr = _lr()
    _fused(params, grads, bufs, scales, lr)
    for i, (base, snap) in enumerate(zip(p_bases + b_bases, before)):
        n = math.prod(shapes[i % len(shapes)])
        for cut in (slice(0, pad + 1), slice(pad + 1 + n, None)):
            assert torch.equal(base[cut], snap[cut]), "a write landed outside a view"
    _check_step(p0, g0, b0, scales, params, bufs, lr, what="unaligned")


def test_poisoned_workspace_and_outputs(seed):
    """Deterministic mode fills every fresh CUDA allocation (the step's workspace, newton_schulz's
    output) with NaN: an element no kernel writes turns into NaN in the result."""
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    x = torch.randn(3, 19, 11, device=DEVICE)
    lr = _lr()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(8, device=DEVICE)).all(), "poisoning is not active"
        _fused(params, grads, bufs, scales, lr)
        y = torch.ops.muon_ext.newton_schulz(x, FLAT, 1e-7)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert torch.isfinite(y).all()
    _check_step(p0, g0, b0, scales, params, bufs, lr, what="poisoned")


def test_deterministic_reruns(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.bfloat16)
    pa, ba = _clone(params), _clone(bufs)
    pb, bb = _clone(params), _clone(bufs)
    _fused(pa, grads, ba, scales, _lr())
    _fused(pb, grads, bb, scales, _lr())
    for x, y in zip(pa + ba, pb + bb):
        assert torch.equal(x, y), "two runs on the same inputs differ"


def test_lr_on_device_equals_lr_on_cpu(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    pa, ba = _clone(params), _clone(bufs)
    pb, bb = _clone(params), _clone(bufs)
    _fused(pa, grads, ba, scales, _lr(0.03, DEVICE))
    _fused(pb, grads, bb, scales, _lr(0.03, "cpu"))
    for x, y in zip(pa + ba, pb + bb):
        assert torch.equal(x, y)
    # lr in another float dtype on the device is converted on the device, not on the host.
    pc, bc = _clone(params), _clone(bufs)
    _fused(pc, grads, bc, scales, torch.tensor(0.03, dtype=torch.float64, device=DEVICE))
    for x, y in zip(pa, pc):
        assert torch.equal(x, y)


@pytest.mark.parametrize("flag_device", ["cuda", "cpu"])
def test_found_inf_changes_nothing(seed, flag_device):
    params, grads, bufs, scales = _inputs(SHAPES, torch.bfloat16)
    grads[2].view(-1)[0] = float("inf")
    grads[4].view(-1)[-1] = float("nan")
    p0, b0 = _clone(params), _clone(bufs)
    for flag in (1.0, float("nan")):
        found_inf = torch.tensor([flag], device=flag_device)
        _fused(
            params,
            grads,
            bufs,
            scales,
            _lr(),
            grad_scale=torch.tensor([2.0], device=DEVICE),
            found_inf=found_inf,
        )
        for x, y in zip(params + bufs, p0 + b0):
            assert torch.equal(x, y), f"found_inf={flag} must leave params and momentum as they are"
    # found_inf = 0: the step happens (tensor 3's grads are finite).
    _fused(params, grads, bufs, scales, _lr(), found_inf=torch.zeros(1, device=flag_device))
    assert not torch.equal(params[3], p0[3]) and torch.isfinite(params[3]).all()


@pytest.mark.parametrize("scale_device", ["cuda", "cpu"])
def test_grad_scale(seed, scale_device):
    params, grads, bufs, scales = _inputs(SHAPES, torch.bfloat16)
    # A power of two scales exactly (bf16 grads, no overflow): bit-identical to unscaled grads.
    pa, ba = _clone(params), _clone(bufs)
    pb, bb = _clone(params), _clone(bufs)
    _fused(pa, grads, ba, scales, _lr())
    scaled = [g * 8 for g in grads]
    _fused(pb, scaled, bb, scales, _lr(), grad_scale=torch.tensor([8.0], device=scale_device))
    for x, y in zip(pa + ba, pb + bb):
        assert torch.equal(x, y)
    # Any other scale: the reference divides the same way.
    gs = torch.tensor([3.0], device=scale_device)
    p0, g0, b0 = _clone(params), [g * 3 for g in grads], _clone(bufs)
    pc, bc = _clone(params), _clone(bufs)
    _fused(pc, g0, bc, scales, _lr(), grad_scale=gs)
    _check_step(p0, g0, b0, scales, pc, bc, _lr(), grad_scale=gs.to(DEVICE), what="grad_scale")


def test_non_default_stream(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    pa, ba = _clone(params), _clone(bufs)
    _fused(pa, grads, ba, scales, _lr())
    pb, bb = _clone(params), _clone(bufs)
    lr = _lr()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _fused(pb, grads, bb, scales, lr)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in zip(pa + ba, pb + bb):
        assert torch.equal(x, y), "a step on a side stream must equal the default-stream step"


def test_zero_grads_no_nan(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    grads = [torch.zeros_like(g) for g in grads]
    bufs = [torch.zeros_like(b) for b in bufs]
    decay = 1 - float(_lr()) * HP["weight_decay"]
    for eps in (1e-7, 0.0):
        p = _clone(params)
        _fused(p, grads, _clone(bufs), scales, _lr(), eps=eps)
        for x, x0 in zip(p, params):
            assert torch.isfinite(x).all()
            # X == 0: P only decays, with one fp32 rounding.
            torch.testing.assert_close(x.double(), x0.double() * decay, rtol=2e-7, atol=0)


def test_cuda_graph_capture_and_replay(seed):
    """Metadata travels as kernel arguments and scalars are read on the device: the step can be
    captured once and replayed, giving the eager result."""
    params, grads, bufs, scales = _inputs(SHAPES, torch.bfloat16)
    lr, found_inf = _lr(), torch.zeros(1, device=DEVICE)
    pe, be = _clone(params), _clone(bufs)
    _fused(pe, grads, be, scales, lr, found_inf=found_inf)

    pg, bg = _clone(params), _clone(bufs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (handles, workspaces)
        _fused(_clone(params), grads, _clone(bufs), scales, lr, found_inf=found_inf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _fused(pg, grads, bg, scales, lr, found_inf=found_inf)
    for p, p0, b, b0 in zip(pg, params, bg, bufs):  # capture ran nothing
        p.copy_(p0)
        b.copy_(b0)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(pe + be, pg + bg):
        assert torch.equal(x, y)


def test_step_never_syncs(seed):
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    lr, gs, fi = _lr(), torch.tensor([2.0], device=DEVICE), torch.zeros(1, device=DEVICE)
    _fused(params, grads, bufs, scales, lr, grad_scale=gs, found_inf=fi)  # warm-up
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fused(params, grads, bufs, scales, lr, grad_scale=gs, found_inf=fi)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_legacy_cublas_fallback(seed, monkeypatch):
    """MUON_EXT_NS_BACKEND=cublas routes every GEMM through cublasGemmStridedBatchedEx (the
    fallback for shapes cuBLASLt has no algorithm for), with one copy of the addend each."""
    params, grads, bufs, scales = _inputs(SHAPES, torch.float32)
    p0, g0, b0 = _clone(params), _clone(grads), _clone(bufs)
    monkeypatch.setenv("MUON_EXT_NS_BACKEND", "cublas")
    lr = _lr()
    _fused(params, grads, bufs, scales, lr)
    _check_step(p0, g0, b0, scales, params, bufs, lr, what="legacy cuBLAS")
    monkeypatch.setenv("MUON_EXT_NS_BACKEND", "bogus")
    pb, bb = _clone(p0), _clone(b0)
    with pytest.raises(RuntimeError, match="MUON_EXT_NS_BACKEND"):
        _fused(pb, g0, bb, scales, lr)
    for x, y in zip(pb + bb, p0 + b0):
        assert torch.equal(x, y), "a rejected call must change nothing"


def test_empty_lists_and_empty_tensors():
    lr = _lr()
    _fused([], [], [], [], lr)
    shapes = [(1, 0, 3), (0, 2, 2), (2, 3, 0)]
    params, grads, bufs, scales = _inputs(shapes, torch.float32)
    _fused(params, grads, bufs, scales, lr)
    y = torch.ops.muon_ext.newton_schulz(torch.empty(0, 4, 5, device=DEVICE), FLAT, 1e-7)
    assert y.shape == (0, 4, 5) and y.device.type == "cuda"


def test_rejects_bad_arguments():
    lr = _lr()
    p, g, b, s = _inputs([(1, 4, 4)], torch.float32)
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        _fused(p, g, [b[0].to(torch.bfloat16)], s, lr)
    with pytest.raises(RuntimeError):
        _fused(p, [g[0].cpu()], b, s, lr)
    with pytest.raises(RuntimeError):
        torch.ops.muon_ext.newton_schulz(torch.randn(4, 4, device=DEVICE), FLAT, 1e-7)


# ----------------------------------------------------------------------------- newton_schulz


NS_SHAPES = [(3, 17, 29), (2, 64, 64), (1, 200, 33), (1, 1, 9), (2, 9, 1), (1, 257, 301)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_newton_schulz_matches_reference(seed, dtype, shape):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    y = torch.ops.muon_ext.newton_schulz(x, FLAT, 1e-7)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    ref = orthogonalize(x.double(), JORDAN, 1e-7, ns_dtype=torch.float64)
    ref16 = orthogonalize(x, JORDAN, 1e-7, ns_dtype=torch.bfloat16).to(dtype)
    # atol: half a bf16 ulp (2^-9) of ||X|| for near-ties of the final bf16 rounding, plus one
    # ulp of the output dtype per element for the cast back to x's dtype.
    atol = (2.0**-9 + torch.finfo(dtype).eps) * torch.linalg.vector_norm(ref).item()
    assert_within_ratio(_fro(y, ref), _fro(ref16, ref), atol, f"newton_schulz {shape} {dtype}")


@pytest.mark.parametrize("shape", [(4, 48, 48), (2, 40, 96), (2, 96, 40)], ids=str)
def test_newton_schulz_approximates_polar_factor(seed, shape):
    """Loosely against U Vᵀ from a float64 SVD: with singular values of the normalized input in
    [0.1, 1]·s_max, deepseek_v4 (8 x jordan, then 2 convergent polishing steps) must bring every
    singular value near 1, as far as its scalar map says plus a bf16 allowance."""
    b, r, c = shape
    k = min(r, c)
    u, _ = torch.linalg.qr(torch.randn(b, r, k, dtype=torch.float64, device=DEVICE))
    v, _ = torch.linalg.qr(torch.randn(b, c, k, dtype=torch.float64, device=DEVICE))
    s = torch.linspace(0.1, 1.0, k, dtype=torch.float64, device=DEVICE)
    x = (u * s) @ v.transpose(1, 2)
    schedule = resolve_ns_coefficients("deepseek_v4", 5)
    y = torch.ops.muon_ext.newton_schulz(x.float(), flat_coefficients(schedule), 1e-7).double()
    polar = u @ v.transpose(1, 2)
    # Where the exact polynomial map sends the normalized singular values.
    sigma = s / torch.linalg.vector_norm(s)
    for a, bb, cc in schedule:
        sigma = a * sigma + bb * sigma**3 + cc * sigma**5
    map_dev = (sigma - 1).abs().max().item()
    # 10 bf16 iterations: the bf16 reference lands within ~0.015 of the exact map here.
    bf16_slack = 0.05
    spectral = torch.linalg.matrix_norm(y - polar, ord=2).max().item()
    assert spectral <= map_dev + bf16_slack, (spectral, map_dev)
    sv = torch.linalg.svdvals(y)
    assert (sv - 1).abs().max().item() <= map_dev + bf16_slack
