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
* Matrix blocks (``num_heads`` / ``split_sizes``, rows only) and NorMuon work in both modes:
  NOTE: [Distributed matrix blocks] and NOTE: [Distributed NorMuon].
* Any other DTensor layout (several sharded mesh dims, e.g. FSDP2 + tensor parallel) falls
  back to ``full_tensor()`` on every rank: correct, but every rank does all the work.

Owners are assigned deterministically from shapes alone (identical on every rank), balancing
Newton-Schulz FLOPs. Before a param group's first collective, the ranks of each process group
exchange one small header (structure fingerprint, which params have grads, ``found_inf``), so
a param without a grad on some rank, or an inf found by one rank only, cannot make ranks
issue different collectives (a hang). README.md, "Distributed training", gives the costs.

``Muon._step_group`` calls :func:`step_group` for groups where :func:`wanted` says so;
:func:`stats` gives the per-rank counters (matrices orthogonalized, collectives, elements).
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import ops
from ._extension import extension_available
from .coefficients import (
    DEFAULT_RMS_TARGET,
    blocking_requested,
    flat_coefficients,
    matrix_blocks,
    matrix_shape,
    resolve_ns_algorithm,
    resolve_ns_coefficients,
    update_scale,
)
from .dispatch import (
    NORMUON_STATE_KEY,
    lr_tensor,
    momentum_buffer,
    momentum_dtype,
    same_state,
    scalar_on,
    takes_fused_step,
    tensors_hash,
)
from .reference import (
    block_view,
    copy_blocks_packed_,
    momentum_packed_,
    normuon_,
    normuon_rows,
    orthogonalize_packed_,
    resolve_gram_restarts,
    update_packed_,
)

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
    if dtensor is None:
        return False
    # Asked several times per step: cached while the group holds the same params (by identity).
    params = group["params"]
    key = tuple(map(id, params))
    cache = optimizer.__dict__.setdefault("_distributed_wanted", {})
    hit = cache.get(id(params))
    if hit is not None and hit[0] == key:
        return hit[1]
    answer = any(isinstance(p, dtensor) for p in params)
    cache[id(params)] = (key, answer)
    return answer


@torch.no_grad()
def step_group(
    optimizer: Any,
    index: int,
    group: dict[str, Any],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    grads: list[Tensor | None] | None = None,
) -> None:
    """Steps one (already checked) param group of a ``muon_ext.Muon``, on every rank.
    ``grads``: each param's grad or None, by position, as the check phase read them."""
    owner = getattr(optimizer, "distributed_mode", None) == "owner"
    if owner:
        _require_initialized()
    rt = _runtime(optimizer)
    default_pg = getattr(optimizer, "process_group", None)
    layout = rt.layout(index, group, owner, default_pg)
    if grads is None:
        grads = [p.grad for p in group["params"]]
    agreement = _agree_start(rt, layout, grads, owner, default_pg)
    # While the headers are in flight, the host work that changes nothing: the settings, and
    # for the units this rank has grads for, their state tensors (when cached: creating state
    # waits for the agreement), grads and plan. Redone only if the ranks disagree on grads.
    sc = _scalars(optimizer, group, grad_scale)
    guess = layout.units if agreement.complete else layout.stepped(agreement.has)
    prepared = None
    if layout.collected is not None and layout.collected.fresh(guess, optimizer.state, sc.normuon):
        prepared = _prepare(rt, layout, guess, grads, optimizer.state, sc, early=True)
    has, groups = _agree_finish(rt, layout, agreement)
    if found_inf is not None:  # set on any rank: nothing changes anywhere (read on the device)
        sc.found_inf = _found_inf_anywhere(rt, found_inf, groups)
    units = guess if has is agreement.has else layout.stepped(has)
    if not units:
        return
    if prepared is None or units is not guess:
        prepared = _prepare(rt, layout, units, grads, optimizer.state, sc)
    _run(rt, prepared, sc)


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
    local: Any = None  # this rank's tensor of the param (the DTensor's local tensor)
    placements: Any = None  # a DTensor param's placements (None: a plain tensor)
    spec: Any = None  # a DTensor param's sharding spec (FSDP2's grads share it)
    # Matrix blocks and NorMuon (NOTE: [Distributed matrix blocks]):
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # its matrices, in order
    rows_of: tuple[int, int] | None = None  # a row block of a whole param: its rows [lo, hi)
    column_block: Any = None  # a column block (MatrixBlock) of a whole param: stepped on copies
    v_of: tuple[int, int] | None = None  # a block of a whole param: its entries of the v
    pieces: list[tuple[int, int, float]] | None = None  # _SHARDED blocks: (lo, hi, scale) rows
    column_blocks: Any = None  # _SHARDED column blocks: the MatrixBlocks (pieces are columns)
    v_numel: int = 0  # NorMuon: entries of the param's v (normuon_rows), 0 with NorMuon off
    v_local: Any = None  # NorMuon: this rank's (entries, placements) of v (_v_layout)
    grad_spec: Any = None  # a grad sharding spec seen to have the param's placements (cached)

    @property
    def whole(self) -> bool:
        """Stepped as its local tensor as it stands (not as blocks, pieces or copies)."""
        return (self.rows_of is None and self.column_block is None and self.pieces is None
                and self.column_blocks is None)

    @property
    def tall(self) -> bool:
        return self.rows > self.cols

    @property
    def m(self) -> int:
        return min(self.rows, self.cols)

    @property
    def n(self) -> int:
        return max(self.rows, self.cols)

    def flops(self, steps: int) -> int:
        return sum(b * ns_flops(r, c, steps) for b, r, c in self.shapes)

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
    agreeing: list[tuple[Any, list[_Unit]]] | None = None  # _agree's groups and their units
    collected: Any = None  # _Collected: the units' state tensors, while they stay the same
    partial: tuple[tuple[int, ...], list[_Unit]] | None = None  # see stepped()

    def stepped(self, has: list[bool]) -> list[_Unit]:
        """The units whose params have grads (``has``, by position): the same list object
        step after step while the same params lack grads (frozen or unused params), so that
        the state cached for it (_Collected) stays valid."""
        missing = tuple(i for i, h in enumerate(has) if not h)
        if not missing:
            return self.units
        if self.partial is None or self.partial[0] != missing:
            self.partial = (missing, [u for u in self.units if has[u.pos]])
        return self.partial[1]


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
    tables: Any = None  # _Tables: this rank's packed layout of the bucket


