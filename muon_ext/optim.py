"""``muon_ext.Muon``: a drop-in for ``torch.optim.Muon`` whose step is one fused call per device and dtype.

The optimizer layer owns validation, param groups, state and the cached *plan* (which
tensors go to which fused call, their matrix views and update scales). The math lives in
the ops (``muon_ext.ops``), and the semantics in ``muon_ext.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import ops
from ._extension import extension_available
from .coefficients import (
    ADJUST_LR_FNS,
    JORDAN,
    flat_coefficients,
    matrix_shape,
    resolve_ns_coefficients,
    update_scale,
)
from .reference import orthogonalize

__all__ = ["Muon", "FUSED_DTYPES"]

# Param dtypes the fused ops take; float64 params run the pure-PyTorch path.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def momentum_dtype(param: Tensor) -> torch.dtype:
    """Momentum is kept in fp32 for low-precision params (bf16 momentum loses small grads)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _fused_device_supported(device: torch.device) -> bool:
    if not extension_available():
        return False
    if device.type == "cpu":
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "muon_ext::muon_step_", "CUDA" if device.type == "cuda" else device.type
    )


@dataclass
class _Call:
    """One fused call: tensors of a single device and dtype, in bucket order."""

    indices: list[int]  # positions in the group's params-with-grad list
    update_scales: list[float]
    fused: bool


def _bucket_key(shape: torch.Size) -> tuple[int, int]:
    _, rows, cols = matrix_shape(shape)
    return min(rows, cols), max(rows, cols)


def _describe(param_names: list[str] | None, group_index: int, position: int) -> str:
    if param_names is not None and position < len(param_names):
        return f"parameter {param_names[position]!r} (param_groups[{group_index}], index {position})"
    return f"parameter param_groups[{group_index}]['params'][{position}]"


