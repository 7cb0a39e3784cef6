"""Distributed Muon on gloo (CPU): DDP owner mode, FSDP2, ZeRO, DCP, missing grads, layouts.

Every comparison is against a single-process, full-batch ``muon_ext.Muon`` run (float32; the
CPU path orthogonalizes in fp32, so 1e-5 is a real bound). One spawn per world size runs all
scenarios (see _dist_utils); the tests below assert on what each rank reported. A scenario
with the wrong algorithm (shard-local orthogonalization) shows the comparison can fail.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn

from muon_ext import Muon
from muon_ext import distributed as mdist
from muon_ext.coefficients import matrix_shape

from . import _dist_utils as U

pytestmark = pytest.mark.distributed

WORLDS = (2, 3)
TOL = 1e-5


# ---------------------------------------------------------------------- helpers (workers)


def _train(model, opt, rank, world, loss_model=None, steps=range(U.STEPS)):
    """Trains on this rank's slice of each batch; the max error against the single-process
    full-batch run after every step, and the distributed counters of every step."""
    ref = U.reference_run()
    names = {p: n for n, p in model.named_parameters()}
    diffs, mom_diffs, counts = [], [], []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        U.loss_fn(loss_model or model, *U.local_batch(step, rank, world)).backward()
        before = dataclasses.replace(mdist.stats(opt))
        opt.step()
        after = mdist.stats(opt)
        counts.append(
            {
                f.name: getattr(after, f.name) - getattr(before, f.name)
                for f in dataclasses.fields(after)
            }
        )
        diffs.append(U.max_diff(dict(model.named_parameters()), ref[step]["params"]))
        momentum = {names[p]: s["momentum_buffer"] for p, s in opt.state.items()}
        mom_diffs.append(U.max_diff(momentum, ref[step]["momentum"]))
    return {"param_diff": max(diffs), "momentum_diff": max(mom_diffs), "counts": counts}


def _fsdp_model(world, perturb=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    model = U.make_model()
    if perturb:  # values that only a checkpoint load can make right
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    for m in (model.inp, model.h1, model.h2, model.down, model.out):
        fully_shard(m, mesh=mesh)
    # The 3x6x6 stack sharded on its middle dim (the whole param goes to one owner); the
    # 4x11x6 experts stay on Shard(0) (whole matrices on every rank, no communication).
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is model.mix else None)
    return model


def _state_keys(model, opt):
    """Param names with state and their state keys, from every rank (gathered)."""
    names = {p: n for n, p in model.named_parameters()}
    mine = sorted((names[p], sorted(s)) for p, s in opt.state.items())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _shard_local_kind(unit, owner):
    """The wrong algorithm: each rank orthogonalizes its shard as if it were the whole matrix."""
    local = unit.param.to_local()
    unit.agree_pg = None
    if local.numel() == 0:
        unit.local_batch = 0
        return
    unit.local_batch, unit.rows, unit.cols = matrix_shape(local.shape)


@contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------- scenarios (workers)


def ddp_owner(rank, world, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = U.make_model()
    ddp = DDP(model)
    opt = Muon(U.param_groups(model), **U.HYPER, distributed_mode="owner")
    out = _train(model, opt, rank, world, loss_model=ddp)
    tensors = list(model.parameters()) + [s["momentum_buffer"] for s in opt.state.values()]
    out["identical_on_ranks"] = U.ranks_identical(tensors)
    out["state_keys"] = _state_keys(model, opt)
    return out


def fsdp(rank, world, tmp):
    model = _fsdp_model(world)
    opt = Muon(U.param_groups(model), **U.HYPER)
    out = _train(model, opt, rank, world)
    out["empty_shards"] = sum(p.to_local().numel() == 0 for p in model.parameters())
    out["state_like_params"] = all(
        s["momentum_buffer"].placements == p.placements
        and s["momentum_buffer"].to_local().shape == p.to_local().shape
        for p, s in opt.state.items()
    )
    out["state_keys"] = _state_keys(model, opt)
    return out


def fsdp_shard_local(rank, world, tmp):
    """The same comparison with shard-local orthogonalization: it must fail it."""
    with _patched(mdist, "_dtensor_kind", _shard_local_kind):
        model = _fsdp_model(world)
        opt = Muon(U.param_groups(model), **U.HYPER)
        return _train(model, opt, rank, world)


def fsdp_dcp(rank, world, tmp):
    """Save after two steps with torch.distributed.checkpoint, load into a fresh (different)
    model and optimizer, take the third step with both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model(world)
    opt = Muon(U.param_groups(model), **U.HYPER)
    _train(model, opt, rank, world, steps=range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    path = os.path.join(tmp, "dcp")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    model2 = _fsdp_model(world, perturb=True)
    opt2 = Muon(U.param_groups(model2), **U.HYPER)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)  # creates opt2's state (a zero step)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    pairs = list(zip(model.parameters(), model2.parameters()))
    momentum_equal = all(
        torch.equal(
            opt.state[a]["momentum_buffer"].to_local(), opt2.state[b]["momentum_buffer"].to_local()
        )
        and opt2.state[b]["momentum_buffer"].placements == b.placements
        for a, b in pairs
    )
    params_equal = all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs)
    _train(model, opt, rank, world, steps=range(2, 3))
    after = _train(model2, opt2, rank, world, steps=range(2, 3))
    return {
        "momentum_equal": momentum_equal,
        "params_equal": params_equal,
        "continued_equal": all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs),
        "param_diff": after["param_diff"],
        "saved_state_keys": sorted(optim_sd["state"]),
        "state_keys": _state_keys(model2, opt2),
    }


