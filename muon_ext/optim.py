"""``muon_ext.Muon``: a drop-in for ``torch.optim.Muon`` whose step is one fused call per device and dtype.

The optimizer layer owns validation, param groups, state and the cached *plan* (which
tensors go to which fused call, their matrix views and update scales). The math lives in
the ops (``muon_ext.ops``), and the semantics in ``muon_ext.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import distributed as _distributed
from . import ops
from ._extension import extension_available
from .coefficients import (
    ADJUST_LR_FNS,
    JORDAN,
    NS_ALGORITHM_CHOICES,
    flat_coefficients,
    matrix_shape,
    resolve_ns_algorithm,
    resolve_ns_coefficients,
    update_scale,
)
from .reference import orthogonalize, resolve_gram_restarts, validate_gram_restarts

__all__ = ["FUSED_DTYPES", "Muon"]

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
    if device.type != "cuda":
        # meta, mps, xpu, ...: no fused kernel; such params take the pure-PyTorch step.
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("muon_ext::muon_step_", "CUDA")


@dataclass
class _Call:
    """One fused call: tensors of a single device and dtype, in bucket order.

    The 3-D views of the params and momentum buffers are made once, when the plan is built, and
    reused while the params stay the same (NOTE: [Cached plan]); only the grads, new tensors
    every backward, are viewed per step.
    """

    indices: list[int]  # positions in the group's params-with-grad list
    update_scales: list[float]
    fused: bool
    shapes: list[tuple[int, int, int]]  # the (batch, rows, cols) matrix view of each param
    param_views: list[Tensor | None]  # None: non-contiguous, stepped through a copy
    momentum_views: list[Tensor]


def _bucket_key(shape: torch.Size) -> tuple[int, int]:
    _, rows, cols = matrix_shape(shape)
    return min(rows, cols), max(rows, cols)


def _describe(param_names: list[str] | None, group_index: int, position: int) -> str:
    if param_names is not None and position < len(param_names):
        return f"parameter {param_names[position]!r} (param_groups[{group_index}], index {position})"
    return f"parameter param_groups[{group_index}]['params'][{position}]"


def _muon_defaults(
    lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, *,
    fused, capturable, ns_algorithm="standard", gram_restarts=None,
) -> dict[str, Any]:
    """A Muon group's defaults: torch.optim.Muon's keys (so checkpoints interchange), plus ours."""
    return {
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
        "ns_algorithm": ns_algorithm,
        "gram_restarts": tuple(gram_restarts) if isinstance(gram_restarts, list) else gram_restarts,
    }


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
    * ``capturable`` (keyword-only): the step may be captured in a CUDA graph (``torch.cuda.graph``,
      also around ``scaler.step(opt); scaler.update()``). Capture then needs ``lr`` as a Tensor
      on the params' device (schedulers update it in place, and replays read the new value);
      a float or CPU lr would be read on the host once, at capture, and frozen into the graph,
      so capture refuses it. CUDA params must take the fused step (the pure-PyTorch path reads
      ``found_inf`` on the host). On the CPU the flag changes nothing.
    * Distributed (keyword-only; see ``muon_ext.distributed``): FSDP2 (DTensor) params need
      nothing. ``distributed_mode="owner"`` is for replicated params (DDP): each matrix is
      orthogonalized on one rank of ``process_group`` (default: the world) and shared.
    * AMP: ``GradScaler`` passes ``grad_scale``/``found_inf`` and the step unscales on device;
      with ``found_inf != 0`` nothing changes, read on the device (no host sync on CUDA).
    * ``torch.compile(opt.step)`` traces the step as one graph with the fused op in it; a
      Tensor lr can change (``lr.fill_``, LR schedulers) without recompiling.
    * Momentum buffers of bf16/fp16 params are float32.
    * ``workspace_limit`` (keyword-only, bytes): the most Newton-Schulz scratch memory one fused
      call allocates; shape buckets are orthogonalized in chunks that fit it, so a step's extra
      memory does not grow with the model. ``None`` is ``muon_ext.ops.DEFAULT_WORKSPACE_LIMIT``
      (128 MiB). A single matrix whose scratch exceeds it is a chunk of its own. It may be
      changed between steps (``opt.workspace_limit = ...``); ``opt.workspace_bytes()`` tells
      what the next step will allocate. Chunking never changes results.
    * ``ns_algorithm`` (keyword-only, a group hyperparameter, checkpointed): ``"standard"``
      (torch's iteration), ``"gram"`` (Gram Newton-Schulz: the same polynomial computed on
      X Xᵀ, fewer FLOPs on rectangular matrices; applied to matrices with
      max/min side >= 1.5, standard on squarer ones; restarting after each iteration count in
      ``gram_restarts``; ``None``: after iteration 2, then every 3, see
      ``muon_ext.reference.default_gram_restarts``) or ``"auto"`` (Gram where it was measured
      to be faster: see ``muon_ext.coefficients.resolve_ns_algorithm``; on CUDA, standard
      until measured on a GPU).
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
        distributed_mode: str | None = None,
        process_group: Any = None,
        workspace_limit: int | None = None,
        ns_algorithm: str = "standard",
        gram_restarts: Sequence[int] | None = None,
    ) -> None:
        self.workspace_limit = _validate_workspace_limit(workspace_limit)
        # How the step runs, not hyperparameters: kept off param_groups, so checkpoints move
        # between single-process and distributed runs (and a ProcessGroup is never pickled).
        self.distributed_mode = _distributed.validate_mode(distributed_mode)
        self.process_group = process_group
        defaults = _muon_defaults(
            lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
            fused=fused, capturable=capturable, ns_algorithm=ns_algorithm,
            gram_restarts=gram_restarts,
        )
        _validate_hyperparameters(defaults, where="Muon")
        self._plans: dict[int, tuple[tuple, list[Tensor], list[_Call]]] = {}
        # What the check phase of the current step found for each group: (params, grads).
        self._pending: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
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
        self._pending = {}
        self.__dict__.setdefault("distributed_mode", None)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("workspace_limit", None)
        for group in self.param_groups:
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("ns_algorithm", "standard")  # checkpoints from before Gram NS
            group.setdefault("gram_restarts", None)

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
            group.setdefault("ns_algorithm", "standard")  # checkpoints from before Gram NS
            group.setdefault("gram_restarts", None)
        self._plans = {}

    # ------------------------------------------------------------------ the step

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
    ) -> None:
        """Collects the params that have grads and their state (creating zero momentum).

        torch.optim's convention: all reading and creating of state happens here, and Dynamo
        runs this method eagerly while tracing ``step`` (its optimizer support calls it by
        name), so a compiled step sees real state tensors and no state-dependent branches.
        """
        for pos, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = buf = torch.zeros_like(
                    p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format
                )
            elif buf.shape != p.shape or buf.device != p.device:
                # Eager steps caught this in _check_group_for_step; compiled ones get here.
                index = next(i for i, g in enumerate(self.param_groups) if g is group)
                raise RuntimeError(
                    _momentum_mismatch(buf, p, _describe(group.get("param_names"), index, pos))
                )
            momentum_buffers.append(buf)

    def _check_group_for_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that could make the step fail, checked before any state is touched.

        Per step only the grads are looked at (one cheap comparison per param); the checks of
        the params and their state run again only when the cached plan is stale
        (NOTE: [Cached plan]).
        """
        _validate_hyperparameters(group, where=f"param_groups[{index}]", check_tensor_value=False)
        self._pending.pop(index, None)
        if torch.compiler.is_compiling() or _distributed.wanted(self, group):
            self._check_params_for_step(group, index)
            return
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or g.is_sparse:
                self._check_params_for_step(group, index)  # raises, naming the param
            params.append(p)
            grads.append(g)
        # The per-param checks run again only when the cached plan is stale; the plan itself is
        # (re)built in the step phase, since it creates state and the check phase changes nothing.
        cached = self._plans.get(index)
        fresh = (
            cached is not None
            and cached[0][0] == tuple(map(id, params))
            and cached[0][2:] == (group["adjust_lr_fn"], group["fused"], group["capturable"])
            and _same_buffers(cached[1], self.state, params)
        )
        if not fresh:
            self._check_params_for_step(group, index)
        self._pending[index] = (params, grads)

    def _check_params_for_step(self, group: dict[str, Any], index: int) -> None:
        """The per-param checks, with errors that name the parameter."""
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
            # Not while Dynamo traces: state read here would differ between Dynamo's first
            # pass and a restart after a graph break (_init_group, run eagerly, creates it in
            # between); _init_group checks the buffer then.
            if not torch.compiler.is_compiling():
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None and (buf.shape != p.shape or buf.device != p.device):
                    raise RuntimeError(_momentum_mismatch(buf, p, what))
            if group["fused"] and not _fused_supported(p):
                raise RuntimeError(
                    f"fused=True but the fused step does not support {what} "
                    f"({p.dtype} on {p.device}); use fused=None to fall back automatically"
                )
            if group["capturable"] and (problem := _capturable_problem(p, group)):
                raise RuntimeError(f"capturable=True but {what} {problem}")

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
        self._check_capture(grad_scale, found_inf)

        for index, group in enumerate(self.param_groups):
            self._step_group(index, group, grad_scale, found_inf)
        return loss

    # NOTE: [CUDA graphs]
    # A captured step is replayed without running any Python, so every value that may change
    # between replays (lr from a scheduler, GradScaler's scale and found_inf) must be a device
    # tensor that the kernels read; a float or CPU value is read on the host once, at capture,
    # and frozen into the graph. The CUDA op reads CPU scalars on the host and device scalars
    # in-kernel (csrc/cuda/muon_step_cuda.cpp, NOTE: [No host sync]); the checks below make
    # capture fail loudly instead of replaying stale values.
    def _check_capture(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Raises if the current stream is capturing a CUDA graph and this step is unsafe to
        capture. Python-side checks only (no device reads), done before any state changes."""
        if not _capturing():
            return
        for index, group in enumerate(self.param_groups):
            where = f"param_groups[{index}]"
            if not group["capturable"]:
                raise RuntimeError(
                    f"Attempting CUDA graph capture of step() for an instance of "
                    f"{type(self).__name__}, but {where} has capturable=False; construct it "
                    "with capturable=True and lr as a Tensor on the params' device"
                )
            _check_capture_scalars(group, where, grad_scale, found_inf)
            self._check_group_for_capture(group, index, grad_scale, found_inf)

    def _check_group_for_capture(
        self,
        group: dict[str, Any],
        index: int,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """What only a Muon group needs under capture (``MuonWithAdamW`` adds its AdamW part)."""
        if _distributed.wanted(self, group):
            raise RuntimeError(
                f"CUDA graph capture of step(): param_groups[{index}] takes the distributed "
                "step, which reads lr and found_inf on the host and is not capturable"
            )

    def _step_group(
        self,
        index: int,
        group: dict[str, Any],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """Updates one (already checked) group; ``MuonWithAdamW`` overrides it to route AdamW groups."""
        # -- distributed hook: DTensor (FSDP2) params and distributed_mode="owner" -----------
        if _distributed.wanted(self, group):
            _distributed.step_group(self, index, group, grad_scale, found_inf)
            return
        # -- end distributed hook -------------------------------------------------------------
        pending = self._pending.pop(index, None)
        if pending is None:
            # Under torch.compile: Dynamo needs state made in _init_group, which it runs eagerly
            # while tracing; the calls are then rebuilt during tracing and folded into the graph
            # as constants (reading the plan cache would make Dynamo guard on it).
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            calls = _make_calls(group, params, bufs) if params else []
        else:
            params, grads = pending
            calls = self._plan(index, group, params) if params else []
        if not params:
            return
        schedule = resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        for call in calls:
            _run_call(call, group, schedule, params, grads, grad_scale, found_inf,
                      self.workspace_limit)

    # NOTE: [Cached plan]
    # A step's host work must grow with groups and shape buckets, not parameters. Everything
    # that depends only on which params have grads (their state, matrix views, scales, which
    # fused call takes them, the one-time state checks) is made once and reused while the key
    # below stays the same: the params' identities and storage (a `p.data = ...` swap changes
    # it), the group's rules, and the momentum buffers' identities. Per step, Python only
    # collects the grads and views them; the op checks the grads in C++ before any write.
    def _plan(self, index: int, group: dict[str, Any], params: list[Tensor]) -> list[_Call]:
        """Which fused calls a group's step makes; cached while its params and rules stay put."""
        state = self.state
        key = (
            tuple(map(id, params)),
            tuple(p.data_ptr() for p in params),
            group["adjust_lr_fn"],
            group["fused"],
            group["capturable"],
        )
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key and _same_buffers(cached[1], state, params):
            return cached[2]
        bufs = []
        for p in params:
            st = state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                st["momentum_buffer"] = buf = torch.zeros_like(
                    p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format
                )
            bufs.append(buf)
        calls = _make_calls(group, params, bufs)
        self._plans[index] = (key, bufs, calls)
        return calls

    def workspace_bytes(self) -> int:
        """Scratch bytes the next step's largest fused call allocates (params with grads now;
        all params if none has a grad yet). Shapes only: nothing is allocated or read."""
        most = 0
        for group in self.param_groups:
            if "use_muon" in group and not group["use_muon"]:
                continue
            params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
            parts: dict[tuple, list[Tensor]] = {}
            for p in params:
                if _takes_fused_step(p, group):
                    # A stride-0 expansion of one element: the op reads only shapes.
                    probe = torch.empty((), dtype=p.dtype, device=p.device).expand(
                        matrix_shape(p.shape)
                    )
                    parts.setdefault((p.device, p.dtype), []).append(probe)
            limit = -1 if self.workspace_limit is None else self.workspace_limit
            for probes in parts.values():
                most = max(
                    most, ops.muon_step_workspace_bytes(probes, limit, group["ns_algorithm"])
                )
        return most


def _same_buffers(bufs: list[Tensor], state: Any, params: list[Tensor]) -> bool:
    """Whether the cached momentum buffers are still the params' state (a user may replace it)."""
    return all(state[p].get("momentum_buffer") is b for p, b in zip(params, bufs))


def _make_calls(group: dict[str, Any], params: list[Tensor], bufs: list[Tensor]) -> list[_Call]:
    """Partitions a group's params by (device, dtype, fused) into calls, with their views."""
    partitions: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        fused = _takes_fused_step(p, group)
        partitions.setdefault((p.device, p.dtype, fused), []).append(i)
    calls = []
    for (_, _, fused), idx in partitions.items():
        # Same-shape matrices next to each other: the op's buckets are then contiguous runs.
        idx.sort(key=lambda i: _bucket_key(params[i].shape))
        shapes = [matrix_shape(params[i].shape) for i in idx]
        scales = [update_scale(rows, cols, group["adjust_lr_fn"]) for _, rows, cols in shapes]
        param_views: list[Tensor | None] = []
        momentum_views: list[Tensor] = []
        for i, shape in zip(idx, shapes):
            p, b = params[i], bufs[i]
            param_views.append(p.view(shape) if p.is_contiguous() else None)
            momentum_views.append(b.view(shape) if fused else b)
        calls.append(_Call(idx, scales, fused, shapes, param_views, momentum_views))
    return calls


def _momentum_mismatch(buf: Tensor, p: Tensor, what: str) -> str:
    return (
        f"momentum_buffer of {what} has shape {tuple(buf.shape)} on {buf.device}; "
        f"expected {tuple(p.shape)} on {p.device} (a mismatched checkpoint?)"
    )


def _fused_supported(p: Tensor) -> bool:
    """Whether the built extension has a fused step for ``p``'s dtype and device."""
    return p.dtype in FUSED_DTYPES and _fused_device_supported(p.device)


def _takes_fused_step(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is stepped by the fused op (else by ``_single_tensor_muon``)."""
    return group["fused"] is not False and _fused_supported(p)


def _capturable_problem(p: Tensor, group: dict[str, Any]) -> str | None:
    """Why a param of a ``capturable=True`` group could not be stepped inside a CUDA graph
    (completes "capturable=True but <param> ..."), or None. CPU params: no graphs, no syncs."""
    if p.device.type == "cpu":
        return None
    if not _takes_fused_step(p, group):
        # _single_tensor_muon reads found_inf and lr on the host: a sync, never capturable.
        return (
            f"({p.dtype} on {p.device}) would take the pure-PyTorch step, which reads lr and "
            "found_inf on the host (a sync); capturable needs the fused step: float32, bfloat16 "
            "or float16 params, fused=None or True, and the extension built with CUDA "
            "(see muon_ext.build_info())"
        )
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.device != p.device:
        return (
            f"is on {p.device} while the Tensor lr is on {lr.device}: a captured graph would "
            f"keep the value read at capture; put lr on {p.device}"
        )
    return None


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph. False while Dynamo traces (whether
    a compiled graph is CUDA-graphed is inductor's decision, with its own checks, as in
    torch.optim), and never initializes CUDA."""
    if torch.compiler.is_compiling():
        return False
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _check_capture_scalars(
    group: dict[str, Any], where: str, grad_scale: Tensor | None, found_inf: Tensor | None
) -> None:
    """Under CUDA graph capture: the group's params with grads are on an accelerator, and lr,
    grad_scale and found_inf are device tensors there (see NOTE: [CUDA graphs])."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    lr = group["lr"]
    lr_device = lr.device if isinstance(lr, Tensor) else None
    if lr_device is None:
        raise RuntimeError(
            f"CUDA graph capture of step(): {where} has a float lr ({lr!r}), which would be "
            "frozen into the graph (LR-scheduler changes silently ignored on replay); with "
            f"capturable=True pass lr=torch.tensor({lr!r}, device=<the params' device>)"
        )
    for p in params:
        if p.device.type == "cpu":
            raise RuntimeError(
                f"CUDA graph capture of step(): {where} holds a CPU parameter; a CUDA graph "
                "cannot capture CPU work"
            )
        if lr_device != p.device:
            raise RuntimeError(
                f"CUDA graph capture of step(): {where} has lr on {lr_device} but a parameter "
                f"on {p.device}; with capturable=True the Tensor lr must be on {p.device}"
            )
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.device.type == "cpu":
            raise RuntimeError(
                f"CUDA graph capture of step(): optimizer.{name} is a CPU tensor, which would "
                "be read once at capture and frozen into the graph; keep it on the params' "
                "device (GradScaler does)"
            )


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor for the op: as is when on ``device`` or on the CPU (the op reads a
    CPU scalar on the host, no copy), else moved on the device side. Never a host sync."""
    if t.device == device or t.device.type == "cpu":
        return t
    return t.to(device)


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        return _scalar_on(lr, device).reshape(())
    # A CPU float64 scalar (read on the host by the op). Under torch.compile a float lr is a
    # constant of the graph, and a new value recompiles: schedule a Tensor lr instead.
    return torch.tensor(float(lr), dtype=torch.float64)


def _run_call(
    call: _Call,
    group: dict[str, Any],
    schedule: list[tuple[float, float, float]],
    params: list[Tensor],
    grads: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    workspace_limit: int | None = None,
) -> None:
    ps = [params[i] for i in call.indices]
    gs = [grads[i] for i in call.indices]
    if not call.fused:
        _single_tensor_muon(
            ps, gs, call.momentum_views, group, schedule, call.update_scales, grad_scale, found_inf
        )
        return
    device = ps[0].device
    # Non-contiguous params (e.g. channels_last convs) are updated through a contiguous copy.
    work = [
        v if v is not None else p.contiguous().view(shape)
        for v, p, shape in zip(call.param_views, ps, call.shapes)
    ]
    ops.muon_step_(
        work,
        [g.view(shape) if g.is_contiguous() else g.contiguous().view(shape)
         for g, shape in zip(gs, call.shapes)],
        call.momentum_views,
        _lr_tensor(group["lr"], device),
        group["momentum"],
        group["nesterov"],
        group["weight_decay"],
        group["eps"],
        flat_coefficients(schedule),
        call.update_scales,
        None if grad_scale is None else _scalar_on(grad_scale, device),
        None if found_inf is None else _scalar_on(found_inf, device),
        -1 if workspace_limit is None else workspace_limit,
        group["ns_algorithm"],
        resolve_gram_restarts(group["gram_restarts"], len(schedule)),
    )
    for v, p, w in zip(call.param_views, ps, work):
        if v is None:
            p.copy_(w.view(p.shape))


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

    Newton-Schulz in bf16 on accelerators (as torch.optim.Muon) and fp32 on CPU. It reads
    ``found_inf`` and a Tensor lr on the host (a sync on accelerators, a graph break under
    torch.compile), so ``capturable=True`` groups never get here with accelerator params:
    ``_capturable_problem`` rejects them when the group is added and at every step.
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
        _, rows, cols = matrix_shape(p.shape)
        x = orthogonalize(
            update.reshape(matrix_shape(p.shape)), schedule, group["eps"], ns_dtype,
            algorithm=resolve_ns_algorithm(group["ns_algorithm"], rows, cols, p.device.type),
            gram_restarts=group["gram_restarts"],
        )
        p.mul_(1 - lr * wd)
        p.add_(x.reshape(p.shape).to(p.dtype), alpha=-lr * scale)


# ---------------------------------------------------------------------- validation


def _validate_hyperparameters(
    group: dict[str, Any], where: str, check_tensor_value: bool = True
) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: Tensor lr must be 1-element (it must have exactly one element), got shape {tuple(lr.shape)}")
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
            f"{where}: Adjust learning rate function {group['adjust_lr_fn']} is not supported; "
            f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
        )
    if group.get("fused") not in (None, True, False):
        raise ValueError(f"{where}: fused must be None, True or False, got {group['fused']!r}")
    if not isinstance(group.get("capturable", False), bool):
        raise ValueError(f"{where}: capturable must be a bool, got {group['capturable']!r}")
    try:
        resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        if group.get("ns_algorithm", "standard") not in NS_ALGORITHM_CHOICES:
            raise ValueError(
                f"ns_algorithm must be one of {NS_ALGORITHM_CHOICES}, "
                f"got {group['ns_algorithm']!r}"
            )
        if group.get("gram_restarts") is not None:
            validate_gram_restarts(group["gram_restarts"])
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
        if group["fused"] and not _fused_supported(p):
            raise ValueError(
                f"fused=True but the fused step does not support {what} ({p.dtype} on "
                f"{p.device}); build info: {__import__('muon_ext').build_info()}"
            )
        if group["capturable"] and (problem := _capturable_problem(p, group)):
            raise ValueError(f"capturable=True but {what} {problem}")


def _validate_workspace_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"workspace_limit must be None (the default, {ops.DEFAULT_WORKSPACE_LIMIT} bytes) or "
            f"a number of bytes >= 1, got {limit!r}"
        )
    return limit


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

