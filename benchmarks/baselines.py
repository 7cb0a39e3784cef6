"""The implementations the Muon step is timed against (re-exported from
``muon_ext.benchmarking.baselines``): ``torch.optim.Muon``, a per-parameter PyTorch loop in
Keller Jordan's formulation, and a shape-batched bmm implementation (optionally compiled).

    from baselines import make_step, StepConfig
    step = make_step("torch_batched", params, grads, StepConfig(lr=0.02))
    step()  # one optimizer step, in place on params
"""

import sys
from pathlib import Path

try:
    import muon_ext  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muon_ext.benchmarking.baselines import *
