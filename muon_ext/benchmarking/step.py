"""The full-step benchmark: every implementation on the same params and grads, per suite."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from ..coefficients import resolve_ns_coefficients
from .baselines import StepConfig, Unsupported, impl_ns_dtype, make_step
from .shapes import Suite, elementwise_bytes, ns_flops
from .memory import host_ms, peak_extra_bytes
from .timing import sync, time_rotating

__all__ = ["DEFAULT_CPU_IMPLS", "DEFAULT_GPU_IMPLS", "impl_label", "run_step_bench", "suite_info"]

DEFAULT_GPU_IMPLS = (
    "muon_ext",
    "torch_muon",
    "torch_loop",
    "torch_batched",
    "torch_batched_compiled",
)
DEFAULT_CPU_IMPLS = ("muon_ext", "torch_muon", "torch_loop", "torch_batched")

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def impl_label(impl: str, ns_algorithm: str) -> str:
    """Row name: the implementation, with the Newton-Schulz algorithm unless standard."""
    return impl if ns_algorithm == "standard" else f"{impl}[{ns_algorithm}]"


def suite_info(suite: Suite, iterations: int, param_dtype: torch.dtype, peaks: dict) -> dict:
    shapes = suite.shapes()
    flops = ns_flops(shapes, iterations)
    pb = _DTYPE_BYTES[param_dtype]
    nbytes = elementwise_bytes(shapes, param_bytes=pb, grad_bytes=pb, momentum_bytes=4)
    ns_floor = flops / peaks["matmul_flops"] * 1e3
    ew_floor = nbytes / peaks["copy_bytes_per_s"] * 1e3
    return {
        "description": suite.description,
        "shapes": [list(s) for s in shapes],
        "num_params": suite.num_params,
        "param_mib": sum(_numel(s) for s in shapes) * pb / 2**20,
        "num_matrices": suite.num_matrices,
        "numel": suite.numel,
        "buckets": {f"{m}x{n}": c for (m, n), c in suite.buckets().items()},
        "ns_iterations": iterations,
        "ns_flops": flops,
        "ns_floor_ms": ns_floor,
        "ew_bytes": nbytes,
        "ew_floor_ms": ew_floor,
        "floor_ms": ns_floor + ew_floor,
    }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _make_sets(
    shapes: Sequence[tuple[int, ...]], k: int, device: torch.device, dtype: torch.dtype, seed: int
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """k independent (params, grads) sets; the same seed gives every implementation the same data."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(k):
        params = [(0.02 * torch.randn(s, device=device, generator=gen)).to(dtype) for s in shapes]
        grads = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
        sets.append((params, grads))
    return sets


def _impl_note(impl: str, suite: Suite, device: torch.device) -> str:
    notes = [f"NS {str(impl_ns_dtype(impl, device)).replace('torch.', '')}"]
    if impl == "torch_muon" and any(len(s) != 2 for s in suite.shapes()):
        notes.append("3-D/4-D params passed as 2-D views")
    return "; ".join(notes)


