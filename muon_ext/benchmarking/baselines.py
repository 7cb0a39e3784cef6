"""The implementations a Muon step is timed against, each behind one factory signature.

``make_step(impl, params, grads, config)`` returns a zero-argument callable that performs one
full optimizer step in place on ``params`` (their momentum lives inside the callable), or
raises :class:`Unsupported` with the reason a row is skipped.

* ``muon_ext``: ``muon_ext.Muon(fused=True)``, the fused step users get.
* ``torch_muon``: ``torch.optim.Muon`` (PyTorch >= 2.9): a per-parameter Python loop,
  Newton-Schulz in bf16. It takes 2-D params only, so 3-D stacks and 4-D convs are handed
  to it as 2-D views of the same storage (what a user of it would have to do).
* ``torch_loop``: a per-parameter loop of the same algorithm in Keller Jordan's
  formulation (``zeropower_via_newtonschulz5`` + ``muon_update``), NS in bf16 on GPU and
  fp32 on CPU.
* ``torch_batched`` / ``torch_batched_compiled``: the honest strong baseline: foreach
  momentum for all params, then per shape bucket one ``cat`` into a (B, m, n) batch,
  ``bmm``/``baddbmm`` Newton-Schulz with the scalars folded into alpha/beta, and a foreach
  update; optionally the per-bucket part under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..coefficients import JORDAN, Triple, matrix_shape, update_scale

__all__ = [
    "IMPLS",
    "StepConfig",
    "Unsupported",
    "compile_static",
    "make_step",
    "ns_dtype_for",
    "orthogonalize_batched",
    "zeropower_via_newtonschulz5",
]


class Unsupported(Exception):
    """This implementation cannot run this case; the message is the row's note."""


@dataclass
class StepConfig:
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.01
    eps: float = 1e-7
    schedule: list[Triple] = field(default_factory=lambda: [JORDAN] * 5)
    adjust_lr_fn: str | None = None
    ns_algorithm: str = "standard"  # muon_ext only; the baselines run standard NS
    normuon: bool = False  # muon_ext only: NorMuon on (a different update: not a baseline)


def compile_static(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)`` with room for one graph per shape bucket.

    Every bucket shape (and, in the Newton-Schulz benchmark, every preset) is a recompile of
    the same code object; past dynamo's default limit of 8 it would silently run eagerly.
    """
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the older torch name second
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            break
    return torch.compile(fn, dynamic=False)


def ns_dtype_for(device: torch.device) -> torch.dtype:
    """The dtype our own baselines run Newton-Schulz in: what muon_ext uses on that device."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


# ---------------------------------------------------------------------- per-parameter loop


def zeropower_via_newtonschulz5(
    G: Tensor, schedule: Sequence[Triple], eps: float, dtype: torch.dtype
) -> Tensor:
    """Keller Jordan's ``zeropower_via_newtonschulz5``, with the schedule and dtype as arguments.

    Works on the last two dims (a 3-D stack is a batch of matrices).
    """
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


