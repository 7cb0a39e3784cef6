"""Orthogonalization alone: fused ``muon_ext.ops.newton_schulz`` against torch bmm, per
(m, n) shape, batch size and coefficient preset, with the accuracy of the result."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from ..coefficients import flat_coefficients, resolve_ns_algorithm, resolve_ns_coefficients
from ..reference import gram_flops, resolve_gram_restarts, standard_flops
from .baselines import Unsupported, compile_static, ns_dtype_for, orthogonalize_batched
from .timing import time_rotating

__all__ = [
    "DEFAULT_CPU_CASES",
    "DEFAULT_GPU_CASES",
    "NS_IMPLS",
    "log_spectrum_input",
    "run_ns_bench",
    "singular_values",
]

# (m, n, batch): the buckets of the model suites, one matrix and the model's batch.
DEFAULT_GPU_CASES = (
    (64, 64, 64),
    (128, 256, 32),
    (768, 768, 1),
    (768, 768, 48),
    (768, 3072, 1),
    (768, 3072, 24),
    (1024, 1024, 96),
    (1024, 4096, 48),
    (4096, 4096, 2),
    (4096, 14336, 3),
)
DEFAULT_CPU_CASES = (
    (64, 64, 1),
    (64, 64, 64),
    (128, 256, 1),
    (128, 256, 32),
    (768, 768, 1),
    (768, 3072, 1),
)
NS_IMPLS = ("muon_ext", "torch_bmm", "torch_bmm_compiled")


def log_spectrum_input(
    batch: int, m: int, n: int, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """(batch, m, n) fp32 matrices U diag(s) Vᵀ with s log-spaced in [1e-3, 1]."""
    s = torch.logspace(-3, 0, m, device=device)
    out = []
    for _ in range(batch):
        u, _ = torch.linalg.qr(torch.randn(m, m, device=device, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, m, device=device, generator=gen))
        out.append((u * s) @ v.T)
    return torch.stack(out)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each wide (m <= n) matrix, from the eigenvalues of the float64 Gram
    matrix X Xᵀ: far cheaper than an SVD at 4096 x 14336 and exact enough for |sigma - 1|."""
    xd = x.double()
    gram = xd @ xd.mT
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def _ns_fn(
    impl: str, schedule, eps: float, device: torch.device, algorithm: str = "standard"
) -> Callable[[torch.Tensor], torch.Tensor]:
    if impl == "muon_ext":
        from .. import ops
        from .._extension import extension_available

        if not extension_available() or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "muon_ext::newton_schulz", "CUDA" if device.type == "cuda" else "CPU"
        ):
            raise Unsupported(
                f"skipped: this muon_ext build has no newton_schulz kernel for {device.type}"
            )
        coeffs = flat_coefficients(schedule)
        restarts = resolve_gram_restarts(None, len(schedule))
        return lambda x: ops.newton_schulz(x, coeffs, eps, algorithm, restarts)
    ns_dtype = ns_dtype_for(device)

    def torch_bmm(x: torch.Tensor) -> torch.Tensor:
        return orthogonalize_batched(x, schedule, eps, ns_dtype).to(x.dtype)

    if impl == "torch_bmm":
        return torch_bmm
    if impl == "torch_bmm_compiled":
        return compile_static(torch_bmm)
    raise ValueError(f"unknown Newton-Schulz implementation {impl!r}; choose from {NS_IMPLS}")