def run_step_bench(
    suites: Sequence[Suite],
    impls: Sequence[str],
    device: torch.device,
    peaks: dict,
    *,
    param_dtype: torch.dtype = torch.float32,
    preset: str = "jordan",
    repeats: int = 10,
    warmup: int = 2,
    rotate: int = 2,
    budget_s: float | None = 60.0,
    seed: int = 0,
    nvtx: bool = True,
    profiler_range: bool = False,
    memory: bool = True,
    ns_algorithms: Sequence[str] = ("standard",),
    normuon: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, dict]]:
    """One row per suite and implementation; muon_ext gets one row per Newton-Schulz
    algorithm in ``ns_algorithms`` (named ``muon_ext[gram]`` etc.), its floor from that
    algorithm's FLOPs. The baselines run standard NS. ``normuon``: one more muon_ext row,
    ``muon_ext[normuon]`` (standard NS, NorMuon on: its update differs by design, so its
    update_rel_diff measures NorMuon, not an error)."""
    schedule = resolve_ns_coefficients(preset, 5)
    rows: list[dict] = []
    infos: dict[str, dict] = {}
    min_repeats = 3
    for suite in suites:
        info = suite_info(suite, len(schedule), param_dtype, peaks)
        infos[suite.name] = info
        shapes = suite.shapes()
        ref_delta: list[torch.Tensor] | None = None
        runs = [
            (impl, alg, False)
            for impl in impls
            for alg in (ns_algorithms if impl == "muon_ext" else ("standard",))
        ]
        if normuon and "muon_ext" in impls:
            at = max(i for i, r in enumerate(runs) if r[0] == "muon_ext") + 1
            runs.insert(at, ("muon_ext", "standard", True))
        for impl, alg, nu in runs:
            cfg = StepConfig(schedule=schedule, ns_algorithm=alg, normuon=nu)
            alg_flops = ns_flops(shapes, len(schedule), alg, device.type)
            alg_ns_floor = alg_flops / peaks["matmul_flops"] * 1e3
            row = {
                "bench": "step",
                "suite": suite.name,
                "impl": impl_label(impl, alg) + ("[normuon]" if nu else ""),
                "ns_algorithm": alg,
                "ns_flops": alg_flops,
                "preset": preset,
                "param_dtype": str(param_dtype).replace("torch.", ""),
                "ns_dtype": str(impl_ns_dtype(impl, device)).replace("torch.", ""),
                "median_ms": None,
                "p20_ms": None,
                "p80_ms": None,
                "floor_ms": alg_ns_floor + info["ew_floor_ms"],
                "ns_floor_ms": alg_ns_floor,
                "ew_floor_ms": info["ew_floor_ms"],
                "repeats": 0,
                "update_rel_diff": None,
                "host_ms": None,
                "peak_extra_mib": None,
                "status": "ok",
                "note": "",
            }
            rows.append(row)
            # Skip before allocating anything when even a minimal run cannot fit the budget.
            rate = peaks.get("matmul_flops_by_dtype", {}).get(
                row["ns_dtype"], peaks["matmul_flops"]
            )
            est_s = alg_flops / rate + info["ew_bytes"] / peaks["copy_bytes_per_s"]
            if budget_s and est_s * (rotate + 1 + min_repeats) > budget_s:
                row["status"] = "skipped"
                row["note"] = (
                    f"skipped: estimated {est_s:.1f} s/step on this device ({row['ns_dtype']} matmul "
                    f"at {rate / 1e9:.0f} GFLOP/s) does not fit the {budget_s:g} s budget "
                    "(--budget-s 0 to run anyway)"
                )
                log(f"  {suite.name:24s} {row['impl']:24s} {row['note']}")
                continue
            sets = fns = before = None
            try:
                sets = _make_sets(shapes, rotate, device, param_dtype, seed)
                before = [p.clone() for p in sets[0][0]]
                fns = [make_step(impl, params, grads, cfg) for params, grads in sets]
                # First step of set 0, from the shared initial state: the update check.
                fns[0]()
                sync(device)
                delta = [(p.float() - b.float()) for p, b in zip(sets[0][0], before)]
                if ref_delta is None:
                    ref_delta = delta
                    row["update_rel_diff"] = 0.0
                    info["update_reference"] = row["impl"]
                else:
                    num = sum(float((d - r).square().sum()) for d, r in zip(delta, ref_delta))
                    den = sum(float(r.square().sum()) for r in ref_delta)
                    row["update_rel_diff"] = (num / den) ** 0.5 if den > 0 else None
                del delta
                before = None
                timing = time_rotating(
                    fns,
                    device,
                    warmup=max(warmup - 1, 1),
                    repeats=repeats,
                    budget_s=budget_s or None,
                    min_repeats=min_repeats,
                    nvtx_label=f"bench::{suite.name}::{row['impl']}" if nvtx else None,
                    profiler_range=profiler_range,
                )
                row.update(
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    repeats=len(timing.times_ms),
                    times_ms=timing.times_ms,
                )
                row["note"] = "; ".join(
                    n for n in (_impl_note(impl, suite, device), timing.note) if n
                )
                row["host_ms"] = host_ms(fns[0], device, repeats=min(5, repeats))
                if memory:
                    del fns
                    fns = None
                    gc.collect()
                    row["peak_extra_mib"] = peak_extra_bytes(
                        impl, shapes, device, param_dtype, ns_algorithm=alg
                    ) / 2**20
            except Unsupported as exc:
                row["status"] = "skipped"
                row["note"] = str(exc)
            except Exception as exc:  # noqa: BLE001  (a failing baseline must not end the run)
                row["status"] = "error"
                row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            finally:
                del sets, fns, before
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            shown = f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["note"]
            if row["peak_extra_mib"] is not None:
                shown += f", peak extra {row['peak_extra_mib']:.1f} MiB"
            log(f"  {suite.name:24s} {row['impl']:24s} {shown}")
        ref_delta = None
    return rows, infos
