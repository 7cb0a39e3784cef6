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

__all__ = ["muon_step_", "newton_schulz"]


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
) -> None:
    """The fused Muon step on 3-D (batch, rows, cols) views; see csrc/muon_step_args.h."""
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
    )


def newton_schulz(x: Tensor, ns_coefficients: Sequence[float], eps: float = 1e-7) -> Tensor:
    """Orthogonalizes each matrix of a (batch, rows, cols) tensor (fp32 on CPU, bf16 on CUDA)."""
    require_extension()
    return torch.ops.muon_ext.newton_schulz(x, [float(c) for c in ns_coefficients], float(eps))


if extension_available():

    @torch.library.register_fake("muon_ext::muon_step_")
    def _muon_step_fake(
        params, grads, momentum_buffers, lr, momentum, nesterov, weight_decay, eps,
        ns_coefficients, update_scales, grad_scale=None, found_inf=None,
    ) -> None:
        return None

    @torch.library.register_fake("muon_ext::newton_schulz")
    def _newton_schulz_fake(x, ns_coefficients, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
