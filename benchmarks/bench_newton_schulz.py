"""Orthogonalization alone, per shape, batch size and coefficient preset: fused vs torch bmm,
with the accuracy (max |sigma - 1|) of each result.

Same as ``python -m muon_ext.bench ns``; every option of that command works here::

    python benchmarks/bench_newton_schulz.py
    python benchmarks/bench_newton_schulz.py --shapes 768x3072 4096x14336 --batch 1 8 32
"""

import sys
from pathlib import Path

try:
    import muon_ext  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muon_ext.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["ns", *sys.argv[1:]]))