class Muon(Optimizer):
    """Muon: momentum, orthogonalized by Newton-Schulz, with decoupled weight decay.

    Same constructor, defaults, update and ``state_dict`` (``momentum_buffer``) as
    ``torch.optim.Muon``. Additionally:

    * 3-D params are stacks of independent matrices (MoE experts); 4-D+ (conv) params are
      orthogonalized as (out, in·kh·kw); the lr scale rule uses that matrix's shape.
    * ``ns_coefficients`` is one (a, b, c) triple, a list of triples (one per iteration), or
      a preset name: ``"jordan"`` (default values), ``"polar_express"``, ``"deepseek_v4"``.
    * ``fused`` (keyword-only): ``None`` picks the fused C++/CUDA step when the extension
      supports the params' device and dtype; ``False`` forces the pure-PyTorch loop.
    * ``capturable`` (keyword-only): keep everything on the device for CUDA-graph capture.
    * AMP: ``GradScaler`` passes ``grad_scale``/``found_inf`` and the step unscales on device.
    * Momentum buffers of bf16/fp16 params are float32.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = JORDAN,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        fused: bool | None = None,
        capturable: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "fused": fused,
            "capturable": capturable,
        }
        _validate_hyperparameters(defaults, where="Muon")
        self._plans: dict[int, tuple[tuple, list[_Call]]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        try:
            _validate_hyperparameters(group, where=f"param_groups[{index}]")
            _validate_params(group, index)
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("fused", None)
            group.setdefault("capturable", False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads ours or torch.optim.Muon's; momentum stays float32 for low-precision params.

        ``Optimizer.load_state_dict`` casts floating state to the param dtype, which would
        round a float32 momentum to bf16; the saved buffers are restored at full precision.
        """
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        saved = {
            pid: s["momentum_buffer"]
            for pid, s in state_dict["state"].items()
            if isinstance(s, dict) and isinstance(s.get("momentum_buffer"), Tensor)
        }
        super().load_state_dict(state_dict)
        own = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for pid, p in zip(saved_ids, own, strict=False):
            if pid in saved:
                buf = saved[pid]
                if buf.shape != p.shape:
                    raise ValueError(
                        f"load_state_dict: momentum_buffer of shape {tuple(buf.shape)} does not "
                        f"match its parameter of shape {tuple(p.shape)}"
                    )
                self.state[p]["momentum_buffer"] = buf.to(
                    device=p.device, dtype=momentum_dtype(p), memory_format=torch.contiguous_format
                ).clone()
        for group in self.param_groups:
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
        self._plans = {}

    # ------------------------------------------------------------------ the step

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
    ) -> None:
        """Collects the params that have grads and their state (creating zero momentum)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format
                )
            momentum_buffers.append(state["momentum_buffer"])

    def _check_group_for_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that could make the step fail, checked before any state is touched."""
        _validate_hyperparameters(group, where=f"param_groups[{index}]", check_tensor_value=False)
        names = group.get("param_names")
        for pos, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            what = _describe(names, index, pos)
            if torch.is_complex(p):
                raise RuntimeError(f"Muon does not support complex parameters: {what}")
            if g.is_sparse:
                raise RuntimeError(f"Muon does not support sparse gradients: {what}")
            if g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                raise RuntimeError(
                    f"grad of {what} has shape {tuple(g.shape)}, {g.dtype} on {g.device}; "
                    f"expected {tuple(p.shape)}, {p.dtype} on {p.device}"
                )
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (buf.shape != p.shape or buf.device != p.device):
                raise RuntimeError(
                    f"momentum_buffer of {what} has shape {tuple(buf.shape)} on {buf.device}; "
                    f"expected {tuple(p.shape)} on {p.device} (a mismatched checkpoint?)"
                )
            if group["fused"] and not (p.dtype in FUSED_DTYPES and _fused_device_supported(p.device)):
                raise RuntimeError(
                    f"fused=True but the fused step does not support {what} "
                    f"({p.dtype} on {p.device}); use fused=None to fall back automatically"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Performs a single optimization step (all matrices of a group in one fused call per
        device and dtype)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)

        for index, group in enumerate(self.param_groups):
            self._check_group_for_step(group, index)

        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            schedule = resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
            for call in self._plan(index, group, params):
                _run_call(call, group, schedule, params, grads, bufs, grad_scale, found_inf)
        return loss

    def _plan(self, index: int, group: dict[str, Any], params: list[Tensor]) -> list[_Call]:
        """Which fused calls a group's step makes; cached while its params and rules stay put."""
        key = (
            tuple(id(p) for p in params),
            tuple((p.shape, p.dtype, p.device) for p in params),
            group["adjust_lr_fn"],
            group["fused"],
        )
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        partitions: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            fused = group["fused"] is not False and p.dtype in FUSED_DTYPES and (
                _fused_device_supported(p.device)
            )
            partitions.setdefault((p.device, p.dtype, fused), []).append(i)
        calls = []
        for (_, _, fused), idx in partitions.items():
            # Same-shape matrices next to each other: the op's buckets are then contiguous runs.
            idx.sort(key=lambda i: _bucket_key(params[i].shape))
            scales = [
                update_scale(*matrix_shape(params[i].shape)[1:], group["adjust_lr_fn"]) for i in idx
            ]
            calls.append(_Call(idx, scales, fused))
        self._plans[index] = (key, calls)
        return calls


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        if lr.device.type == "cpu" or lr.device == device:
            return lr.reshape(())
        return lr.to(device).reshape(())
    return torch.tensor(float(lr), dtype=torch.float64)


