"""Newton-Schulz coefficient schedules and the update-scale rules.

A schedule is a list of (a, b, c) triples, one per iteration of
``A = X Xᵀ; B = b·A + c·A·A; X = a·X + B·X``. Presets are named in ANCHORS-style
tables in the README; every preset costs the same 3 matmuls per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

Triple = tuple[float, float, float]

JORDAN: Triple = (3.4445, -4.7750, 2.0315)

# NOTE: [Polar Express safety factor]
# The published Polar Express polynomials are tuned for singular values in (0, 1]. Just above 1
# they explode: sigma = 1.001 ends at 5e20 after five iterations. The Frobenius normalization
# puts the top singular value at exactly 1 for every rank-1 matrix (1xN, Nx1), and bf16
# rounding nudges it past 1, so unguarded, about half of random bf16 inputs diverge. As in the
# authors' reference code, each polynomial but the last evaluates p(sigma / 1.01)
# (a/s, b/s^3, c/s^5): inputs up to sigma = 1.01 stay bounded, and sigma in [1e-3, 1] lands in
# [0.852, 1.124] instead of [0.876, 1.124].
_POLAR_EXPRESS_PUBLISHED: tuple[Triple, ...] = (
    (8.28721, -23.5959, 17.3004),
    (4.10706, -2.94785, 0.54484),
    (3.94869, -2.90890, 0.55182),
    (3.31842, -2.48849, 0.51005),
    (2.30065, -1.66890, 0.41881),
)
POLAR_EXPRESS_SAFETY = 1.01

# NOTE: [Gram safety factor]
# Gram Newton-Schulz (reference.gram_newton_schulz) iterates on R = X Xᵀ rather than on X. In
# half precision each GEMM on R rounds sigma² by about an ulp (fp16 ~1e-3, bf16 ~8e-3), and
# between restarts those errors compound through R <- H R H instead of being re-measured from
# X, so the sigma a later polynomial sees can sit further above 1 than in the standard
# iteration. As in the reference Gram Newton-Schulz package, the Gram schedule divides by 1.05
# instead of 1.01: inputs up to sigma = 1.05 stay bounded, at the price of a wider landing
# range for sigma in [1e-3, 1] ([0.758, 1.124] instead of [0.852, 1.124]).
POLAR_EXPRESS_GRAM_SAFETY = 1.05


def _with_safety_factor(schedule: tuple[Triple, ...], s: float = POLAR_EXPRESS_SAFETY):
    head = tuple((a / s, b / s**3, c / s**5) for a, b, c in schedule[:-1])
    return head + (schedule[-1],)


PRESETS: dict[str, tuple[Triple, ...]] = {
    # Keller Jordan's quintic, the torch.optim.Muon default, repeated ns_steps times.
    "jordan": (JORDAN,),
    # Amsel et al. 2025 (arXiv 2505.16932), 5 iterations, each optimal for its step, with the
    # paper's safety factor on all but the last (see NOTE: [Polar Express safety factor]).
    "polar_express": _with_safety_factor(_POLAR_EXPRESS_PUBLISHED),
    # The same polynomials for Gram Newton-Schulz (see NOTE: [Gram safety factor]).
    "polar_express_gram": _with_safety_factor(_POLAR_EXPRESS_PUBLISHED, POLAR_EXPRESS_GRAM_SAFETY),
    # 8 x jordan to grow small singular values fast, then 2 x a convergent polish.
    "deepseek_v4": (JORDAN,) * 8 + ((2.0, -1.5, 0.5),) * 2,
}

ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")

NS_ALGORITHM_CHOICES = ("standard", "gram", "auto")

# NOTE: [Newton-Schulz dtype] in csrc/muon_step_args.h: the element type the CUDA step iterates
# in, "bfloat16" (torch's numerics, the default) or "float16" (Gram Newton-Schulz prefers it).
# The CPU step iterates in fp32 whatever it says (NOTE: [fp32 Newton-Schulz on CPU]).
NS_DTYPE_CHOICES = ("bfloat16", "float16")
_NS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_ns_dtype(ns_dtype) -> str:
    """The name in :data:`NS_DTYPE_CHOICES` of ``ns_dtype``, a name or ``torch.bfloat16`` /
    ``torch.float16``; ValueError otherwise."""
    if isinstance(ns_dtype, torch.dtype):
        for name, dtype in _NS_DTYPES.items():
            if ns_dtype == dtype:
                return name
    elif isinstance(ns_dtype, str) and ns_dtype in NS_DTYPE_CHOICES:
        return ns_dtype
    raise ValueError(
        f"ns_dtype must be one of {NS_DTYPE_CHOICES} (or torch.bfloat16 / torch.float16), "
        f"got {ns_dtype!r}"
    )


def ns_torch_dtype(ns_dtype) -> torch.dtype:
    """The torch dtype of ``ns_dtype`` (a name or a dtype, as :func:`resolve_ns_dtype`)."""
    return _NS_DTYPES[resolve_ns_dtype(ns_dtype)]

# "gram" runs Gram Newton-Schulz on matrices whose wide orientation m x n has
# n >= GRAM_MIN_ASPECT * m (the only ones where it saves FLOPs) and standard NS on square-ish
# ones: R = X Xᵀ squares their condition number (kGramMinAspect in csrc/muon_step_args.h).
GRAM_MIN_ASPECT = 1.5
# NOTE: [Gram on CPU] in csrc/cpu/muon_step_cpu.cpp: "auto" takes Gram Newton-Schulz on the CPU
# for n >= CPU_GRAM_MIN_ASPECT * m and m >= CPU_GRAM_MIN_ROWS (the fused step applies the same
# rule per bucket). On CUDA "auto" is standard until thresholds are measured on a GPU.
CPU_GRAM_MIN_ASPECT = 3.0
CPU_GRAM_MIN_ROWS = 64


def resolve_ns_algorithm(ns_algorithm: str, rows: int, cols: int, device_type: str) -> str:
    """"standard" or "gram": what the step runs for one rows x cols matrix on this device type."""
    m, n = min(rows, cols), max(rows, cols)
    if ns_algorithm == "gram":
        return "gram" if n >= GRAM_MIN_ASPECT * m else "standard"
    if ns_algorithm == "auto":
        if device_type == "cpu" and m >= CPU_GRAM_MIN_ROWS and n >= CPU_GRAM_MIN_ASPECT * m:
            return "gram"
    return "standard"


def resolve_ns_coefficients(ns_coefficients, ns_steps: int) -> list[Triple]:
    """Turns the user's ``ns_coefficients`` into one (a, b, c) triple per iteration.

    Accepts one triple (repeated ``ns_steps`` times, as torch.optim.Muon does), a list of
    triples (one per iteration; its length is the iteration count), or a preset name.
    """
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
    if ns_steps >= 100:
        raise ValueError(f"ns_steps must be < 100 (as in torch.optim.Muon), got {ns_steps}")
    if isinstance(ns_coefficients, str):
        if ns_coefficients not in PRESETS:
            raise ValueError(
                f"ns_coefficients: unknown preset {ns_coefficients!r}; "
                f"choose one of {sorted(PRESETS)} or pass (a, b, c) triples"
            )
        preset = PRESETS[ns_coefficients]
        # A one-triple preset repeats for ns_steps; a full schedule defines its own length.
        steps = [preset[0]] * ns_steps if len(preset) == 1 else list(preset)
        return [tuple(float(v) for v in t) for t in steps]  # type: ignore[misc]
    if not isinstance(ns_coefficients, Sequence) or len(ns_coefficients) == 0:
        raise ValueError(
            f"ns_coefficients must be (a, b, c), a list of (a, b, c) or a preset name, "
            f"got {ns_coefficients!r}"
        )
    if all(_is_number(v) for v in ns_coefficients):
        triples = [tuple(ns_coefficients)] * ns_steps
    else:
        triples = [tuple(t) if isinstance(t, Sequence) else t for t in ns_coefficients]
    out: list[Triple] = []
    for i, t in enumerate(triples):
        if not isinstance(t, tuple) or len(t) != 3 or not all(_is_number(v) for v in t):
            raise ValueError(
                f"ns_coefficients[{i}] must be three numbers (a, b, c), got {t!r}"
            )
        if not all(math.isfinite(float(v)) for v in t):
            raise ValueError(f"ns_coefficients[{i}] must be finite, got {t!r}")
        out.append((float(t[0]), float(t[1]), float(t[2])))
    return out


def flat_coefficients(schedule: Sequence[Triple]) -> list[float]:
    return [float(v) for t in schedule for v in t]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """(batch, rows, cols) of the matrices a parameter of this shape is made of.

    2-D: one matrix. 3-D: a stack of independent matrices (MoE experts, batched heads).
    4-D and up (conv weights): one (out, in·kh·kw) matrix, as Keller Jordan's Muon flattens it.
    """
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters with at least 2 dims, got shape {tuple(shape)}")
    if len(shape) == 2:
        return 1, int(shape[0]), int(shape[1])
    if len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    return 1, int(shape[0]), int(math.prod(shape[1:]))


DEFAULT_RMS_TARGET = 0.2


def update_scale(
    rows: int, cols: int, adjust_lr_fn: str | None, rms_target: float = DEFAULT_RMS_TARGET
) -> float:
    """The factor on lr for a rows x cols orthogonalized matrix (torch.optim.Muon's rules).

    ``rms_target`` is the constant of ``"match_rms_adamw"`` (``rms_target·sqrt(max(rows, cols))``
    gives the update that RMS; torch uses 0.2); the other rules ignore it.
    """
    if rows == 0 or cols == 0:
        return 0.0
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return rms_target * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(
        f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}"
    )


class MatrixBlock(NamedTuple):
    """One block of a 2-D parameter that is orthogonalized as matrices of its own.

    The block is ``t.narrow(dim, start, size)``, cut along ``dim`` into ``heads`` equal parts
    that are stacked as a (heads, rows, cols) batch: for ``dim=0`` each part is
    (size / heads, cols) rows, for ``dim=1`` (rows, size / heads) columns.
    """

    dim: int
    start: int
    size: int
    heads: int

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(batch, rows, cols) of this block of a parameter of ``shape``."""
        rows, cols = int(shape[0]), int(shape[1])
        if self.dim == 0:
            return self.heads, self.size // self.heads, cols
        return self.heads, rows, self.size // self.heads


def blocking_requested(
    num_heads: int | None, split_sizes: Sequence[int] | None
) -> bool:
    """Whether a group's settings cut its parameters into blocks (else one matrix view each)."""
    return num_heads is not None or split_sizes is not None


def matrix_blocks(
    shape: Sequence[int],
    num_heads: int | None = None,
    split_sizes: Sequence[int] | None = None,
    split_dim: int = 0,
) -> list[MatrixBlock]:
    """The blocks a 2-D parameter of ``shape`` is orthogonalized as (see :class:`MatrixBlock`).

    ``split_sizes`` cuts dim ``split_dim`` (0: rows, 1: columns) into consecutive blocks of
    these sizes (they must add up to that dim); ``num_heads`` cuts each block (the whole
    parameter without ``split_sizes``) along the same dim into that many equal heads. Raises
    ValueError (without naming the parameter: callers add that) when the sizes do not fit.
    """
    if len(shape) != 2:
        raise ValueError(
            f"num_heads and split_sizes apply to 2-D parameters only, got shape {tuple(shape)} "
            "(put 3-D expert stacks and conv weights in a group without them)"
        )
    if split_dim not in (0, 1):
        raise ValueError(f"split_dim must be 0 (rows) or 1 (columns), got {split_dim!r}")
    length = int(shape[split_dim])
    what = "rows" if split_dim == 0 else "columns"
    sizes = [length] if split_sizes is None else [int(s) for s in split_sizes]
    if sum(sizes) != length:
        raise ValueError(
            f"split_sizes {tuple(sizes)} add up to {sum(sizes)}, but the parameter of shape "
            f"{tuple(shape)} has {length} {what} (split_dim={split_dim})"
        )
    heads = 1 if num_heads is None else int(num_heads)
    blocks = []
    start = 0
    for i, size in enumerate(sizes):
        if size % heads:
            where = f"its {length} {what}" if split_sizes is None else (
                f"block {i} ({size} {what}, split_sizes={tuple(sizes)})"
            )
            raise ValueError(
                f"num_heads={heads} does not divide {where} of the parameter of shape "
                f"{tuple(shape)} (heads are cut along split_dim={split_dim})"
            )
        blocks.append(MatrixBlock(split_dim, start, size, heads))
        start += size
    return blocks


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
