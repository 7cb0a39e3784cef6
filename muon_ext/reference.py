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

from .coefficients import (
    MatrixBlock, Triple, blocking_requested, matrix_blocks, matrix_shape, ns_torch_dtype,
)

__all__ = [
    "NS_ALGORITHMS",
    "block_view",
    "blocks_of",
    "copy_blocks_packed_",
    "gram_flops",
    "gram_newton_schulz",
    "matrix_view",
    "momentum_packed_",
    "muon_step_reference",
    "normuon_",
    "normuon_rows",
    "normuon_views",
    "orthogonalize",
    "orthogonalize_packed_",
    "standard_flops",
    "update_packed_",
    "default_gram_restarts",
    "resolve_gram_restarts",
    "validate_gram_restarts",
]

# "auto" is not here: choosing between them per shape is the optimizer's job.
NS_ALGORITHMS = ("standard", "gram")


def matrix_view(t: Tensor) -> Tensor:
    """The (batch, rows, cols) view of a parameter-shaped tensor (see coefficients.matrix_shape)."""
    return t.reshape(matrix_shape(t.shape))


def block_view(t: Tensor, block: MatrixBlock) -> Tensor:
    """The (heads, rows, cols) view of one :class:`~muon_ext.coefficients.MatrixBlock` of a
    2-D tensor. Always a view (never a copy); contiguous when ``t`` is and ``block.dim == 0``,
    strided for column blocks."""
    part = t.narrow(block.dim, block.start, block.size).unflatten(
        block.dim, (block.heads, block.size // block.heads)
    )
    return part if block.dim == 0 else part.permute(1, 0, 2)


def blocks_of(
    t: Tensor,
    num_heads: int | None = None,
    split_sizes: Sequence[int] | None = None,
    split_dim: int = 0,
) -> list[Tensor]:
    """The 3-D (batch, rows, cols) views of the matrices Muon orthogonalizes ``t`` as.

    Without ``num_heads`` and ``split_sizes``: ``[matrix_view(t)]``. Otherwise (2-D ``t``
    only) one view per block of ``split_sizes`` along ``split_dim`` (0: rows, 1: columns),
    each a stack of ``num_heads`` equal heads cut along the same dim (see
    ``muon_ext.coefficients.matrix_blocks``). Each view's matrices get their own lr scale.
    """
    if not blocking_requested(num_heads, split_sizes):
        return [matrix_view(t)]
    return [block_view(t, b) for b in matrix_blocks(t.shape, num_heads, split_sizes, split_dim)]


# NOTE: [Default Gram restarts]
# Restart after iteration 2 (the published recipe for 5-iteration schedules), then every 3
# iterations: long schedules (deepseek_v4's 10) drift without them. Measured in fp32 against
# float64 standard NS (rank 1, rank 8, singular values 1..1e-6, 32x64): deepseek_v4 with only
# (2,) is off by 1.4e-2..1.2e-1, with (2, 5, 8) by 3.7e-4..5.2e-3, as accurate as fp32 standard
# NS on the same inputs (4.8e-4..5.9e-3). Five-iteration schedules get (2,), as published.
def default_gram_restarts(num_iterations: int) -> tuple[int, ...]:
    """The restarts ``gram_restarts=None`` means for a schedule of this many iterations."""
    return tuple(range(2, num_iterations, 3))


def resolve_gram_restarts(
    gram_restarts: Sequence[int] | None, num_iterations: int
) -> tuple[int, ...]:
    """``gram_restarts`` validated, or the default (NOTE: [Default Gram restarts]) for None."""
    if gram_restarts is None:
        return default_gram_restarts(num_iterations)
    return validate_gram_restarts(gram_restarts)


def validate_gram_restarts(gram_restarts: Sequence[int]) -> tuple[int, ...]:
    """``gram_restarts`` as a tuple: iteration counts k >= 1, strictly increasing.

    A restart after iteration k recomputes R from X (see :func:`gram_newton_schulz`). Entries
    at or past the schedule's length are allowed here and ignored there, so one setting serves
    schedules of any length.
    """
    if isinstance(gram_restarts, (str, bytes)) or not isinstance(gram_restarts, Sequence):
        raise ValueError(
            f"gram_restarts must be a sequence of ints >= 1, got {gram_restarts!r}"
        )
    out = tuple(gram_restarts)
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"gram_restarts entries must be ints >= 1, got {gram_restarts!r}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(
            f"gram_restarts must be strictly increasing (sorted, no duplicates), "
            f"got {gram_restarts!r}"
        )
    return out


