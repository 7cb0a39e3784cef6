"""Which implementation steps a param, and the scalars handed to the ops.

Shared by the optimizer (``muon_ext.optim``) and the distributed driver
(``muon_ext.distributed``), so that neither imports the other for it: the optimizer calls the
driver, and both decide alike whether a param takes the fused ops or the pure-PyTorch path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._extension import _C, extension_available

__all__ = [
    "FUSED_DTYPES",
    "NORMUON_STATE_KEY",
    "fused_device_supported",
    "fused_supported",
    "lr_tensor",
    "momentum_buffer",
    "momentum_dtype",
    "same_state",
    "scalar_on",
    "step_facts",
    "tensors_hash",
    "takes_fused_step",
]

# Param dtypes the fused ops take; float64 params run the pure-PyTorch path.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# State key of NorMuon's second moment (NOTE: [NorMuon state] in muon_ext/reference.py).
NORMUON_STATE_KEY = "normuon_v"


def momentum_dtype(param: Tensor) -> torch.dtype:
    """Momentum is kept in fp32 for low-precision params (bf16 momentum loses small grads)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def momentum_buffer(state: dict, param: Tensor) -> Tensor:
    """``param``'s momentum buffer in its state dict, created as zeros on first use."""
    buf = state.get("momentum_buffer")
    if buf is None:
        state["momentum_buffer"] = buf = torch.zeros_like(
            param, dtype=momentum_dtype(param), memory_format=torch.contiguous_format
        )
    return buf


def same_state(held: list[Any], states: list[dict], params: list[Tensor], state: Any) -> bool:
    """Whether state cached from the params' state dicts is still current: those dicts are
    still the params' entries of ``state`` (``del opt.state[p]`` or ``opt.state[p] = {}``
    makes a param start afresh, as torch.optim does), and the tensors ``held`` from them are
    still in them (a user may replace them): momentum buffers, or (momentum buffer, NorMuon
    vector) pairs with NorMuon on."""
    if not all(state.get(p) is st for p, st in zip(params, states)):
        return False
    if held and isinstance(held[0], tuple):
        return all(
            st.get("momentum_buffer") is b[0] and st.get(NORMUON_STATE_KEY) is b[1]
            for st, b in zip(states, held)
        )
    return all(st.get("momentum_buffer") is b for st, b in zip(states, held))


def fused_device_supported(device: torch.device) -> bool:
    if not extension_available():
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        # meta, mps, xpu, ...: no fused kernel; such params take the pure-PyTorch step.
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("muon_ext::muon_step_", "CUDA")


def fused_supported(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether the built extension has a fused step for ``p``'s dtype and device (NorMuon or
    not: the CPU and CUDA steps both have it)."""
    return p.dtype in FUSED_DTYPES and fused_device_supported(p.device)


def takes_fused_step(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is stepped by the fused ops (else by the pure-PyTorch path)."""
    return group["fused"] is not False and fused_supported(p, group)


def scalar_on(t: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor for the ops: as is when on ``device`` or on the CPU (the ops read a
    CPU scalar on the host, no copy), else moved on the device side. Never a host sync."""
    if t.device == device or t.device.type == "cpu":
        return t
    return t.to(device)


def lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        return scalar_on(lr, device).reshape(())
    # A CPU float64 scalar (read on the host by the op). Under torch.compile a float lr is a
    # constant of the graph, and a new value recompiles: schedule a Tensor lr instead.
    return torch.tensor(float(lr), dtype=torch.float64)


def step_facts(params: list[Tensor]) -> tuple[list[Tensor | None], int, int]:
    """(each param's grad or None; the index of the first grad whose shape, dtype or device
    differs from its param's, or that is sparse, else -1; a hash of which params have grads
    and of those params' data pointers, shapes, dtypes and devices), in one C++ pass (NOTE:
    [Cached plan] in muon_ext/optim.py)."""
    if extension_available():
        return _C.step_facts(params)
    grads = [p.grad for p in params]
    bad = next(
        (i for i, (p, g) in enumerate(zip(params, grads)) if g is not None and (
            g.is_sparse or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device)),
        -1,
    )
    key = tuple(None if g is None else _tensor_facts(p) for p, g in zip(params, grads))
    return grads, bad, hash(key)


def tensors_hash(tensors: list[Tensor]) -> int:
    """A hash of the tensors' data pointers, shapes, dtypes and devices (one C++ pass)."""
    if extension_available():
        return _C.tensors_hash(tensors)
    return hash(tuple(map(_tensor_facts, tensors)))


def _tensor_facts(t: Tensor) -> tuple:
    # As in C++: a DTensor is a wrapper with no storage, so only its shape, dtype and device.
    pointer = 0 if hasattr(t, "_local_tensor") else t.data_ptr()
    return pointer, t.shape, t.dtype, t.device