def ddp_grad_missing_on_one_rank(rank, world, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = U.make_model()
    ddp = DDP(model)
    opt = Muon(U.param_groups(model), **U.HYPER, distributed_mode="owner")
    h2_before = model.h2.weight.detach().clone()
    U.loss_fn(ddp, *U.local_batch(0, rank, world)).backward()
    if rank == world - 1:
        model.h2.weight.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return {
        "warned": any("some ranks only" in str(w.message) for w in caught),
        "h2_unchanged": torch.equal(model.h2.weight, h2_before),
        "h2_has_state": model.h2.weight in opt.state,
        "h1_changed": not torch.equal(model.h1.weight, U.make_model().h1.weight),
        "identical_on_ranks": U.ranks_identical(list(model.parameters())),
        "state_keys": _state_keys(model, opt),
    }


def fsdp_grad_missing_on_one_rank(rank, world, tmp):
    model = _fsdp_model(world)
    opt = Muon(U.param_groups(model), **U.HYPER)
    h1_before = model.h1.weight.full_tensor()
    U.loss_fn(model, *U.local_batch(0, rank, world)).backward()
    if rank == 0:
        model.h1.weight.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    first = {
        "warned": any("some ranks only" in str(w.message) for w in caught),
        "h1_unchanged": torch.equal(model.h1.weight.full_tensor(), h1_before),
        "h1_has_state": model.h1.weight in opt.state,
        "state_keys": _state_keys(model, opt),
    }
    # Later, with every state tensor cached: ranks that have every grad prepare the step while
    # the headers are in flight, and must drop what they prepared for h1 once they learn.
    for batch in (1, 2):
        opt.zero_grad()
        U.loss_fn(model, *U.local_batch(batch, rank, world)).backward()
        opt.step()
    opt.zero_grad()
    U.loss_fn(model, *U.local_batch(3, rank, world)).backward()
    if rank == 0:
        model.h1.weight.grad = None
    h1, h2 = model.h1.weight.full_tensor(), model.h2.weight.full_tensor()
    m1 = opt.state[model.h1.weight]["momentum_buffer"].full_tensor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return {
        **first,
        "later_warned": any("some ranks only" in str(w.message) for w in caught),
        "later_h1_unchanged": torch.equal(model.h1.weight.full_tensor(), h1)
        and torch.equal(opt.state[model.h1.weight]["momentum_buffer"].full_tensor(), m1),
        "later_h2_changed": not torch.equal(model.h2.weight.full_tensor(), h2),
    }


def fsdp_found_inf_on_one_rank(rank, world, tmp):
    """A GradScaler that saw an inf on one rank only: every rank skips, nothing changes."""
    model = _fsdp_model(world)
    opt = Muon(U.param_groups(model), **U.HYPER)
    before = [p.to_local().clone() for p in model.parameters()]
    U.loss_fn(model, *U.local_batch(0, rank, world)).backward()
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0 if rank == 0 else 0.0)
    opt.step()
    # The flag is never read on the host, so the step cannot know before the ops run that it
    # skips: momentum buffers may be created (zeros, as a first fused single-process step would
    # create them), but nothing holds a value it did not hold before.
    return {
        "unchanged": all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before)),
        "state_nonzero": sum(
            int(bool(s["momentum_buffer"].to_local().any())) for s in opt.state.values()
        ),
    }


