"""The step's bounded workspace (NOTE: [Workspace budget] in csrc/muon_step_args.h).

Chunking a shape bucket must not change results (every matrix's GEMMs are the same in any
chunk), the scratch a step allocates must follow the limit rather than the model, and a step
that fails after its allocations but before its first write must change nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from muon_ext import Muon, ops
from muon_ext._extension import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="needs the compiled extension")

# Awkward on purpose: tall and wide in one bucket, a 3-D stack whose matrices a chunk boundary
# splits, a matrix above the 32K-element reduction block, and a lone bigger matrix.
SHAPES = [(24, 40), (40, 24), (5, 24, 40), (24, 40), (200, 180), (3, 7, 5), (64, 96)]


def _params(
    dtype: torch.dtype, seed: int, device: str = "cpu"
) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
        for s in SHAPES
    ]
    grads = [
        [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]
        for _ in range(3)
    ]
    return params, grads


def _run(limit: int | None, dtype: torch.dtype, seed: int, nesterov: bool, device: str = "cpu"):
    params, grads = _params(dtype, seed, device)
    opt = Muon(params, lr=0.02, weight_decay=0.1, nesterov=nesterov, workspace_limit=limit)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], [
        opt.state[p]["momentum_buffer"].clone() for p in params
    ]


_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_many_chunks_are_bit_identical_to_one(dtype, nesterov, device):
    # CUDA: every chunk of a bucket runs the cuBLASLt algorithm chosen for the whole bucket
    # (NOTE: [Chunk-independent algorithm] in newton_schulz.cu), so the bits cannot change.
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    one_chunk = _run(1 << 40, dtype, seed, nesterov, device)
    # 1 byte: every matrix is a chunk of its own, and every matrix is larger than the limit.
    # 20 KB: about two 24x40 matrices per chunk, so a chunk boundary falls inside the 3-D stack.
    for limit in (1, 20_000, None):
        chunked = _run(limit, dtype, seed, nesterov, device)
        for a, b in zip(one_chunk[0] + one_chunk[1], chunked[0] + chunked[1]):
            assert torch.equal(a, b), f"limit={limit} seed={seed}"


def test_planned_workspace_follows_the_limit_not_the_model():
    def planned(count: int, limit: int) -> int:
        probes = [torch.empty(()).expand(1, 64, 256) for _ in range(count)]
        return ops.muon_step_workspace_bytes(probes, limit)

    per_matrix = 4 * (2 * 64 * 256 + 2 * 64 * 64)
    partials = 8  # one double per 32K-element block: one block per 64x256 matrix
    limit = 10 * per_matrix
    # Bounded: ten matrices per chunk at most, however many there are (plus the partial sums,
    # 8 bytes per 32K elements, i.e. 0.006% of the params' bytes).
    for count in (1, 10, 100, 1000):
        assert planned(count, limit) == min(count, 10) * per_matrix + count * partials
    # A matrix larger than the limit is a chunk of its own.
    assert planned(3, 1) == per_matrix + 3 * partials
    # The default: 819 of these fit, so 1000 go as two balanced chunks of 500.
    fit = ops.DEFAULT_WORKSPACE_LIMIT // per_matrix
    chunks = -(-1000 // fit)
    assert planned(1000, -1) == -(-1000 // chunks) * per_matrix + 1000 * partials


def test_optimizer_reports_its_workspace_and_validates_the_limit():
    params = [torch.nn.Parameter(torch.randn(64, 256)) for _ in range(8)]
    per_matrix = 4 * (2 * 64 * 256 + 2 * 64 * 64)
    opt = Muon(params, workspace_limit=3 * per_matrix)
    # 8 matrices in chunks of at most 3: balanced 3, 3, 2.
    assert opt.workspace_bytes() == 3 * per_matrix + 8 * 8
    opt.workspace_limit = None
    assert opt.workspace_bytes() == 8 * per_matrix + 8 * 8
    for bad in (0, -5, 1.5, True, "1MB"):
        with pytest.raises(ValueError, match="workspace_limit"):
            Muon(params, workspace_limit=bad)
    with pytest.raises(RuntimeError, match="workspace_limit"):
        ops.muon_step_(
            [params[0].detach().view(1, 64, 256)], [torch.randn(1, 64, 256)],
            [torch.zeros(1, 64, 256)], torch.tensor(0.1), 0.9, True, 0.0, 1e-7,
            [3.4445, -4.775, 2.0315], [1.0], workspace_limit=0,
        )


@pytest.mark.parametrize("device", _DEVICES)
def test_failure_after_allocation_before_first_write_changes_nothing(monkeypatch, device):
    params, grads = _params(torch.float32, 0, device)
    opt = Muon(params, workspace_limit=20_000)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    monkeypatch.setenv("MUON_EXT_TEST_FAIL_BEFORE_WRITE", "1")
    with pytest.raises(RuntimeError, match="failure injected before the first write"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(momentum, params))
    monkeypatch.delenv("MUON_EXT_TEST_FAIL_BEFORE_WRITE")
    opt.step()  # and the retry applies the momentum once: as a step that never failed
    twin_params, _ = _params(torch.float32, 0, device)
    twin = Muon(twin_params, workspace_limit=20_000)
    for step_grads in grads[:2]:
        for p, g in zip(twin_params, step_grads):
            p.grad = g.clone()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


_PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from muon_ext import Muon
    torch.set_num_threads(1)
    count, limit = int(sys.argv[1]), int(sys.argv[2])
    params = [torch.nn.Parameter(torch.randn(256, 1024)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params, workspace_limit=limit)
    for p in params:  # the state a first step would create: what the user's tensors hold
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    # A step of two small matrices first: it pages in the code the big step runs (MKL's GEMM
    # kernels, ATen's elementwise kernels), which the high-water mark would otherwise count.
    warm = [torch.nn.Parameter(torch.randn(64, 256)) for _ in range(2)]
    for p in warm:
        p.grad = torch.randn_like(p)
    Muon(warm).step()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024)
    """
)


