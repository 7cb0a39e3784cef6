"""Newton-Schulz FLOPs of GPT-2 small's attention weights, whole vs per head (num_heads=12).

    python benchmarks/bench_head_flops.py

Measured: torch.utils.flop_counter counts the matmuls one step of the pure-PyTorch Muon issues
(fused=False: the fused op is opaque to the counter, and it runs the same GEMMs per matrix).
Predicted: muon_ext.reference.standard_flops of the shapes. One JSON line.
"""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from muon_ext import Muon
from muon_ext.reference import standard_flops

D, HEADS, STEPS = 768, 12, 5


def measure(num_heads: int | None) -> int:
    """FLOPs of one step over q, k, v (heads along rows) and o (heads along columns)."""
    qkv = [torch.nn.Parameter(torch.randn(D, D)) for _ in range(3)]
    o = torch.nn.Parameter(torch.randn(D, D))
    for p in (*qkv, o):
        p.grad = torch.randn_like(p)
    groups = [
        {"params": qkv, "num_heads": num_heads},
        {"params": [o], "num_heads": num_heads, "split_dim": 1},
    ]
    opt = Muon(groups, lr=0.02, fused=False, ns_steps=STEPS)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    return counter.get_total_flops()


def main() -> None:
    whole, per_head = measure(None), measure(HEADS)
    predicted_whole = 4 * standard_flops(D, D, STEPS)
    predicted_heads = 4 * HEADS * standard_flops(D // HEADS, D, STEPS)
    print(json.dumps({
        "weights": "GPT-2 small attention: q, k, v (768x768, heads along rows), o (heads along cols)",
        "ns_steps": STEPS,
        "measured_flops_whole": whole,
        "measured_flops_num_heads_12": per_head,
        "measured_ratio": per_head / whole,
        "predicted_flops_whole": predicted_whole,
        "predicted_flops_num_heads_12": predicted_heads,
        "predicted_ratio": predicted_heads / predicted_whole,
    }))


if __name__ == "__main__":
    main()
