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
from .dispatch import FUSED_DTYPES, NORMUON_STATE_KEY, momentum_buffer, momentum_dtype
from .dispatch import same_state as _same_state
from .dispatch import step_facts as _step_facts
from .dispatch import fused_supported as _fused_supported
from .dispatch import lr_tensor as _lr_tensor
from .dispatch import scalar_on as _scalar_on
from .dispatch import takes_fused_step as _takes_fused_step
from .coefficients import (
    ADJUST_LR_FNS,
    DEFAULT_RMS_TARGET,
    JORDAN,
    NS_ALGORITHM_CHOICES,
    MatrixBlock,
    blocking_requested,
    flat_coefficients,
    matrix_blocks,
    matrix_shape,
    ns_torch_dtype,
    resolve_ns_algorithm,
    resolve_ns_coefficients,
    resolve_ns_dtype,
    update_scale,
)
from .reference import (
    block_view,
    normuon_,
    normuon_rows,
    normuon_views,
    orthogonalize,
    resolve_gram_restarts,
    validate_gram_restarts,
)

__all__ = ["FUSED_DTYPES", "Muon"]

@dataclass
class _Call:
    """One fused call: tensors of a single device and dtype, in bucket order.

    Fused calls hold one entry per op tensor: a param's whole matrix view, or one of its
    *matrix blocks* (``num_heads`` / ``split_sizes``, NOTE: [Matrix blocks]), so a param may
    have several entries. Calls of the pure-PyTorch step hold one entry per param, with its
    blocks and their scales. The 3-D views of the params and momentum buffers are made once,
    when the plan is built, and reused while the params stay the same (NOTE: [Cached plan]);
    only the grads, new tensors every backward, are viewed per step.
    """

    indices: list[int]  # positions in the group's params-with-grad list
    update_scales: list[Any]  # fused: a float per entry; else a float, or a list per block
    fused: bool
    shapes: list[tuple[int, int, int]]  # the (batch, rows, cols) view of each entry
    param_views: list[Tensor | None]  # None: non-contiguous, stepped through a copy
    momentum_views: list[Tensor | None]  # fused: None: non-contiguous (a column block)
    # The block of the param each entry steps (None: the whole param, as matrix_shape views
    # it); for pure-PyTorch calls a list of the param's blocks, or None.
    blocks: list[Any] = None  # type: ignore[assignment]
    buffers: list[Tensor] = None  # type: ignore[assignment]  # each entry's momentum_buffer
    # NorMuon on (else None): fused: each entry's (batch, rows) view of its param's NorMuon
    # vector; pure-PyTorch: each param's flat vector (NOTE: [NorMuon state]).
    normuon_views: list[Tensor] | None = None
    # fused: entries whose NorMuon view goes through a copy (column blocks, which share a
    # call with the other blocks of their param: the op refuses aliasing written tensors).
    normuon_copy: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.blocks is None:
            self.blocks = [None] * len(self.indices)


def _bucket_key(shape: torch.Size) -> tuple[int, int]:
    _, rows, cols = matrix_shape(shape)
    return min(rows, cols), max(rows, cols)


def _describe(param_names: list[str] | None, group_index: int, position: int) -> str:
    if param_names is not None and position < len(param_names):
        return f"parameter {param_names[position]!r} (param_groups[{group_index}], index {position})"
    return f"parameter param_groups[{group_index}]['params'][{position}]"


def _muon_defaults(
    lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, *,
    fused, capturable, ns_algorithm="standard", gram_restarts=None, ns_dtype="bfloat16",
    num_heads=None, split_sizes=None, split_dim=0, rms_target=DEFAULT_RMS_TARGET,
    normuon=False, normuon_beta2=0.95, normuon_eps=1e-8,
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
        "ns_dtype": ns_dtype,
        "num_heads": num_heads,
        "split_sizes": tuple(split_sizes) if isinstance(split_sizes, list) else split_sizes,
        "split_dim": split_dim,
        "rms_target": rms_target,
        "normuon": normuon,
        "normuon_beta2": normuon_beta2,
        "normuon_eps": normuon_eps,
    }


