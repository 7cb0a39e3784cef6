"""Loads the compiled core (``muon_ext._C``), which registers ``torch.ops.muon_ext.*``."""

from __future__ import annotations

import torch  # torch's libraries must be loaded before the extension

# The bindings this Python code calls (csrc/bindings.cpp sets the same number).
ABI_VERSION = 2

_IMPORT_ERROR: str | None = None
try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = (
        f"muon_ext's compiled core failed to load ({exc}). It must be built against the "
        f"installed torch {torch.__version__} (CUDA {torch.version.cuda}): reinstall with "
        "`pip install --no-build-isolation .`; `python -m muon_ext.info` shows the details."
    )
else:
    if getattr(_C, "abi_version", None) != ABI_VERSION:  # pragma: no cover - stale builds only
        _IMPORT_ERROR = (
            f"muon_ext's compiled core is a stale build (bindings version "
            f"{getattr(_C, 'abi_version', 'none')}, this code needs {ABI_VERSION}): rebuild with "
            "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)."
        )
        _C = None


def extension_available() -> bool:
    return _C is not None


def build_info() -> dict:
    """How the compiled core was built (torch, CUDA, cuBLAS, archs), or why it is missing."""
    if _C is None:
        return {"available": False, "error": _IMPORT_ERROR}
    return {"available": True, **_C.build_info()}


def require_extension() -> None:
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
