"""Distributed Muon on ``torch.distributed``: one owner rank per matrix.

Newton-Schulz needs whole matrices, and it is the expensive part of the step
(``4m²n + 2m³`` FLOPs per iteration, DESIGN.md). This module makes every matrix be
orthogonalized exactly once per step, on one *owner* rank, wherever its data lives:

* **FSDP2** (``fully_shard``): params are DTensors sharded on one dim, possibly unevenly and
  possibly empty on some ranks. Momentum runs on the local shard (elementwise, no
  communication). Per shape bucket, one ``all_to_all_single`` sends every shard of the
  (Nesterov) momentum to the matrix's owner, the owner orthogonalizes all its matrices of the
  bucket in one batched call, and a second ``all_to_all_single`` sends every rank its slice
  of the result. A 3-D stack sharded on its first (expert) dim holds whole matrices on every
  rank: each rank orthogonalizes its own experts, with no communication.
* **DDP** (``Muon(..., distributed_mode="owner")``): params and grads are replicated. Every
  rank updates every momentum buffer (cheap, and the optimizer state stays independent of
  the rank), orthogonalizes only the matrices it owns, and one ``all_gather_single`` per
  shape bucket hands everyone the results; every rank then applies the same update.
* Any other DTensor layout (several sharded mesh dims, e.g. FSDP2 + tensor parallel) falls
  back to ``full_tensor()`` on every rank: correct, but every rank does all the work.

Owners are assigned deterministically from shapes alone (identical on every rank), balancing
Newton-Schulz FLOPs. Before a param group's first collective, the ranks of each process group
exchange one small header (structure fingerprint, which params have grads, ``found_inf``), so
a param without a grad on some rank, or an inf found by one rank only, cannot make ranks
issue different collectives (a hang). See docs/README_distributed.md for the costs.

``Muon._step_group`` calls :func:`step_group` for groups where :func:`wanted` says so;
:func:`stats` gives the per-rank counters (matrices orthogonalized, collectives, elements).
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import ops
from .coefficients import (
    DEFAULT_RMS_TARGET,
    flat_coefficients,
    matrix_shape,
    resolve_ns_algorithm,
    resolve_ns_coefficients,
    update_scale,
)
from .reference import orthogonalize, resolve_gram_restarts

__all__ = ["DISTRIBUTED_MODES", "DistributedStats", "ns_flops", "stats", "validate_mode"]

DISTRIBUTED_MODES = (None, "owner")

# How a param's Newton-Schulz is organised (one "unit" per param).
_EMPTY = "empty"  # no elements: momentum state only
_LOCAL = "local"  # this rank holds whole matrices and orthogonalizes all of them
_GATHER = "gather"  # unrecognised DTensor layout: full_tensor() everywhere, keep the local slice
_REPLICATED = "replicated"  # same on every rank of the group: matrices split among owners
_SHARDED = "sharded"  # Shard(d) on one mesh dim: the whole param goes to one owner

_HEADER_MAGIC = 0x4D756F6E  # "Muon": a rank running something else fails loudly, not silently


def validate_mode(mode: Any) -> str | None:
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    return mode


def ns_flops(rows: int, cols: int, steps: int) -> int:
    """Newton-Schulz FLOPs for one rows x cols matrix (DESIGN.md, performance model)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


@dataclass
class DistributedStats:
    """What this rank's distributed steps did (cumulative; compare before/after a step)."""

    matrices: int = 0  # 2-D matrices orthogonalized on this rank
    collectives: int = 0  # collectives issued (headers included)
    elements_sent: int = 0  # elements this rank sends to other ranks (padding included)
    elements_received: int = 0  # elements this rank receives from other ranks


def stats(optimizer: Any) -> DistributedStats:
    """The counters of ``optimizer``'s distributed steps on this rank."""
    return _runtime(optimizer).stats


# ---------------------------------------------------------------------- entry points


def wanted(optimizer: Any, group: dict[str, Any]) -> bool:
    """Whether a param group's step must go through this module (cheap when it need not)."""
    if getattr(optimizer, "distributed_mode", None) is not None:
        return True
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in group["params"])