def zero_redundancy(rank, world, tmp):
    """ZeroRedundancyOptimizer(optimizer_class=Muon): ZeRO itself gives each param one rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = U.reference_run()
    model = U.make_model()
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(U.param_groups(model), optimizer_class=Muon, **U.HYPER)
    names = [n for n, _ in model.named_parameters()]
    diffs = []
    for step in range(U.STEPS):
        opt.zero_grad(set_to_none=True)
        U.loss_fn(ddp, *U.local_batch(step, rank, world)).backward()
        opt.step()
        diffs.append(U.max_diff(dict(model.named_parameters()), ref[step]["params"]))
    local = [p for g in opt.optim.param_groups for p in g["params"]]
    matrices = sum(matrix_shape(p.shape)[0] for p in local)
    opt.consolidate_state_dict(to=0)
    state = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    sd = state[0]
    # Consolidated indices follow the param_groups order: map them to names.
    order = [id(p) for g in U.param_groups(model) for p in g["params"]]
    by_id = {id(p): n for n, p in model.named_parameters()}
    momentum = {by_id[order[i]]: s["momentum_buffer"] for i, s in sd["state"].items()}
    momentum_diff = U.max_diff(momentum, ref[-1]["momentum"])  # now: the next steps write to sd
    # Load into a fresh ZeRO over a copy of the model, then both take one more step with the
    # same grads (a second DDP could sum them in another order).
    model2 = U.make_model()
    with torch.no_grad():
        for a, b in zip(model2.parameters(), model.parameters()):
            a.copy_(b)
    opt2 = ZeroRedundancyOptimizer(U.param_groups(model2), optimizer_class=Muon, **U.HYPER)
    opt2.load_state_dict(copy.deepcopy(sd))  # rank 0's sd aliases opt's live buffers
    opt.zero_grad(set_to_none=True)
    U.loss_fn(ddp, *U.local_batch(U.STEPS, rank, world)).backward()
    for a, b in zip(model2.parameters(), model.parameters()):
        a.grad = b.grad.clone()
    opt.step()
    opt2.step()
    return {
        "param_diff": max(diffs),
        "momentum_diff": momentum_diff,
        "matrices": matrices,
        "names": names,
        "continued_equal": all(
            torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters())
        ),
    }


def zero_with_owner_mode_rejected(rank, world, tmp):
    """ZeRO hands each rank different params: owner mode must refuse on every rank, not hang."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = U.make_model()
    opt = ZeroRedundancyOptimizer(
        U.param_groups(model), optimizer_class=Muon, **U.HYPER, distributed_mode="owner"
    )
    U.loss_fn(model, *U.local_batch(0, rank, world)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
    except RuntimeError as exc:
        message = str(exc)
    else:
        message = ""
    return {
        "message": message,
        "unchanged": all(torch.equal(p, b) for p, b in zip(model.parameters(), before)),
    }


def dtensor_layouts(rank, world, tmp):
    """Hand-made DTensors: Shard(1) (columns, uneven), Shard(0) with empty shards, Replicate,
    and a 2-D mesh with two sharded dims (the gather fallback); against plain tensors. The
    Shard(1) param gets a replicated grad every other step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("outer", "inner"))
    layouts = [
        ((13, 5), mesh, [Shard(1)]),
        ((2, 9), mesh, [Shard(0)]),
        ((4, 7), mesh, [Replicate()]),
        ((6, 9), mesh2, [Shard(1), Shard(0)]),
        ((3, 4, 5), mesh, [Shard(2)]),
        ((9, 4), mesh2, [Replicate(), Shard(0)]),  # HSDP-like: one sharded mesh dim of two
    ]
    g = torch.Generator().manual_seed(U.SEED)
    fulls = [torch.randn(shape, generator=g) for shape, _, _ in layouts]
    plain = [nn.Parameter(t.clone()) for t in fulls]
    dts = [
        nn.Parameter(distribute_tensor(t.clone(), m, pl, src_data_rank=None))
        for t, (_, m, pl) in zip(fulls, layouts)
    ]
    ref_opt = Muon(plain, **U.HYPER)
    opt = Muon(dts, **U.HYPER)
    diff, matrices = 0.0, []
    for step in range(U.STEPS):
        grads = [torch.randn(t.shape, generator=g) for t in fulls]
        for k, (p, q, gr, (_, m, pl)) in enumerate(zip(plain, dts, grads, layouts)):
            p.grad = gr.clone()
            if k == 0 and step % 2:  # a grad placed unlike its param: redistributed by the step
                pl = [Replicate()]
            q.grad = distribute_tensor(gr.clone(), m, pl, src_data_rank=None)
        ref_opt.step()
        before = mdist.stats(opt).matrices
        opt.step()
        matrices.append(mdist.stats(opt).matrices - before)
        diff = max(
            diff,
            max(
                float((q.detach().full_tensor() - p.detach()).abs().max())
                for p, q in zip(plain, dts)
            ),
        )
    return {"param_diff": diff, "matrices": matrices}


def warm_cache_edge_cases(rank, world, tmp):
    """With the distributed step's caches warm (NorMuon on), against a single-process Muon
    given the same full grads and the same state edits:
    step 3: a grad placed unlike its param (Shard(0) grad, Shard(1) param: redistributing it
      is an all_to_all) while another param lacks its grad on rank 0 only; the ranks that
      have every grad prepare early and must not redistribute before the agreement;
    step 5: a momentum buffer replaced in the state; step 6: a NorMuon v replaced;
    step 7: a param's whole state deleted (it starts afresh).
    (Step 4 warms the caches again: a step with other grads rebuilds them.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    layouts = [((8, 6), [Shard(1)]), ((6, 4), [Shard(0)]), ((5, 7), [Shard(0)])]
    g = torch.Generator().manual_seed(U.SEED + 7)
    fulls = [torch.randn(shape, generator=g) for shape, _ in layouts]
    plain = [nn.Parameter(t.clone()) for t in fulls]
    dts = [
        nn.Parameter(distribute_tensor(t.clone(), mesh, pl, src_data_rank=None))
        for t, (_, pl) in zip(fulls, layouts)
    ]
    hyper = {**U.HYPER, "normuon": True}
    ref, opt = Muon(plain, **hyper), Muon(dts, **hyper)
    param_diff, state_diff, warned = 0.0, 0.0, []
    for step in range(8):
        grads = [torch.randn(t.shape, generator=g) for t in fulls]
        for k, (p, q, gr, (_, pl)) in enumerate(zip(plain, dts, grads, layouts)):
            p.grad = gr.clone()
            if step == 3 and k == 0:
                pl = [Shard(0)]
            q.grad = distribute_tensor(gr.clone(), mesh, pl, src_data_rank=None)
        if step == 3:
            plain[1].grad = None
            if rank == 0:
                dts[1].grad = None
        for o, ps in ((ref, plain), (opt, dts)):
            if step == 5:
                st = o.state[ps[0]]
                st["momentum_buffer"] = torch.zeros_like(st["momentum_buffer"])
            if step == 6:
                st = o.state[ps[2]]
                st["normuon_v"] = torch.full_like(st["normuon_v"], 0.5)
            if step == 7:
                del o.state[ps[1]]
        ref.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned.append(any("some ranks only" in str(w.message) for w in caught))
        param_diff = max(param_diff, *(
            float((q.detach().full_tensor() - p.detach()).abs().max()) for p, q in zip(plain, dts)
        ))
        for p, q in zip(plain, dts):
            for key in ("momentum_buffer", "normuon_v"):
                a, b = ref.state[p][key], opt.state[q][key]
                state_diff = max(state_diff, float((b.full_tensor() - a).abs().max()))
    # A param that stays without a grad (frozen) on every rank: the step's cache of the other
    # params' state is made once, then reused.
    layout, made = mdist._runtime(opt).layouts[0], []
    for _ in range(3):
        for q in (dts[0], dts[2]):
            q.grad = torch.zeros_like(q)
        dts[1].grad = None
        opt.step()
        made.append(layout.collected)
    return {"param_diff": param_diff, "state_diff": state_diff, "warned": warned,
            "state_back": dts[1] in opt.state and plain[1] in ref.state,
            "frozen_reuses_cache": made[1] is made[2] and made[0] is made[1]}


def same_grads_bit_identical(rank, world, tmp):
    """Every rank given exactly the single process's gradients (no reduction, so no rounding
    of its own): DDP owner mode and FSDP2 must then reproduce the single-process fused step bit
    for bit, params and momentum, since they run the same phase ops on the same floats."""
    from torch.distributed.tensor import distribute_tensor

    def grads(step, model):
        gen = torch.Generator().manual_seed(U.SEED + 100 + step)
        return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}

    single = U.make_model()
    single_opt = Muon(U.param_groups(single), **U.HYPER)
    owner = U.make_model()
    owner_opt = Muon(U.param_groups(owner), **U.HYPER, distributed_mode="owner")
    sharded = _fsdp_model(world)
    sharded_opt = Muon(U.param_groups(sharded), **U.HYPER)
    for step in range(U.STEPS):
        g = grads(step, single)
        for n, p in single.named_parameters():
            p.grad = g[n].clone()
        for n, p in owner.named_parameters():
            p.grad = g[n].clone()
        for n, p in sharded.named_parameters():
            p.grad = distribute_tensor(g[n].clone(), p.device_mesh, p.placements)
        single_opt.step()
        owner_opt.step()
        sharded_opt.step()
    ref = dict(single.named_parameters())
    ref_m = {n: single_opt.state[p]["momentum_buffer"] for n, p in ref.items()}
    return {
        "owner_params": all(torch.equal(p, ref[n]) for n, p in owner.named_parameters()),
        "owner_momentum": all(
            torch.equal(owner_opt.state[p]["momentum_buffer"], ref_m[n])
            for n, p in owner.named_parameters()
        ),
        "fsdp_params": all(
            torch.equal(p.detach().full_tensor(), ref[n]) for n, p in sharded.named_parameters()
        ),
        "fsdp_momentum": all(
            torch.equal(sharded_opt.state[p]["momentum_buffer"].full_tensor(), ref_m[n])
            for n, p in sharded.named_parameters()
        ),
    }


class BlockNet(nn.Module):
    """Params for num_heads, split_sizes and NorMuon: row counts that FSDP2 shards unevenly
    (a shard may span two blocks), one blocked weight and one 3-D stack on Shard(1)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(U.SEED + 7)

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen) / shape[-1] ** 0.5)

        self.heads = param(10, 6)  # num_heads=2: (2, 5, 6)
        self.heads_cols = param(12, 6)  # num_heads=2: (2, 6, 6); Shard(1) under FSDP2
        self.qkv = param(14, 6)  # split_sizes (8, 4, 2) x 2 heads, NorMuon
        self.split = param(9, 4)  # split_sizes (5, 4)
        self.plain = param(9, 5)  # NorMuon
        self.wide = param(4, 9)  # NorMuon
        self.stack = param(3, 6, 5)  # NorMuon; Shard(1) under FSDP2 (even: FSDP2 needs it)
        self.c_attn = param(6, 12)  # column blocks (4, 4, 4) x 2 heads, NorMuon
        self.c_cols = param(5, 12)  # column blocks (6, 6) x 2 heads; Shard(1) (cuts a head at 3)


def _block_groups(model: BlockNet) -> list[dict]:
    return [
        {"params": [model.c_attn], "split_sizes": (4, 4, 4), "split_dim": 1, "num_heads": 2,
         "normuon": True},
        {"params": [model.c_cols], "split_sizes": (6, 6), "split_dim": 1, "num_heads": 2},
        {"params": [model.heads, model.heads_cols], "num_heads": 2},
        {"params": [model.qkv], "split_sizes": (8, 4, 2), "num_heads": 2, "normuon": True,
         "normuon_beta2": 0.9},
        {"params": [model.split], "split_sizes": (5, 4), "adjust_lr_fn": "match_rms_adamw"},
        {"params": [model.plain, model.wide, model.stack], "normuon": True, "nesterov": False},
    ]


def _resumed(model, opt, dcp_path=None, **kwargs):
    """A fresh optimizer loaded from ``opt``'s checkpoint: its state_dict, or with dcp_path a
    torch.distributed.checkpoint round trip (FSDP2)."""
    fresh = Muon(_block_groups(model), **U.HYPER, **kwargs)
    if dcp_path is None:
        fresh.load_state_dict(opt.state_dict())
        return fresh
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_state_dict

    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=dcp_path)
    opt.zero_grad(set_to_none=True)  # else the fresh optimizer's zero step would not run
    loaded = {"optim": get_optimizer_state_dict(model, fresh)}  # a zero step makes its state
    dcp.load(loaded, checkpoint_id=dcp_path)
    set_state_dict(model, fresh, model_state_dict={}, optim_state_dict=loaded["optim"])
    return fresh


def blocks_normuon_bit_identical(rank, world, tmp):
    """num_heads, split_sizes (row and column blocks) and NorMuon given exactly the single
    process's
    gradients: DDP owner mode and FSDP2 reproduce the single-process fused step bit for bit,
    params, momentum and NorMuon's v, also after resuming from a checkpoint (state_dict; DCP
    for FSDP2) before the last step; every rank holds the same state keys."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    single = BlockNet()
    single_opt = Muon(_block_groups(single), **U.HYPER)
    owner = BlockNet()
    owner_opt = Muon(_block_groups(owner), **U.HYPER, distributed_mode="owner")
    sharded = BlockNet()
    cols = {sharded.heads_cols, sharded.stack, sharded.c_cols}
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)),
                shard_placement_fn=lambda p: Shard(1) if p in cols else None)
    sharded_opt = Muon(_block_groups(sharded), **U.HYPER)
    for step in range(U.STEPS):
        if step == U.STEPS - 1:  # the last step resumes both from checkpoints
            owner_opt = _resumed(owner, owner_opt, distributed_mode="owner")
            sharded_opt = _resumed(sharded, sharded_opt, dcp_path=os.path.join(tmp, "blocks"))
        gen = torch.Generator().manual_seed(U.SEED + 200 + step)
        g = {n: torch.randn(p.shape, generator=gen) for n, p in single.named_parameters()}
        for model in (single, owner):
            for n, p in model.named_parameters():
                p.grad = g[n].clone()
        for n, p in sharded.named_parameters():
            p.grad = distribute_tensor(g[n].clone(), p.device_mesh, p.placements)
        for opt in (single_opt, owner_opt, sharded_opt):
            opt.step()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def same(model, opt):
        ref_state = {n: single_opt.state[p] for n, p in single.named_parameters()}
        ref = dict(single.named_parameters())
        out = {}
        for n, p in model.named_parameters():
            st = opt.state[p]
            out[n] = [
                torch.equal(full(p.detach()), ref[n].detach()),
                sorted(st) == sorted(ref_state[n]),
                all(torch.equal(full(st[k]), ref_state[n][k]) for k in ref_state[n]),
            ]
        return out

    return {
        "owner": same(owner, owner_opt),
        "fsdp": same(sharded, sharded_opt),
        "owner_keys": _state_keys(owner, owner_opt),
        "fsdp_keys": _state_keys(sharded, sharded_opt),
        "v_is_dtensor": type(sharded_opt.state[sharded.qkv]["normuon_v"]).__name__,
        "v_moved": all(bool(single_opt.state[p]["normuon_v"].min() > 0)
                       for p in (single.qkv, single.plain, single.stack)),
    }