def run_ns_bench(
    cases: Sequence[tuple[int, int, int]],
    presets: Sequence[str],
    impls: Sequence[str],
    device: torch.device,
    peaks: dict,
    *,
    repeats: int = 10,
    warmup: int = 2,
    rotate: int = 2,
    budget_s: float | None = 60.0,
    accuracy: bool = True,
    seed: int = 0,
    nvtx: bool = True,
    ns_algorithms: Sequence[str] = ("standard",),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per case, preset and implementation; muon_ext gets one row per algorithm in
    ``ns_algorithms`` (``muon_ext[gram]``, ...), with that algorithm's FLOPs in its floor."""
    rows: list[dict] = []
    eps = 1e-7
    ns_dtype = str(ns_dtype_for(device)).replace("torch.", "")
    for m, n, batch in cases:
        if m > n:
            m, n = n, m
        gen = torch.Generator(device=device).manual_seed(seed)
        acc_x = log_spectrum_input(min(batch, 2), m, n, device, gen) if accuracy else None
        inputs = None
        for preset in presets:
            schedule = resolve_ns_coefficients(preset, 5)
            iters = len(schedule)
            nbytes = batch * m * n * 8.0  # fp32 in, fp32 out
            runs = [
                (impl, alg)
                for impl in impls
                for alg in (ns_algorithms if impl == "muon_ext" else ("standard",))
            ]
            for impl, alg in runs:
                chosen = resolve_ns_algorithm(alg, m, n, device.type)
                per_matrix = (
                    gram_flops(m, n, iters) if chosen == "gram" else standard_flops(m, n, iters)
                )
                flops = float(batch * per_matrix)
                floor_ms = (flops / peaks["matmul_flops"] + nbytes / peaks["copy_bytes_per_s"]) * 1e3
                row = {
                    "bench": "ns",
                    "suite": f"{m}x{n} B={batch}",
                    "impl": impl if alg == "standard" else f"{impl}[{alg}]",
                    "ns_algorithm": alg,
                    "preset": preset,
                    "m": m,
                    "n": n,
                    "batch": batch,
                    "ns_iterations": iters,
                    "ns_flops": flops,
                    "ns_dtype": ns_dtype,
                    "median_ms": None,
                    "p20_ms": None,
                    "p80_ms": None,
                    "floor_ms": floor_ms,
                    "max_sigma_err": None,
                    "sigma_min": None,
                    "sigma_max": None,
                    "repeats": 0,
                    "status": "ok",
                    "note": "",
                }
                rows.append(row)
                rate = peaks.get("matmul_flops_by_dtype", {}).get(ns_dtype, peaks["matmul_flops"])
                est_s = flops / rate
                if budget_s and est_s * (rotate + 4) > budget_s:
                    row["status"] = "skipped"
                    row["note"] = (
                        f"skipped: estimated {est_s:.1f} s per call exceeds the {budget_s:g} s budget"
                    )
                    log(f"  {row['suite']:18s} {preset:14s} {row['impl']:20s} {row['note']}")
                    continue
                try:
                    fn = _ns_fn(impl, schedule, eps, device, alg)
                    if inputs is None:
                        inputs = [
                            torch.randn(batch, m, n, device=device, generator=gen)
                            for _ in range(rotate)
                        ]
                    if acc_x is not None:
                        sv = singular_values(fn(acc_x))
                        row["max_sigma_err"] = float((sv - 1).abs().max())
                        row["sigma_min"] = float(sv.min())
                        row["sigma_max"] = float(sv.max())
                    fns = [lambda x=x, fn=fn: fn(x) for x in inputs]
                    timing = time_rotating(
                        fns,
                        device,
                        warmup=warmup,
                        repeats=repeats,
                        budget_s=budget_s or None,
                        nvtx_label=f"bench::ns::{m}x{n}x{batch}::{preset}::{row['impl']}"
                        if nvtx
                        else None,
                    )
                    row.update(
                        median_ms=timing.median_ms,
                        p20_ms=timing.p20_ms,
                        p80_ms=timing.p80_ms,
                        repeats=len(timing.times_ms),
                        note=timing.note,
                    )
                except Unsupported as exc:
                    row["status"] = "skipped"
                    row["note"] = str(exc)
                except Exception as exc:  # noqa: BLE001  (a failing implementation must not end the run)
                    row["status"] = "error"
                    row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                shown = (
                    f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["note"]
                )
                log(f"  {row['suite']:18s} {preset:14s} {row['impl']:20s} {shown}")
        del inputs, acc_x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