# Keys added to Muon groups after the first checkpoints, with the value that means "as before".
_LATER_GROUP_KEYS: dict[str, Any] = {
    "fused": None,
    "capturable": False,
    "ns_algorithm": "standard",  # checkpoints from before Gram NS
    "gram_restarts": None,
    "ns_dtype": "bfloat16",  # from before the fp16 Newton-Schulz workspace
    "num_heads": None,  # from before matrix blocks
    "split_sizes": None,
    "split_dim": 0,
    "rms_target": DEFAULT_RMS_TARGET,  # from before rms_target: torch's 0.2
    "normuon": False,  # from before NorMuon
    "normuon_beta2": 0.95,
    "normuon_eps": 1e-8,
}


# Muon-only: not added to MuonWithAdamW's AdamW (use_muon=False) groups.
_BLOCK_KEYS = (
    "num_heads", "split_sizes", "split_dim", "rms_target", "normuon", "normuon_beta2",
    "normuon_eps",
)



def _fill_later_keys(group: dict[str, Any]) -> None:
    for key, value in _LATER_GROUP_KEYS.items():
        if key in _BLOCK_KEYS and group.get("use_muon") is False:
            continue
        group.setdefault(key, value)


def _group_rules(group: dict[str, Any]) -> tuple:
    """The group settings a cached plan depends on (NOTE: [Cached plan])."""
    split_sizes = group.get("split_sizes")
    return (
        group["adjust_lr_fn"],
        group["fused"],
        group["capturable"],
        group.get("num_heads"),
        None if split_sizes is None else tuple(split_sizes),
        group.get("split_dim", 0),
        group.get("rms_target", DEFAULT_RMS_TARGET),
        bool(group.get("normuon", False)),
    )


def _normuon_rows(p: Tensor, group: dict[str, Any]) -> int:
    return normuon_rows(
        p.shape, group.get("num_heads"), group.get("split_sizes"), group.get("split_dim", 0)
    )


