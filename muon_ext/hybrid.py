"""``muon_ext.MuonWithAdamW``: one optimizer for a whole model.

Muon is only for hidden weight matrices; embeddings, output heads, norms and biases need
AdamW. Trainers that own the optimizer (Lightning's automatic optimization, Hugging Face
``Trainer``) take one ``torch.optim.Optimizer``, so this class holds both kinds of param
group, told apart by the ``use_muon`` flag each group carries:

* ``use_muon=True`` groups take exactly ``muon_ext.Muon``'s path (validation, cached plan,
  fused C++/CUDA step, fp32 momentum, AMP without host sync);
* ``use_muon=False`` groups call torch's own functional AdamW (``torch.optim.adamw.adamw``)
  with the fused kernel where it supports the params, so their update and their state
  (``step``, ``exp_avg``, ``exp_avg_sq``) are those of ``torch.optim.AdamW``, bit for bit.

``muon_ext.muon_param_groups(model)`` builds the two groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach

from .coefficients import DEFAULT_RMS_TARGET, JORDAN
from .optim import (
    Muon,
    _describe,
    _is_real,
    _muon_defaults,
    _validate_hyperparameters,
    _validate_params,
)

__all__ = ["MuonWithAdamW"]

# Options that only one kind of group understands: a group of the other kind that sets one
# is a mistake (e.g. ``momentum`` on an AdamW group, which is ``betas[0]`` there).
_MUON_ONLY_KEYS = (
    "momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn",
    "num_heads", "split_sizes", "split_dim", "rms_target", "normuon", "normuon_beta2",
    "normuon_eps",
)
_ADAMW_ONLY_KEYS = ("betas", "foreach", "amsgrad", "maximize")
_ADAMW_PREFIX = "adamw_"


def _fused_adamw_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - every supported torch has it
        return ["cuda", "cpu"]


def _fused_adamw_supports(p: Tensor) -> bool:
    return p.device.type in _fused_adamw_devices() and torch.is_floating_point(p)


def _resolve_adamw_fused(group: dict[str, Any]) -> bool:
    """Whether an AdamW group takes torch's fused kernel this step.

    ``fused=None`` with ``foreach=None`` (the default) means: fused when torch's fused AdamW
    supports every param of the group (as ``torch.optim.AdamW(fused=True)`` would accept
    them), else torch's own default. An explicit ``foreach`` keeps torch's meaning.
    """
    if group["fused"] is not None:
        return bool(group["fused"])
    if group["foreach"] is not None or not group["params"]:
        return False
    fused, _ = _default_to_fused_or_foreach(list(group["params"]), False, use_fused=True)
    return fused


def _step_dtype(fused: bool) -> torch.dtype:
    """torch.optim.Adam's dtype for ``state["step"]`` (float32 when fused)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MuonWithAdamW(Muon):
    """Muon for hidden matrices and AdamW for everything else, as one optimizer.

    Every param group must carry ``use_muon``: ``True`` for hidden weight matrices (2-D, 3-D
    expert stacks, conv weights), ``False`` for embeddings, output heads, norms, biases and
    anything else. ``muon_ext.muon_param_groups(model)`` builds such groups::

        opt = MuonWithAdamW(muon_param_groups(model), lr=0.02, adamw_lr=3e-4)

    Args:
        params: param groups (dicts), each with ``use_muon``.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
            fused, capturable, ns_algorithm, gram_restarts, ns_dtype, num_heads, split_sizes,
            split_dim, rms_target, normuon, normuon_beta2, normuon_eps: defaults of the Muon
            groups, as in :class:`muon_ext.Muon`
            (``lr=0.02``, ``weight_decay=0.01`` here: Keller Jordan's recipe for
            ``adjust_lr_fn=None``; with ``"match_rms_adamw"`` use your AdamW lr and weight
            decay instead). ``capturable`` also applies to the AdamW groups.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups,
            stored in those groups as ``lr``, ``betas``, ``eps``, ``weight_decay`` (the keys of
            ``torch.optim.AdamW``), so LR schedulers and per-group overrides work unchanged.
        adamw_fused, adamw_foreach: torch's AdamW implementation switches. The default
            (both ``None``) uses the fused kernel when it supports every param of the group
            (CUDA, CPU, ...) and torch's default otherwise; ``adamw_fused=False`` /
            ``adamw_foreach=...`` mean what they mean for ``torch.optim.AdamW``.
        distributed_mode, process_group: as in :class:`muon_ext.Muon`, for the Muon groups
            (FSDP2 DTensor params need neither); the AdamW groups step on each rank.

    One ``state_dict`` holds both kinds of state: ``momentum_buffer`` for Muon params,
    ``step``/``exp_avg``/``exp_avg_sq`` for AdamW params. ``GradScaler`` works without host
    sync when the AdamW groups are fused (otherwise their step reads ``found_inf`` once).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.02,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = JORDAN,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float | Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        adamw_fused: bool | None = None,
        adamw_foreach: bool | None = None,
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
        muon_defaults = _muon_defaults(
            lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
            fused=fused, capturable=capturable, ns_algorithm=ns_algorithm,
            gram_restarts=gram_restarts, ns_dtype=ns_dtype, num_heads=num_heads,
            split_sizes=split_sizes, split_dim=split_dim, rms_target=rms_target, normuon=normuon,
            normuon_beta2=normuon_beta2, normuon_eps=normuon_eps,
        )
        _validate_hyperparameters(muon_defaults, where="MuonWithAdamW")
        adamw_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas) if isinstance(adamw_betas, list) else adamw_betas,
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
            "foreach": adamw_foreach,
            "fused": adamw_fused,
            "capturable": capturable,
        }
        _validate_adamw_hyperparameters(adamw_defaults, where="MuonWithAdamW (adamw_* arguments)")
        self._adamw_defaults = adamw_defaults
        # Distributed options apply to the Muon groups only (AdamW groups step locally, on
        # grads that DDP / FSDP already reduced); passed on only when set.
        distributed = {
            k: v
            for k, v in (("distributed_mode", distributed_mode), ("process_group", process_group))
            if v is not None
        }
        super().__init__(
            params,
            lr,
            weight_decay,
            momentum,
            nesterov,
            ns_coefficients,
            eps,
            ns_steps,
            adjust_lr_fn,
            fused=fused,
            capturable=capturable,
            workspace_limit=workspace_limit,
            ns_algorithm=ns_algorithm,
            gram_restarts=gram_restarts,
            ns_dtype=ns_dtype,
            num_heads=num_heads,
            split_sizes=split_sizes,
            split_dim=split_dim,
            rms_target=rms_target,
            normuon=normuon,
            normuon_beta2=normuon_beta2,
            normuon_eps=normuon_eps,
            **distributed,
        )
        # ``defaults`` mirrors the constructor's arguments (``type(opt)(groups, **opt.defaults)``).
        self.defaults.update(
            {_ADAMW_PREFIX + k: v for k, v in adamw_defaults.items() if k != "capturable"}
        )

    # ------------------------------------------------------------------ groups and state

    def _muon_group_defaults(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.defaults.items()
            if not k.startswith(_ADAMW_PREFIX) and k != "differentiable"
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        if "use_muon" not in param_group:
            raise ValueError(
                f"MuonWithAdamW: {where} has no 'use_muon'. Every group must say where its "
                "parameters go: use_muon=True for hidden weight matrices (Muon), use_muon=False "
                "for embeddings, output heads, norms and biases (AdamW). "
                "muon_ext.muon_param_groups(model) builds these groups."
            )
        use_muon = param_group["use_muon"]
        if not isinstance(use_muon, bool):
            raise ValueError(f"{where}: use_muon must be True or False, got {use_muon!r}")
        foreign = _ADAMW_ONLY_KEYS if use_muon else _MUON_ONLY_KEYS
        stray = [k for k in foreign if k in param_group]
        if stray:
            kind, other = ("Muon", "AdamW") if use_muon else ("AdamW", "Muon")
            raise ValueError(
                f"{where} is a {kind} group (use_muon={use_muon}) but sets {other}-only "
                f"option(s) {stray}"
            )
        kind_defaults = self._muon_group_defaults() if use_muon else dict(self._adamw_defaults)
        for key, value in kind_defaults.items():
            param_group.setdefault(key, value)
        # Optimizer.add_param_group fills in ``self.defaults``; every key of this group's kind
        # is already set, and the other kind's must not leak in.
        all_defaults = self.defaults
        self.defaults = kind_defaults
        try:
            Optimizer.add_param_group(self, param_group)
        finally:
            self.defaults = all_defaults
        group = self.param_groups[-1]
        try:
            if use_muon:
                _validate_hyperparameters(group, where=where)
                _validate_muon_group_params(group, index)
            else:
                _validate_adamw_hyperparameters(group, where=where)
                _validate_adamw_params(group, index)
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._adamw_defaults = {
            k[len(_ADAMW_PREFIX) :]: v
            for k, v in self.defaults.items()
            if k.startswith(_ADAMW_PREFIX)
        }
        self._adamw_defaults["capturable"] = self.defaults.get("capturable", False)
        for group in self.param_groups:
            if group.get("use_muon") is False:
                group.setdefault("foreach", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a ``MuonWithAdamW`` state_dict whose groups have the same ``use_muon`` flags."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            for index, (saved, own) in enumerate(zip(saved_groups, self.param_groups)):
                if "use_muon" not in saved:
                    raise ValueError(
                        f"load_state_dict: saved param_groups[{index}] has no 'use_muon': not a "
                        "MuonWithAdamW state_dict"
                    )
                if saved["use_muon"] != own["use_muon"]:
                    raise ValueError(
                        f"load_state_dict: saved param_groups[{index}] has "
                        f"use_muon={saved['use_muon']} but this optimizer's has "
                        f"use_muon={own['use_muon']}"
                    )
        super().load_state_dict(state_dict)  # Muon's: keeps momentum buffers in fp32

    # ------------------------------------------------------------------ the step

    # Muon.step runs every group's checks before any group's update and then steps each
    # group; these two overrides send AdamW groups to their own check and update, so the
    # hybrid inherits Muon.step (and torch's step hooks run once, as for any optimizer).

    def _check_group_for_step(self, group: dict[str, Any], index: int) -> None:
        if group["use_muon"]:
            super()._check_group_for_step(group, index)
        else:
            self._check_adamw_group_for_step(group, index)

    def _step_group(
        self,
        index: int,
        group: dict[str, Any],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        if group["use_muon"]:
            super()._step_group(index, group, grad_scale, found_inf)
        else:
            self._step_adamw_group(group, grad_scale, found_inf)

    def _check_group_for_capture(
        self,
        group: dict[str, Any],
        index: int,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """Muon's capture check, plus the AdamW groups' part: with GradScaler, only torch's
        fused AdamW takes ``grad_scale``/``found_inf`` on the device (the other
        implementations make ``_step_adamw_group`` read ``found_inf`` on the host)."""
        if group["use_muon"]:
            super()._check_group_for_capture(group, index, grad_scale, found_inf)
        elif (grad_scale is not None or found_inf is not None) and not _resolve_adamw_fused(group):
            raise RuntimeError(
                f"CUDA graph capture of step(): param_groups[{index}] is an AdamW group without "
                "torch's fused kernel, whose GradScaler step reads found_inf on the host (a "
                "sync); leave adamw_fused=None (or True) and adamw_foreach=None"
            )

    def _check_adamw_group_for_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that could make an AdamW group's step fail, before any state is touched."""
        _validate_adamw_hyperparameters(
            group, where=f"param_groups[{index}]", check_tensor_value=False
        )
        names = group.get("param_names")
        for pos, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            what = _describe(names, index, pos)
            if g.is_sparse:
                raise RuntimeError(
                    f"AdamW does not support sparse gradients: {what} (torch.optim.SparseAdam does)"
                )
            if g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                raise RuntimeError(
                    f"grad of {what} has shape {tuple(g.shape)}, {g.dtype} on {g.device}; "
                    f"expected {tuple(p.shape)}, {p.dtype} on {p.device}"
                )
            state = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                buf = state.get(key)
                if buf is not None and (buf.shape != p.shape or buf.device != p.device):
                    raise RuntimeError(
                        f"{key} of {what} has shape {tuple(buf.shape)} on {buf.device}; expected "
                        f"{tuple(p.shape)} on {p.device} (a mismatched checkpoint?)"
                    )
            if group["fused"] and not _fused_adamw_supports(p):
                raise RuntimeError(
                    f"adamw fused=True but torch's fused AdamW does not support {what} "
                    f"({p.dtype} on {p.device}); use fused=None to fall back automatically"
                )

    def _step_adamw_group(
        self, group: dict[str, Any], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        fused = _resolve_adamw_fused(group)
        step_on_device = fused or group["capturable"]
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                # Same placement as torch.optim.AdamW (note [special device hosting for step]).
                state["step"] = (
                    torch.zeros((), dtype=_step_dtype(fused), device=p.device)
                    if step_on_device
                    else torch.tensor(0.0, dtype=_step_dtype(False))
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                step = state["step"]
                if not isinstance(step, Tensor):  # an old checkpoint's plain number
                    step = torch.tensor(float(step), dtype=_step_dtype(False))
                if step_on_device and step.device != p.device:  # e.g. loaded from a CPU run
                    step = step.to(device=p.device, dtype=torch.float32)
                state["step"] = step
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        if not fused and (grad_scale is not None or found_inf is not None):
            # torch's foreach / for-loop AdamW do not take GradScaler's tensors: do their part
            # here (one host read of found_inf; grads are divided into copies, never in place).
            if found_inf is not None and bool(found_inf.item()):
                return
            if grad_scale is not None:
                scales: dict[torch.device, Tensor] = {}
                grads = [g.div(scales.setdefault(g.device, grad_scale.to(g.device))) for g in grads]
            grad_scale = found_inf = None
        beta1, beta2 = group["betas"]
        _torch_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=False,
            fused=True if fused else group["fused"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            has_complex=has_complex,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


# ---------------------------------------------------------------------- validation


def _validate_muon_group_params(group: dict[str, Any], index: int) -> None:
    names = group.get("param_names")
    for pos, p in enumerate(group["params"]):
        if p.ndim < 2:
            raise ValueError(
                f"param_groups[{index}] has use_muon=True but {_describe(names, index, pos)} has "
                f"shape {tuple(p.shape)}: Muon needs 2 or more dims. Put it in a use_muon=False "
                "(AdamW) group; muon_ext.muon_param_groups(model) routes parameters for you"
            )
    _validate_params(group, index)


def _validate_adamw_hyperparameters(
    group: dict[str, Any], where: str, check_tensor_value: bool = True
) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{where}: Tensor lr must have exactly one element, got shape {tuple(lr.shape)}"
            )
        if not lr.is_floating_point():
            raise ValueError(f"{where}: Tensor lr must be floating point, got {lr.dtype}")
        if check_tensor_value:  # reading a device tensor syncs: only when a group is added
            value = float(lr.detach().cpu())
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{where}: lr must be a finite number >= 0, got {value}")
        if group.get("foreach") and not group.get("capturable"):
            raise ValueError(
                f"{where}: a Tensor lr needs fused=True or capturable=True with foreach=True "
                "(torch.optim.AdamW's rule)"
            )
    elif not _is_real(lr) or not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    betas = group["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    eps = group["eps"]
    if not _is_real(eps) or not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    wd = group["weight_decay"]
    if not _is_real(wd) or not (math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    for key in ("fused", "foreach"):
        if group.get(key) not in (None, True, False):
            raise ValueError(f"{where}: {key} must be None, True or False, got {group[key]!r}")
    if group.get("fused") and group.get("foreach"):
        raise ValueError(f"{where}: fused=True and foreach=True cannot be set together")
    if not isinstance(group.get("capturable", False), bool):
        raise ValueError(f"{where}: capturable must be a bool, got {group['capturable']!r}")
    for key in ("amsgrad", "maximize"):
        if group.get(key):
            raise ValueError(f"{where}: {key}=True is not supported by MuonWithAdamW")


def _validate_adamw_params(group: dict[str, Any], index: int) -> None:
    names = group.get("param_names")
    for pos, p in enumerate(group["params"]):
        what = _describe(names, index, pos)
        if not (p.is_floating_point() or torch.is_complex(p)):
            raise ValueError(f"AdamW needs floating-point parameters: {what} is {p.dtype}")
        if group["fused"] and not _fused_adamw_supports(p):
            raise ValueError(
                f"adamw fused=True but torch's fused AdamW does not support {what} "
                f"({p.dtype} on {p.device}); use fused=None to fall back automatically"
            )