def _run_call(
    call: _Call,
    group: dict[str, Any],
    schedule: list[tuple[float, float, float]],
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    ps = [params[i] for i in call.indices]
    gs = [grads[i] for i in call.indices]
    ms = [bufs[i] for i in call.indices]
    if not call.fused:
        _single_tensor_muon(ps, gs, ms, group, schedule, call.update_scales, grad_scale, found_inf)
        return
    device = ps[0].device
    # Non-contiguous params (e.g. channels_last convs) are updated through a contiguous copy.
    work = [p if p.is_contiguous() else p.contiguous() for p in ps]
    ops.muon_step_(
        [w.view(matrix_shape(w.shape)) for w in work],
        [g.contiguous().view(matrix_shape(g.shape)) for g in gs],
        [m.view(matrix_shape(m.shape)) for m in ms],
        _lr_tensor(group["lr"], device),
        group["momentum"],
        group["nesterov"],
        group["weight_decay"],
        group["eps"],
        flat_coefficients(schedule),
        call.update_scales,
        None if grad_scale is None else grad_scale.to(device),
        None if found_inf is None else found_inf.to(device),
    )
    for p, w in zip(ps, work):
        if w is not p:
            p.copy_(w)


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    group: dict[str, Any],
    schedule: list[tuple[float, float, float]],
    update_scales: list[float],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Pure-PyTorch per-parameter loop (float64 params, devices without the extension).

    Newton-Schulz in bf16 on accelerators (as torch.optim.Muon) and fp32 on CPU.
    """
    if found_inf is not None and bool(found_inf.item()):  # this path may sync; the fused one never
        return
    lr = group["lr"]
    lr = lr.item() if isinstance(lr, Tensor) else float(lr)
    beta, wd = group["momentum"], group["weight_decay"]
    for p, g, buf, scale in zip(params, grads, bufs, update_scales):
        if p.numel() == 0:
            continue
        g = g.to(buf.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=g.dtype)
        buf.lerp_(g, 1 - beta)
        update = g.lerp(buf, beta) if group["nesterov"] else buf
        ns_dtype = torch.float32 if p.device.type == "cpu" else torch.bfloat16
        x = orthogonalize(update.reshape(matrix_shape(p.shape)), schedule, group["eps"], ns_dtype)
        p.mul_(1 - lr * wd)
        p.add_(x.reshape(p.shape).to(p.dtype), alpha=-lr * scale)


# ---------------------------------------------------------------------- validation


def _validate_hyperparameters(
    group: dict[str, Any], where: str, check_tensor_value: bool = True
) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: Tensor lr must have exactly one element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"{where}: Tensor lr must be floating point, got {lr.dtype}")
        if check_tensor_value:  # reading a device tensor syncs: only at construction
            value = float(lr.detach().cpu())
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{where}: lr must be a finite number >= 0, got {value}")
    elif not _is_real(lr) or not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    momentum = group["momentum"]
    if not _is_real(momentum) or not (0.0 <= momentum < 1.0):
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    wd = group["weight_decay"]
    if not _is_real(wd) or not (math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    eps = group["eps"]
    if not _is_real(eps) or not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(
            f"{where}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
        )
    if group.get("fused") not in (None, True, False):
        raise ValueError(f"{where}: fused must be None, True or False, got {group['fused']!r}")
    try:
        resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _validate_params(group: dict[str, Any], index: int) -> None:
    names = group.get("param_names")
    for pos, p in enumerate(group["params"]):
        what = _describe(names, index, pos)
        if p.ndim < 2:
            raise ValueError(
                f"Muon only supports parameters with 2 or more dims, but {what} has shape "
                f"{tuple(p.shape)}; give biases, norms and embeddings to AdamW "
                "(muon_ext.MuonWithAdamW and muon_ext.muon_param_groups do this)"
            )
        if torch.is_complex(p):
            raise ValueError(f"Muon does not support complex parameters: {what}")
        if not p.is_floating_point():
            raise ValueError(f"Muon needs floating-point parameters: {what} is {p.dtype}")
        if group["fused"] and not (p.dtype in FUSED_DTYPES and _fused_device_supported(p.device)):
            raise ValueError(
                f"fused=True but the fused step does not support {what} ({p.dtype} on "
                f"{p.device}); build info: {__import__('muon_ext').build_info()}"
            )


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