def _normuon_state(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> Tensor | None:
    """The param's NorMuon vector (created as zeros), or None with NorMuon off."""
    if not group.get("normuon", False):
        return None
    v = state.get(NORMUON_STATE_KEY)
    if v is None:
        state[NORMUON_STATE_KEY] = v = torch.zeros(
            _normuon_rows(p, group), dtype=momentum_dtype(p), device=p.device
        )
    return v


def _normuon_mismatch(v: Tensor, p: Tensor, group: dict[str, Any], what: str) -> str | None:
    rows = _normuon_rows(p, group)
    if v.shape == (rows,) and v.device == p.device and v.dtype == momentum_dtype(p):
        return None
    return (
        f"{NORMUON_STATE_KEY} of {what} has shape {tuple(v.shape)}, {v.dtype} on {v.device}; "
        f"expected ({rows},), {momentum_dtype(p)} on {p.device}: one entry per row of each "
        "matrix the param is orthogonalized as (a checkpoint saved with other num_heads / "
        "split_sizes?)"
    )


def _param_blocks(p: Tensor, group: dict[str, Any]) -> list[MatrixBlock] | None:
    """The matrix blocks of ``p`` under the group's settings; None: one matrix view (no blocks)."""
    num_heads, split_sizes = group.get("num_heads"), group.get("split_sizes")
    if not blocking_requested(num_heads, split_sizes):
        return None
    return matrix_blocks(p.shape, num_heads, split_sizes, group.get("split_dim", 0))


def _block_problem(p: Tensor, group: dict[str, Any]) -> str | None:
    """Why the group's num_heads / split_sizes do not fit ``p`` (a message), or None."""
    try:
        _param_blocks(p, group)
    except ValueError as exc:
        return str(exc)
    return None


def _scale(rows: int, cols: int, group: dict[str, Any]) -> float:
    return update_scale(
        rows, cols, group["adjust_lr_fn"], group.get("rms_target", DEFAULT_RMS_TARGET)
    )


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
    * ``ns_dtype`` (keyword-only, a group hyperparameter, checkpointed): the element type the
      CUDA step's Newton-Schulz iterates in, ``"bfloat16"`` (the default: torch's numerics) or
      ``"float16"`` (8x finer rounding, the choice of the published Gram Newton-Schulz recipe);
      ``torch.bfloat16`` / ``torch.float16`` are accepted and stored as those names. Either way
      the GEMMs accumulate in fp32 and the update is normalized in fp32 before the cast, so
      loss-scaled gradients do not overflow fp16. On CPU the step iterates in fp32 whatever it
      says (NOTE: [fp32 Newton-Schulz on CPU]); the pure-PyTorch step on other accelerators
      iterates in it.
    * Matrix blocks (keyword-only group hyperparameters, checkpointed; NOTE: [Matrix blocks]):
      ``num_heads=H`` orthogonalizes a 2-D param of H·d rows as H independent (d, cols)
      matrices (attention projections per head); ``split_sizes=(s1, s2, ...)`` cuts dim
      ``split_dim`` (0: rows, the default; 1: columns) into blocks that are matrices of their
      own (fused q/k/v projections). With both, each block is cut into H heads along
      ``split_dim``. Each matrix gets the lr scale of its own shape. 2-D params only; the
      momentum buffer stays param-shaped. The distributed step takes them too (NOTE:
      [Distributed matrix blocks]).
    * ``rms_target`` (keyword-only group hyperparameter, checkpointed, default 0.2 as in torch):
      the constant of ``adjust_lr_fn="match_rms_adamw"`` (scale ``rms_target·sqrt(max(rows,
      cols))``); the other rules ignore it.
    * NorMuon (keyword-only group hyperparameters, checkpointed): ``normuon=True`` normalizes
      each orthogonalized matrix per row by a running second moment (state
      ``"normuon_v"``, float32, one entry per row of each matrix: NOTE: [NorMuon state] in
      ``muon_ext.reference``) with decay ``normuon_beta2`` (0.95) and ``normuon_eps`` (1e-8),
      then restores the matrix's Frobenius norm, before the lr rule and weight decay. Rows are
      those of each matrix: per head, per block, per expert. Under the distributed step v is
      replicated (owner mode) or a Shard(0) DTensor (FSDP2): NOTE: [Distributed NorMuon].
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
        ns_dtype: str | torch.dtype = "bfloat16",
        num_heads: int | None = None,
        split_sizes: Sequence[int] | None = None,
        split_dim: int = 0,
        rms_target: float = DEFAULT_RMS_TARGET,
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        normuon_eps: float = 1e-8,
    ) -> None:
        self.workspace_limit = _validate_workspace_limit(workspace_limit)
        # How the step runs, not hyperparameters: kept off param_groups, so checkpoints move
        # between single-process and distributed runs (and a ProcessGroup is never pickled).
        self.distributed_mode = _distributed.validate_mode(distributed_mode)
        self.process_group = process_group
        defaults = _muon_defaults(
            lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
            fused=fused, capturable=capturable, ns_algorithm=ns_algorithm,
            gram_restarts=gram_restarts, ns_dtype=ns_dtype, num_heads=num_heads,
            split_sizes=split_sizes, split_dim=split_dim, rms_target=rms_target, normuon=normuon,
            normuon_beta2=normuon_beta2, normuon_eps=normuon_eps,
        )
        _validate_hyperparameters(defaults, where="Muon")
        # Per group: (key, state tensors, calls, the params' state dicts): NOTE: [Cached plan].
        self._plans: dict[int, tuple[tuple, list[Any], list[_Call], list[dict]]] = {}
        self._dist_checked: dict[int, tuple] = {}  # distributed groups: key of the last check
        # What the check phase of the current step found for each group: (params, grads, plan
        # key, whether the cached plan is fresh); for a distributed group, each param's grad (or
        # None) by position.
        self._pending: dict[int, Any] = {}
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
        self._dist_checked = {}
        self._pending = {}
        self.__dict__.setdefault("distributed_mode", None)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("workspace_limit", None)
        for group in self.param_groups:
            _fill_later_keys(group)

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
        saved_v = {
            pid: s[NORMUON_STATE_KEY]
            for pid, s in state_dict["state"].items()
            if isinstance(s, dict) and isinstance(s.get(NORMUON_STATE_KEY), Tensor)
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
            if pid in saved_v:  # its length is checked against the group's blocks at the step
                self.state[p][NORMUON_STATE_KEY] = saved_v[pid].to(
                    device=p.device, dtype=momentum_dtype(p)
                ).contiguous().clone()
        for group in self.param_groups:
            _fill_later_keys(group)
        self._plans = {}
        self._dist_checked = {}

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
            buf = momentum_buffer(state, p)
            if buf.shape != p.shape or buf.device != p.device:
                # Eager steps caught this in _check_group_for_step; compiled ones get here.
                index = next(i for i, g in enumerate(self.param_groups) if g is group)
                raise RuntimeError(
                    _momentum_mismatch(buf, p, _describe(group.get("param_names"), index, pos))
                )
            momentum_buffers.append(buf)
            _normuon_state(state, p, group)

    def _check_group_for_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that could make the step fail, checked before any state is touched.

        Per step only the grads are looked at (one C++ pass, _step_facts); the checks of the
        params and their state run again only when the cached plan (or, for a distributed
        group, the last check) is stale (NOTE: [Cached plan]).
        """
        _validate_hyperparameters(group, where=f"param_groups[{index}]", check_tensor_value=False)
        self._pending.pop(index, None)
        if torch.compiler.is_compiling():
            self._check_params_for_step(group, index)
            return
        all_grads, bad, facts = _step_facts(group["params"])
        if bad >= 0:
            self._check_params_for_step(group, index)  # raises, naming the param
        if _distributed.wanted(self, group):
            # The distributed driver keeps its own plan; the per-param checks run again only
            # when the params or rules change (or a checkpoint is loaded). It takes the grads
            # as read here, by position.
            key = (tuple(map(id, group["params"])), facts, *_group_rules(group))
            if self._dist_checked.get(index) != key:
                self._check_params_for_step(group, index)
                self._dist_checked[index] = key
            self._pending[index] = all_grads
            return
        params = [p for p, g in zip(group["params"], all_grads) if g is not None]
        grads = [g for g in all_grads if g is not None]
        key = (tuple(map(id, params)), facts, *_group_rules(group))
        # The per-param checks run again only when the cached plan is stale; the plan itself is
        # (re)built in the step phase, since it creates state and the check phase changes nothing.
        cached = self._plans.get(index)
        fresh = (cached is not None and cached[0] == key
                 and _same_state(cached[1], cached[3], params, self.state))
        if not fresh:
            self._check_params_for_step(group, index)
        self._pending[index] = (params, grads, key, fresh)

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
            if problem := _block_problem(p, group):
                raise ValueError(f"{what}: {problem}")
            v = self.state.get(p, {}).get(NORMUON_STATE_KEY)
            if group.get("normuon", False) and v is not None and not torch.compiler.is_compiling():
                if problem := _normuon_mismatch(v, p, group, what):
                    raise RuntimeError(problem)
            if group["fused"] and not _fused_supported(p, group):
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
            _distributed.step_group(self, index, group, grad_scale, found_inf,
                                    self._pending.pop(index, None))
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
            vs = _normuon_list(self.state, params, group)
            calls = _make_calls(group, params, bufs, vs) if params else []
        else:
            params, grads, key, fresh = pending
            calls = self._plans[index][2] if fresh else self._plan(index, group, params, key)
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
    # stays the same: the params' identities, a hash of which have grads and of their data
    # pointers, shapes, dtypes and devices (a `p.data = ...` swap changes it, even a reshape over
    # the same storage) and the group's rules (adjust_lr_fn, fused, capturable and the
    # matrix-block settings num_heads, split_sizes, split_dim, rms_target, normuon: see
    # _group_rules); and while the params' state dicts are the ones the plan was built from and
    # the state tensors its views point into are still in them (a deleted state or a replaced
    # momentum buffer is seen; load_state_dict drops the plans). Per step, one C++ pass reads
    # the grads (_step_facts: each param's grad, whether they match their params, and the
    # hash); grads are handed to the op as they are (the op reads a contiguous grad as its
    # param's matrices), only matrix blocks are viewed.
    def _plan(
        self, index: int, group: dict[str, Any], params: list[Tensor], key: tuple
    ) -> list[_Call]:
        """Builds (and caches under ``key``, from _plan_key) which fused calls a group's step
        makes; the check phase decides whether the cached one is still fresh."""
        state = self.state
        bufs = [momentum_buffer(state[p], p) for p in params]
        vs = _normuon_list(state, params, group)
        calls = _make_calls(group, params, bufs, vs)
        # The state tensors the plan's views point into: momentum, and NorMuon's v if on.
        self._plans[index] = (
            key, bufs if vs is None else list(zip(bufs, vs)), calls, [state[p] for p in params]
        )
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
                    blocks = _param_blocks(p, group)
                    shapes = (
                        [matrix_shape(p.shape)] if blocks is None
                        else [b.matrix_shape(p.shape) for b in blocks]
                    )
                    for shape in shapes:
                        # A stride-0 expansion of one element: the op reads only shapes.
                        probe = torch.empty((), dtype=p.dtype, device=p.device).expand(shape)
                        parts.setdefault((p.device, p.dtype), []).append(probe)
            limit = -1 if self.workspace_limit is None else self.workspace_limit
            for probes in parts.values():
                most = max(
                    most,
                    ops.muon_step_workspace_bytes(
                        probes, limit, group["ns_algorithm"], bool(group.get("normuon", False)),
                        group.get("ns_dtype", "bfloat16"),
                    ),
                )
        return most


def _normuon_list(state: Any, params: list[Tensor], group: dict[str, Any]) -> list[Tensor] | None:
    """Each param's NorMuon vector (created as zeros if missing), or None with NorMuon off."""
    if not group.get("normuon", False):
        return None
    return [_normuon_state(state[p], p, group) for p in params]  # type: ignore[misc]


# NOTE: [Matrix blocks]
# With num_heads / split_sizes a 2-D param is stepped as several matrices: each block (rows or
# columns of split_sizes along split_dim) cut into num_heads heads along the same dim, viewed
# as (heads, rows, cols) by reference.block_view. The op takes each block as a tensor of its
# own, with the update scale of one head's shape, so a blocked param has several entries in
# a fused call, and its blocks are bucketed with same-shape matrices of other params. Momentum
# stays one param-shaped buffer in state (checkpoints as without blocks). Row blocks of a
# contiguous param are contiguous views: no copy. Column blocks (split_dim=1) are strided:
# each step they go through contiguous copies of the param, grad and momentum block, and the
# param and momentum copies are written back after the op (one extra read and write of those
# blocks per step). The op refuses two written tensors on one storage (csrc/muon_step_args.cpp,
# check_no_aliasing), so the row blocks of one param, views of one storage, cannot share a
# call: a partition with row blocks is stepped as k calls, the k-th taking every param's k-th
# view block (so the number of calls grows with the most row blocks of one param, not with the
# params). The elementwise part of the step is the same for every block, and the op's result
# for a matrix does not depend on the other matrices of its call, so the result equals
# stepping the blocks as separate params (tested bit for bit).
def _make_calls(
    group: dict[str, Any],
    params: list[Tensor],
    bufs: list[Tensor],
    vs: list[Tensor] | None = None,
) -> list[_Call]:
    """Partitions a group's params by (device, dtype, fused) into calls, with their views.

    ``vs``: each param's NorMuon vector, or None with NorMuon off."""
    partitions: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        fused = _takes_fused_step(p, group)
        partitions.setdefault((p.device, p.dtype, fused), []).append(i)
    calls = []
    for (_, _, fused), idx in partitions.items():
        if not fused:
            # One entry per param: _single_tensor_muon steps it (block by block).
            blocks_per = [_param_blocks(params[i], group) for i in idx]
            shapes = [matrix_shape(params[i].shape) for i in idx]
            scales: list[Any] = [
                _scale(*shape[1:], group) if blocks is None
                else [_scale(*b.matrix_shape(params[i].shape)[1:], group) for b in blocks]
                for i, shape, blocks in zip(idx, shapes, blocks_per)
            ]
            calls.append(_Call(
                idx, scales, False, shapes, [None] * len(idx), [bufs[i] for i in idx],
                blocks_per, [bufs[i] for i in idx],
                None if vs is None else [vs[i] for i in idx],
            ))
            continue
        # One entry per op tensor: a param's matrix view, or each of its blocks. The op refuses
        # two written tensors on one storage, so the k-th block that is a view of its param or
        # momentum goes to the k-th call of this partition (NOTE: [Matrix blocks]).
        rounds: list[list[tuple]] = []
        for i in idx:
            p, b = params[i], bufs[i]
            blocks = _param_blocks(p, group)
            if blocks is None:
                shape = matrix_shape(p.shape)
                v = None if vs is None else normuon_views(vs[i], [shape])[0]
                entry = (i, None, shape, p.view(shape) if p.is_contiguous() else None,
                         b.view(shape), v)
                _add_to_round(rounds, 0, entry)
                continue
            views = 0
            block_shapes = [block.matrix_shape(p.shape) for block in blocks]
            v_views = (
                [None] * len(blocks) if vs is None else normuon_views(vs[i], block_shapes)
            )
            for block, shape, v in zip(blocks, block_shapes, v_views):
                pv, mv = block_view(p, block), block_view(b, block)
                entry = (i, block, shape,
                         pv if pv.is_contiguous() else None, mv if mv.is_contiguous() else None, v)
                if entry[3] is None and entry[4] is None:
                    _add_to_round(rounds, 0, entry)  # stepped through copies: no aliasing
                else:
                    _add_to_round(rounds, views, entry)
                    views += 1
        for entries in rounds:
            # Same-shape matrices next to each other: the op's buckets are then contiguous runs.
            entries.sort(key=lambda e: _bucket_key(e[2]))
            calls.append(_Call(
                [e[0] for e in entries],
                [_scale(*e[2][1:], group) for e in entries],
                True,
                [e[2] for e in entries],
                [e[3] for e in entries],
                [e[4] for e in entries],
                [e[1] for e in entries],
                [bufs[e[0]] for e in entries],
                None if vs is None else [e[5] for e in entries],
                None if vs is None else [e[3] is None and e[4] is None for e in entries],
            ))
    return calls


def _add_to_round(rounds: list[list[tuple]], k: int, entry: tuple) -> None:
    while len(rounds) <= k:
        rounds.append([])
    rounds[k].append(entry)


def _entry_view(t: Tensor, block: MatrixBlock | None, shape: tuple[int, int, int]) -> Tensor:
    """The 3-D view of one call entry of a param-shaped tensor (strided where it must be)."""
    if block is None:
        return t.view(shape) if t.is_contiguous() else t.contiguous().view(shape)
    return block_view(t, block)


def _momentum_mismatch(buf: Tensor, p: Tensor, what: str) -> str:
    return (
        f"momentum_buffer of {what} has shape {tuple(buf.shape)} on {buf.device}; "
        f"expected {tuple(p.shape)} on {p.device} (a mismatched checkpoint?)"
    )


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
            ps, gs, call.momentum_views, group, schedule, call.update_scales, grad_scale,
            found_inf, call.blocks, call.normuon_views,
        )
        return
    device = ps[0].device
    # Non-contiguous params (e.g. channels_last convs) and column blocks are updated through
    # contiguous copies, written back after the op (NOTE: [Matrix blocks]).
    work = [
        v if v is not None else _entry_view(p, block, shape).contiguous()
        for v, p, block, shape in zip(call.param_views, ps, call.blocks, call.shapes)
    ]
    momentum = [
        v if v is not None else block_view(buf, block).contiguous()
        for v, buf, block in zip(call.momentum_views, call.buffers, call.blocks)
    ]
    # The op reads a contiguous grad of the param's numel as its matrices: whole-param entries
    # pass the grad itself (no view per step); blocks pass their view.
    grad_views = []
    for g, block, shape in zip(gs, call.blocks, call.shapes):
        v = g if block is None else _entry_view(g, block, shape)
        grad_views.append(v if v.is_contiguous() else v.contiguous())
    normuon = None
    if call.normuon_views is not None:
        normuon = [
            v.clone() if copy else v for v, copy in zip(call.normuon_views, call.normuon_copy)  # type: ignore[arg-type]
        ]
    ops.muon_step_(
        work,
        grad_views,
        momentum,
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
        normuon or (),
        group.get("normuon_beta2", 0.95),
        group.get("normuon_eps", 1e-8),
        group.get("ns_dtype", "bfloat16"),
    )
    if normuon is not None:
        for v, copy, w in zip(call.normuon_views, call.normuon_copy, normuon):  # type: ignore[arg-type]
            if copy:
                v.copy_(w)
    for v, p, w, block in zip(call.param_views, ps, work, call.blocks):
        if v is None:
            if block is None:
                p.copy_(w.view(p.shape))
            else:
                block_view(p, block).copy_(w)
    for v, buf, m, block in zip(call.momentum_views, call.buffers, momentum, call.blocks):
        if v is None:
            block_view(buf, block).copy_(m)


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    group: dict[str, Any],
    schedule: list[tuple[float, float, float]],
    update_scales: list[Any],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    blocks: list[list[MatrixBlock] | None] | None = None,
    normuon_vectors: list[Tensor] | None = None,
) -> None:
    """Pure-PyTorch per-parameter loop (float64 params, devices without the extension).

    ``normuon_vectors``: each param's flat NorMuon vector (NOTE: [NorMuon state]), or None.

    ``blocks[i]``: the matrix blocks of ``params[i]`` (NOTE: [Matrix blocks]), each
    orthogonalized on its own with its scale from the list ``update_scales[i]``; None: one
    matrix view with the float ``update_scales[i]``.

    Newton-Schulz in the group's ``ns_dtype`` on accelerators (bf16 by default, as
    torch.optim.Muon) and fp32 on CPU. It reads
    ``found_inf`` and a Tensor lr on the host (a sync on accelerators, a graph break under
    torch.compile), so ``capturable=True`` groups never get here with accelerator params:
    ``_capturable_problem`` rejects them when the group is added and at every step.
    """
    if found_inf is not None and bool(found_inf.item()):  # this path may sync; the fused one never
        return
    lr = group["lr"]
    lr = lr.item() if isinstance(lr, Tensor) else float(lr)
    beta, wd = group["momentum"], group["weight_decay"]
    if blocks is None:
        blocks = [None] * len(params)
    if normuon_vectors is None:
        normuon_vectors = [None] * len(params)  # type: ignore[list-item]
    beta2, nu_eps = group.get("normuon_beta2", 0.95), group.get("normuon_eps", 1e-8)
    for p, g, buf, scale, param_blocks, nv in zip(
        params, grads, bufs, update_scales, blocks, normuon_vectors
    ):
        if p.numel() == 0:
            continue
        g = g.to(buf.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=g.dtype)
        buf.lerp_(g, 1 - beta)
        update = g.lerp(buf, beta) if group["nesterov"] else buf
        ns_dtype = (
            torch.float32 if p.device.type == "cpu"
            else ns_torch_dtype(group.get("ns_dtype", "bfloat16"))
        )
        if param_blocks is not None:
            p.mul_(1 - lr * wd)
            shapes = [b.matrix_shape(p.shape) for b in param_blocks]
            vs = [None] * len(shapes) if nv is None else normuon_views(nv, shapes)
            for block, block_scale, v in zip(param_blocks, scale, vs):
                # Contiguous, as a separate param's update would be: the same reductions.
                u = block_view(update, block).contiguous()
                x = orthogonalize(
                    u, schedule, group["eps"], ns_dtype,
                    algorithm=resolve_ns_algorithm(
                        group["ns_algorithm"], u.size(1), u.size(2), p.device.type
                    ),
                    gram_restarts=group["gram_restarts"],
                )
                if v is not None:
                    x = normuon_(x.to(v.dtype), v, beta2, nu_eps)
                block_view(p, block).add_(x.to(p.dtype), alpha=-lr * block_scale)
            continue
        _, rows, cols = matrix_shape(p.shape)
        x = orthogonalize(
            update.reshape(matrix_shape(p.shape)), schedule, group["eps"], ns_dtype,
            algorithm=resolve_ns_algorithm(group["ns_algorithm"], rows, cols, p.device.type),
            gram_restarts=group["gram_restarts"],
        )
        if nv is not None:
            x = normuon_(x.to(nv.dtype), normuon_views(nv, [x.shape])[0], beta2, nu_eps)
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
        if "ns_dtype" in group:
            # Stored by name (torch.float16 -> "float16"); only a dtype is rewritten, since a
            # store at every step would make a compiled step retrace.
            name = resolve_ns_dtype(group["ns_dtype"])
            if not isinstance(group["ns_dtype"], str):
                group["ns_dtype"] = name
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    num_heads = group.get("num_heads")
    if num_heads is not None and (not _is_int(num_heads) or num_heads < 1):
        raise ValueError(f"{where}: num_heads must be None or an int >= 1, got {num_heads!r}")
    split_sizes = group.get("split_sizes")
    if split_sizes is not None and (
        isinstance(split_sizes, (str, bytes))
        or not isinstance(split_sizes, Sequence)
        or len(split_sizes) == 0
        or not all(_is_int(s) and s >= 1 for s in split_sizes)
    ):
        raise ValueError(
            f"{where}: split_sizes must be None or a non-empty sequence of ints >= 1, "
            f"got {split_sizes!r}"
        )
    split_dim = group.get("split_dim", 0)
    if not _is_int(split_dim) or split_dim not in (0, 1):
        raise ValueError(f"{where}: split_dim must be 0 (rows) or 1 (columns), got {split_dim!r}")
    rms_target = group.get("rms_target", DEFAULT_RMS_TARGET)
    if not _is_real(rms_target) or not (math.isfinite(rms_target) and rms_target > 0.0):
        raise ValueError(f"{where}: rms_target must be a finite number > 0, got {rms_target!r}")
    if not isinstance(group.get("normuon", False), bool):
        raise ValueError(f"{where}: normuon must be a bool, got {group['normuon']!r}")
    beta2 = group.get("normuon_beta2", 0.95)
    if not _is_real(beta2) or not (0.0 <= beta2 < 1.0):
        raise ValueError(f"{where}: normuon_beta2 must be a number in [0, 1), got {beta2!r}")
    nu_eps = group.get("normuon_eps", 1e-8)
    if not _is_real(nu_eps) or not (math.isfinite(nu_eps) and nu_eps > 0.0):
        raise ValueError(f"{where}: normuon_eps must be a finite number > 0, got {nu_eps!r}")


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
        if problem := _block_problem(p, group):
            raise ValueError(f"{what}: {problem}")
        if group["fused"] and not _fused_supported(p, group):
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

