"""Peak extra memory and host time of one step, next to its time (DESIGN.md: both are performance).

* **Peak extra memory**: what a step allocates on top of the tensors the user already holds
  (params, grads, optimizer state after a first step). On CUDA: ``max_memory_allocated`` during
  the step minus ``memory_allocated`` before it. On the CPU, where torch keeps no allocator
  statistics, the first step runs in a fresh process (``python -m muon_ext.benchmarking.memory``):
  the high-water mark of its resident set is reset just before the step (``/proc/self/clear_refs``;
  without it, loading torch's libraries dominated the lifetime peak: 600 MiB "extra" for a 5 MB
  model), and the step's peak minus the resident set after it (which holds the state the step
  created) is what it added. A fresh process per row keeps one implementation's peak from
  hiding another's.
* **Host time**: how long ``step()`` keeps the calling thread, without waiting for the device
  (on CUDA that is the time a training loop cannot hide; on the CPU it is the step itself).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["host_ms", "peak_extra_bytes"]


def host_ms(fn: Callable[[], None], device: torch.device, repeats: int = 5) -> float:
    """Median wall time of the call itself (the device drained before each call, not after)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times.sort()
    return times[len(times) // 2]


def _cuda_peak_extra(make: Callable[[], Callable[[], None]], device: torch.device) -> int:
    fn = make()
    fn()  # state now exists, as after the first step of training
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_extra_bytes(
    impl: str, shapes: Sequence[tuple[int, ...]], device: torch.device, dtype: torch.dtype,
    make: Callable[[], Callable[[], None]] | None = None, ns_algorithm: str = "standard",
) -> int:
    """Peak extra bytes of one step of ``impl`` on params of ``shapes`` (see the module doc)."""
    if device.type == "cuda":
        if make is None:
            make = lambda: _make(impl, shapes, device, dtype, ns_algorithm)  # noqa: E731
        return _cuda_peak_extra(make, device)
    payload = json.dumps({"impl": impl, "shapes": [list(s) for s in shapes],
                          "dtype": str(dtype).replace("torch.", ""),
                          "ns_algorithm": ns_algorithm})
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(
        [sys.executable, "-m", "muon_ext.benchmarking.memory", payload],
        check=True, capture_output=True, text=True, env=env, timeout=600,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _make(impl: str, shapes: Sequence[tuple[int, ...]], device: torch.device,
          dtype: torch.dtype, ns_algorithm: str = "standard") -> Callable[[], None]:
    from .baselines import StepConfig, make_step

    gen = torch.Generator(device=device).manual_seed(0)
    params = [(0.02 * torch.randn(s, device=device, generator=gen)).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    return make_step(impl, params, grads, StepConfig(ns_algorithm=ns_algorithm))


def _main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fn = _make(args["impl"], [tuple(s) for s in args["shapes"]], torch.device("cpu"),
               getattr(torch, args["dtype"]), args.get("ns_algorithm", "standard"))
    # The high-water mark never falls, so a warm-up step would hide the step's own peak: the
    # first step is measured, and what it leaves allocated (the state it creates) is taken off.
    gc.collect()
    reset = _reset_peak_resident()
    fn()
    peak = _peak_resident_bytes() if reset else None
    if peak is None:  # no resettable high-water mark: the process's lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(max(0, peak - _resident_bytes()))


def _reset_peak_resident() -> bool:
    """Resets the high-water mark (VmHWM) to the current resident set (Linux >= 4.0), so that
    what `import torch` and the setup touched before the step is not counted as the step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    _main()