def _extra_rss(count: int, limit: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(count), str(limit)],
        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_extra_memory_is_bounded_as_the_model_grows():
    """Peak RSS of a step (state already made) in a fresh process: bounded by the limit.

    The process's high-water mark can only grow, so ``peak - base`` is what the step added on
    top of everything allocated before it. With 4 MiB of scratch per chunk the extra memory must
    stay near 4 MiB for 8 and for 32 matrices of 1 MiB each, where holding every bucket at once
    (the old plan) would need 2.5x the params: 20 and 80 MiB.
    """
    limit = 4 << 20
    small, large = _extra_rss(8, limit), _extra_rss(32, limit)
    # Allowance: the limit, plus 4 MiB for allocator slack and BLAS packing buffers.
    bound = limit + (4 << 20)
    assert small <= bound and large <= bound, (small, large)


# Llama-3-8B's Muon matrices of one layer (q, k, v, o, gate, up, down), bf16.
_LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
                    (14336, 4096), (4096, 14336)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_extra_memory_of_a_llama3_8b_layer_is_bounded():
    """max_memory_allocated around a step, state already made: the workspace limit, not the model.

    Before chunking the step held two bf16 copies of every matrix (4 bytes per param, 0.87 GB for
    this layer's 218M params) plus the Gram buffers. Now: one chunk's scratch (at most the
    limit), plus torch's cuBLASLt workspace (32 MiB on Hopper, allocated once) and the fp32 copy
    of lr.
    """
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02)
              for s in _LLAMA3_8B_LAYER]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params, lr=0.02)
    opt.step()  # creates the state; later steps allocate only the workspace
    planned = opt.workspace_bytes()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert planned <= ops.DEFAULT_WORKSPACE_LIMIT
    assert extra <= planned + (40 << 20), (extra, planned)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_planned_workspace_follows_the_limit_not_the_model():
    def planned(count: int, limit: int) -> int:
        probes = [torch.empty((), device="cuda", dtype=torch.bfloat16).expand(1, 64, 256)
                  for _ in range(count)]
        return ops.muon_step_workspace_bytes(probes, limit)

    limit = 1 << 20
    assert planned(100, limit) == planned(1000, limit) <= limit
    assert planned(1, 1) > 1  # a matrix larger than the limit is a chunk of its own
