"""A small multi-shape CUDA Muon step and newton_schulz call, sized for compute-sanitizer.

Run under the sanitizer tools (benchmarks/gpu_suite.sh does this)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitizer_step.py
    compute-sanitizer --tool racecheck python benchmarks/sanitizer_step.py

Covers every kernel variant that matters for memory safety: fp32/bf16/fp16 params, Nesterov on
and off, wide and tall matrices in one bucket, a stack whose matrices start unaligned (scalar
walks), tall matrices of several strips, 1xN and Nx1, an empty tensor, device lr / grad_scale /
found_inf (found_inf set once: the early-return path), the legacy cuBLAS fallback, and
newton_schulz on every dtype. Exits non-zero if a result is not finite. (Without the caching
allocator every tensor is its own cudaMalloc, so memcheck sees out-of-bounds accesses exactly.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

try:
    import muon_ext  # registers torch.ops.muon_ext.*
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import muon_ext  # noqa: F401

from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale

SHAPES = [
    (1, 13, 17),
    (2, 17, 13),
    (2, 37, 41),
    (1, 300, 70),
    (1, 1, 29),
    (1, 23, 1),
    (1, 0, 5),
    (3, 16, 16),
]
FLAT = flat_coefficients(resolve_ns_coefficients("jordan", 5))


def step(dtype: torch.dtype, nesterov: bool, found_inf: float = 0.0) -> list[torch.Tensor]:
    dev = "cuda"
    params = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
    grads = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
    bufs = [0.1 * torch.randn(s, device=dev) for s in SHAPES]
    scales = [update_scale(s[1], s[2], None) for s in SHAPES]
    torch.ops.muon_ext.muon_step_(
        params,
        grads,
        bufs,
        torch.tensor([0.02], device=dev),
        0.95,
        nesterov,
        0.1,
        1e-7,
        FLAT,
        scales,
        torch.tensor([2.0], device=dev),
        torch.tensor([found_inf], device=dev),
    )
    return params + bufs


def main() -> int:
    torch.manual_seed(int(os.environ.get("MUON_EXT_TEST_SEED", "0")))
    outputs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for nesterov in (True, False):
            outputs += step(dtype, nesterov)
    step(torch.float32, True, found_inf=1.0)
    os.environ["MUON_EXT_NS_BACKEND"] = "cublas"
    outputs += step(torch.bfloat16, True)
    del os.environ["MUON_EXT_NS_BACKEND"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((2, 19, 7), (1, 64, 96)):
            x = torch.randn(shape, device="cuda").to(dtype)
            outputs.append(torch.ops.muon_ext.newton_schulz(x, FLAT, 1e-7))
    torch.cuda.synchronize()
    bad = [tuple(t.shape) for t in outputs if t.numel() and not torch.isfinite(t).all()]
    if bad:
        print(f"sanitizer_step: non-finite results for shapes {bad}")
        return 1
    print(f"sanitizer_step: OK ({len(outputs)} outputs finite)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