def gram_newton_schulz(
    x: Tensor, ns_coefficients: Sequence[Triple], gram_restarts: Sequence[int] | None = None
) -> Tensor:
    """Gram Newton-Schulz on an already normalized, wide (B, m, n) tensor, in ``x.dtype``.

    Exactly the standard iteration's polynomial, evaluated on the m x m Gram matrix
    R = X Xᵀ instead of on X: each step's H = a I + b R + c R² is a polynomial in R, so it
    commutes with R, the accumulated Q = H_1 ... H_k is one too, and after k steps
    X_k = Q X_0 and R_k = H R H. Only the first and last GEMM of a segment touch the n side,
    which is what makes it cheaper for n >> m. ``gram_restarts``: after each listed iteration,
    X = Q X and R is recomputed from X, so that half-precision error accumulated in R (which,
    unlike X Xᵀ, need not stay positive semidefinite) is thrown away.
    """
    restarts = set(resolve_gram_restarts(gram_restarts, len(ns_coefficients)))
    steps = list(ns_coefficients)
    if not steps:
        return x
    X = x
    R = X @ X.transpose(1, 2)
    Q: Tensor | None = None  # None is the identity: the first step of a segment needs no GEMM
    for i, (a, b, c) in enumerate(steps, start=1):
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        if Q is None:
            # Q = a I + Z: the only place a·I is formed, as a diagonal add onto Z.
            Q = Z.clone()
            Q.diagonal(dim1=1, dim2=2).add_(a)
        else:
            # Q (a I + Z) with the a-term in beta: no a·I matrix rounded in half precision.
            Q = torch.baddbmm(Q, Q, Z, beta=a)
        if i in restarts and i < len(steps):
            X = Q @ X
            R = X @ X.transpose(1, 2)
            Q = None
        elif i < len(steps):
            # R <- H R H, as two GEMMs: T = R H = R Z + a R, then H T = Z T + a T.
            T = torch.baddbmm(R, R, Z, beta=a)
            R = torch.baddbmm(T, Z, T, beta=a)
    return X if Q is None else Q @ X


def orthogonalize(
    x: Tensor,
    ns_coefficients: Sequence[Triple],
    eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.float64,
    *,
    algorithm: str = "standard",
    gram_restarts: Sequence[int] | None = None,
) -> Tensor:
    """Approximate polar factor of each matrix of a (B, rows, cols) or (rows, cols) tensor.

    ``X / max(||X||_F, eps)`` (the norm in at least float32), cast to ``ns_dtype``, then one
    quintic Newton-Schulz iteration per (a, b, c) on the wide orientation. Returns ``ns_dtype``.
    ``algorithm="gram"`` evaluates the same polynomials with :func:`gram_newton_schulz`.
    """
    if algorithm not in NS_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {NS_ALGORITHMS}, got {algorithm!r}")
    # Checked for "standard" too, so a bad setting fails the same way whichever runs.
    restarts = resolve_gram_restarts(gram_restarts, len(ns_coefficients))
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
    if algorithm == "gram":
        X = gram_newton_schulz(X, ns_coefficients, restarts)
    else:
        for a, b, c in ns_coefficients:
            A = X @ X.transpose(1, 2)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.transpose(1, 2)
    return X.squeeze(0) if squeeze else X


# The phase ops on packed buffers (NOTE: [Phase ops] in csrc/muon_step_args.h) in pure PyTorch:
# what the distributed driver runs for params the fused ops do not take (float64, devices
# without the extension). They read found_inf and a Tensor lr on the host, as the pure-PyTorch
# single-process step does; Newton-Schulz in fp32 on the CPU and bf16 elsewhere (as torch).


def _skip(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.reshape(-1)[0] != 0)


def momentum_packed_(grads, momentum_buffers, momentum, nesterov, grad_scale=None,
                     found_inf=None, out=None) -> None:
    """``muon_momentum_``: M = lerp(M, G / s, 1 - beta); U packed into ``out``."""
    if _skip(found_inf):
        return
    offset = 0
    for g, m in zip(grads, momentum_buffers):
        g = g.to(m.dtype).view(m.shape)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=g.dtype)
        m.lerp_(g, 1 - momentum)
        if out is not None:
            u = g.lerp(m, momentum) if nesterov else m
            out[offset : offset + m.numel()].copy_(u.reshape(-1))
        offset += m.numel()


