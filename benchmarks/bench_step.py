"""One full optimizer step per implementation, on the same params and grads, per suite.

Same as ``python -m muon_ext.bench step``; every option of that command works here::

    python benchmarks/bench_step.py --suite gpt2_small llama3_8b_layer
    python benchmarks/bench_step.py --suite cpu_small --device cpu --repeats 5
"""

import sys
from pathlib import Path

try:
    import muon_ext  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muon_ext.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["step", *sys.argv[1:]]))