def dtensor_layouts_blocks(rank, world, tmp):
    """Row blocks and NorMuon on hand-made layouts (uneven Shard(1), Shard(0) with empty
    shards, HSDP-like Replicate + Shard(0)): bit for bit with plain tensors given the same
    grads; the gather fallback refuses them on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("outer", "inner"))
    layouts = [
        ((13, 5), mesh, [Shard(1)], {"split_sizes": (8, 5), "normuon": True}),
        ((2, 9), mesh, [Shard(0)], {"normuon": True}),
        ((9, 4), mesh2, [Replicate(), Shard(0)],
         {"split_sizes": (3, 6), "num_heads": 3, "normuon": True}),
    ]
    g = torch.Generator().manual_seed(U.SEED + 3)
    fulls = [torch.randn(shape, generator=g) for shape, _, _, _ in layouts]
    plain = [nn.Parameter(t.clone()) for t in fulls]
    dts = [
        nn.Parameter(distribute_tensor(t.clone(), m, pl, src_data_rank=None))
        for t, (_, m, pl, _) in zip(fulls, layouts)
    ]
    ref_opt = Muon([{"params": [p], **kw} for p, (*_, kw) in zip(plain, layouts)], **U.HYPER)
    opt = Muon([{"params": [p], **kw} for p, (*_, kw) in zip(dts, layouts)], **U.HYPER)
    for _ in range(U.STEPS):
        grads = [torch.randn(t.shape, generator=g) for t in fulls]
        for p, q, gr, (_, m, pl, _) in zip(plain, dts, grads, layouts):
            p.grad = gr.clone()
            q.grad = distribute_tensor(gr.clone(), m, pl, src_data_rank=None)
        ref_opt.step()
        opt.step()
    same = [
        torch.equal(q.detach().full_tensor(), p.detach())
        and torch.equal(opt.state[q]["normuon_v"].full_tensor(), ref_opt.state[p]["normuon_v"])
        for p, q in zip(plain, dts)
    ]
    gathered = nn.Parameter(distribute_tensor(torch.randn(6, 9), mesh2, [Shard(1), Shard(0)],
                                              src_data_rank=None))
    gathered.grad = torch.zeros_like(gathered)
    try:
        Muon([gathered], num_heads=3, **U.HYPER).step()
        refused = ""
    except NotImplementedError as exc:
        refused = str(exc)
    return {"same": same, "refused": refused}


def blocks_refusals(rank, world, tmp):
    """What the distributed step still refuses, on every rank, before any state changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    errors = {}
    model = U.make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = Muon([model.experts], **U.HYPER, normuon=True)  # experts: Shard(0), whole matrices
    model.experts.grad = torch.zeros_like(model.experts)
    try:
        opt.step()
    except NotImplementedError as exc:
        errors["experts"] = str(exc)
    errors["state"] = len(opt.state)
    return errors