class _PerParamLoop:
    """Keller Jordan's ``muon_update`` applied parameter by parameter.

    Two departures from the original, both to compute the same thing as the other rows:
    the Nesterov blend is out of place (the original overwrites ``p.grad``), and the lr
    scale uses the matrix view's rows/cols (the original uses the conv kernel's last dims).
    """

    def __init__(self, params: list[Tensor], grads: list[Tensor], cfg: StepConfig) -> None:
        self.params, self.grads, self.cfg = params, grads, cfg
        self.bufs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.ns_dtype = ns_dtype_for(params[0].device)
        self.scales = [update_scale(*matrix_shape(p.shape)[1:], cfg.adjust_lr_fn) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        cfg = self.cfg
        for p, g, buf, scale in zip(self.params, self.grads, self.bufs, self.scales):
            g32 = g.float()
            buf.lerp_(g32, 1 - cfg.momentum)
            update = g32.lerp(buf, cfg.momentum) if cfg.nesterov else buf
            if update.ndim == 4:  # conv: (out, in*kh*kw)
                update = update.view(len(update), -1)
            update = zeropower_via_newtonschulz5(update, cfg.schedule, cfg.eps, self.ns_dtype)
            p.mul_(1 - cfg.lr * cfg.weight_decay)
            p.add_(update.reshape(p.shape).to(p.dtype), alpha=-cfg.lr * scale)


# ---------------------------------------------------------------------- shape-batched


def orthogonalize_batched(
    X: Tensor, schedule: Sequence[Triple], eps: float, ns_dtype: torch.dtype
) -> Tensor:
    """Newton-Schulz on a wide (B, m, n) batch: norm in fp32, one bmm + two baddbmm per
    iteration with the scalars folded into alpha/beta. Returns ``ns_dtype``."""
    norm = torch.linalg.vector_norm(X.float(), dim=(1, 2), keepdim=True).clamp_min(eps)
    X = (X / norm).to(ns_dtype)
    for a, b, c in schedule:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


@dataclass
class _Bucket:
    indices: list[int]  # positions in the param list
    batch: list[int]  # matrices each param contributes
    tall: list[bool]
    m: int
    n: int
    neg_lr_scale: Tensor  # (B, 1, 1) fp32: -lr * scale per matrix


class _ShapeBatched:
    def __init__(
        self, params: list[Tensor], grads: list[Tensor], cfg: StepConfig, compile: bool
    ) -> None:
        self.params, self.grads, self.cfg = params, grads, cfg
        self.bufs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        device = params[0].device
        self.ns_dtype = ns_dtype_for(device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(params):
            _, r, c = matrix_shape(p.shape)
            groups.setdefault((min(r, c), max(r, c)), []).append(i)
        self.buckets: list[_Bucket] = []
        for (m, n), idx in groups.items():
            shapes = [matrix_shape(params[i].shape) for i in idx]
            scales = []
            for b, r, c in shapes:
                scales += [-cfg.lr * update_scale(r, c, cfg.adjust_lr_fn)] * b
            self.buckets.append(
                _Bucket(
                    idx,
                    [s[0] for s in shapes],
                    [s[1] > s[2] for s in shapes],
                    m,
                    n,
                    torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1),
                )
            )
        schedule, eps, ns_dtype = list(cfg.schedule), cfg.eps, self.ns_dtype

        def bucket_update(X: Tensor, neg_lr_scale: Tensor) -> Tensor:
            return orthogonalize_batched(X, schedule, eps, ns_dtype).float() * neg_lr_scale

        self._bucket_update: Callable[[Tensor, Tensor], Tensor] = (
            compile_static(bucket_update) if compile else bucket_update
        )

    @torch.no_grad()
    def step(self) -> None:
        cfg = self.cfg
        grads = (
            [g.float() for g in self.grads] if self.grads[0].dtype != torch.float32 else self.grads
        )
        torch._foreach_lerp_(self.bufs, grads, 1 - cfg.momentum)
        updates = torch._foreach_lerp(grads, self.bufs, cfg.momentum) if cfg.nesterov else self.bufs
        torch._foreach_mul_(self.params, 1 - cfg.lr * cfg.weight_decay)
        for bk in self.buckets:
            views = []
            for i, tall in zip(bk.indices, bk.tall):
                v = updates[i].view(matrix_shape(updates[i].shape))
                views.append(v.mT if tall else v)
            X = self._bucket_update(torch.cat(views), bk.neg_lr_scale)
            pieces = []
            for i, piece, tall in zip(bk.indices, X.split(bk.batch), bk.tall):
                pieces.append((piece.mT if tall else piece).reshape(self.params[i].shape))
            targets = [self.params[i] for i in bk.indices]
            if targets[0].dtype != torch.float32:
                pieces = [q.to(targets[0].dtype) for q in pieces]
            torch._foreach_add_(targets, pieces)


# ---------------------------------------------------------------------- optimizers


def _muon_ext(params: list[Tensor], grads: list[Tensor], cfg: StepConfig) -> Callable[[], None]:
    import muon_ext
    from muon_ext.dispatch import fused_device_supported as _fused_device_supported

    device = params[0].device
    if not _fused_device_supported(device):
        raise Unsupported(
            f"skipped: this muon_ext build has no fused kernels for {device.type} "
            f"(build_info: {muon_ext.build_info()})"
        )
    for p, g in zip(params, grads):
        p.grad = g
    opt = muon_ext.Muon(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_coefficients=[tuple(t) for t in cfg.schedule],
        eps=cfg.eps,
        ns_steps=len(cfg.schedule),
        adjust_lr_fn=cfg.adjust_lr_fn,
        fused=True,
        ns_algorithm=cfg.ns_algorithm,
        normuon=cfg.normuon,
    )
    return opt.step


def _torch_muon(params: list[Tensor], grads: list[Tensor], cfg: StepConfig) -> Callable[[], None]:
    if not hasattr(torch.optim, "Muon"):
        raise Unsupported(
            f"skipped: torch.optim.Muon is not in torch {torch.__version__} (needs 2.9+)"
        )
    if len(set(cfg.schedule)) != 1:
        raise Unsupported("skipped: torch.optim.Muon takes a single (a, b, c) triple")
    flat_params: list[Tensor] = []
    for p, g in zip(params, grads):
        if p.ndim == 2:
            pv, gv = [p], [g]
        else:  # 2-D views of the same storage: the params still get updated
            pv = list(p.view(matrix_shape(p.shape)).unbind(0))
            gv = list(g.view(matrix_shape(g.shape)).unbind(0))
        for a, b in zip(pv, gv):
            a.grad = b
            flat_params.append(a)
    opt = torch.optim.Muon(
        flat_params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_coefficients=tuple(cfg.schedule[0]),
        eps=cfg.eps,
        ns_steps=len(cfg.schedule),
        adjust_lr_fn=cfg.adjust_lr_fn,
    )
    return opt.step


def _torch_loop(params, grads, cfg) -> Callable[[], None]:
    return _PerParamLoop(params, grads, cfg).step


def _torch_batched(params, grads, cfg) -> Callable[[], None]:
    return _ShapeBatched(params, grads, cfg, compile=False).step


def _torch_batched_compiled(params, grads, cfg) -> Callable[[], None]:
    return _ShapeBatched(params, grads, cfg, compile=True).step


@dataclass(frozen=True)
class ImplInfo:
    factory: Callable[[list[Tensor], list[Tensor], StepConfig], Callable[[], None]]
    description: str
    # NS dtype per device type; None: the device's default (ns_dtype_for).
    ns_dtype: dict[str, torch.dtype] | None = None


IMPLS: dict[str, ImplInfo] = {
    "muon_ext": ImplInfo(_muon_ext, "muon_ext.Muon(fused=True): the fused step"),
    "torch_muon": ImplInfo(
        _torch_muon,
        "torch.optim.Muon: per-parameter loop, NS in bf16 on every device",
        {"cpu": torch.bfloat16, "cuda": torch.bfloat16},
    ),
    "torch_loop": ImplInfo(
        _torch_loop, "per-parameter loop, Keller Jordan's formulation (NS fp32 on CPU, bf16 on GPU)"
    ),
    "torch_batched": ImplInfo(
        _torch_batched, "shape-batched PyTorch: foreach momentum, bmm NS per shape bucket"
    ),
    "torch_batched_compiled": ImplInfo(
        _torch_batched_compiled, "torch_batched with the per-bucket part under torch.compile"
    ),
}


def impl_ns_dtype(impl: str, device: torch.device) -> torch.dtype:
    table = IMPLS[impl].ns_dtype
    if table and device.type in table:
        return table[device.type]
    return ns_dtype_for(device)


def make_step(
    impl: str, params: list[Tensor], grads: list[Tensor], cfg: StepConfig
) -> Callable[[], None]:
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {sorted(IMPLS)}")
    return IMPLS[impl].factory(params, grads, cfg)