@torch.no_grad()
def step_group(
    optimizer: Any,
    index: int,
    group: dict[str, Any],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Steps one (already checked) param group of a ``muon_ext.Muon``, on every rank."""
    owner = getattr(optimizer, "distributed_mode", None) == "owner"
    if owner:
        _require_initialized()
    rt = _runtime(optimizer)
    default_pg = getattr(optimizer, "process_group", None)
    layout = rt.layout(index, group, owner, default_pg)
    local_inf = found_inf is not None and bool(found_inf.item())
    # In owner mode every rank takes part in the header exchange even with an empty group
    # (ZeroRedundancyOptimizer can hand a rank none of a group's params): no rank waits alone.
    must_agree = [_default_group(default_pg)] if owner else []
    present, skip = _agree(rt, layout, local_inf, must_agree)
    if skip:  # found_inf on some rank: nothing changes anywhere
        return
    units = [u for u in layout.units if present[u]]
    if units:
        _step_group(rt, optimizer.state, group, layout, units, grad_scale)


# ---------------------------------------------------------------------- layouts and plans


@dataclass(eq=False)
class _Unit:
    """One param: how its matrices are orthogonalized and where its data lives."""

    group_index: int
    pos: int  # index in group["params"]
    param: Tensor
    kind: str
    batch: int  # matrices in the (global) param
    rows: int
    cols: int
    scale: float  # lr factor of the adjust_lr_fn rule
    route: str  # "ops" (muon_ext.ops.newton_schulz) or "reference" (pure PyTorch)
    agree_pg: Any = None  # group whose ranks must agree on this param's grad presence
    pg: Any = None  # group of the owner scheme (_REPLICATED, _SHARDED)
    world: int = 1
    rank: int = 0
    shard_dim: int = 0  # _SHARDED: the sharded param dim
    chunks: tuple[int, ...] = ()  # _SHARDED: its size on each group rank (torch.chunk rule)
    local_batch: int = 0  # _LOCAL: matrices in the local tensor (a 3-D stack's local experts)
    load_pg: Any = None  # _LOCAL expert shards: the group their experts are spread over,
    load: tuple[int, ...] = ()  # and the experts on each of its ranks (for balancing owners)

    @property
    def tall(self) -> bool:
        return self.rows > self.cols

    @property
    def m(self) -> int:
        return min(self.rows, self.cols)

    @property
    def n(self) -> int:
        return max(self.rows, self.cols)

    def local_shape(self, rank: int) -> list[int]:
        shape = list(self.param.shape)
        shape[self.shard_dim] = self.chunks[rank]
        return shape

    def local_numel(self, rank: int) -> int:
        numel = 1
        for s in self.local_shape(rank):
            numel *= s
        return numel


@dataclass(eq=False)
class _Layout:
    group_index: int
    units: list[_Unit]
    key: tuple
    fingerprints: dict[int, int] = field(default_factory=dict)  # per agreement group (id)
    verified: set[int] = field(default_factory=set)  # groups whose replicated params were checked


@dataclass(eq=False)
class _Bucket:
    """Matrices of one (m, n) shape, dtype and route, on one owner group (or none)."""

    m: int
    n: int
    route: str
    pg: Any
    world: int
    rank: int
    local: list[_Unit] = field(default_factory=list)
    replicated: list[_Unit] = field(default_factory=list)
    sharded: list[_Unit] = field(default_factory=list)
    # _REPLICATED: matrices [starts[r], starts[r] + counts[r]) of the concatenation are rank r's
    counts: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    # _SHARDED: the owner (group rank) of each unit in `sharded`
    owners: list[int] = field(default_factory=list)


@dataclass
class _Runtime:
    """Per-optimizer cache and counters (never part of state_dict or pickles)."""

    layouts: dict[int, _Layout] = field(default_factory=dict)
    plans: dict[int, tuple[tuple, list[_Bucket]]] = field(default_factory=dict)
    stats: DistributedStats = field(default_factory=DistributedStats)

    def layout(self, index: int, group: dict[str, Any], owner: bool, default_pg: Any) -> _Layout:
        key = (
            owner,
            id(default_pg),
            group["adjust_lr_fn"],
            group.get("rms_target", DEFAULT_RMS_TARGET),
            group["fused"],
            tuple(
                (
                    id(p),
                    p.shape,
                    p.dtype,
                    getattr(p, "placements", None),
                    getattr(p, "device_mesh", None),
                )
                for p in group["params"]
            ),
        )
        cached = self.layouts.get(index)
        if cached is not None and cached.key == key:
            return cached
        units = [
            _make_unit(index, pos, p, group, owner, default_pg)
            for pos, p in enumerate(group["params"])
        ]
        layout = _Layout(index, units, key)
        self.layouts[index] = layout
        self.plans.pop(index, None)
        return layout

    def plan(self, layout: _Layout, units: list[_Unit], steps: int) -> list[_Bucket]:
        key = (layout.key, tuple(u.pos for u in units), steps)
        cached = self.plans.get(layout.group_index)
        if cached is not None and cached[0] == key:
            return cached[1]
        buckets = _make_plan(units, steps)
        self.plans[layout.group_index] = (key, buckets)
        return buckets


def _runtime(optimizer: Any) -> _Runtime:
    rt = optimizer.__dict__.get("_distributed_runtime")
    if rt is None:
        rt = _Runtime()
        optimizer.__dict__["_distributed_runtime"] = rt
    return rt


def _make_unit(
    index: int, pos: int, p: Tensor, group: dict[str, Any], owner: bool, default_pg: Any
) -> _Unit:
    from .optim import _takes_fused_step  # optim imports this module

    batch, rows, cols = matrix_shape(p.shape)
    fused = _takes_fused_step(_local(p), group)
    unit = _Unit(
        group_index=index,
        pos=pos,
        param=p,
        kind=_LOCAL,
        batch=batch,
        rows=rows,
        cols=cols,
        scale=update_scale(
            rows, cols, group["adjust_lr_fn"], group.get("rms_target", DEFAULT_RMS_TARGET)
        ),
        route="ops" if fused else "reference",
        local_batch=batch,
    )
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(p, dtensor):
        _dtensor_kind(unit, owner)
    elif owner:
        import torch.distributed as dist

        pg = _default_group(default_pg)
        unit.agree_pg = pg
        if dist.get_world_size(pg) > 1:
            unit.kind, unit.pg = _REPLICATED, pg
            unit.world, unit.rank = dist.get_world_size(pg), dist.get_rank(pg)
    if p.numel() == 0:
        unit.kind = _EMPTY
    return unit


def _dtensor_kind(unit: _Unit, owner: bool) -> None:
    """Classifies a DTensor param (FSDP2: a single Shard(d) on a 1-D mesh)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    p = unit.param
    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    where = f"param_groups[{unit.group_index}]['params'][{unit.pos}]"
    if any(pl.is_partial() for pl in placements):
        raise RuntimeError(
            f"Muon: {where} has a Partial placement {placements}; expected Shard/Replicate"
        )
    unit.agree_pg = _mesh_group(mesh)
    sharded = [(k, pl) for k, pl in enumerate(placements) if not pl.is_replicate()]
    if not sharded:  # replicated on the mesh: like DDP
        if owner and mesh.ndim == 1 and mesh.size() > 1:
            pg = mesh.get_group()
            unit.kind, unit.pg = _REPLICATED, pg
            unit.world, unit.rank = dist.get_world_size(pg), dist.get_rank(pg)
        unit.local_batch = unit.batch
        return
    if len(sharded) == 1 and type(sharded[0][1]) is Shard:  # not _StridedShard or other subclasses
        k, pl = sharded[0]
        d = pl.dim % p.ndim
        world = mesh.size(k)
        pg = mesh.get_group(k)
        rank = mesh.get_local_rank(k)
        chunks = _chunk_sizes(p.shape[d], world)
        local = _local(p)
        expected = list(p.shape)
        expected[d] = chunks[rank]
        if list(local.shape) == expected and _group_ranks_follow_mesh(mesh, k, pg):
            if world == 1:
                unit.local_batch = unit.batch
                return
            if p.ndim == 3 and d == 0:  # an expert stack split by experts: whole matrices here
                unit.local_batch = chunks[rank]
                unit.world, unit.rank, unit.load_pg, unit.load = world, rank, pg, chunks
                return
            unit.kind, unit.pg, unit.world, unit.rank = _SHARDED, pg, world, rank
            unit.shard_dim, unit.chunks = d, chunks
            return
    if unit.agree_pg is None:
        raise NotImplementedError(
            f"Muon: {where} is a DTensor with placements {placements} on a mesh that does not "
            "cover all ranks; only a single Shard(d) mesh dim (FSDP2, HSDP) is supported there"
        )
    unit.kind = _GATHER
    unit.local_batch = unit.batch


def _make_plan(units: list[_Unit], steps: int) -> list[_Bucket]:
    """Shape buckets (largest matrices first) and their owners; identical on every rank."""
    buckets: dict[tuple, _Bucket] = {}
    pg_ids: dict[int, int] = {}
    loads: dict[int, list[float]] = {}
    for u in units:
        if u.kind == _EMPTY:
            continue
        owner_pg = u.pg if u.kind in (_REPLICATED, _SHARDED) else None
        pg_index = -1 if owner_pg is None else pg_ids.setdefault(id(owner_pg), len(pg_ids))
        key = (u.m, u.n, u.route, pg_index)
        if key not in buckets:
            buckets[key] = _Bucket(u.m, u.n, u.route, owner_pg, u.world, u.rank)
        b = buckets[key]
        {_LOCAL: b.local, _GATHER: b.local, _REPLICATED: b.replicated, _SHARDED: b.sharded}[
            u.kind
        ].append(u)
        if u.kind == _LOCAL and u.load_pg is not None:  # experts already placed
            per = loads.setdefault(id(u.load_pg), [0.0] * len(u.load))
            for r, count in enumerate(u.load):
                per[r] += count * ns_flops(u.m, u.n, steps)
    order = sorted(buckets, key=lambda k: (-ns_flops(k[0], k[1], steps), k))
    plan = [buckets[k] for k in order]
    for b in plan:
        if not (b.replicated or b.sharded):
            continue
        load = loads.setdefault(id(b.pg), [0.0] * b.world)
        flops = ns_flops(b.m, b.n, steps)
        if b.replicated:
            # Every rank takes n // W matrices and the n % W left over go to the least loaded:
            # one padded all_gather per bucket then wastes at most one slot per rank.
            total = sum(u.batch for u in b.replicated)
            q, rem = divmod(total, b.world)
            extra = set(sorted(range(b.world), key=lambda r: (load[r], r))[:rem])
            b.counts = [q + (r in extra) for r in range(b.world)]
            b.starts = [sum(b.counts[:r]) for r in range(b.world)]
            for r in range(b.world):
                load[r] += b.counts[r] * flops
        if b.sharded:  # longest processing time first: biggest param to the least loaded rank
            owners = [0] * len(b.sharded)
            for i in sorted(range(len(b.sharded)), key=lambda i: (-b.sharded[i].batch, i)):
                r = min(range(b.world), key=lambda r: (load[r], r))
                owners[i] = r
                load[r] += b.sharded[i].batch * flops
            b.owners = owners
    return plan


# ---------------------------------------------------------------------- agreement


def _agree(
    rt: _Runtime, layout: _Layout, local_inf: bool, must_agree: list[Any]
) -> tuple[dict[_Unit, bool], bool]:
    """Which params take part this step (a grad on every rank of their group) and found_inf.

    One all_gather of a 6-element header per process group; a second small collective only
    when the ranks disagree about grads, or to check on a (re)built layout that "replicated"
    params really are identical on every rank.
    """
    import torch.distributed as dist

    present: dict[_Unit, bool] = {}
    by_pg: dict[int, tuple[Any, list[_Unit]]] = {id(pg): (pg, []) for pg in must_agree}
    for u in layout.units:
        present[u] = u.param.grad is not None
        if u.agree_pg is not None:
            by_pg.setdefault(id(u.agree_pg), (u.agree_pg, []))[1].append(u)
    skip = local_inf
    for pg, units in by_pg.values():
        world = dist.get_world_size(pg)
        device = _comm_device(pg, units)
        fingerprint = layout.fingerprints.get(id(pg))
        if fingerprint is None:
            fingerprint = _hash(
                (u.group_index, u.pos, u.kind, tuple(u.param.shape), str(u.param.dtype), u.chunks)
                for u in units
            )
            layout.fingerprints[id(pg)] = fingerprint
        verify = id(pg) not in layout.verified
        bits = [present[u] for u in units]
        header = torch.tensor(
            [_HEADER_MAGIC, len(units), fingerprint, _hash(bits), int(local_inf), int(verify)],
            dtype=torch.int64,
            device=device,
        )
        gathered = _all_gather(rt, header, pg).view(world, -1).tolist()
        if any(row[:3] != gathered[0][:3] for row in gathered):
            raise RuntimeError(
                "Muon: the ranks of a process group disagree on the parameters of the distributed "
                "step (different models, param groups or shapes). distributed_mode='owner' needs "
                "the same parameters on every rank (DDP); under ZeroRedundancyOptimizer leave it "
                "unset, since ZeRO already gives each parameter to one rank."
            )
        if any(row[4] for row in gathered):
            skip = True
        if any(row[5] for row in gathered):
            _verify_replicated(rt, units, pg, device)
            layout.verified.add(id(pg))
        if any(row[3] != gathered[0][3] for row in gathered):
            counts = torch.tensor(bits, dtype=torch.int32, device=device)
            dist.all_reduce(counts, group=pg)
            rt.stats.collectives += 1
            partial = []
            for u, c in zip(units, counts.tolist()):
                present[u] = c == world
                if 0 < c < world:
                    partial.append(u)
            if partial:
                warnings.warn(
                    "Muon: skipped "
                    + ", ".join(
                        f"param_groups[{u.group_index}]['params'][{u.pos}]" for u in partial
                    )
                    + " on every rank this step: it has a grad on some ranks only",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return present, skip


def _verify_replicated(rt: _Runtime, units: list[_Unit], pg: Any, device: torch.device) -> None:
    """Replicated params must be identical on every rank, else owners would mix them up."""
    reps = [u for u in units if u.kind == _REPLICATED]
    if not reps:
        return
    sums = torch.stack([_local(u.param).detach().double().sum() for u in reps]).to(device)
    gathered = _all_gather(rt, sums, pg).view(-1, len(reps))
    differ = (gathered != gathered[0]).any(dim=0) & ~gathered[0].isnan()
    if bool(differ.any()):
        bad = [reps[i] for i in differ.nonzero().flatten().tolist()]
        raise RuntimeError(
            "Muon(distributed_mode='owner') needs parameters that are identical on every rank "
            "(DDP broadcasts them at construction), but "
            + ", ".join(f"param_groups[{u.group_index}]['params'][{u.pos}]" for u in bad)
            + " differ. Under ZeroRedundancyOptimizer leave distributed_mode unset."
        )


# ---------------------------------------------------------------------- the step


class _GroupStep:
    """One param group's step: hyperparameters, and the local tensors of each unit."""

    def __init__(self, rt: _Runtime, state: dict, group: dict[str, Any], grad_scale: Tensor | None):
        from .optim import momentum_dtype  # optim imports this module

        self.rt = rt
        lr = group["lr"]
        self.lr = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        self.beta, self.nesterov, self.eps = group["momentum"], group["nesterov"], group["eps"]
        self.decay = 1.0 - self.lr * group["weight_decay"]
        self.schedule = resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        self.flat = flat_coefficients(self.schedule)
        self.ns_algorithm = group.get("ns_algorithm", "standard")
        self.gram_restarts = resolve_gram_restarts(group.get("gram_restarts"), len(self.schedule))
        self.state = state
        self.grad_scale = None if grad_scale is None else float(grad_scale.item())
        self.momentum_dtype = momentum_dtype
        self.tensors: dict[_Unit, tuple[Tensor, Tensor, Tensor]] = {}  # param, grad, momentum

    def momentum(self, u: _Unit) -> None:
        """M = lerp(M, G, 1 - beta) on whatever this rank holds of the param."""
        p = u.param
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(
                p, dtype=self.momentum_dtype(p), memory_format=torch.contiguous_format
            )
        grad = p.grad
        placements = getattr(p, "placements", None)
        if placements is not None and grad.placements != placements:  # type: ignore[union-attr]
            grad = grad.redistribute(p.device_mesh, placements)  # type: ignore[union-attr]
        buf = _local(st["momentum_buffer"])
        g = _local(grad).to(buf.dtype)  # never written: it may be the grad itself
        if self.grad_scale is not None:
            g = g / self.grad_scale
        buf.lerp_(g, 1 - self.beta)
        self.tensors[u] = (_local(p), g, buf)

    def nesterov_update(self, u: _Unit) -> Tensor:
        """U = lerp(G, M, beta) (Nesterov) or M, param-shaped, of this rank's part."""
        _, g, buf = self.tensors[u]
        return g.lerp(buf, self.beta) if self.nesterov else buf

    def matrices(self, u: _Unit, lo: int = 0, hi: int | None = None) -> Tensor:
        """Matrices [lo, hi) of the update of a whole-matrix local tensor, (b, m, n) wide."""
        _, g, buf = self.tensors[u]
        shape = (u.local_batch, u.rows, u.cols)
        g3, b3 = g.reshape(shape)[lo:hi], buf.reshape(shape)[lo:hi]
        x = g3.lerp(b3, self.beta) if self.nesterov else b3
        return x.mT if u.tall else x

    def newton_schulz(self, route: str, parts: list[Tensor]) -> Tensor:
        """One batched call for all of a bucket's matrices on this rank."""
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.rt.stats.matrices += x.size(0)
        if route == "ops":
            return ops.newton_schulz(
                x, self.flat, self.eps, self.ns_algorithm, self.gram_restarts
            )
        # Same precision rule as Muon's pure-PyTorch path: fp32 on CPU, bf16 on accelerators.
        ns_dtype = torch.float32 if x.device.type == "cpu" else torch.bfloat16
        algorithm = resolve_ns_algorithm(self.ns_algorithm, x.size(1), x.size(2), x.device.type)
        return orthogonalize(
            x, self.schedule, self.eps, ns_dtype, algorithm=algorithm,
            gram_restarts=self.gram_restarts,
        )

    def apply(self, u: _Unit, x: Tensor) -> None:
        """P = P (1 - lr wd) - lr scale X, on the local tensor; x is param-shaped like it."""
        p = self.tensors[u][0]
        step = self.lr * u.scale
        compute = torch.promote_types(p.dtype, torch.float32)
        if compute == p.dtype:
            p.mul_(self.decay).add_(x.to(compute), alpha=-step)
        else:  # bf16/fp16 params: computed in fp32 and rounded once, as the fused step does
            p.copy_(p.to(compute).mul_(self.decay).add_(x.to(compute), alpha=-step))


def _to_param(u: _Unit, x: Tensor, shape: Any) -> Tensor:
    """(b, m, n) wide matrices back to the param's orientation and the given shape."""
    return (x.mT if u.tall else x).reshape(shape)


def _step_group(
    rt: _Runtime,
    state: dict,
    group: dict[str, Any],
    layout: _Layout,
    units: list[_Unit],
    grad_scale: Tensor | None,
) -> None:
    gs = _GroupStep(rt, state, group, grad_scale)
    for u in units:
        gs.momentum(u)
    plan = rt.plan(layout, units, len(gs.schedule))

    # 1. Sharded params: every shard of the update to its owner. All buckets are sent first, so
    #    later buckets travel while owners orthogonalize earlier ones.
    inbound = {i: _send_to_owners(rt, b, gs) for i, b in enumerate(plan) if b.sharded}
    # 2. Unrecognised DTensor layouts: the whole update on every rank.
    full = {
        u: _full_tensor(u, gs.nesterov_update(u))
        for b in plan
        for u in b.local
        if u.kind == _GATHER
    }

    # 3. Per bucket: one batched Newton-Schulz of this rank's matrices, then share the results.
    pending: list[tuple[Any, Any]] = []
    for i, b in enumerate(plan):
        local_parts = []
        for u in b.local:
            if u.kind == _GATHER:
                x = full[u].reshape(u.batch, u.rows, u.cols)
                local_parts.append((u, x.mT if u.tall else x))
            elif u.local_batch:
                local_parts.append((u, gs.matrices(u)))
        rep_parts = _owned_replicated(b, gs)
        shard_owned = [j for j, r in enumerate(b.owners) if r == b.rank]
        shard_parts: list[Tensor] = []
        if b.sharded:
            handle, received = inbound[i]
            handle.wait()
            shard_parts = _assemble(b, shard_owned, received)
        parts = [x for _, x in local_parts] + rep_parts + shard_parts
        x_all = gs.newton_schulz(b.route, parts) if parts else None
        cursor = 0
        for u, x in local_parts:
            x_u = x_all[cursor : cursor + x.size(0)]  # type: ignore[index]
            cursor += x.size(0)
            if u.kind == _GATHER:
                gs.apply(u, _local_slice(u, _to_param(u, x_u, u.param.shape)))
            else:
                gs.apply(u, _to_param(u, x_u, gs.tensors[u][0].shape))
        if b.replicated:
            count = b.counts[b.rank]
            mine = x_all[cursor : cursor + count] if count else None  # type: ignore[index]
            cursor += count
            pending.append(_share_replicated(rt, b, gs, mine))
        if b.sharded:
            results = []
            for j in shard_owned:
                u = b.sharded[j]
                results.append(_to_param(u, x_all[cursor : cursor + u.batch], u.param.shape))  # type: ignore[index]
                cursor += u.batch
            pending.append(_return_slices(rt, b, gs, shard_owned, results))

    # 4. Apply what the other owners computed, bucket by bucket as it arrives.
    for handle, finish in pending:
        handle.wait()
        finish()


# ---------------------------------------------------------------------- DDP: replicated params


def _owned_replicated(b: _Bucket, gs: _GroupStep) -> list[Tensor]:
    """This rank's share of a bucket's replicated matrices (a contiguous range)."""
    if not b.replicated:
        return []
    lo, hi = b.starts[b.rank], b.starts[b.rank] + b.counts[b.rank]
    parts, offset = [], 0
    for u in b.replicated:
        a, z = max(lo, offset), min(hi, offset + u.batch)
        if a < z:
            parts.append(gs.matrices(u, a - offset, z - offset))
        offset += u.batch
    return parts


def _share_replicated(rt: _Runtime, b: _Bucket, gs: _GroupStep, mine: Tensor | None):
    """One all_gather per bucket; each rank contributes max(counts) slots (padded)."""
    slots = max(b.counts)
    dtype = _ns_out_dtype(b.route, gs.tensors[b.replicated[0]][2])
    device = _local(b.replicated[0].param).device
    if mine is not None and mine.size(0) == slots:
        send = mine  # a contiguous slice of the bucket's Newton-Schulz output
    else:  # fewer matrices than the busiest owner: zero padding (at most one slot)
        send = torch.zeros(slots, b.m, b.n, dtype=dtype, device=device)
        if mine is not None:
            send[: mine.size(0)].copy_(mine)
    out = torch.empty(b.world * slots, b.m, b.n, dtype=dtype, device=device)
    handle = _all_gather_async(rt, out, send, b.pg)

    def finish() -> None:
        if all(c == slots for c in b.counts):
            ordered = out
        else:
            ordered = torch.cat([out[r * slots : r * slots + c] for r, c in enumerate(b.counts)])
        offset = 0
        for u in b.replicated:
            gs.apply(u, _to_param(u, ordered[offset : offset + u.batch], gs.tensors[u][0].shape))
            offset += u.batch

    return handle, finish


def _ns_out_dtype(route: str, momentum: Tensor) -> torch.dtype:
    """Newton-Schulz output dtype: the op keeps its input's (the momentum's) dtype."""
    if route == "ops":
        return momentum.dtype
    return torch.float32 if momentum.device.type == "cpu" else torch.bfloat16


# ---------------------------------------------------------------------- FSDP2: sharded params


def _send_to_owners(rt: _Runtime, b: _Bucket, gs: _GroupStep) -> tuple[Any, Tensor]:
    """all_to_all #1: this rank's shard of every param of the bucket, to that param's owner."""
    by_owner: list[list[Tensor]] = [[] for _ in range(b.world)]
    for u, r in zip(b.sharded, b.owners):
        by_owner[r].append(gs.nesterov_update(u).reshape(-1))
    in_splits = [sum(t.numel() for t in ts) for ts in by_owner]
    mine = [u for u, r in zip(b.sharded, b.owners) if r == b.rank]
    out_splits = [sum(u.local_numel(s) for u in mine) for s in range(b.world)]
    dtype = gs.tensors[b.sharded[0]][2].dtype
    device = _local(b.sharded[0].param).device
    flat = [t for ts in by_owner for t in ts]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(out_splits), dtype=dtype, device=device)
    handle = _all_to_all_async(rt, received, send, out_splits, in_splits, b.pg, b.rank)
    return handle, received


def _assemble(b: _Bucket, owned: list[int], received: Tensor) -> list[Tensor]:
    """The owner's whole matrices, (b, m, n) wide, from the shards every rank sent."""
    units = [b.sharded[j] for j in owned]
    pieces: list[list[Tensor]] = [[] for _ in units]
    offset = 0
    for s in range(b.world):  # received holds, per source rank, its shards in bucket order
        for k, u in enumerate(units):
            numel = u.local_numel(s)
            pieces[k].append(received[offset : offset + numel].view(u.local_shape(s)))
            offset += numel
    parts = []
    for u, ps in zip(units, pieces):
        x = torch.cat(ps, dim=u.shard_dim).reshape(u.batch, u.rows, u.cols)
        parts.append(x.mT if u.tall else x)
    return parts


def _return_slices(
    rt: _Runtime, b: _Bucket, gs: _GroupStep, owned: list[int], results: list[Tensor]
):
    """all_to_all #2: each rank's slice of every result this rank owns, back to that rank."""
    units = [b.sharded[j] for j in owned]
    outgoing: list[list[Tensor]] = [[] for _ in range(b.world)]
    for u, x in zip(units, results):
        for r, piece in enumerate(torch.split(x, list(u.chunks), dim=u.shard_dim)):
            outgoing[r].append(piece.reshape(-1))
    in_splits = [sum(t.numel() for t in ts) for ts in outgoing]
    out_splits = [
        sum(u.local_numel(b.rank) for u, o in zip(b.sharded, b.owners) if o == s)
        for s in range(b.world)
    ]
    dtype = _ns_out_dtype(b.route, gs.tensors[b.sharded[0]][2])
    device = _local(b.sharded[0].param).device
    flat = [t for ts in outgoing for t in ts]
    send = torch.cat(flat).to(dtype) if flat else torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(out_splits), dtype=dtype, device=device)
    handle = _all_to_all_async(rt, received, send, out_splits, in_splits, b.pg, b.rank)

    def finish() -> None:
        offset = 0
        for s in range(b.world):
            for u, o in zip(b.sharded, b.owners):
                if o == s:
                    numel = u.local_numel(b.rank)
                    gs.apply(u, received[offset : offset + numel].view(u.local_shape(b.rank)))
                    offset += numel

    return handle, finish