SCENARIOS = {
    f.__name__: f
    for f in (
        same_grads_bit_identical,
        blocks_normuon_bit_identical,
        dtensor_layouts_blocks,
        blocks_refusals,
        ddp_owner,
        fsdp,
        fsdp_shard_local,
        fsdp_dcp,
        ddp_grad_missing_on_one_rank,
        fsdp_grad_missing_on_one_rank,
        fsdp_found_inf_on_one_rank,
        zero_redundancy,
        zero_with_owner_mode_rejected,
        dtensor_layouts,
        warm_cache_edge_cases,
    )
}


# ---------------------------------------------------------------------- tests (parent)


@pytest.fixture(scope="module")
def dist_seed() -> int:
    """One fresh seed for all workers (MUON_EXT_TEST_SEED pins it), printed for replay."""
    value = int(os.environ.get("MUON_EXT_TEST_SEED", random.randrange(2**31)))
    print(f"\n[test_distributed] seed={value} (rerun with MUON_EXT_TEST_SEED={value})")
    return value


@pytest.fixture(scope="module")
def results(dist_seed):
    """Every scenario, once per world size: {world: {scenario: [metrics of each rank]}}."""
    return U.run_workers(WORLDS, SCENARIOS, dist_seed)


worlds = pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"world{w}")


