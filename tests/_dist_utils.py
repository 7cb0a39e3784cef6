"""Spawned gloo workers for tests/test_distributed.py and tests/test_qk_clip.py.

Starting a process group costs seconds (each worker imports torch), so one spawn per world
size runs every scenario in sequence (both world sizes at the same time); each scenario
returns JSON metrics per rank and the tests assert on them in the parent. Every scenario
compares against a single-process run computed inside the worker (cheap at these sizes):
for test_distributed a full-batch run of ``muon_ext.Muon``.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SEED = 0  # set in every worker from the parent's seed (fresh each run unless pinned)
BATCH = 12  # divisible by every world size tested, so DDP's average is the full-batch mean
STEPS = 3
HYPER = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}
# Different rules in the second group: every per-group hyperparameter reaches the distributed path.
EXPERT_GROUP = {
    "lr": 0.03,
    "weight_decay": 0.0,
    "nesterov": False,
    "adjust_lr_fn": "match_rms_adamw",
    "ns_coefficients": "polar_express",
}


class Net(nn.Module):
    """Awkward shapes: tall 11x7, two 11x11 (one bucket), a 4x11x6 expert stack, a 3x6x6
    stack, 2x6 and 1x2 (fewer rows than ranks: FSDP2 leaves some shards empty).

    The 2x6 -> 1x2 branch is added to the 6-wide output rather than being its only path: a
    1-wide bottleneck would make every upstream grad low-rank, and Newton-Schulz (polar_express
    most of all) amplifies float noise in near-zero singular directions ~1000x, which is no
    property of the distributed step but would blur a 1e-5 comparison.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 11, bias=False)
        self.h1 = nn.Linear(11, 11, bias=False)
        self.h2 = nn.Linear(11, 11, bias=False)
        self.experts = nn.Parameter(torch.randn(4, 11, 6) / 11**0.5)
        self.mix = nn.Parameter(torch.randn(3, 6, 6) / 6**0.5)
        self.down = nn.Linear(6, 2, bias=False)
        self.out = nn.Linear(2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.inp(x))
        h = torch.tanh(self.h1(a)) + torch.tanh(self.h2(a))
        e = torch.tanh(torch.einsum("bi,eio->beo", h, self.experts).mean(1))
        z = torch.einsum("bj,kij->bki", e, self.mix).mean(1)
        return z + self.out(torch.tanh(self.down(z)))


MATRICES = 1 + 1 + 1 + 4 + 3 + 1 + 1  # 2-D matrices Newton-Schulz must see per step
SHAPE_BUCKETS = 6  # (7,11) (11,11) (6,11) (6,6) (2,6) (1,2)


def make_model() -> Net:
    torch.manual_seed(SEED)
    return Net()


def param_groups(model: Net) -> list[dict[str, Any]]:
    return [
        {
            "params": [
                model.inp.weight,
                model.h1.weight,
                model.h2.weight,
                model.down.weight,
                model.out.weight,
            ]
        },
        {"params": [model.experts, model.mix], **EXPERT_GROUP},
    ]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1 + step)
    return torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 6, generator=g)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    per = BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


@functools.lru_cache(maxsize=1)
def reference_run(steps: int = STEPS) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Single process, full batch: params and momentum (by param name) after every step.

    Cached per worker process (SEED is fixed there); callers must not modify the tensors.
    """
    from muon_ext import Muon

    model = make_model()
    opt = Muon(param_groups(model), **HYPER)
    names = {p: n for n, p in model.named_parameters()}
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *batch(step)).backward()
        opt.step()
        history.append(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "momentum": {names[p]: s["momentum_buffer"].clone() for p, s in opt.state.items()},
            }
        )
    return history


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_diff(named: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(named) == set(ref), (sorted(named), sorted(ref))
    return max(float((full(t).detach() - ref[n]).abs().max()) for n, t in named.items())


def ranks_identical(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds bit-identical values (gathered and compared on every rank)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_metrics(results: dict, world: int, name: str) -> list[dict]:
    """The metrics each rank reported for one scenario of run_workers; fails with a rank's
    traceback if it raised."""
    per_rank = results[world][name]
    for r, m in enumerate(per_rank):
        assert "error" not in m, f"{name} failed on rank {r} of {world}:\n{m['error']}"
    return per_rank


def run_workers(
    worlds: tuple[int, ...],
    scenarios: dict[str, Callable[[int, int, str], dict]],
    seed: int,
    timeout: float = 120.0,
    only: dict[int, tuple[str, ...]] | None = None,
) -> dict[int, dict[str, list[dict]]]:
    """Runs every scenario on spawned gloo ranks, one process group per world size (all
    started at once: start-up is most of the time). Returns world -> name -> per-rank metrics.
    ``only`` maps a world size to the scenarios it runs (default: all of them), for scenarios
    that need a particular world (a 2 x 2 mesh).

    Workers still running at the deadline are killed (never waited for); a scenario without
    a result on some rank (it hung, or its worker died) is reported as an error there.
    """
    names = list(scenarios)
    module = scenarios[names[0]].__module__
    only = only or {}
    names_of = {world: [n for n in names if n in only.get(world, names)] for world in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        for world in worlds:
            folder = os.path.join(tmp, f"world{world}")
            os.makedirs(folder)
            jobs[world] = mp.start_processes(
                _entry,
                args=(world, free_port(), seed, module, names_of[world], folder),
                nprocs=world,
                join=False,
                start_method="spawn",
            )
        deadline = time.monotonic() + timeout
        try:
            for ctx in jobs.values():
                while time.monotonic() < deadline:
                    try:
                        if ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                            break
                    except (mp.ProcessRaisedException, mp.ProcessExitedException):
                        break  # what is missing is reported per scenario below
        finally:
            for ctx in jobs.values():
                for p in ctx.processes:  # only ours, and only those still running
                    if p.is_alive():
                        p.kill()
        missing = {"error": f"no result: the worker hung (killed after {timeout:.0f} s) or died"}
        out: dict[int, dict[str, list[dict]]] = {}
        for world in worlds:
            per_rank = []
            for r in range(world):
                try:
                    with open(os.path.join(tmp, f"world{world}", f"rank{r}.json")) as f:
                        per_rank.append(json.load(f))
                except FileNotFoundError:
                    per_rank.append({})
            out[world] = {
                n: [per_rank[r].get(n, missing) for r in range(world)] for n in names_of[world]
            }
    return out


def _entry(
    rank: int, world: int, port: int, seed: int, module: str, names: list[str], tmp: str
) -> None:
    import importlib

    global SEED
    SEED = seed
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),  # a hung collective fails its scenario, not the run
    )
    scenarios = importlib.import_module(module).SCENARIOS
    results: dict[str, dict] = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = scenarios[name](rank, world, tmp)
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        path = os.path.join(tmp, f"rank{rank}.json")
        with open(path + ".part", "w") as f:
            json.dump(results, f)
        os.replace(path + ".part", path)  # the parent never reads half a file
    dist.destroy_process_group()
