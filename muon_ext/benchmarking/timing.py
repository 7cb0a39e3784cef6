"""Timing: warm-up, rotating input sets, median and 20/80 percentiles, a per-row time budget.

On CUDA every timed step is bracketed by CUDA events after an L2 flush and a synchronize, so
neither a warm cache nor host work queued behind the previous step flatters the number (the
host-side launch cost of a step is part of what users wait for, and is included). On CPU the
host clock brackets the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Timing", "measure_peaks", "percentile", "sync", "time_rotating"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    times_ms: list[float]
    note: str = ""

    @property
    def median_ms(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p20_ms(self) -> float:
        return percentile(self.times_ms, 20)

    @property
    def p80_ms(self) -> float:
        return percentile(self.times_ms, 80)


class _L2Flusher:
    """Writes a buffer larger than the L2 between timed runs (cudaMemset-backed)."""

    def __init__(self, device: torch.device) -> None:
        self.buf = None
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
            self.buf = torch.empty(max(2 * l2, 256 * 2**20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def _wall(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_rotating(
    fns: Sequence[Callable[[], None]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    min_repeats: int = 3,
    nvtx_label: str | None = None,
    profiler_range: bool = False,
) -> Timing:
    """Times ``fns[i % len(fns)]()`` for i in range(repeats) after warm-up.

    Each input set is warmed up at least once (its first call creates optimizer state).
    With ``budget_s``, the second warm-up call's time decides how many warm-ups and repeats
    fit: the row then records fewer repeats (at least ``min_repeats``) and says so in its note.
    """
    k = len(fns)
    warmup = max(warmup, k, 2)
    # The first call creates state (and compiles, for compiled baselines): the second one
    # is the estimate of a step's time that the budget works with.
    spent_ms = _wall(fns[0], device)
    step_ms = _wall(fns[1 % k], device)
    spent_ms += step_ms
    note = ""
    if budget_s is not None:
        left_ms = budget_s * 1e3 - spent_ms
        if (warmup - 2 + repeats) * step_ms > left_ms:
            warmup = max(k, 2)
            fit = int(left_ms // max(step_ms, 1e-6)) - (warmup - 2)
            new_repeats = max(min_repeats, min(repeats, fit))
            if new_repeats < repeats:
                note = f"repeats cut to {new_repeats} by the {budget_s:g} s time budget"
                repeats = new_repeats
    for i in range(2, warmup):
        fns[i % k]()
    sync(device)

    flush = _L2Flusher(device)
    times: list[float] = []
    if nvtx_label and device.type == "cuda":
        torch.cuda.nvtx.range_push(nvtx_label)
    if profiler_range and device.type == "cuda":
        torch.cuda.profiler.start()
    try:
        if device.type == "cuda":
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(repeats)
            ]
            for i, (start, end) in enumerate(events):
                flush()
                torch.cuda.synchronize(device)
                start.record()
                fns[i % k]()
                end.record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(repeats):
                t0 = time.perf_counter()
                fns[i % k]()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if profiler_range and device.type == "cuda":
            torch.cuda.profiler.stop()
        if nvtx_label and device.type == "cuda":
            torch.cuda.nvtx.range_pop()
    return Timing(times, note)


# ---------------------------------------------------------------------- peaks


def _best_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()
    fn()
    sync(device)
    best = math.inf
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            best = min(best, start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """The device's ceilings, measured now: a large matmul and a large copy.

    The best of several runs is taken, so floors derived from these are as low as this
    device has shown it can go (the conservative direction for our ratios). On CUDA the
    matmul is bf16 (what the Newton-Schulz GEMMs run in); on CPU it is fp32 (the CPU path
    computes NS in fp32), with bf16 measured as well for the per-row time estimates.
    """
    gen = torch.Generator(device=device).manual_seed(1234)
    peaks: dict = {}

    def matmul_rate(dtype: torch.dtype, n: int, reps: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        out = torch.empty(n, n, device=device, dtype=dtype)
        ms = _best_ms(lambda: torch.mm(a, b, out=out), device, reps)
        return 2.0 * n**3 / (ms * 1e-3)

    if device.type == "cuda":
        n = 4096 if quick else 8192
        peaks["matmul_dtype"] = "bfloat16"
        peaks["matmul_shape"] = [n, n, n]
        peaks["matmul_flops"] = matmul_rate(torch.bfloat16, n, 5 if quick else 20)
        peaks["matmul_flops_by_dtype"] = {"bfloat16": peaks["matmul_flops"]}
        nbytes = (256 if quick else 2048) * 2**20
    else:
        # A CPU's best size varies; the best of two sizes keeps a low reading from one of them
        # (a busy core, a bad blocking) out of the floor.
        sizes = (512,) if quick else (1024, 2048)
        by_dtype = {}
        for dtype in (torch.float32, torch.bfloat16):
            rates = {n: matmul_rate(dtype, n, 3 if quick else 5) for n in sizes}
            best = max(rates, key=rates.get)
            by_dtype[str(dtype).replace("torch.", "")] = (rates[best], best)
        rate, n = by_dtype["float32"]
        peaks["matmul_dtype"] = "float32"
        peaks["matmul_shape"] = [n, n, n]
        peaks["matmul_flops"] = rate
        peaks["matmul_flops_by_dtype"] = {k: v[0] for k, v in by_dtype.items()}
        nbytes = (32 if quick else 256) * 2**20
    src = torch.randn(nbytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, 5 if quick else 10)
    peaks["copy_bytes_per_s"] = 2.0 * nbytes / (ms * 1e-3)  # read + write
    peaks["copy_bytes"] = nbytes
    return peaks
