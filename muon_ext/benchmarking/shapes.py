"""Parameter-shape registry: the matrices Muon sees in real models, grouped into suites.

Shapes follow ``nn.Linear`` / ``nn.Conv2d`` layout (out, in[, kh, kw]). A suite is what one
optimizer step covers; its FLOP and byte counts (DESIGN.md, performance model) give the
floors that every benchmark row is compared with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..coefficients import matrix_shape, resolve_ns_algorithm
from ..reference import gram_flops, standard_flops

__all__ = [
    "DEFAULT_CPU_SUITES",
    "DEFAULT_GPU_SUITES",
    "SUITES",
    "ParamSpec",
    "Suite",
    "elementwise_bytes",
    "get_suite",
    "ns_flops",
]


@dataclass(frozen=True)
class ParamSpec:
    """``count`` parameters named ``name`` of shape ``shape``."""

    name: str
    shape: tuple[int, ...]
    count: int = 1


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    params: tuple[ParamSpec, ...]
    # Suites meant for a 2-core CPU; the others need a GPU to finish in reasonable time.
    cpu_friendly: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    def shapes(self) -> list[tuple[int, ...]]:
        """Every parameter's shape, in model order."""
        return [spec.shape for spec in self.params for _ in range(spec.count)]

    def names(self) -> list[str]:
        out = []
        for spec in self.params:
            out += (
                [spec.name] if spec.count == 1 else [f"{spec.name}.{i}" for i in range(spec.count)]
            )
        return out

    @property
    def num_params(self) -> int:
        return sum(spec.count for spec in self.params)

    @property
    def num_matrices(self) -> int:
        return sum(matrix_shape(s)[0] for s in self.shapes())

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes():
            b, r, c = matrix_shape(s)
            total += b * r * c
        return total

    def buckets(self) -> dict[tuple[int, int], int]:
        """(m, n) with m <= n -> number of matrices: the shape buckets a batched step sees."""
        out: dict[tuple[int, int], int] = {}
        for s in self.shapes():
            b, r, c = matrix_shape(s)
            key = (min(r, c), max(r, c))
            out[key] = out.get(key, 0) + b
        return out


def ns_flops(
    shapes: Iterable[tuple[int, ...]],
    iterations: int,
    algorithm: str = "standard",
    device_type: str = "cpu",
    gram_restarts: Sequence[int] | None = None,
) -> float:
    """Newton-Schulz GEMM FLOPs of one step over these param shapes.

    Standard: per iteration on an m x n matrix (m <= n), ``4m²n + 2m³`` (``X Xᵀ``: 2m²n,
    ``A·A``: 2m³, ``B·X``: 2m²n). Gram: ``muon_ext.reference.gram_flops`` (about 8αm³ + 28m³
    for 5 iterations and one restart, α = n / m). "auto" counts each matrix with the algorithm
    the fused step picks for it on this device type. Elementwise terms are folded into GEMM
    alpha/beta and not counted.
    """
    total = 0.0
    for s in shapes:
        b, r, c = matrix_shape(s)
        m, n = min(r, c), max(r, c)
        if resolve_ns_algorithm(algorithm, m, n, device_type) == "gram":
            total += b * float(gram_flops(m, n, iterations, gram_restarts))
        else:
            total += b * float(standard_flops(m, n, iterations))
    return total


def elementwise_bytes(
    shapes: Iterable[tuple[int, ...]],
    param_bytes: int = 4,
    grad_bytes: int = 4,
    momentum_bytes: int = 4,
) -> float:
    """Fewest bytes the step must move outside the GEMMs: grad read, momentum read + write,
    param read + write (20 B per element for fp32 everything)."""
    per_elt = grad_bytes + 2 * momentum_bytes + 2 * param_bytes
    total = 0
    for s in shapes:
        b, r, c = matrix_shape(s)
        total += b * r * c
    return float(total * per_elt)


# ---------------------------------------------------------------------------- models


def _gpt2(layers: int, d: int, fused_qkv: bool) -> tuple[ParamSpec, ...]:
    specs: list[ParamSpec] = []
    if fused_qkv:  # HF GPT-2 layout: one c_attn producing q, k and v
        specs.append(ParamSpec("attn.c_attn", (3 * d, d), layers))
    else:
        specs += [ParamSpec(f"attn.{p}_proj", (d, d), layers) for p in "qkv"]
    specs += [
        ParamSpec("attn.o_proj", (d, d), layers),
        ParamSpec("mlp.c_fc", (4 * d, d), layers),
        ParamSpec("mlp.c_proj", (d, 4 * d), layers),
    ]
    return tuple(specs)