@worlds
def test_ddp_owner_mode_matches_single_process(results, world):
    for m in U.rank_metrics(results, world, "ddp_owner"):
        assert m["param_diff"] <= TOL, m["param_diff"]
        assert m["momentum_diff"] <= TOL, m["momentum_diff"]
        assert m["identical_on_ranks"]
    keys = U.rank_metrics(results, world, "ddp_owner")[0]["state_keys"]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 7


@worlds
def test_same_gradients_give_the_single_process_step_bit_for_bit(results, world):
    for m in U.rank_metrics(results, world, "same_grads_bit_identical"):
        keys = ("owner_params", "owner_momentum", "fsdp_params", "fsdp_momentum")
        assert all(m[k] is True for k in keys), m


@worlds
def test_blocks_and_normuon_give_the_single_process_step_bit_for_bit(results, world):
    for m in U.rank_metrics(results, world, "blocks_normuon_bit_identical"):
        for mode in ("owner", "fsdp"):
            bad = {n: r for n, r in m[mode].items() if r != [True, True, True]}
            assert not bad, (mode, bad)  # [param, state keys, state values] per param
            keys = m[f"{mode}_keys"]
            assert all(k == keys[0] for k in keys), keys
        assert m["v_is_dtensor"] == "DTensor"  # FSDP2: v sharded like the param
        assert m["v_moved"]  # NorMuon really ran (every row's v left 0)


