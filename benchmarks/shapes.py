"""Parameter-shape registry of real models (GPT-2 small/medium, Llama-3-8B layer, MoE, ResNet-50).

The registry lives in ``muon_ext.benchmarking.shapes`` so that ``python -m muon_ext.bench``
works from an installed package; this script re-exports it and prints the suites with
their FLOP and byte counts::

    python benchmarks/shapes.py
"""

import sys
from pathlib import Path

try:
    import muon_ext  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muon_ext.benchmarking.shapes import *
from muon_ext.benchmarking.shapes import SUITES, elementwise_bytes, ns_flops

if __name__ == "__main__":
    print(
        f"{'suite':24s} {'params':>6s} {'matrices':>8s} {'M elements':>10s} {'NS TFLOP (5 it.)':>16s} "
        f"{'elementwise GB':>14s}  buckets (m x n: count)"
    )
    for s in SUITES.values():
        shapes = s.shapes()
        buckets = ", ".join(f"{m}x{n}: {c}" for (m, n), c in s.buckets().items())
        print(
            f"{s.name:24s} {s.num_params:6d} {s.num_matrices:8d} {s.numel / 1e6:10.2f} "
            f"{ns_flops(shapes, 5) / 1e12:16.3f} {elementwise_bytes(shapes) / 1e9:14.3f}  {buckets}"
        )
