"""Benchmarks of the Muon step against the anchors and the FLOP/byte floors.

Importable from an installed package; ``python -m muon_ext.bench`` is the command line,
and the scripts under the repository's ``benchmarks/`` call into this package.
"""

from .baselines import IMPLS, StepConfig, Unsupported, make_step, orthogonalize_batched
from .report import compare_records, format_record, load_record, plot_record, write_json
from .shapes import DEFAULT_CPU_SUITES, DEFAULT_GPU_SUITES, SUITES, ParamSpec, Suite, get_suite

__all__ = [
    "DEFAULT_CPU_SUITES",
    "DEFAULT_GPU_SUITES",
    "IMPLS",
    "SUITES",
    "ParamSpec",
    "StepConfig",
    "Suite",
    "Unsupported",
    "compare_records",
    "format_record",
    "get_suite",
    "load_record",
    "make_step",
    "orthogonalize_batched",
    "plot_record",
    "write_json",
]
