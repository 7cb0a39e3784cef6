"""Pure-PyTorch Muon: the semantics every fused implementation is tested against.

Single-tensor, any dtype. With ``compute_dtype=ns_dtype=torch.float64`` it is the oracle;
with ``ns_dtype=torch.bfloat16`` it is the "bf16 reference implementation" whose error
sets the tolerance for the fused CUDA step (DESIGN.md, numerics contract); with
``ns_dtype=torch.float32`` it plays that role for the CPU step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .coefficients import Triple, matrix_shape

__all__ = ["matrix_view", "muon_step_reference", "orthogonalize"]


def matrix_view(t: Tensor) -> Tensor:
    """The (batch, rows, cols) view of a parameter-shaped tensor (see coefficients.matrix_shape)."""
    return t.reshape(matrix_shape(t.shape))


def orthogonalize(
    x: Tensor,
    ns_coefficients: Sequence[Triple],
    eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Approximate polar factor of each matrix of a (B, rows, cols) or (rows, cols) tensor.

    ``X / max(||X||_F, eps)`` (the norm in at least float32), cast to ``ns_dtype``, then one
    quintic Newton-Schulz iteration per (a, b, c) on the wide orientation. Returns ``ns_dtype``.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"orthogonalize expects 2-D or 3-D input, got shape {tuple(x.shape)}")
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.transpose(1, 2)
    norm_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(norm_dtype)
    norm = torch.linalg.vector_norm(xf, dim=(1, 2), keepdim=True).clamp(min=eps)
    # A zero matrix orthogonalizes to zero, also with eps == 0 (no NaN from 0 / 0); a NaN
    # norm (NaN or inf in the input) stays NaN, as in torch: garbage in, visible out.
    X = torch.where(norm == 0, torch.zeros_like(xf), xf / norm).to(ns_dtype)
    for a, b, c in ns_coefficients:
        A = X @ X.transpose(1, 2)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.transpose(1, 2)
    return X.squeeze(0) if squeeze else X


@torch.no_grad()
def muon_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    eps: float,
    ns_coefficients: Sequence[Triple],
    update_scales: Sequence[float],
    compute_dtype: torch.dtype = torch.float64,
    ns_dtype: torch.dtype | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Muon step, in place on ``params`` and ``momentum_buffers`` (never on ``grads``).

    Same contract as ``torch.ops.muon_ext.muon_step_`` but for tensors of any shape
    (each viewed with :func:`matrix_view`). Elementwise math in ``compute_dtype``,
    Newton-Schulz in ``ns_dtype`` (default: ``compute_dtype``); each output is rounded once.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    ns_dtype = compute_dtype if ns_dtype is None else ns_dtype
    lr = float(lr)
    for p, g, m, scale in zip(params, grads, momentum_buffers, update_scales, strict=True):
        if p.numel() == 0:
            continue
        gd = g.to(compute_dtype)
        if grad_scale is not None:
            gd = gd / grad_scale.to(compute_dtype)
        md = m.to(compute_dtype).lerp(gd, 1 - momentum)
        u = gd.lerp(md, momentum) if nesterov else md
        x = orthogonalize(matrix_view(u), ns_coefficients, eps, ns_dtype).to(compute_dtype)
        pd = p.to(compute_dtype) * (1 - lr * weight_decay) - (lr * scale) * x.reshape(p.shape)
        p.copy_(pd)
        m.copy_(md)
