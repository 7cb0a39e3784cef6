"""The step-engine targets, one measurement per process, for side-by-side runs of two trees.

    python benchmarks/bench_engine_targets.py mem 96    # peak extra RSS of a step, 96 x 512x2048 fp32
    python benchmarks/bench_engine_targets.py host      # Muon.step vs AdamW(fused=True), 500 x 4x4
    python benchmarks/bench_engine_targets.py normuon cpu_small   # step with normuon on vs off
    python benchmarks/bench_engine_targets.py step cpu_small   # the fused step of a bench suite
    python benchmarks/bench_engine_targets.py fsdp      # FSDP2 Muon step (gloo, 2 ranks) vs
                                                        # AdamW(fused=True) in one process

Compare two builds by running each with PYTHONPATH pointing at its tree, interleaved. ``mem``
creates the momentum state up front, so the process's peak-RSS growth across the one step
it runs is the step's own scratch. ``host`` interleaves 30 steps of each optimizer on one
thread and prints the medians. ``fsdp`` times the distributed Muon step of 256 16x16 params
sharded by FSDP2 over 2 gloo ranks (one thread each; ranks aligned by a barrier before each
step) against torch's fused AdamW over the same shapes in one process (one thread), in
alternating rounds of 20 steps each while the other side sleeps (a rank waiting in a gloo
collective takes CPU from the others); medians over 5 rounds. Each prints one JSON line.
"""

import json
import resource
import statistics
import sys
import time

import torch

from muon_ext import Muon


def mem(count: int) -> dict:
    params = [torch.nn.Parameter(torch.randn(512, 2048)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params)
    for p in params:  # the state a first step would create
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    opt.step()
    step_s = time.perf_counter() - t0
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    param_bytes = count * 512 * 2048 * 4
    return {"what": "mem", "count": count, "extra_mib": extra / 2**20,
            "ratio_to_params": extra / param_bytes, "step_s": step_s}


def host(n: int = 500) -> dict:
    def make():
        ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    muon, adamw = Muon(make()), torch.optim.AdamW(make(), fused=True)
    for o in (muon, adamw):
        o.step()
        o.step()
    tm, ta = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        muon.step()
        tm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adamw.step()
        ta.append(time.perf_counter() - t0)
    m, a = statistics.median(tm) * 1e3, statistics.median(ta) * 1e3
    return {"what": "host", "muon_ms": m, "adamw_fused_ms": a, "ratio": m / a}


def normuon(suite_name: str, steps: int = 15) -> dict:
    """The fused step of a bench suite with NorMuon off and on, interleaved step by step (two
    optimizers over two copies of the same params and grads), medians of ``steps`` each."""
    from muon_ext.benchmarking.shapes import get_suite

    shapes = get_suite(suite_name).shapes()

    def make(on: bool) -> Muon:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        return Muon(ps, lr=0.02, normuon=on)

    off, on = make(False), make(True)
    for o in (off, on):
        o.step()
    t_off, t_on = [], []
    for _ in range(steps):
        for o, ts in ((off, t_off), (on, t_on)):
            t0 = time.perf_counter()
            o.step()
            ts.append(time.perf_counter() - t0)
    a, b = statistics.median(t_off) * 1e3, statistics.median(t_on) * 1e3
    return {"what": "normuon", "suite": suite_name, "threads": torch.get_num_threads(),
            "off_ms": a, "on_ms": b, "ratio": b / a, "steps": steps}


def step(suite_name: str, steps: int = 15) -> dict:
    """Median time of ``Muon.step`` (fp32, the machine's threads) on a bench suite's shapes."""
    from muon_ext.benchmarking.shapes import get_suite

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in get_suite(suite_name).shapes()]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = Muon(ps, lr=0.02)
    opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"what": "step", "suite": suite_name, "threads": torch.get_num_threads(),
            "step_ms": statistics.median(times) * 1e3, "steps": steps}


def _fsdp_worker(rank: int, world: int, port: int, rounds: int, steps: int, go, queue) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(16, 16)) for _ in range(256)])
    fully_shard(model, mesh=mesh)
    for p in model:
        p.grad = distribute_tensor(torch.randn(16, 16), mesh, p.placements)
    opt = Muon(list(model), lr=0.02)
    opt.step()
    for _ in range(rounds):
        go.get()  # blocks without spinning while the parent times AdamW
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        dist.barrier()
        if rank == 0:
            queue.put(times)
    dist.destroy_process_group()


def fsdp(rounds: int = 5, steps: int = 20) -> dict:
    """Rounds of ``steps`` AdamW steps (this process, the ranks blocked) and ``steps`` FSDP2
    Muon steps (2 ranks, this process blocked), alternating; medians over all rounds."""
    import socket

    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    ps = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(256)]
    for p in ps:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(ps, fused=True)
    adamw.step()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    gos = [ctx.Queue() for _ in range(2)]
    procs = [
        ctx.Process(target=_fsdp_worker, args=(r, 2, port, rounds, steps, gos[r], queue))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    ta, tm = [], []
    for _ in range(rounds):
        for _ in range(steps):
            t0 = time.perf_counter()
            adamw.step()
            ta.append(time.perf_counter() - t0)
        for go in gos:
            go.put(1)
        tm += queue.get(timeout=600)
    for proc in procs:
        proc.join()
    muon_ms, adamw_ms = statistics.median(tm) * 1e3, statistics.median(ta) * 1e3
    return {"what": "fsdp", "params": "256 x 16x16", "ranks": 2, "muon_fsdp2_ms": muon_ms,
            "adamw_fused_single_process_ms": adamw_ms, "ratio": muon_ms / adamw_ms,
            "rounds": rounds, "steps_per_round": steps}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fsdp":
        print(json.dumps(fsdp()))
        sys.exit(0)
    what = sys.argv[1] if len(sys.argv) > 1 else "host"
    if what == "normuon":
        print(json.dumps(normuon(sys.argv[2] if len(sys.argv) > 2 else "cpu_small")))
        sys.exit(0)
    if what == "step":
        print(json.dumps(step(sys.argv[2] if len(sys.argv) > 2 else "cpu_small")))
        sys.exit(0)
    torch.set_num_threads(1)
    print(json.dumps(mem(int(sys.argv[2])) if what == "mem" else host()))
