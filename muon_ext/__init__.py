"""muon_ext: the Muon optimizer with a fused C++/CUDA step for all matrices at once.

>>> from muon_ext import Muon
>>> opt = Muon([w for w in model.parameters() if w.ndim >= 2], lr=0.02)  # doctest: +SKIP
"""

from . import ops, reference
from ._extension import build_info, extension_available
from .coefficients import PRESETS
from .hybrid import MuonWithAdamW
from .optim import Muon
from .qk_clip import MuonClip, QKClip, QKClipLayer
from .routing import DEFAULT_ADAMW_PATTERNS, muon_param_groups

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADAMW_PATTERNS",
    "PRESETS",
    "Muon",
    "MuonClip",
    "MuonWithAdamW",
    "QKClip",
    "QKClipLayer",
    "build_info",
    "extension_available",
    "muon_param_groups",
    "ops",
    "reference",
]