@dataclass
class _Runtime:
    """Per-optimizer cache and counters (never part of state_dict or pickles)."""

    layouts: dict[int, _Layout] = field(default_factory=dict)
    plans: dict[int, tuple[tuple, list[_Bucket]]] = field(default_factory=dict)
    stats: DistributedStats = field(default_factory=DistributedStats)
    host_groups: dict[int, Any] = field(default_factory=dict)  # _host_group's gloo groups

    def layout(self, index: int, group: dict[str, Any], owner: bool, default_pg: Any) -> _Layout:
        key = (
            owner,
            id(default_pg),
            group["adjust_lr_fn"],
            group.get("rms_target", DEFAULT_RMS_TARGET),
            group["fused"],
            group.get("num_heads"),
            None if group.get("split_sizes") is None else tuple(group["split_sizes"]),
            group.get("split_dim", 0),
            bool(group.get("normuon", False)),
            # Per param its identity, and a hash of its local tensor's storage, shape, dtype
            # and device (one C++ pass): a DTensor keeps its placements for life, and a
            # `p.data = ...` swap changes the local tensor.
            tuple(map(id, group["params"])),
            tensors_hash(_locals(group["params"])),
        )
        cached = self.layouts.get(index)
        if cached is not None and cached.key == key:
            return cached
        units = [
            u
            for pos, p in enumerate(group["params"])
            for u in _make_units(index, pos, p, group, owner, default_pg)
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
        for b in buckets:
            b.tables = _make_tables(b)
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
    batch, rows, cols = matrix_shape(p.shape)
    fused = takes_fused_step(_local(p), group)
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
        local=_local(p),
        shapes=[(batch, rows, cols)],
        placements=getattr(p, "placements", None),
        spec=getattr(p, "_spec", None),
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


# NOTE: [Distributed matrix blocks]
# num_heads / split_sizes cut a 2-D param into blocks, each a (heads, rows, cols) stack with its
# own update scale (NOTE: [Matrix blocks] in muon_ext/optim.py). With split_dim=0 (row blocks)
# the rows of a contiguous param-shaped buffer hold the blocks one after another, each
# row-major.
# * A param that goes whole to one owner (_SHARDED, FSDP2) stays one unit: its reassembled
#   buffer contributes its blocks' shapes to the owner's orthogonalize call (the op buckets
#   them), and its local shard is stepped as `pieces`, ranges of the local tensor (the shard
#   intersected with each block, made once per layout), each with its block's scale. Row
#   pieces are views: muon_momentum_ and muon_update_ take them (disjoint views of one storage
#   may share a call of the phase ops), and U packs them in order, exactly as the whole shard.
#   Column pieces (split_dim=1) are strided: they are stepped on contiguous copies, written
#   back after the step, and the owner's tables (_shard_blocks) put each piece's head columns
#   straight into a whole buffer that holds the blocks one after another, each a contiguous
#   (heads, rows, w) stack, and take them back from there.
# * A param whose local tensor is the whole param (_LOCAL, _REPLICATED in owner mode) becomes
#   one unit per block (rows_of: its rows), in the bucket of the block's own shape, so owners
#   and their FLOP balance are per block, like separate params. Column blocks (split_dim=1)
#   of such params are units too (column_block): strided, they are stepped on contiguous
#   (heads, rows, w) copies of the param, grad and momentum block, and the param and momentum
#   copies are written back after the step, as the single-process step does.
# NorMuon: NOTE: [Distributed NorMuon].
def _make_units(
    index: int, pos: int, p: Tensor, group: dict[str, Any], owner: bool, default_pg: Any
) -> list[_Unit]:
    """The units of one param: one, or one per matrix block (NOTE: [Distributed matrix
    blocks])."""
    unit = _make_unit(index, pos, p, group, owner, default_pg)
    num_heads, split_sizes = group.get("num_heads"), group.get("split_sizes")
    normuon = bool(group.get("normuon", False))
    blocked = blocking_requested(num_heads, split_sizes)
    if not (blocked or normuon):
        return [unit]
    split_dim = group.get("split_dim", 0)
    where = f"param_groups[{index}]['params'][{pos}]"
    setting = "num_heads / split_sizes" if blocked else "normuon=True"
    if unit.kind == _GATHER:
        raise NotImplementedError(
            f"Muon: {where} is a DTensor with placements {unit.placements}, which the distributed "
            f"step only supports through full_tensor() on every rank; {setting} is not supported "
            "there (FSDP2's single Shard(d) mesh dim and replicated params are)"
        )
    if normuon and unit.load_pg is not None:
        raise NotImplementedError(
            f"Muon: {where} is an expert stack sharded on its expert dim; normuon=True is not "
            "supported for it in the distributed step yet (shard it on another dim)"
        )
    if normuon:
        unit.v_numel = normuon_rows(p.shape, num_heads, split_sizes, split_dim)
    if not blocked or unit.kind == _EMPTY:
        return [unit]
    blocks = matrix_blocks(p.shape, num_heads, split_sizes, split_dim)
    shapes = [b.matrix_shape(p.shape) for b in blocks]
    rule, target = group["adjust_lr_fn"], group.get("rms_target", DEFAULT_RMS_TARGET)
    scales = [update_scale(r, c, rule, target) for _, r, c in shapes]
    if unit.kind == _SHARDED:
        # Bucketed by its largest block (any key works: the owner's op buckets the shapes).
        unit.batch, unit.rows, unit.cols = max(shapes, key=lambda s: (ns_flops(s[1], s[2], 1), s))
        unit.shapes = shapes
        lo, hi = 0, p.shape[split_dim]
        if unit.shard_dim == split_dim:
            lo = sum(unit.chunks[: unit.rank])
            hi = lo + unit.chunks[unit.rank]
        if split_dim == 1:
            unit.column_blocks = blocks
        unit.pieces = [
            (max(lo, b.start) - lo, min(hi, b.start + b.size) - lo, scale)
            for b, scale in zip(blocks, scales)
            if max(lo, b.start) < min(hi, b.start + b.size)
        ]
        return [unit]
    units, v_start = [], 0
    for block, (b, r, c), scale in zip(blocks, shapes, scales):
        sub = replace(unit, batch=b, rows=r, cols=c, local_batch=b, scale=scale, shapes=[(b, r, c)],
                      v_of=(v_start, v_start + b * r))
        v_start += b * r
        if split_dim == 0:
            sub.rows_of = (block.start, block.start + block.size)
            sub.local = unit.local[block.start : block.start + block.size]
        else:
            sub.column_block, sub.local = block, block_view(unit.local, block)
        units.append(sub)
    return units


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
            for i in sorted(range(len(b.sharded)), key=lambda i: (-b.sharded[i].flops(steps), i)):
                r = min(range(b.world), key=lambda r: (load[r], r))
                owners[i] = r
                load[r] += b.sharded[i].flops(steps)
            b.owners = owners
    return plan


# ---------------------------------------------------------------------- agreement


@dataclass(eq=False)
class _Agreement:
    """The headers of one step in flight (_agree_start), and what this rank knows already."""

    has: list[bool]  # by position: this rank has the param's grad
    complete: bool  # every param of the group has a grad here
    headers: list[tuple[Any, list[_Unit], Tensor, Any]]  # (pg, its units, gathered, work)


def _agree_start(
    rt: _Runtime, layout: _Layout, grads: list[Tensor | None], owner: bool, default_pg: Any
) -> _Agreement:
    """Issues this step's headers: one all_gather of a 5-element header per process group
    (structure, which params have grads, whether to verify replication: host facts, on the
    CPU for gloo). _agree_finish reads them; the host work in between overlaps them."""
    has = [g is not None for g in grads]
    complete = all(has)
    if layout.agreeing is None:
        # In owner mode every rank exchanges a header even with an empty group
        # (ZeroRedundancyOptimizer can hand a rank none of a group's params): no rank waits
        # alone.
        by_pg: dict[int, tuple[Any, list[_Unit]]] = {}
        if owner:
            pg = _default_group(default_pg)
            by_pg[id(pg)] = (pg, [])
        for u in layout.units:
            if u.agree_pg is not None:
                by_pg.setdefault(id(u.agree_pg), (u.agree_pg, []))[1].append(u)
        layout.agreeing = list(by_pg.values())
    headers = []
    for pg, units in layout.agreeing:
        fingerprint = layout.fingerprints.get(id(pg))
        if fingerprint is None:
            fingerprint = _hash(
                (u.group_index, u.pos, u.kind, tuple(u.param.shape), str(u.param.dtype), u.chunks)
                for u in units
            )
            layout.fingerprints[id(pg)] = fingerprint
        verify = id(pg) not in layout.verified
        missing = _NONE_MISSING if complete else _hash(u.pos for u in units if not has[u.pos])
        header = torch.tensor(
            [_HEADER_MAGIC, len(units), fingerprint, missing, int(verify)], dtype=torch.int64
        )
        hpg = _host_group(rt, pg)
        gathered = torch.empty(_world(hpg) * header.numel(), dtype=torch.int64)
        headers.append((pg, units, gathered, _all_gather_async(rt, gathered, header, hpg)))
    return _Agreement(has, complete, headers)


def _agree_finish(rt: _Runtime, layout: _Layout, a: _Agreement) -> tuple[list[bool], list[Any]]:
    """Which params take part this step (a grad on every rank of their group), by position in
    the group, and the process groups that agreed. A second small collective runs only when
    the ranks disagree about grads, or to check on a (re)built layout that "replicated" params
    really are identical on every rank."""
    import torch.distributed as dist

    has = a.has
    for _, _, _, work in a.headers:  # all in flight: wait for every one before acting on any
        work.wait()
    for pg, units, gathered, _ in a.headers:
        world = dist.get_world_size(pg)
        rows = gathered.view(world, -1).tolist()
        if any(row[:3] != rows[0][:3] for row in rows):
            raise RuntimeError(
                "Muon: the ranks of a process group disagree on the parameters of the distributed "
                "step (different models, param groups or shapes). distributed_mode='owner' needs "
                "the same parameters on every rank (DDP); under ZeroRedundancyOptimizer leave it "
                "unset, since ZeRO already gives each parameter to one rank."
            )
        if any(row[4] for row in rows):
            _verify_replicated(rt, units, pg, _comm_device(pg, units))
            layout.verified.add(id(pg))
        if any(row[3] != rows[0][3] for row in rows):
            if has is a.has:
                has = list(has)
            counts = torch.tensor([a.has[u.pos] for u in units], dtype=torch.int32)
            dist.all_reduce(counts, group=_host_group(rt, pg))
            rt.stats.collectives += 1
            partial = {}
            for u, c in zip(units, counts.tolist()):
                if c < world:  # a param's blocks share its position and its count
                    has[u.pos] = False
                if 0 < c < world:
                    partial.setdefault(id(u.param), u)
            if partial:
                warnings.warn(
                    "Muon: skipped "
                    + ", ".join(
                        f"param_groups[{u.group_index}]['params'][{u.pos}]"
                        for u in partial.values()
                    )
                    + " on every rank this step: it has a grad on some ranks only",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return has, [pg for pg, _ in layout.agreeing]  # type: ignore[union-attr]


def _found_inf_anywhere(rt: _Runtime, found_inf: Tensor, groups: list[Any]) -> Tensor:
    """found_inf as a float32 flag that is set on every rank if it is set on any (a MAX
    all-reduce per agreeing process group, on the flag's device: never read on the host)."""
    import torch.distributed as dist

    flag = found_inf.detach().reshape(1).to(torch.float32, copy=True)
    for pg in groups:
        if str(dist.get_backend(pg)) == "gloo" and flag.device.type != "cpu":
            flag = flag.cpu()  # gloo reduces CPU tensors (a copy, only for gloo with CUDA)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        rt.stats.collectives += 1
    return flag


def _verify_replicated(rt: _Runtime, units: list[_Unit], pg: Any, device: torch.device) -> None:
    """Replicated params must be identical on every rank, else owners would mix them up."""
    # One entry per param (a blocked param has a unit per block).
    reps = list({id(u.param): u for u in units if u.kind == _REPLICATED}.values())
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
#
# NOTE: [Distributed step on the phase ops]
# Per shape bucket, everything runs on packed buffers with the step's own phase ops (NOTE:
# [Phase ops] in csrc/muon_step_args.h), so the step's math lives in C++ once:
#   1. muon_momentum_ over every local tensor of the bucket writes U into one buffer, in the
#      order [local units | replicated units | sharded units by owner rank]. Its sharded part is
#      the send buffer of the first all_to_all as it stands.
#   2. The owner gets whole matrices: muon_copy_blocks_ reassembles the received shards (one
#      op, with a table made once per plan), and muon_orthogonalize_ runs Newton-Schulz in place
#      on the local matrices, on this rank's share of the replicated ones and on the assembled
#      sharded ones.
#   3. muon_copy_blocks_ packs each rank's slice of the results; the second all_to_all returns
#      them into the sharded part of the same buffer (free since the first one finished), and
#      one all_gather per bucket shares the replicated results.
#   4. One muon_update_ over the bucket's local tensors reads the whole buffer.
# No value is read on the host: lr, grad_scale and found_inf go to the ops as tensors, and a
# found_inf set on any rank (all-reduced with MAX on the device) makes every rank's momentum and
# update ops write nothing, while every rank still issues the same collectives. The result
# equals the single-process step bit for bit, given the same gradients (tested).
# Host work per step: the check phase reads every grad in one C++ pass (_C.step_facts) and
# hands them over by position; the layout is keyed by one C++ hash of the local tensors; the
# headers (_agree_start) are issued asynchronously, and while they are in flight each unit's
# local grad is taken (an attribute read; a grad placed unlike its param waits for the
# agreement, since redistributing it is a collective) and the state tensors and per-bucket
# lists of params and momentum come from a cache (_Collected, checked by identity). What was
# prepared is dropped only if the ranks disagree about which params have grads.


@dataclass
class _Scalars:
    """One group's step settings, as the ops take them."""

    beta: float
    nesterov: bool
    eps: float
    weight_decay: float
    flat: list[float]
    schedule: list[tuple[float, float, float]]
    ns_algorithm: str
    gram_restarts: list[int]
    ns_dtype: str  # NOTE: [Newton-Schulz dtype]
    workspace_limit: int
    lr: Any  # float or Tensor (group["lr"])
    grad_scale: Tensor | None
    found_inf: Tensor | None  # MAX over the ranks of every rank's flag (device tensor)
    normuon: bool = False
    normuon_beta2: float = 0.95
    normuon_eps: float = 1e-8


def _scalars(optimizer: Any, group: dict[str, Any], grad_scale: Tensor | None) -> _Scalars:
    schedule = resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
    limit = getattr(optimizer, "workspace_limit", None)
    return _Scalars(
        beta=group["momentum"], nesterov=group["nesterov"], eps=group["eps"],
        weight_decay=group["weight_decay"], flat=flat_coefficients(schedule), schedule=schedule,
        ns_algorithm=group.get("ns_algorithm", "standard"),
        gram_restarts=resolve_gram_restarts(group.get("gram_restarts"), len(schedule)),
        ns_dtype=group.get("ns_dtype", "bfloat16"),
        workspace_limit=-1 if limit is None else int(limit), lr=group["lr"],
        grad_scale=grad_scale, found_inf=None, normuon=bool(group.get("normuon", False)),
        normuon_beta2=group.get("normuon_beta2", 0.95), normuon_eps=group.get("normuon_eps", 1e-8),
    )


@dataclass(eq=False)
class _Prepared:
    """A step's inputs: per bucket of the plan, its (params, grads, momentum) lists in the
    ops' order and its v per unit of ``order`` (None with NorMuon off); the gather units'
    triples; the copies to write back after the step (column blocks)."""

    plan: list[_Bucket]
    buckets: list[tuple[tuple[list, list, list], list | None]]
    gathered: list[tuple[_Unit, tuple[Tensor, Tensor, Tensor]]]
    write_back: list[tuple[Tensor, Tensor]]


def _prepare(
    rt: _Runtime, layout: _Layout, units: list[_Unit], grads: list[Tensor | None], state: Any,
    sc: _Scalars, early: bool = False,
) -> _Prepared | None:
    """The step's inputs. The state tensors and the per-bucket lists of params and momentum
    are made once (_Collected); per step only the grads are read. None if ``early`` (headers
    in flight) and a grad would need a redistribute, a collective of its own that must wait
    for the agreement."""
    c = layout.collected
    if c is None or not c.fresh(units, state, sc.normuon):
        made = [_unit_state(state, u, sc.normuon) for u in units]
        c = _Collected(units, state, sc.normuon, [u.param for u in units],
                       [x[0] for x in made], [x[1] for x in made], [x[2] for x in made])
        layout.collected = c
    local_grads = _local_grads(units, grads, early)
    if local_grads is None:
        return None
    plan = rt.plan(layout, units, len(sc.schedule))
    if c.plan is not plan:
        c.bind(plan)
    write_back: list[tuple[Tensor, Tensor]] = []
    buckets = []
    for inputs in c.inputs:
        if inputs.params is not None:  # whole units only: the cached lists
            lists = (inputs.params, [local_grads[i] for i in inputs.index], inputs.bufs)
        else:
            pieces = []
            for i in inputs.index:
                u, m = units[i], c.local[i][0]
                pieces += ([(u.local, local_grads[i], m)] if u.whole
                           else _pieces(u, local_grads[i], m, write_back))
            lists = ([x[0] for x in pieces], [x[1] for x in pieces], [x[2] for x in pieces])
        buckets.append((lists, inputs.vs))
    gathered = [(units[i], (units[i].local, local_grads[i], c.local[i][0])) for i in c.gathers]
    return _Prepared(plan, buckets, gathered, write_back)


def _run(rt: _Runtime, prep: _Prepared, sc: _Scalars) -> None:
    for b, (lists, vs) in zip(prep.plan, prep.buckets):
        _step_bucket(rt, b, lists, vs, sc)
    for dst, src in prep.write_back:  # column blocks (unchanged copies when found_inf is set)
        dst.copy_(src)
    for u, triple in prep.gathered:
        _step_gathered(rt, u, triple, sc)


@dataclass(eq=False)
class _BucketInputs:
    """What a bucket's ops take that stays the same from step to step: the positions (in the
    stepped units) of its units in the ops' order, and for a bucket of whole units (no blocks,
    pieces or copies) its params' and momentum lists; each unit's v."""

    index: list[int]
    params: list[Tensor] | None
    bufs: list[Tensor] | None
    vs: list[Tensor] | None


@dataclass(eq=False)
class _Collected:
    """The state tensors of a layout's stepped units, made once and reused while the units, the
    optimizer's state dict and the tensors in the units' state dicts stay the same; and, per
    bucket of the plan they were bound to, the lists the ops take."""

    units: list[_Unit]
    state: Any  # optimizer.state
    normuon: bool
    params: list[Tensor]  # per unit: its param,
    states: list[dict]  # its param's state dict,
    held: list[Any]  # the momentum buffer found there (and v: same_state's pairs),
    local: list[tuple[Tensor, Tensor | None]]  # and this rank's (momentum, v) of the unit
    plan: list[_Bucket] | None = None
    inputs: list[_BucketInputs] = field(default_factory=list)
    gathers: list[int] = field(default_factory=list)  # positions of _GATHER units

    def fresh(self, units: list[_Unit], state: Any, normuon: bool) -> bool:
        return (self.units is units and self.state is state and self.normuon == normuon
                and same_state(self.held, self.states, self.params, state))

    def bind(self, plan: list[_Bucket]) -> None:
        position = {u: i for i, u in enumerate(self.units)}
        self.plan, self.inputs = plan, []
        for b in plan:
            index = [position[u] for u in b.tables.order]
            whole = all(self.units[i].whole for i in index)
            self.inputs.append(_BucketInputs(
                index,
                [self.units[i].local for i in index] if whole else None,
                [self.local[i][0] for i in index] if whole else None,
                [self.local[i][1] for i in index] if self.normuon else None,
            ))
        self.gathers = [i for i, u in enumerate(self.units) if u.kind == _GATHER]


def _unit_state(state: Any, u: _Unit, normuon: bool) -> tuple[dict, Any, tuple]:
    """A unit's state dict, what same_state holds from it (the momentum buffer, or the
    (momentum buffer, v) pair with NorMuon on), and this rank's (momentum, v) of the unit
    (v: None with NorMuon off), creating zero state on first use."""
    st = state[u.param]
    buf = momentum_buffer(st, u.param)
    if not normuon:
        return st, buf, (_local(buf), None)
    v = _normuon_v(st, u)
    if u.v_of is not None:
        v = v[u.v_of[0] : u.v_of[1]]
    return st, (buf, st[NORMUON_STATE_KEY]), (_local(buf), v)


def _local_grads(
    units: list[_Unit], grads: list[Tensor | None], early: bool
) -> list[Tensor] | None:
    """This rank's grad of each unit (contiguous), a DTensor grad placed unlike its param
    redistributed first; None if ``early`` and one would be (see _prepare)."""
    dtensor = _dtensor_type()
    out = []
    for u in units:
        g = grads[u.pos]
        if dtensor is not None and isinstance(g, dtensor):
            spec = g._spec
            if spec is not u.spec and spec is not u.grad_spec:
                if spec.placements != u.placements:
                    if early:
                        return None
                    g = g.redistribute(u.param.device_mesh, u.placements)  # type: ignore
                else:  # the same placements: remembered, compared once
                    u.grad_spec = spec
            g = g._local_tensor
        out.append(g if g.is_contiguous() else g.contiguous())
    return out


def _pieces(
    u: _Unit, g: Tensor, m: Tensor, write_back: list[tuple[Tensor, Tensor]]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The (param, grad, momentum) triples of a unit that is a block or has pieces (NOTE:
    [Distributed matrix blocks]). Copies (column blocks) add their (destination, copy) pairs
    to ``write_back``."""
    if u.rows_of is not None:
        lo, hi = u.rows_of
        return [(u.local, g[lo:hi], m[lo:hi])]
    if u.column_block is not None:  # copies, written back by _run
        m_block = block_view(m, u.column_block)
        copies = (u.local.contiguous(), block_view(g, u.column_block).contiguous(),
                  m_block.contiguous())
        write_back.append((u.local, copies[0]))
        write_back.append((m_block, copies[2]))
        return [copies]
    if u.column_blocks is not None:  # column pieces of the shard: copies, written back
        out = []
        for lo, hi, _ in u.pieces:  # type: ignore[union-attr]
            copies = (u.local[:, lo:hi].contiguous(), g[:, lo:hi].contiguous(),
                      m[:, lo:hi].contiguous())
            write_back.append((u.local[:, lo:hi], copies[0]))
            write_back.append((m[:, lo:hi], copies[2]))
            out.append(copies)
        return out
    return [(u.local[lo:hi], g[lo:hi], m[lo:hi]) for lo, hi, _ in u.pieces]  # type: ignore


# NOTE: [Distributed NorMuon]
# NorMuon's v (state key "normuon_v", NOTE: [NorMuon state] in muon_ext/reference.py) is state
# of every rank, in the single-process layout: one flat float32 entry per row of each matrix.
# * Plain and replicated params (DDP owner mode): every rank holds all of v. The owners
#   orthogonalize their share and the all_gather hands every rank every O; then every rank
#   applies NorMuon to all of the bucket's replicated matrices (cheap: one pass, like the
#   update every rank applies anyway), so v is updated identically everywhere, without sending it.
# * FSDP2 params: v is a DTensor sharded like the param on its mesh dim, Shard(0) of the flat
#   (rows,) vector (torch.chunk sizes; for a 2-D Shard(0) weight exactly the rows of the shard).
#   Per bucket, one all_to_all (issued with the first one of U) carries each rank's chunks to
#   the params' owners, the owner applies NorMuon to the whole orthogonalized params with the
#   whole v, and one all_to_all (with the second one) returns the chunks. v stays out of the
#   buffer U, which muon_momentum_ writes contiguously.
# * Locally orthogonalized params: v is local too (a DTensor when the param is one).
# NorMuon runs between orthogonalize and update (muon_normuon_ on the CPU: the floats of
# muon_step_), so the update op is unchanged. Expert stacks sharded on the expert dim and the
# full_tensor() fallback are refused with NorMuon.
def _normuon_v(st: dict, u: _Unit) -> Tensor:
    """The param's NorMuon v (its local tensor for a DTensor), created as zeros on first use."""
    if u.v_local is None:
        u.v_local = _v_layout(u)
    size, placements = u.v_local
    v = st.get(NORMUON_STATE_KEY)
    if v is None:
        p = u.param
        local = torch.zeros(size, dtype=momentum_dtype(p), device=u.local.device)
        if placements is None:
            v = local
        else:
            from torch.distributed.tensor import DTensor

            v = DTensor.from_local(local, p.device_mesh, placements,  # type: ignore[attr-defined]
                                   run_check=False, shape=(u.v_numel,), stride=(1,))
        st[NORMUON_STATE_KEY] = v
    local = _local(v)
    if local.numel() != size:
        raise RuntimeError(
            f"Muon: {NORMUON_STATE_KEY} of param_groups[{u.group_index}]['params'][{u.pos}] has "
            f"{local.numel()} local entries on this rank, expected {size} (a DTensor like its "
            "param: load FSDP2 checkpoints through torch.distributed.checkpoint)"
        )
    return local


def _v_layout(u: _Unit) -> tuple[int, list | None]:
    """This rank's number of entries of a param's v, and its placements (None: a plain tensor):
    Shard(0) of the flat vector where the param is sharded, replicated where it is."""
    if u.placements is None:
        return u.v_numel, None
    from torch.distributed.tensor import Shard

    mesh = u.param.device_mesh  # type: ignore[attr-defined]
    size, placements = u.v_numel, []
    for k, pl in enumerate(u.placements):
        if pl.is_replicate():
            placements.append(pl)
        else:
            placements.append(Shard(0))
            size = _chunk_sizes(u.v_numel, mesh.size(k))[mesh.get_local_rank(k)]
    return size, placements


def _momentum(route: str, grads, bufs, sc: _Scalars, out: Tensor) -> None:
    if route == "ops":
        device = out.device
        ops.muon_momentum_(
            grads, bufs, sc.beta, sc.nesterov,
            None if sc.grad_scale is None else scalar_on(sc.grad_scale, device),
            None if sc.found_inf is None else scalar_on(sc.found_inf, device), out,
        )
    else:
        momentum_packed_(grads, bufs, sc.beta, sc.nesterov, sc.grad_scale, sc.found_inf, out)


def _orthogonalize(rt: _Runtime, route: str, x: Tensor, shapes: list[int], sc: _Scalars) -> None:
    if not shapes:
        return
    rt.stats.matrices += sum(shapes[k] for k in range(0, len(shapes), 3))
    if route == "ops":
        ops.muon_orthogonalize_(x, shapes, sc.flat, sc.eps, sc.ns_algorithm, sc.gram_restarts,
                                sc.workspace_limit, sc.ns_dtype)
    else:
        # Per segment shape, as the single-process pure-PyTorch step resolves it.
        algorithm = [
            resolve_ns_algorithm(sc.ns_algorithm, shapes[k + 1], shapes[k + 2], x.device.type)
            for k in range(0, len(shapes), 3)
        ]
        orthogonalize_packed_(x, shapes, sc.schedule, sc.eps, algorithm, sc.gram_restarts,
                              sc.ns_dtype)


def _normuon(route: str, x: Tensor, shapes: list[int], vs: list[Tensor], sc: _Scalars) -> None:
    """NorMuon on orthogonalized matrices packed in x (NOTE: [Distributed NorMuon])."""
    if not shapes:
        return
    if route == "ops" and x.device.type == "cpu":
        ops.muon_normuon_(
            x, shapes, vs, sc.normuon_beta2, sc.normuon_eps,
            None if sc.found_inf is None else scalar_on(sc.found_inf, x.device),
        )
        return
    # Elsewhere with ATen ops (the formula, not the fused kernels' floats); found_inf is not
    # read on the host: a set flag selects the old x and v.
    skip = None if sc.found_inf is None else scalar_on(sc.found_inf, x.device).reshape(()) != 0
    offset = 0
    for k, v in zip(range(0, len(shapes), 3), vs):
        batch, rows, cols = shapes[k : k + 3]
        seg = x[offset : offset + batch * rows * cols].view(batch, rows, cols)
        offset += seg.numel()
        if not seg.numel():
            continue
        v2 = v.view(batch, rows).clone()
        out = normuon_(seg, v2, sc.normuon_beta2, sc.normuon_eps)
        if skip is not None:
            out, v2 = torch.where(skip, seg, out), torch.where(skip, v.view(batch, rows), v2)
        seg.copy_(out)
        v.view(batch, rows).copy_(v2)


def _update(route: str, params, x: Tensor, scales: list[float], sc: _Scalars) -> None:
    if route == "ops":
        device = x.device
        ops.muon_update_(
            params, x, lr_tensor(sc.lr, device), sc.weight_decay, scales,
            None if sc.found_inf is None else scalar_on(sc.found_inf, device),
        )
    else:
        update_packed_(params, x, sc.lr, sc.weight_decay, scales, sc.found_inf)


def _copy_blocks(src: Tensor, dst: Tensor, blocks: list[int]) -> None:
    if extension_available():
        ops.muon_copy_blocks_(src, dst, blocks)
    else:
        copy_blocks_packed_(src, dst, blocks)


def _step_bucket(
    rt: _Runtime, b: _Bucket, lists: tuple[list, list, list], vs: list | None, sc: _Scalars
) -> None:
    """One bucket: NOTE: [Distributed step on the phase ops]. ``lists``: the (params, grads,
    momentum) the ops take, in order; ``vs``: each unit's v, by ``b.tables.order``."""
    t = b.tables
    if not t.order:
        return
    params, grads, bufs = lists
    buf_dtype = momentum_dtype(t.order[0].param)
    device = t.order[0].local.device
    u_buf = torch.empty(t.total, dtype=buf_dtype, device=device)
    _momentum(b.route, grads, bufs, sc, u_buf)
    n_local = len(t.order) - len(b.replicated) - len(b.sharded)
    v_sharded = sc.normuon and bool(t.v_send_splits)

    shard_part = u_buf[t.shard_range[0] : t.shard_range[1]]
    whole = None
    if b.sharded:  # all_to_all #1: every shard to its owner, reassembled there
        received = torch.empty(sum(t.recv_splits), dtype=buf_dtype, device=device)
        first = [_all_to_all_async(rt, received, shard_part, t.recv_splits, t.send_splits, b.pg,
                                   b.rank)]
        if v_sharded:  # NorMuon: each rank's chunks of v to the owners, alongside
            v_locals = vs[n_local + len(b.replicated) :]  # type: ignore[index]
            v_dtype = v_locals[0].dtype
            v_send = torch.cat(v_locals)
            v_recv = torch.empty(sum(t.v_recv_splits), dtype=v_dtype, device=device)
            first.append(_all_to_all_async(rt, v_recv, v_send, t.v_recv_splits, t.v_send_splits,
                                           b.pg, b.rank))
        for handle in first:
            handle.wait()
        whole = torch.empty(t.whole_numel, dtype=buf_dtype, device=device)
        _copy_blocks(received, whole, t.unpack_blocks)
        del received

    local_x = u_buf[: t.local_numel]
    _orthogonalize(rt, b.route, local_x, t.local_shapes, sc)
    if sc.normuon:
        _normuon(b.route, local_x, t.local_shapes, vs[:n_local], sc)  # type: ignore[index]
    own = u_buf[t.own_range[0] : t.own_range[1]]
    _orthogonalize(rt, b.route, own, t.own_shapes, sc)

    pending = []
    if b.sharded:
        _orthogonalize(rt, b.route, whole, t.whole_shapes, sc)
        if v_sharded:
            whole_v = torch.empty(sum(t.v_whole_sizes), dtype=v_dtype, device=device)
            _copy_blocks(v_recv, whole_v, t.v_unpack_blocks)
            _normuon(b.route, whole, t.whole_shapes, list(whole_v.split(t.v_whole_sizes)), sc)
        back = torch.empty(sum(t.send2_splits), dtype=buf_dtype, device=device)
        _copy_blocks(whole, back, t.pack_blocks)  # type: ignore[arg-type]
        # all_to_all #2: into the sharded part of the buffer (the send of #1 has completed).
        pending.append(_all_to_all_async(rt, shard_part, back, t.send_splits, t.send2_splits,
                                         b.pg, b.rank))
        if v_sharded:  # and the v chunks back to their ranks
            v_back = torch.empty(sum(t.v_recv_splits), dtype=v_dtype, device=device)
            _copy_blocks(whole_v, v_back, t.v_pack_blocks)
            pending.append(_all_to_all_async(rt, v_send, v_back, t.v_send_splits,
                                             t.v_recv_splits, b.pg, b.rank))
    if b.replicated:  # one all_gather: each rank contributes max(counts) matrix slots
        slot = b.m * b.n
        slots = max(b.counts)
        if b.counts[b.rank] == slots:
            send = own
        else:  # fewer matrices than the busiest owner: padding (at most one slot)
            send = torch.zeros(slots * slot, dtype=buf_dtype, device=device)
            send[: own.numel()].copy_(own)
        gathered = torch.empty(b.world * slots * slot, dtype=buf_dtype, device=device)
        pending.append(_all_gather_async(rt, gathered, send, b.pg))
    for handle in pending:
        handle.wait()
    if b.replicated:
        rep = u_buf[t.rep_range[0] : t.rep_range[1]]
        _copy_blocks(gathered, rep, t.gather_blocks)
        if sc.normuon:  # on every rank, for every matrix: v stays replicated
            reps = vs[n_local : n_local + len(b.replicated)]  # type: ignore[index]
            _normuon(b.route, rep, t.rep_shapes, reps, sc)
    if v_sharded:  # v_send received the updated chunks, in the order it sent them
        torch._foreach_copy_(v_locals, list(v_send.split([v.numel() for v in v_locals])))
    _update(b.route, params, u_buf, t.scales, sc)


def _step_gathered(rt: _Runtime, u: _Unit, tensors: tuple, sc: _Scalars) -> None:
    """An unrecognised DTensor layout: the whole update on every rank, keep the local slice."""
    p, g, m = tensors
    buf = torch.empty(m.numel(), dtype=m.dtype, device=m.device)
    _momentum(u.route, [g], [m], sc, buf)
    full = _full_tensor(u, buf.view(m.shape)).contiguous().view(-1)
    _orthogonalize(rt, u.route, full, [u.batch, u.rows, u.cols], sc)
    x = _local_slice(u, full.view(u.param.shape)).contiguous().view(-1)
    _update(u.route, [p], x, [u.scale], sc)


# ---------------------------------------------------------------------- packing tables


@dataclass
class _Tables:
    """A bucket's packed layout on this rank (made once per plan; NOTE: [Distributed step on
    the phase ops]). Offsets count elements of the buffer U of muon_momentum_."""

    order: list[_Unit] = field(default_factory=list)  # the ops' tensor order
    scales: list[float] = field(default_factory=list)
    total: int = 0
    local_numel: int = 0
    local_shapes: list[int] = field(default_factory=list)
    rep_range: tuple[int, int] = (0, 0)
    own_range: tuple[int, int] = (0, 0)
    own_shapes: list[int] = field(default_factory=list)
    gather_blocks: list[int] = field(default_factory=list)  # all_gather slots -> rep_range
    shard_range: tuple[int, int] = (0, 0)
    send_splits: list[int] = field(default_factory=list)  # elements to each rank (#1)
    recv_splits: list[int] = field(default_factory=list)  # elements from each rank (#1)
    whole_numel: int = 0
    whole_shapes: list[int] = field(default_factory=list)
    unpack_blocks: list[int] = field(default_factory=list)  # received -> whole params
    pack_blocks: list[int] = field(default_factory=list)  # whole params -> each rank's slices
    send2_splits: list[int] = field(default_factory=list)  # elements to each rank (#2)
    # NorMuon (NOTE: [Distributed NorMuon]): shapes of the replicated part, and for the sharded
    # units the v all_to_alls: chunks to owners and back, whole vectors on the owner.
    rep_shapes: list[int] = field(default_factory=list)
    v_send_splits: list[int] = field(default_factory=list)
    v_recv_splits: list[int] = field(default_factory=list)
    v_whole_sizes: list[int] = field(default_factory=list)  # per whole_shapes triple
    v_unpack_blocks: list[int] = field(default_factory=list)
    v_pack_blocks: list[int] = field(default_factory=list)


def _shard_block(u: _Unit, rank: int) -> tuple[int, int, int, int]:
    """Rank ``rank``'s shard of ``u`` inside the whole param (contiguous, param-shaped) as a 2-D
    block: (offset, stride, rows, width); the shard itself is that block, contiguous."""
    shape = list(u.param.shape)
    d = u.shard_dim
    outer = math.prod(shape[:d])
    inner = math.prod(shape[d + 1 :])
    start = sum(u.chunks[:rank])
    return start * inner, shape[d] * inner, outer, u.chunks[rank] * inner


def _shard_blocks(u: _Unit, rank: int) -> list[tuple[int, ...]]:
    """How rank ``rank``'s packed shard of ``u`` maps into the owner's whole buffer: 2-D blocks
    (shard offset, shard stride, whole offset, whole stride, rows, width). The whole buffer is
    the param-shaped tensor, or with column blocks the blocks one after another, each a
    contiguous (heads, rows, w) stack, and the shard is packed as its column pieces in order
    (NOTE: [Distributed matrix blocks])."""
    if u.column_blocks is None:
        off, stride, rows, width = _shard_block(u, rank)
        return [(0, width, off, stride, rows, width)] if rows * width else []
    total_rows, total_cols = u.param.shape
    start = sum(u.chunks[:rank])
    r0, nr, c0, c1 = 0, total_rows, 0, total_cols
    if u.shard_dim == 0:
        r0, nr = start, u.chunks[rank]
    else:
        c0, c1 = start, start + u.chunks[rank]
    out, piece = [], 0
    for blk in u.column_blocks:
        a, z = max(c0, blk.start), min(c1, blk.start + blk.size)
        if a >= z:
            continue
        w = blk.size // blk.heads
        for h in range(blk.heads):
            x0, x1 = max(a, blk.start + h * w), min(z, blk.start + (h + 1) * w)
            if x0 < x1 and nr:
                out.append((piece + x0 - a, z - a,
                            total_rows * blk.start + (h * total_rows + r0) * w
                            + x0 - blk.start - h * w, w, nr, x1 - x0))
        piece += nr * (z - a)
    return out


def _make_tables(b: _Bucket) -> _Tables:
    t = _Tables()
    local = [u for u in b.local if u.kind == _LOCAL and u.local_batch]
    sharded = [u for s in range(b.world) for u, o in zip(b.sharded, b.owners) if o == s]
    t.order = local + b.replicated + sharded
    t.scales = [
        s for u in t.order for s in ([u.scale] if u.pieces is None else [x[2] for x in u.pieces])
    ]
    offset = 0
    for u in local:
        t.local_shapes += [u.local_batch, u.rows, u.cols]
        offset += u.local_batch * u.rows * u.cols
    t.local_numel = offset
    slot = b.m * b.n
    if b.replicated:
        rep_start = offset
        offset += sum(u.batch for u in b.replicated) * slot
        t.rep_range = (rep_start, offset)
        for u in b.replicated:
            t.rep_shapes += [u.batch, u.rows, u.cols]
        lo, count = b.starts[b.rank], b.counts[b.rank]
        t.own_range = (rep_start + lo * slot, rep_start + (lo + count) * slot)
        first = 0
        for u in b.replicated:  # this rank's matrices [lo, lo + count) of the concatenation
            a, z = max(lo, first), min(lo + count, first + u.batch)
            if a < z:
                t.own_shapes += [z - a, u.rows, u.cols]
            first += u.batch
        slots = max(b.counts)
        for r in range(b.world):
            t.gather_blocks += [r * slots * slot, 0, b.starts[r] * slot, 0, 1, b.counts[r] * slot]
    shard_start = offset
    mine = [u for u, o in zip(b.sharded, b.owners) if o == b.rank]
    for u in sharded:
        offset += u.local_numel(b.rank)
    t.shard_range = (shard_start, offset)
    t.total = offset
    if b.sharded:
        t.send_splits = [
            sum(u.local_numel(b.rank) for u, o in zip(b.sharded, b.owners) if o == r)
            for r in range(b.world)
        ]
        t.recv_splits = [sum(u.local_numel(s) for u in mine) for s in range(b.world)]
        bases, base = [], 0
        for u in mine:
            bases.append(base)
            for shape in u.shapes:
                t.whole_shapes += shape
                t.v_whole_sizes.append(shape[0] * shape[1])
            base += u.param.numel()
        t.whole_numel = base
        src = 0
        for s in range(b.world):  # received: per source rank, its shard of each unit I own
            for u, whole_base in zip(mine, bases):
                for so, ss, wo, ws, rows, width in _shard_blocks(u, s):
                    t.unpack_blocks += [src + so, ss, whole_base + wo, ws, rows, width]
                src += u.local_numel(s)
        dst = 0
        t.send2_splits = []
        for r in range(b.world):  # to each rank, its shard of each unit I own
            start = dst
            for u, whole_base in zip(mine, bases):
                for so, ss, wo, ws, rows, width in _shard_blocks(u, r):
                    t.pack_blocks += [whole_base + wo, ws, dst + so, ss, rows, width]
                dst += u.local_numel(r)
            t.send2_splits.append(dst - start)
        if any(u.v_numel for u in b.sharded):
            _v_tables(t, b, mine)
    return t


def _v_tables(t: _Tables, b: _Bucket, mine: list[_Unit]) -> None:
    """The NorMuon v all_to_alls of a bucket's sharded units: each rank's chunk of every v (a
    Shard(0) of the flat vector) to the unit's owner, whole there, and back."""

    def chunk(u: _Unit, r: int) -> tuple[int, int]:  # (start, size) of rank r's chunk of u's v
        sizes = _chunk_sizes(u.v_numel, b.world)
        return sum(sizes[:r]), sizes[r]

    t.v_send_splits = [
        sum(chunk(u, b.rank)[1] for u, o in zip(b.sharded, b.owners) if o == r)
        for r in range(b.world)
    ]
    t.v_recv_splits = [sum(chunk(u, s)[1] for u in mine) for s in range(b.world)]
    bases, base = [], 0
    for u in mine:
        bases.append(base)
        base += u.v_numel
    src = 0
    for s in range(b.world):
        for u, v_base in zip(mine, bases):
            start, size = chunk(u, s)
            if size:
                t.v_unpack_blocks += [src, size, v_base + start, size, 1, size]
            src += size
    dst = 0
    for r in range(b.world):
        for u, v_base in zip(mine, bases):
            start, size = chunk(u, r)
            if size:
                t.v_pack_blocks += [v_base + start, size, dst, size, 1, size]
            dst += size


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
    """A DTensor's local tensor (its attribute: to_local() costs microseconds per call, a step
    asks for three per param), or the tensor itself."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    """_local of each (a list comprehension with no call per plain tensor)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return tensors
    return [t._local_tensor if isinstance(t, dtensor) else t for t in tensors]


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


def _host_group(rt: _Runtime, pg: Any) -> Any:
    """The group that carries the per-step header: ``pg`` itself under gloo, else a gloo group
    over the same ranks, made once (only by those ranks), so that the header, host facts, is
    a CPU tensor and reading it back is no device sync."""
    import torch.distributed as dist

    if str(dist.get_backend(pg)) == "gloo":
        return pg
    group = rt.host_groups.get(id(pg))
    if group is None:
        group = dist.new_group(
            dist.get_process_group_ranks(pg), backend="gloo", use_local_synchronization=True
        )
        rt.host_groups[id(pg)] = group
    return group


def _comm_device(pg: Any, units: list[_Unit]) -> torch.device:
    """Where the one-time replication check's sums live: the CPU for gloo, else the params'
    (or the current) device."""
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


_NONE_MISSING = _hash([])  # the header's "which grads are missing" when none is