@worlds
def test_blocks_and_normuon_on_hand_made_layouts(results, world):
    for m in U.rank_metrics(results, world, "dtensor_layouts_blocks"):
        assert m["same"] == [True, True, True], m
        assert "num_heads / split_sizes is not supported there" in m["refused"], m


@worlds
def test_distributed_step_refuses_normuon_on_expert_shards(results, world):
    for m in U.rank_metrics(results, world, "blocks_refusals"):
        assert "normuon=True is not supported" in m["experts"], m
        assert m["state"] == 0, m  # refused before any state was made


@worlds
def test_ddp_owner_mode_orthogonalizes_each_matrix_once(results, world):
    per_rank = U.rank_metrics(results, world, "ddp_owner")
    for step in range(U.STEPS):
        counts = [m["counts"][step]["matrices"] for m in per_rank]
        assert sum(counts) == U.MATRICES, counts
        assert max(counts) < U.MATRICES  # the work is actually split
    # One header per param group, one all_gather per shape bucket (after the first step,
    # which also checks once that the params are identical on every rank).
    assert per_rank[0]["counts"][-1]["collectives"] == 2 + U.SHAPE_BUCKETS


@worlds
def test_fsdp2_matches_single_process(results, world):
    per_rank = U.rank_metrics(results, world, "fsdp")
    for m in per_rank:
        assert m["param_diff"] <= TOL, m["param_diff"]
        assert m["momentum_diff"] <= TOL, m["momentum_diff"]
        assert m["state_like_params"]
    assert sum(m["empty_shards"] for m in per_rank) > 0  # the awkward case is really there
    keys = per_rank[0]["state_keys"]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 7