# ---------------------------------------------------------------------- fallback: gather


def _full_tensor(u: _Unit, update_local: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    p = u.param
    dt = DTensor.from_local(
        update_local,
        p.device_mesh,
        p.placements,
        shape=p.shape,
        stride=p.stride(),  # type: ignore[attr-defined]
    )
    return dt.full_tensor()


def _local_slice(u: _Unit, x_full: Tensor) -> Tensor:
    from torch.distributed.tensor import distribute_tensor

    p = u.param
    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    try:  # src_data_rank=None: every rank holds x_full already and keeps its own slice
        return distribute_tensor(x_full, mesh, placements, src_data_rank=None).to_local()
    except TypeError:  # older torch (no src_data_rank): a redundant broadcast from rank 0
        return distribute_tensor(x_full, mesh, placements).to_local()


# ---------------------------------------------------------------------- collectives


def _all_gather(rt: _Runtime, t: Tensor, pg: Any) -> Tensor:
    out = torch.empty((_world(pg) * t.numel(),), dtype=t.dtype, device=t.device)
    _all_gather_async(rt, out, t.reshape(-1), pg).wait()
    return out


def _all_gather_async(rt: _Runtime, out: Tensor, send: Tensor, pg: Any):
    import torch.distributed as dist

    world = _world(pg)
    rt.stats.collectives += 1
    rt.stats.elements_sent += (world - 1) * send.numel()
    rt.stats.elements_received += (world - 1) * send.numel()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, send, group=pg, async_op=True)