def orthogonalize_packed_(x, shapes, ns_coefficients, eps, algorithm="standard",
                          gram_restarts=None, ns_dtype="bfloat16") -> None:
    """``muon_orthogonalize_``: each (batch, rows, cols) segment of ``x`` orthogonalized in
    place. ``algorithm``: one for all, or a list with one per segment. Iterates in fp32 on CPU
    and in ``ns_dtype`` elsewhere."""
    ns_dtype = torch.float32 if x.device.type == "cpu" else ns_torch_dtype(ns_dtype)
    offset = 0
    for k in range(0, len(shapes), 3):
        batch, rows, cols = shapes[k : k + 3]
        seg = x[offset : offset + batch * rows * cols].view(batch, rows, cols)
        offset += seg.numel()
        alg = algorithm if isinstance(algorithm, str) else algorithm[k // 3]
        if seg.numel():
            seg.copy_(orthogonalize(seg, ns_coefficients, eps, ns_dtype, algorithm=alg,
                                    gram_restarts=gram_restarts))


def update_packed_(params, x, lr, weight_decay, update_scales, found_inf=None) -> None:
    """``muon_update_``: P = P (1 - lr wd) - lr scale_i X_i, X packed in ``x``."""
    if _skip(found_inf):
        return
    lr = float(lr) if not isinstance(lr, Tensor) else float(lr.reshape(-1)[0])
    offset = 0
    for p, scale in zip(params, update_scales):
        xi = x[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        compute = torch.promote_types(p.dtype, torch.float32)
        p.copy_(p.to(compute).mul_(1 - lr * weight_decay).add_(xi.to(compute), alpha=-lr * scale))


def copy_blocks_packed_(src, dst, blocks) -> None:
    """``muon_copy_blocks_``: 6-tuples (src_offset, src_stride, dst_offset, dst_stride, rows,
    width) of strided 2-D blocks."""
    for k in range(0, len(blocks), 6):
        so, ss, do, ds, rows, width = blocks[k : k + 6]
        if rows and width:
            dst.as_strided((rows, width), (ds, 1), do).copy_(
                src.as_strided((rows, width), (ss, 1), so))


# NOTE: [NorMuon state]
# NorMuon's second moment v has one float32 entry per row of each orthogonalized matrix, in the
# param's orientation: a flat vector, matrix after matrix in the order blocks_of gives them (a
# 3-D stack: expert after expert; blocks: block after block, head after head). For a plain 2-D
# weight, and for row blocks / heads of one, entry i is row i of the weight; column blocks have
# a full set of rows each. Flat, so that one layout serves every blocking.
def normuon_rows(
    shape: Sequence[int],
    num_heads: int | None = None,
    split_sizes: Sequence[int] | None = None,
    split_dim: int = 0,
) -> int:
    """Length of the NorMuon second-moment vector of a param of ``shape`` (NOTE: [NorMuon state])."""
    if not blocking_requested(num_heads, split_sizes):
        batch, rows, _ = matrix_shape(shape)
        return batch * rows
    total = 0
    for b in matrix_blocks(shape, num_heads, split_sizes, split_dim):
        heads, rows, _ = b.matrix_shape(shape)
        total += heads * rows
    return total


def normuon_views(v: Tensor, shapes: Sequence[tuple[int, int, int]]) -> list[Tensor]:
    """The (batch, rows) views of a flat NorMuon vector for matrices of these (batch, rows, cols)
    shapes, in order (NOTE: [NorMuon state])."""
    views, offset = [], 0
    for batch, rows, _ in shapes:
        views.append(v.narrow(0, offset, batch * rows).view(batch, rows))
        offset += batch * rows
    if offset != v.numel():
        raise ValueError(f"a NorMuon vector of {v.numel()} entries for matrices of {offset} rows")
    return views


def normuon_(o: Tensor, v: Tensor, beta2: float, eps: float) -> Tensor:
    """NorMuon on orthogonalized matrices ``o`` (B, rows, cols): updates ``v`` (B, rows) in place
    and returns ``f * O / (sqrt(v) + eps)`` (row-wise), where f restores each matrix's Frobenius
    norm (0 for a zero matrix). In ``o``'s dtype (the formula of NOTE: [NorMuon] in
    csrc/muon_step_args.h). ``v`` is stored in its own dtype and read back, as the ops do."""
    q = o.square().sum(dim=-1)
    v.copy_((beta2 * v.to(o.dtype) + (1 - beta2) * q / o.size(-1)).to(v.dtype))
    s = 1 / (v.to(o.dtype).sqrt() + eps)
    num, den = q.sum(dim=-1), (s * s * q).sum(dim=-1)
    f = torch.where(den > 0, (num / torch.where(den > 0, den, 1)).sqrt(), 0)
    return o * (f[:, None] * s)[..., None]


def standard_flops(m: int, n: int, num_iterations: int) -> int:
    """GEMM FLOPs (2·m·k·n per product) of standard Newton-Schulz on one m x n matrix.

    Per iteration on the wide orientation (m <= n after transposing): X Xᵀ, A·A, B·X.
    """
    m, n = min(m, n), max(m, n)
    return num_iterations * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)


def gram_flops(
    m: int, n: int, num_iterations: int, gram_restarts: Sequence[int] | None = None
) -> int:
    """GEMM FLOPs of :func:`gram_newton_schulz` as implemented, on one m x n matrix.

    m x n GEMMs (2m²n): the first R = X Xᵀ, X = Q X and R = X Xᵀ at each restart, and the final
    X = Q X. m x m GEMMs (2m³): R·R every iteration, Q·Z on all but a segment's first
    iteration (Q is the identity there), and the two of R <- H R H on every iteration that is
    neither the last nor followed by a restart.
    """
    m, n = min(m, n), max(m, n)
    if num_iterations == 0:
        return 0
    restarts = {k for k in resolve_gram_restarts(gram_restarts, num_iterations) if k < num_iterations}
    wide = 2 * m * m * n
    square = 2 * m**3
    flops = wide  # R = X Xᵀ
    segment_start = True
    for i in range(1, num_iterations + 1):
        flops += square  # Z = b R + c R R
        if not segment_start:
            flops += square  # Q = Q Z + a Q
        segment_start = False
        if i in restarts:
            flops += 2 * wide  # X = Q X; R = X Xᵀ
            segment_start = True
        elif i < num_iterations:
            flops += 2 * square  # T = R Z + a R; R = Z T + a T
    return flops + wide  # X = Q X


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
    ns_algorithm: str = "standard",
    gram_restarts: Sequence[int] | None = None,
    num_heads: int | None = None,
    split_sizes: Sequence[int] | None = None,
    split_dim: int = 0,
    normuon_buffers: Sequence[Tensor] | None = None,
    normuon_beta2: float = 0.95,
    normuon_eps: float = 1e-8,
) -> None:
    """One Muon step, in place on ``params`` and ``momentum_buffers`` (never on ``grads``).

    Same contract as ``torch.ops.muon_ext.muon_step_`` but for tensors of any shape
    (each viewed with :func:`matrix_view`). Elementwise math in ``compute_dtype``,
    Newton-Schulz in ``ns_dtype`` (default: ``compute_dtype``) with ``ns_algorithm``
    ("standard" or "gram", see :func:`orthogonalize`); each output is rounded once.

    ``num_heads`` / ``split_sizes`` / ``split_dim``: each param is orthogonalized as the
    blocks :func:`blocks_of` gives (the same settings for every param). An entry of
    ``update_scales`` is then either one float for all of its param's blocks or a sequence
    with one float per block.

    ``normuon_buffers``: one flat NorMuon vector per param (NOTE: [NorMuon state]), updated in
    place; each orthogonalized matrix goes through :func:`normuon_` (in ``compute_dtype``).
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    ns_dtype = compute_dtype if ns_dtype is None else ns_dtype
    lr = float(lr)
    if normuon_buffers is None:
        normuon_buffers = [None] * len(params)
    for p, g, m, scale, nv in zip(
        params, grads, momentum_buffers, update_scales, normuon_buffers, strict=True
    ):
        if p.numel() == 0:
            continue
        gd = g.to(compute_dtype)
        if grad_scale is not None:
            gd = gd / grad_scale.to(compute_dtype)
        md = m.to(compute_dtype).lerp(gd, 1 - momentum)
        u = gd.lerp(md, momentum) if nesterov else md
        views = blocks_of(u, num_heads, split_sizes, split_dim)
        vs = None if nv is None else normuon_views(nv, [tuple(x.shape) for x in views])
        if not blocking_requested(num_heads, split_sizes):
            x = orthogonalize(
                matrix_view(u), ns_coefficients, eps, ns_dtype,
                algorithm=ns_algorithm, gram_restarts=gram_restarts,
            ).to(compute_dtype)
            if vs is not None:
                x = normuon_(x, vs[0], normuon_beta2, normuon_eps)
            pd = p.to(compute_dtype) * (1 - lr * weight_decay) - (lr * scale) * x.reshape(p.shape)
        else:
            scales = [scale] * len(views) if isinstance(scale, (int, float)) else list(scale)
            if len(scales) != len(views):
                raise ValueError(
                    f"update_scales: {len(scales)} scales for a param of {len(views)} blocks"
                )
            pd = p.to(compute_dtype) * (1 - lr * weight_decay)
            outs = blocks_of(pd, num_heads, split_sizes, split_dim)
            for k, (view, out, s) in enumerate(zip(views, outs, scales)):
                x = orthogonalize(
                    view.contiguous(), ns_coefficients, eps, ns_dtype,
                    algorithm=ns_algorithm, gram_restarts=gram_restarts,
                ).to(compute_dtype)
                if vs is not None:
                    x = normuon_(x, vs[k], normuon_beta2, normuon_eps)
                out.sub_((lr * s) * x)
        p.copy_(pd)
        m.copy_(md)
