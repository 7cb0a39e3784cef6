"""Typed Python wrappers over ``torch.ops.muon_ext.*`` and their fake (meta) kernels.

The fake kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops without
running them: ``muon_step_`` only mutates its inputs (declared in the schema), and
``newton_schulz`` returns a fresh tensor shaped like its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._extension import extension_available, require_extension
from .coefficients import resolve_ns_dtype

__all__ = [
    "DEFAULT_WORKSPACE_LIMIT",
    "muon_copy_blocks_",
    "muon_momentum_",
    "muon_normuon_",
    "muon_orthogonalize_",
    "muon_step_",
    "muon_step_workspace_bytes",
    "muon_update_",
    "newton_schulz",
]

# Bytes of Newton-Schulz scratch a step may allocate unless told otherwise: 128 MiB (the
# reasoning is in csrc/muon_step_args.h, NOTE: [Workspace budget]).
DEFAULT_WORKSPACE_LIMIT = 128 << 20


def muon_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    eps: float,
    ns_coefficients: Sequence[float],
    update_scales: Sequence[float],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    workspace_limit: int = -1,
    ns_algorithm: str = "standard",
    gram_restarts: Sequence[int] = (2,),
    normuon_buffers: Sequence[Tensor] = (),
    normuon_beta2: float = 0.95,
    normuon_eps: float = 1e-8,
    ns_dtype: str | torch.dtype = "bfloat16",
) -> None:
    """The fused Muon step on 3-D (batch, rows, cols) views; see csrc/muon_step_args.h.

    ``workspace_limit``: bytes of Newton-Schulz scratch the step may allocate (-1: the default,
    :data:`DEFAULT_WORKSPACE_LIMIT`); buckets are orthogonalized in chunks that fit it.
    ``ns_algorithm``: "standard", "gram" (Gram Newton-Schulz, restarting after each iteration
    count in ``gram_restarts``) or "auto" (per bucket; NOTE: [Newton-Schulz algorithm]).
    ``normuon_buffers``: empty (off) or one float32 (batch, rows) second-moment buffer per view:
    NorMuon's per-row normalization after Newton-Schulz (NOTE: [NorMuon]).
    ``ns_dtype``: "bfloat16" or "float16" (or those torch dtypes), the element type CUDA
    iterates in; CPU iterates in fp32 either way (NOTE: [Newton-Schulz dtype]).
    """
    torch.ops.muon_ext.muon_step_(
        list(params),
        list(grads),
        list(momentum_buffers),
        lr,
        float(momentum),
        bool(nesterov),
        float(weight_decay),
        float(eps),
        [float(c) for c in ns_coefficients],
        [float(s) for s in update_scales],
        grad_scale,
        found_inf,
        int(workspace_limit),
        str(ns_algorithm),
        [int(r) for r in gram_restarts],
        list(normuon_buffers) or None,
        float(normuon_beta2),
        float(normuon_eps),
        _ns_dtype(ns_dtype),
    )


# ---------------------------------------------------------------------- the phases on their own
# NOTE: [Phase ops] in csrc/muon_step_args.h. "Packed": one contiguous 1-D float32 tensor holding
# tensor after tensor in list order, each row-major in its own shape.


def muon_momentum_(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    momentum: float,
    nesterov: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    out: Tensor | None = None,
) -> None:
    """Phase 1: ``M = lerp(M, G / grad_scale, 1 - momentum)`` for tensors of any shape, and
    ``U`` (``lerp(G', M, momentum)`` with Nesterov, else ``M``) packed into ``out`` if given.
    With ``found_inf != 0`` nothing is written."""
    torch.ops.muon_ext.muon_momentum_(
        list(grads), list(momentum_buffers), float(momentum), bool(nesterov), grad_scale,
        found_inf, out,
    )


def muon_orthogonalize_(
    x: Tensor,
    shapes: Sequence[int],
    ns_coefficients: Sequence[float],
    eps: float = 1e-7,
    ns_algorithm: str = "standard",
    gram_restarts: Sequence[int] = (2,),
    workspace_limit: int = -1,
    ns_dtype: str | torch.dtype = "bfloat16",
) -> None:
    """Phases 2-3 in place: every matrix of the packed ``x`` (described by the flat
    ``(batch, rows, cols)`` triples ``shapes``, in the param's orientation) becomes
    ``NS(U / max(||U||_F, eps))``, per shape bucket, in workspace-sized chunks."""
    torch.ops.muon_ext.muon_orthogonalize_(
        x, _ints(shapes), [float(c) for c in ns_coefficients], float(eps),
        str(ns_algorithm), _ints(gram_restarts), int(workspace_limit), _ns_dtype(ns_dtype),
    )


def muon_update_(
    params: Sequence[Tensor],
    x: Tensor,
    lr: Tensor,
    weight_decay: float,
    update_scales: Sequence[float],
    found_inf: Tensor | None = None,
) -> None:
    """Phase 4: ``P = P (1 - lr wd) - lr scale_i X_i`` with ``X`` packed in ``x`` (param
    orientation), computed in fp32 and rounded once. With ``found_inf != 0`` nothing changes."""
    torch.ops.muon_ext.muon_update_(
        list(params), x, lr, float(weight_decay), [float(s) for s in update_scales], found_inf
    )


def muon_copy_blocks_(src: Tensor, dst: Tensor, blocks: Sequence[int]) -> None:
    """Copies strided 2-D blocks between flat buffers: ``blocks`` holds 6-tuples
    ``(src_offset, src_stride, dst_offset, dst_stride, rows, width)``; destinations must be
    disjoint. Packs shards for collectives and reassembles whole matrices."""
    torch.ops.muon_ext.muon_copy_blocks_(src, dst, _ints(blocks))


def muon_normuon_(
    x: Tensor,
    shapes: Sequence[int],
    normuon_v: Sequence[Tensor],
    normuon_beta2: float = 0.95,
    normuon_eps: float = 1e-8,
    found_inf: Tensor | None = None,
) -> None:
    """NorMuon between orthogonalize and update (CPU): each matrix O of the packed ``x``
    (``shapes`` as for :func:`muon_orthogonalize_`) updates its rows' second moment in
    ``normuon_v`` (one float32 tensor of batch * rows entries per triple) and becomes
    ``f s_i O_ij`` in place (NOTE: [NorMuon] in csrc/muon_step_args.h), so that
    :func:`muon_update_` then writes what :func:`muon_step_` with ``normuon_buffers`` writes.
    With ``found_inf != 0`` nothing changes."""
    torch.ops.muon_ext.muon_normuon_(
        x, _ints(shapes), list(normuon_v), float(normuon_beta2), float(normuon_eps), found_inf
    )


def _ints(values: Sequence[int]) -> list[int]:
    """A list of ints for an int[] argument; a list is passed as is (the distributed driver's
    tables are made once, as lists of ints, and hold thousands of entries)."""
    return values if type(values) is list else [int(v) for v in values]


def _ns_dtype(ns_dtype: str | torch.dtype) -> str:
    """The op's ns_dtype string: a dtype becomes its name; a string goes to the op as is (the op
    names the argument in its error)."""
    return resolve_ns_dtype(ns_dtype) if isinstance(ns_dtype, torch.dtype) else str(ns_dtype)


def muon_step_workspace_bytes(
    params: Sequence[Tensor],
    workspace_limit: int = -1,
    ns_algorithm: str = "standard",
    normuon: bool = False,
    ns_dtype: str | torch.dtype = "bfloat16",
) -> int:
    """Bytes of scratch memory :func:`muon_step_` allocates for these 3-D views (no allocation);
    ``normuon``: for a step with ``normuon_buffers`` (NorMuon's per-row multipliers)."""
    require_extension()
    return int(
        torch.ops.muon_ext.muon_step_workspace_bytes(
            list(params), int(workspace_limit), str(ns_algorithm), bool(normuon),
            _ns_dtype(ns_dtype),
        )
    )


def newton_schulz(
    x: Tensor,
    ns_coefficients: Sequence[float],
    eps: float = 1e-7,
    ns_algorithm: str = "standard",
    gram_restarts: Sequence[int] = (2,),
    ns_dtype: str | torch.dtype = "bfloat16",
) -> Tensor:
    """Orthogonalizes each matrix of a (batch, rows, cols) tensor (fp32 on CPU; on CUDA in
    ``ns_dtype``, bf16 or fp16)."""
    require_extension()
    return torch.ops.muon_ext.newton_schulz(
        x, [float(c) for c in ns_coefficients], float(eps), str(ns_algorithm),
        [int(r) for r in gram_restarts], _ns_dtype(ns_dtype),
    )


if extension_available():

    @torch.library.register_fake("muon_ext::muon_step_")
    def _muon_step_fake(
        params, grads, momentum_buffers, lr, momentum, nesterov, weight_decay, eps,
        ns_coefficients, update_scales, grad_scale=None, found_inf=None, workspace_limit=-1,
        ns_algorithm="standard", gram_restarts=(2,), normuon_buffers=None, normuon_beta2=0.95,
        normuon_eps=1e-8, ns_dtype="bfloat16",
    ) -> None:
        return None

    @torch.library.register_fake("muon_ext::muon_momentum_")
    def _muon_momentum_fake(
        grads, momentum_buffers, momentum, nesterov, grad_scale=None, found_inf=None, out=None
    ) -> None:
        return None

    @torch.library.register_fake("muon_ext::muon_orthogonalize_")
    def _muon_orthogonalize_fake(
        x, shapes, ns_coefficients, eps, ns_algorithm="standard", gram_restarts=(2,),
        workspace_limit=-1, ns_dtype="bfloat16",
    ) -> None:
        return None

    @torch.library.register_fake("muon_ext::muon_update_")
    def _muon_update_fake(params, x, lr, weight_decay, update_scales, found_inf=None) -> None:
        return None

    @torch.library.register_fake("muon_ext::muon_copy_blocks_")
    def _muon_copy_blocks_fake(src, dst, blocks) -> None:
        return None

    @torch.library.register_fake("muon_ext::muon_normuon_")
    def _muon_normuon_fake(x, shapes, normuon_v, normuon_beta2, normuon_eps,
                           found_inf=None) -> None:
        return None

    @torch.library.register_fake("muon_ext::newton_schulz")
    def _newton_schulz_fake(
        x, ns_coefficients, eps, ns_algorithm="standard", gram_restarts=(2,), ns_dtype="bfloat16"
    ):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