def _all_to_all_async(
    rt: _Runtime,
    out: Tensor,
    send: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    pg: Any,
    rank: int,
):
    import torch.distributed as dist

    rt.stats.collectives += 1
    rt.stats.elements_sent += sum(in_splits) - in_splits[rank]
    rt.stats.elements_received += sum(out_splits) - out_splits[rank]
    return dist.all_to_all_single(out, send, out_splits, in_splits, group=pg, async_op=True)


# ---------------------------------------------------------------------- helpers


def _dtensor_type() -> type | None:
    """DTensor, if torch.distributed.tensor was imported (otherwise nothing can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _local(t: Tensor) -> Tensor:
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t  # type: ignore[attr-defined]


def _world(pg: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(pg)


def _require_initialized() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "Muon(distributed_mode='owner') needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); use distributed_mode=None in one process"
        )


def _chunk_sizes(length: int, world: int) -> tuple[int, ...]:
    """Sizes of torch.chunk(length, world) padded with empty chunks: DTensor's Shard rule."""
    size = -(-length // world)
    return tuple(max(0, min(size, length - r * size)) for r in range(world))


def _group_ranks_follow_mesh(mesh: Any, dim: int, pg: Any) -> bool:
    """Whether mesh coordinate c along `dim` is group rank c (the all_to_all split order)."""
    import torch.distributed as dist

    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return False
    index: list[Any] = list(coordinate)
    index[dim] = slice(None)
    ranks = mesh.mesh[tuple(index)].tolist()
    return all(dist.get_group_rank(pg, g) == c for c, g in enumerate(ranks))


def _mesh_group(mesh: Any) -> Any:
    """A process group over all ranks of the mesh (for agreeing on grads), or None."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return None


def _default_group(pg: Any) -> Any:
    import torch.distributed as dist

    return pg if pg is not None else dist.group.WORLD


def _comm_device(pg: Any, units: list[_Unit]) -> torch.device:
    """Where the header lives: the CPU for gloo, else the params' (or the current) device."""
    import torch.distributed as dist

    if str(dist.get_backend(pg)) == "gloo":
        return torch.device("cpu")
    if units:
        return _local(units[0].param).device
    if torch.cuda.is_available():  # an empty group on a rank: NCCL needs a CUDA tensor
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _hash(items: Any) -> int:
    """A stable 63-bit hash (Python's hash() of strings differs between processes)."""
    digest = hashlib.blake2b(repr(list(items)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