def _llama3_8b_layer() -> tuple[ParamSpec, ...]:
    d, kv, ff = 4096, 1024, 14336  # 32 query heads, 8 KV heads of 128
    return (
        ParamSpec("self_attn.q_proj", (d, d)),
        ParamSpec("self_attn.k_proj", (kv, d)),
        ParamSpec("self_attn.v_proj", (kv, d)),
        ParamSpec("self_attn.o_proj", (d, d)),
        ParamSpec("mlp.gate_proj", (ff, d)),
        ParamSpec("mlp.up_proj", (ff, d)),
        ParamSpec("mlp.down_proj", (d, ff)),
    )


def _resnet50_convs() -> tuple[ParamSpec, ...]:
    """The 53 conv weights of torchvision's resnet50 (the fc head goes to AdamW)."""
    specs = [ParamSpec("conv1", (64, 3, 7, 7))]
    in_ch = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            specs += [
                ParamSpec(f"{name}.conv1", (width, in_ch, 1, 1)),
                ParamSpec(f"{name}.conv2", (width, width, 3, 3)),
                ParamSpec(f"{name}.conv3", (4 * width, width, 1, 1)),
            ]
            if block == 0:
                specs.append(ParamSpec(f"{name}.downsample.0", (4 * width, in_ch, 1, 1)))
            in_ch = 4 * width
    return tuple(specs)


_SUITE_LIST = [
    Suite(
        "gpt2_small",
        "GPT-2 small (124M), 12 layers, separate q/k/v/o: 48 x 768², 24 x 768x3072",
        _gpt2(12, 768, fused_qkv=False),
        tags=("anchor",),
    ),
    Suite(
        "gpt2_small_fused_qkv",
        "GPT-2 small, HF layout with fused c_attn (2304x768)",
        _gpt2(12, 768, fused_qkv=True),
    ),
    Suite(
        "gpt2_medium",
        "GPT-2 medium (350M), 24 layers, separate q/k/v/o: 96 x 1024², 48 x 1024x4096",
        _gpt2(24, 1024, fused_qkv=False),
        tags=("anchor",),
    ),
    Suite(
        "gpt2_medium_fused_qkv",
        "GPT-2 medium, HF layout with fused c_attn (3072x1024)",
        _gpt2(24, 1024, fused_qkv=True),
    ),
    Suite(
        "llama3_8b_layer",
        "one Llama-3-8B decoder layer: q/o 4096², k/v 1024x4096, gate/up/down 14336x4096",
        _llama3_8b_layer(),
        tags=("anchor",),
    ),
    Suite(
        "moe_64x1024x4096",
        "one MoE layer, 64 experts as 3-D stacks: w_in (64, 4096, 1024), w_out (64, 1024, 4096)",
        (ParamSpec("experts.w_in", (64, 4096, 1024)), ParamSpec("experts.w_out", (64, 1024, 4096))),
    ),
    Suite(
        "kimi_k2_experts",
        "one Kimi-K2 MoE expert bucket: 216 x 2048x7168 (aspect 3.5, where Gram NS gains most)",
        (ParamSpec("experts.w", (216, 2048, 7168)),),
    ),
    Suite(
        "resnet50_convs",
        "ResNet-50's 53 conv weights (4-D, orthogonalized as out x in*kh*kw)",
        _resnet50_convs(),
    ),
    # ---- scaled-down suites a 2-core CPU finishes in seconds
    Suite(
        "cpu_small",
        "many small matrices: 64 x 64x64 + 32 x 128x256",
        (ParamSpec("small.square", (64, 64), 64), ParamSpec("small.wide", (128, 256), 32)),
        cpu_friendly=True,
    ),
    Suite(
        "gpt2_small_1layer",
        "one GPT-2 small layer: 4 x 768², 3072x768, 768x3072",
        _gpt2(1, 768, fused_qkv=False),
        cpu_friendly=True,
    ),
    Suite(
        "rect_16x512x2048",
        "16 x 512x2048: rectangular (aspect 4), the Gram Newton-Schulz target on CPU",
        (ParamSpec("mlp.w", (512, 2048), 16),),
        cpu_friendly=True,
    ),
    Suite(
        "tiny",
        "smoke test: 4 x 32x32, 2 x 16x48, one (2, 24, 8) stack, one (8, 4, 3, 3) conv",
        (
            ParamSpec("t.square", (32, 32), 4),
            ParamSpec("t.wide", (16, 48), 2),
            ParamSpec("t.stack", (2, 24, 8)),
            ParamSpec("t.conv", (8, 4, 3, 3)),
        ),
        cpu_friendly=True,
    ),
]

SUITES: dict[str, Suite] = {s.name: s for s in _SUITE_LIST}
DEFAULT_GPU_SUITES = (
    "gpt2_small",
    "gpt2_small_fused_qkv",
    "gpt2_medium",
    "llama3_8b_layer",
    "moe_64x1024x4096",
    "resnet50_convs",
    "cpu_small",
)
DEFAULT_CPU_SUITES = ("cpu_small", "gpt2_small_1layer")


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; choose from {sorted(SUITES)}") from None