@worlds
def test_fsdp2_orthogonalizes_each_matrix_once(results, world):
    per_rank = U.rank_metrics(results, world, "fsdp")
    for step in range(U.STEPS):
        counts = [m["counts"][step]["matrices"] for m in per_rank]
        assert sum(counts) == U.MATRICES, counts
        assert max(counts) < U.MATRICES
    # Per param group one header; per shape bucket of sharded params two all_to_alls (group 0:
    # 4 buckets, group 1: the 3x6x6 stack; the experts are whole matrices on their ranks).
    assert all(m["counts"][-1]["collectives"] == 2 + 2 * 5 for m in per_rank)


@worlds
def test_shard_local_orthogonalization_fails_the_comparison(results, world):
    for m in U.rank_metrics(results, world, "fsdp_shard_local"):
        assert m["param_diff"] > 100 * TOL, m["param_diff"]


@worlds
def test_fsdp2_state_round_trips_through_dcp(results, world):
    per_rank = U.rank_metrics(results, world, "fsdp_dcp")
    for m in per_rank:
        assert m["momentum_equal"] and m["params_equal"] and m["continued_equal"]
        assert m["param_diff"] <= TOL
        assert len(m["saved_state_keys"]) == 7
    assert all(m["saved_state_keys"] == per_rank[0]["saved_state_keys"] for m in per_rank)


@worlds
def test_ddp_grad_missing_on_one_rank_does_not_hang(results, world):
    per_rank = U.rank_metrics(results, world, "ddp_grad_missing_on_one_rank")
    for m in per_rank:
        assert m["warned"] and m["h2_unchanged"] and not m["h2_has_state"]
        assert m["h1_changed"] and m["identical_on_ranks"]
    keys = per_rank[0]["state_keys"]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 6


@worlds
def test_fsdp2_grad_missing_on_one_rank_does_not_hang(results, world):
    per_rank = U.rank_metrics(results, world, "fsdp_grad_missing_on_one_rank")
    for m in per_rank:
        assert m["warned"] and m["h1_unchanged"] and not m["h1_has_state"]
        assert m["later_warned"] and m["later_h1_unchanged"] and m["later_h2_changed"]
    keys = per_rank[0]["state_keys"]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 6


@worlds
def test_warm_caches_follow_disagreements_and_state_edits(results, world):
    for m in U.rank_metrics(results, world, "warm_cache_edge_cases"):
        assert m["param_diff"] <= TOL, m["param_diff"]
        assert m["state_diff"] <= TOL, m["state_diff"]
        assert m["warned"] == [False, False, False, True, False, False, False, False]
        assert m["state_back"] and m["frozen_reuses_cache"]


@worlds
def test_found_inf_on_one_rank_skips_everywhere(results, world):
    for m in U.rank_metrics(results, world, "fsdp_found_inf_on_one_rank"):
        assert m["unchanged"] and m["state_nonzero"] == 0


@worlds
def test_zero_redundancy_optimizer(results, world):
    per_rank = U.rank_metrics(results, world, "zero_redundancy")
    for m in per_rank:
        assert m["param_diff"] <= TOL, m["param_diff"]
        assert m["momentum_diff"] <= TOL, m["momentum_diff"]
        assert m["continued_equal"]
    assert sum(m["matrices"] for m in per_rank) == U.MATRICES  # ZeRO: one rank per param


@worlds
def test_zero_with_owner_mode_is_rejected_on_every_rank(results, world):
    for m in U.rank_metrics(results, world, "zero_with_owner_mode_rejected"):
        assert "ZeroRedundancyOptimizer" in m["message"], m["message"]
        assert m["unchanged"]


@worlds
def test_dtensor_layouts_match_plain_tensors(results, world):
    per_rank = U.rank_metrics(results, world, "dtensor_layouts")
    for m in per_rank:
        assert m["param_diff"] <= TOL, m["param_diff"]
    # One owner for each sharded layout (13x5, 2x9, the 3x4x5 stack, 9x4); the Replicate one
    # and the gather fallback run on every rank.
    for step in range(U.STEPS):
        assert sum(m["matrices"][step] for m in per_rank) == 1 + 1 + 3 + 1 + world * 2


def test_owner_mode_without_process_group_is_a_clear_error():
    model = nn.Linear(3, 4, bias=False)
    opt = Muon(model.parameters(), distributed_mode="owner")
    model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.step()


def test_distributed_mode_is_validated_and_kept_out_of_checkpoints():
    model = nn.Linear(3, 4, bias=False)
    with pytest.raises(ValueError, match="distributed_mode"):
        Muon(model.parameters(), distributed_mode="zero")
    opt = Muon(model.parameters(), distributed_mode="owner")
    assert "distributed_mode" not in opt.state_dict()["param_groups"][0]
