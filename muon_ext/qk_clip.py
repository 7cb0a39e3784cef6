"""QK-Clip (Kimi K2's MuonClip): keep attention logits bounded by rescaling W_q / W_k after a step.

During the forward pass each registered attention layer keeps, per query head, the largest
pre-softmax logit ``S_h = max scale * q_h . k`` seen since the last optimizer step (over
micro-batches, batch, query and attended key positions). ``QKClip.apply()`` (after
``optimizer.step()``) MAX-all-reduces those maxima when ``torch.distributed`` is initialised,
and for every head with ``S_h > tau`` rescales that head's query/key projection rows so its
logits shrink by exactly ``gamma_h = tau / S_h``; every other head, and V, stays bit-identical.

Everything stays on the device: recording is a detached ``amax`` folded into a running
maximum with ``torch.maximum(..., out=...)``, and ``apply`` computes the factors as tensors and
selects rows with ``torch.where``; nothing reads a value back to the host.

Layouts (rows of the projection weights, as ``nn.Linear`` stores them: ``[out, in]``):

* MHA / GQA / MQA (``QKClip.add``): W_q ``[H * D, d]``, W_k ``[H_kv * D, d]``, query head ``h``
  reads key head ``h // (H / H_kv)`` (``repeat_interleave`` order, as SDPA's ``enable_gqa``).
* MLA (``QKClip.add_mla``, DeepSeek-V3 / Kimi K2): W_q (or the q up-projection)
  ``[H * (d_nope + d_rope), r_q]``, per head the non-rotary rows then the rotary rows; W_kv
  (the kv up-projection) ``[H * (d_nope + d_v), r_kv]``, per head the non-rotary key rows then
  the value rows. The shared rotary key comes from the down-projection and is never touched.
  With grouped keys (``num_kv_heads``) W_kv has ``H_kv`` row blocks and the GQA rule below
  applies to the non-rotary rows.

Sharded weights (FSDP2 ``fully_shard``, DTensor ``Shard(0)``): after the all-reduce every rank
builds the same per-row factors for the whole weight and applies the slice of its own shard,
found from the placements with ``torch.chunk``'s rule (``_dim0_local_range``).

NOTE: [GQA: which side absorbs gamma]
Kimi K2 splits ``gamma_h`` evenly: ``sqrt(gamma_h)`` on the head's q rows and on its k rows. Under
GQA a key head is shared by ``G = H / H_kv`` query heads, so an even split is only possible
for one gamma per group. With the per-head gammas ``g_1..g_G`` of a group we scale the
shared key rows by ``kappa = sqrt(max_i g_i)`` and query head ``i`` by ``g_i / kappa``
(computed as ``sqrt(g_i) * (sqrt(g_i) / kappa)``). Then

* every head's logits shrink by exactly its own ``g_i`` (its post-clip maximum is ``tau`` on
  the same batch), no head is clipped harder than Kimi's per-head rule asks;
* a group with a head at or below ``tau`` has ``kappa = 1``: its key rows and the rows of its
  unclipped query heads stay bit-identical, and so do those heads' logits;
* no factor exceeds 1 (``g_i <= max g = kappa**2`` gives ``g_i / kappa <= kappa <= 1``), so no
  weight ever grows;
* with ``G = 1`` (plain MHA) it is exactly Kimi's ``sqrt(gamma)`` on both sides.

The alternative often seen, ``sqrt(min_i g_i)`` on the key, bounds the logits too but
shrinks every other head of the group (under ``tau`` included) by the worst head's factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .optim import Muon

__all__ = ["MuonClip", "QKClip", "QKClipLayer"]

# Logit elements computed at once while recording; bounds the transient memory of the max pass.
_CHUNK_ELEMENTS = 1 << 25

_NEG_INF = float("-inf")

Source = Tensor | nn.Linear
_Getter = Callable[[], Tensor]


class _Rows:
    """Rows ``[start, start + count)`` along dim 0 of the tensor ``get()`` returns (all if
    ``count`` is None); read at every use, so a module's parameter swap is followed.

    Calling it gives those rows as a tensor (for recording and the shape checks). ``apply``
    writes through ``get()`` itself with the row offset, because a row slice of a DTensor is
    a new tensor, not a view of the shard.
    """

    def __init__(self, get: _Getter, start: int = 0, count: int | None = None) -> None:
        self.get, self.start, self.count = get, start, count

    def __call__(self) -> Tensor:
        t = self.get()
        return t if self.count is None else t[self.start : self.start + self.count]

    def rows(self) -> int:
        return self.get().shape[0] if self.count is None else self.count


_MHA_ARG_NAMES = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


class QKClipLayer:
    """One attention layer under QK-Clip: where its heads' W_q / W_k rows live, and its maxima.

    Created by ``QKClip.add`` / ``add_mla`` / ``add_multihead_attention``; not constructed directly.

    Attributes:
        name: the layer's name (for logs).
        num_heads: query heads; ``max_logit`` has this many entries.
        num_kv_heads: key heads (``num_heads`` for MHA and MLA without grouped keys).
        max_logit: running per-head maximum since the last ``apply`` (float32, on the device of
            the recorded queries; ``None`` before the first record); ``-inf`` when nothing was
            seen. Detached: recording never enters the autograd graph.
        last_max_logit: the maxima the last ``apply`` used (after the all-reduce), or ``None``.
        last_gamma: the per-head logit factor the last ``apply`` used (1 where untouched).
    """

    def __init__(
        self,
        clip: QKClip,
        name: str,
        kind: str,
        num_heads: int,
        num_kv_heads: int,
        q_weight: _Rows,
        k_weight: _Rows,
        q_bias: _Rows | None = None,
        k_bias: _Rows | None = None,
        mla_dims: tuple[int, int, int] | None = None,
    ) -> None:
        self._clip = clip
        self.name = name
        self.kind = kind
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self._q_weight, self._k_weight = q_weight, k_weight
        self._q_bias, self._k_bias = q_bias, k_bias
        self._mla_dims = mla_dims
        self._hooks: list[RemovableHandle] = []
        self.max_logit: Tensor | None = None
        self.last_max_logit: Tensor | None = None
        self.last_gamma: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"QKClipLayer(name={self.name!r}, kind={self.kind!r}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads})"
        )

    # ------------------------------------------------------------------ recording

    def attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """Drop-in for ``F.scaled_dot_product_attention`` that also records the max logits.

        Same arguments and result; the output comes from SDPA itself (flash / memory-efficient
        kernels stay available). The maxima are taken in a separate detached pass over the
        logits, chunked over query positions so its memory stays bounded.
        """
        extra = {"enable_gqa": True} if enable_gqa else {}
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **extra,
        )
        # After SDPA, so a call it rejects (e.g. GQA shapes without enable_gqa) records nothing.
        self.record(query, key, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return out

    def record(
        self,
        query: Tensor,
        key: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> None:
        """Folds the per-head max of ``scale * query @ key^T`` into ``max_logit``; no output.

        For attention code that keeps its own kernel (flash-attn, a fused op): call this with the
        queries and keys that kernel sees, in SDPA layout ``(..., heads, seq, dim)`` (a
        ``transpose(1, 2)`` of ``(batch, seq, heads, dim)`` is a free view). ``key`` may have
        fewer heads (GQA) or all of them (already repeated). Masks follow SDPA: a bool
        ``attn_mask`` is True where attention is allowed; a float mask is additive and its
        ``-inf`` positions are excluded (its finite values are not added: they are not
        produced by W_q / W_k, so clipping could not bound them). ``is_causal`` is top-left
        aligned, as in SDPA. Skipped when grad mode is off, unless
        ``QKClip(record_in_no_grad=True)``.
        """
        if not self._clip._recording():
            return
        with torch.no_grad():
            self._fold(
                _max_logits(
                    query.detach(), key.detach(), attn_mask, is_causal, scale, self.num_heads
                )
            )

    def record_logits(self, logits: Tensor) -> None:
        """Folds the per-head max of already computed logits ``(..., heads, q_len, k_len)``.

        For eager attention that materialises the scores: pass them *before* an additive mask
        (or with masked positions at ``-inf``).
        """
        if not self._clip._recording():
            return
        if logits.dim() < 3 or logits.shape[-3] != self.num_heads:
            raise ValueError(
                f"QKClip layer {self.name!r}: logits of shape {tuple(logits.shape)} do not have "
                f"{self.num_heads} heads at dim -3"
            )
        if logits.numel() == 0:
            return
        with torch.no_grad():
            dims = tuple(i for i in range(logits.dim()) if i != logits.dim() - 3)
            self._fold(logits.detach().amax(dim=dims))

    def _fold(self, head_max: Tensor | None) -> None:
        if head_max is None:
            return
        head_max = head_max.to(torch.float32)
        if self.max_logit is None or self.max_logit.device != head_max.device:
            self.max_logit = torch.full_like(head_max, _NEG_INF)
        torch.maximum(self.max_logit, head_max, out=self.max_logit)

    def reset(self) -> None:
        """Forgets the maxima recorded since the last step."""
        if self.max_logit is not None:
            self.max_logit.fill_(_NEG_INF)

    def remove(self) -> None:
        """Removes the layer from its ``QKClip`` (and any forward hook it installed)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._clip.layers = [layer for layer in self._clip.layers if layer is not self]

    # ------------------------------------------------------------------ clipping

    def _row_factors(self, gamma: Tensor) -> list[tuple[_Rows | None, int, Tensor]]:
        """(rows, heads they are split into, per-head-row factor ``[heads, rows or 1]``)."""
        sqrt_gamma = gamma.sqrt()
        group = self.num_heads // self.num_kv_heads
        # NOTE: [GQA: which side absorbs gamma] in the module docstring (MLA: the non-rotary
        # part; with one key head per query head, kappa = sqrt(gamma) and q gets sqrt(gamma)).
        k = sqrt_gamma.view(self.num_kv_heads, group).amax(dim=1, keepdim=True)
        q = sqrt_gamma * (sqrt_gamma / k.expand(self.num_kv_heads, group).reshape(-1))
        q = q[:, None]
        if self.kind == "mla":
            d_nope, d_rope, d_v = self._mla_dims  # type: ignore[misc]
            heads, kv_heads = self.num_heads, self.num_kv_heads
            q = torch.cat([q.expand(heads, d_nope), gamma[:, None].expand(heads, d_rope)], dim=1)
            ones = torch.ones_like(k)
            kv = torch.cat([k.expand(kv_heads, d_nope), ones.expand(kv_heads, d_v)], dim=1)
            return [(self._q_weight, heads, q), (self._k_weight, kv_heads, kv)]
        return [
            (self._q_weight, self.num_heads, q),
            (self._q_bias, self.num_heads, q),
            (self._k_weight, self.num_kv_heads, k),
            (self._k_bias, self.num_kv_heads, k),
        ]

    def _apply_gamma(self, gamma: Tensor) -> None:
        for rows, heads, factor in self._row_factors(gamma):
            if rows is not None:
                per_row = factor.expand(heads, rows.rows() // heads).reshape(-1)
                _scale_rows_(rows.get(), rows.start, per_row)


class QKClip:
    """QK-Clip: per-head max attention logits recorded in the forward pass, clipped after the step.

    >>> clip = QKClip(tau=100.0)
    >>> attn.qk = clip.add(attn.q_proj, attn.k_proj, num_heads=8, num_kv_heads=2)  # doctest: +SKIP
    >>> # in attn.forward: out = self.qk.attention(q, k, v, is_causal=True)  (SDPA's signature)
    >>> clip.attach(optimizer)  # apply() after every optimizer.step()       # doctest: +SKIP

    Args:
        tau: the logit bound (Kimi K2 uses 100).
        process_group: the group whose ranks see different data for the same weights (data /
            context parallel); the maxima are MAX-all-reduced over it in ``apply`` when
            ``torch.distributed`` is initialised. ``None``: the default group. Under tensor
            parallelism register each rank's local heads and pass the data-parallel group.
        record_in_no_grad: also record forwards run with grad mode off. By default evaluation
            under ``torch.no_grad()`` / ``inference_mode`` does not count toward the next step.

    Weights may be whole on every rank (DDP, ZeRO-1) or FSDP2 ``fully_shard`` DTensors
    (``Shard(0)``, also inside an HSDP mesh): each rank then rescales the rows of its own
    shard, each row by the factor of the head its global row belongs to (a shard may split a
    head), with no gather and no collective besides the maxima's all-reduce. Register them
    with global ``num_heads``; the maxima must cover all heads on each rank, as they do under
    FSDP2 (the forward runs on the gathered weights). Row slices of a DTensor are copies, so
    pass whole ``nn.Linear`` modules or parameters, not slices, when they are sharded (packed
    ``nn.MultiheadAttention`` weights are handled). FSDP1 flat parameters are not supported.
    Tensors passed directly are held as given: register after moving the model to its device
    and after ``fully_shard`` (``nn.Linear`` / ``nn.MultiheadAttention`` are read at each
    apply, so they may be registered before).
    """

    def __init__(
        self,
        tau: float = 100.0,
        *,
        process_group: Any = None,
        record_in_no_grad: bool = False,
    ) -> None:
        if (
            isinstance(tau, bool)
            or not isinstance(tau, (int, float))
            or not (math.isfinite(tau) and tau > 0)
        ):
            raise ValueError(f"QKClip: tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)
        self.process_group = process_group
        self.record_in_no_grad = bool(record_in_no_grad)
        self.layers: list[QKClipLayer] = []

    def __repr__(self) -> str:
        return f"QKClip(tau={self.tau}, layers={len(self.layers)})"

    def _recording(self) -> bool:
        return self.record_in_no_grad or torch.is_grad_enabled()

    def _name(self, name: str | None) -> str:
        return name if name is not None else f"layer{len(self.layers)}"

    # ------------------------------------------------------------------ registration

    def add(
        self,
        q_proj: Source,
        k_proj: Source,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        q_bias: Tensor | None = None,
        k_bias: Tensor | None = None,
        name: str | None = None,
    ) -> QKClipLayer:
        """Registers a multi-head (MHA), grouped-query (GQA) or multi-query (MQA) attention layer.

        ``q_proj`` / ``k_proj``: ``nn.Linear`` modules (their bias, if any, is scaled with the
        weight) or weight tensors ``[heads * head_dim, ...]`` (e.g. row slices of a fused QKV
        weight, with ``q_bias`` / ``k_bias`` slices of its bias). Returns the layer handle whose
        ``attention`` / ``record`` the forward pass calls.
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive_int(num_heads, "num_heads")
        _check_positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"QKClip.add: num_heads ({num_heads}) must be a multiple of "
                f"num_kv_heads ({num_kv_heads})"
            )
        q_w, q_b = _weight_and_bias(q_proj, q_bias, "q_proj")
        k_w, k_b = _weight_and_bias(k_proj, k_bias, "k_proj")
        q_rows = _check_rows(q_w(), num_heads, None, "q_proj weight")
        k_rows = _check_rows(k_w(), num_kv_heads, None, "k_proj weight")
        if q_rows != k_rows:
            raise ValueError(
                f"QKClip.add: q head dim {q_rows} != k head dim {k_rows} "
                f"({num_heads} q heads, {num_kv_heads} kv heads)"
            )
        if q_b is not None:
            _check_rows(q_b(), num_heads, q_rows, "q bias")
        if k_b is not None:
            _check_rows(k_b(), num_kv_heads, k_rows, "k bias")
        layer = QKClipLayer(
            self, self._name(name), "mha", num_heads, num_kv_heads, q_w, k_w, q_b, k_b
        )
        self.layers.append(layer)
        return layer

    def add_mla(
        self,
        q_proj: Source,
        kv_proj: Source,
        *,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int = 0,
        num_kv_heads: int | None = None,
        name: str | None = None,
    ) -> QKClipLayer:
        """Registers a multi-head latent attention layer (DeepSeek-V3 / Kimi K2 layout).

        ``q_proj``: W_q or the q up-projection, per head ``qk_nope_head_dim`` non-rotary rows then
        ``qk_rope_head_dim`` rotary rows. ``kv_proj``: the kv up-projection, per head
        ``qk_nope_head_dim`` key rows then ``v_head_dim`` value rows (``v_head_dim=0`` for a
        key-only projection). A clipped head's non-rotary q and k rows are scaled by
        ``sqrt(gamma)``, its rotary q rows by ``gamma``; value rows and the shared rotary key
        (not passed here) are untouched. Biases are not supported (MLA has none).

        ``num_kv_heads``: grouped keys, where ``num_heads / num_kv_heads`` query heads share one
        non-rotary key / value head (``kv_proj`` then has ``num_kv_heads`` row blocks; query
        head ``h`` reads key head ``h // group``). The GQA rule applies to the non-rotary part:
        key rows by ``kappa = sqrt(max gamma of the group)``, the head's non-rotary q rows by
        ``gamma_h / kappa``, its rotary q rows by ``gamma_h`` (the rotary key is shared by
        all heads and never scaled). Every head's logits shrink by exactly its own
        ``gamma_h``, no factor exceeds 1, and ``num_kv_heads = num_heads`` is the rule above.
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive_int(num_heads, "num_heads")
        _check_positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"QKClip.add_mla: num_heads ({num_heads}) must be a multiple of "
                f"num_kv_heads ({num_kv_heads})"
            )
        _check_positive_int(qk_nope_head_dim, "qk_nope_head_dim")
        _check_positive_int(qk_rope_head_dim, "qk_rope_head_dim")
        if not isinstance(v_head_dim, int) or isinstance(v_head_dim, bool) or v_head_dim < 0:
            raise ValueError(f"QKClip.add_mla: v_head_dim must be an int >= 0, got {v_head_dim!r}")
        for what, proj in (("q_proj", q_proj), ("kv_proj", kv_proj)):
            if isinstance(proj, nn.Linear) and proj.bias is not None:
                raise ValueError(
                    f"QKClip.add_mla: {what} has a bias, which MLA layouts do not have"
                )
        q_w, _ = _weight_and_bias(q_proj, None, "q_proj")
        kv_w, _ = _weight_and_bias(kv_proj, None, "kv_proj")
        _check_rows(q_w(), num_heads, qk_nope_head_dim + qk_rope_head_dim, "q_proj weight")
        _check_rows(kv_w(), num_kv_heads, qk_nope_head_dim + v_head_dim, "kv_proj weight")
        layer = QKClipLayer(
            self,
            self._name(name),
            "mla",
            num_heads,
            num_kv_heads,
            q_w,
            kv_w,
            mla_dims=(qk_nope_head_dim, qk_rope_head_dim, v_head_dim),
        )
        self.layers.append(layer)
        return layer

    def add_multihead_attention(
        self, module: nn.MultiheadAttention, *, name: str | None = None
    ) -> QKClipLayer:
        """Registers a ``torch.nn.MultiheadAttention`` with no change to the model's code.

        A forward pre-hook recomputes the module's q/k projections and records the max logits
        (masks honoured: ``attn_mask`` and ``key_padding_mask``, bool True = not allowed, as the
        module defines them). That costs one extra q/k projection and ``q @ k^T`` per call,
        outside the autograd graph. ``add_bias_kv`` modules are rejected (the learned key bias
        is not a row of W_k, so clipping could not bound its logits).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                "QKClip.add_multihead_attention: expected nn.MultiheadAttention, "
                f"got {type(module).__name__}"
            )
        if module.bias_k is not None:
            raise ValueError("QKClip.add_multihead_attention: add_bias_kv=True is not supported")
        e = module.embed_dim
        # Row windows of the packed weight, not slices: under FSDP2 the weight is a DTensor
        # between steps, and slicing one copies.
        if module._qkv_same_embed_dim:
            q_w = _Rows(lambda: module.in_proj_weight, 0, e)
            k_w = _Rows(lambda: module.in_proj_weight, e, e)
        else:
            q_w, k_w = _Rows(lambda: module.q_proj_weight), _Rows(lambda: module.k_proj_weight)
        q_b = k_b = None
        if module.in_proj_bias is not None:
            q_b = _Rows(lambda: module.in_proj_bias, 0, e)
            k_b = _Rows(lambda: module.in_proj_bias, e, e)
        for t in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight):
            if t is not None:
                _dim0_local_range(t)  # refuses unsupported shardings now, not at apply
        heads = module.num_heads
        layer = QKClipLayer(self, self._name(name), "mha", heads, heads, q_w, k_w, q_b, k_b)
        layer._hooks.append(
            module.register_forward_pre_hook(_MultiheadAttentionRecorder(layer), with_kwargs=True)
        )
        self.layers.append(layer)
        return layer

    # ------------------------------------------------------------------ the clip

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Runs ``apply()`` after every ``optimizer.step()`` (a step post-hook); any optimizer.

        Hooks are not pickled with the optimizer: attach again after unpickling.
        """
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    def reset(self) -> None:
        """Forgets every layer's maxima (e.g. after a skipped or rolled-back step)."""
        for layer in self.layers:
            layer.reset()

    @torch.no_grad()
    def apply(self) -> None:
        """Clips every registered layer, then resets the maxima. Call after ``optimizer.step()``.

        For each head with max logit ``S > tau``: ``gamma = tau / S`` and the head's logits are
        scaled by exactly ``gamma`` (see the module docstring for the row factors). Heads with
        ``S <= tau`` (including ``S <= 0`` and heads never recorded), non-finite ``S`` (an
        overflowed forward, usually a step AMP skips) and the value projections are left
        bit-identical. No host synchronisation.
        """
        layers = self.layers
        if not layers:
            return
        device = _local(layers[0]._q_weight.get()).device
        maxima = [
            layer.max_logit.to(device)
            if layer.max_logit is not None
            else torch.full((layer.num_heads,), _NEG_INF, device=device)
            for layer in layers
        ]
        flat = torch.cat(maxima)
        # A NaN maximum counts as "nothing seen", so it cannot reach other ranks' factors.
        flat = torch.where(flat.isnan(), _NEG_INF, flat)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        clipped = flat.isfinite() & (flat > self.tau)
        # The clamp keeps the division away from S <= 0; torch.where then discards those lanes.
        gamma = torch.where(clipped, self.tau / flat.clamp(min=self.tau), 1.0)
        sizes = [layer.num_heads for layer in layers]
        for layer, s, g in zip(layers, flat.split(sizes), gamma.split(sizes)):
            layer._apply_gamma(g)
            layer.last_max_logit, layer.last_gamma = s, g
            layer.reset()


class MuonClip(Muon):
    """``muon_ext.Muon`` that runs ``qk_clip.apply()`` after every step (Kimi K2's MuonClip).

    Same arguments as ``Muon`` plus the keyword-only ``qk_clip``. For ``MuonWithAdamW`` or any
    other optimizer use ``qk_clip.attach(optimizer)``, which this class does for itself.
    """

    def __init__(self, params: Any, *args: Any, qk_clip: QKClip, **kwargs: Any) -> None:
        if not isinstance(qk_clip, QKClip):
            raise TypeError(f"MuonClip: qk_clip must be a QKClip, got {type(qk_clip).__name__}")
        super().__init__(params, *args, **kwargs)
        self.qk_clip = qk_clip
        # A post-hook rather than overriding step(): Optimizer wraps step() to run hooks, and a
        # wrapped override calling a wrapped super().step() would run every hook twice.
        self._qk_clip_handle = qk_clip.attach(self)


# ---------------------------------------------------------------------- helpers


def _max_logits(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    num_heads: int,
) -> Tensor | None:
    """Per-head max of ``scale * q @ k^T`` over batch, query and allowed key positions."""
    if query.dim() < 3 or key.dim() != query.dim():
        raise ValueError(
            f"QKClip: query {tuple(query.shape)} and key {tuple(key.shape)} must both be "
            "(..., heads, seq, dim)"
        )
    heads, q_len, dim = query.shape[-3:]
    kv_heads, k_len = key.shape[-3], key.shape[-2]
    if heads != num_heads:
        raise ValueError(f"QKClip: query has {heads} heads at dim -3, the layer has {num_heads}")
    if kv_heads == 0 or heads % kv_heads or key.shape[-1] != dim:
        raise ValueError(
            f"QKClip: key {tuple(key.shape)} does not fit query {tuple(query.shape)} "
            "(heads must divide the query's, same head dim)"
        )
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape:
        raise ValueError(
            f"QKClip: query batch dims {tuple(batch_shape)} != key's {tuple(key.shape[:-3])}"
        )
    if query.numel() == 0 or k_len == 0:
        return None
    q = query.reshape(-1, heads, q_len, dim)
    k = key.reshape(-1, kv_heads, k_len, dim).transpose(-1, -2)
    batch, group = q.shape[0], heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    mask = attn_mask
    if mask is not None and (query.dim() != 4 or mask.dim() > 4):
        mask = mask.expand(*batch_shape, heads, q_len, k_len).reshape(batch, heads, q_len, k_len)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != _NEG_INF

    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * k_len))
    result = None
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        chunk = q[:, :, start:stop].reshape(batch, kv_heads, group * (stop - start), dim)
        logits = torch.matmul(chunk, k).view(batch, heads, stop - start, k_len)
        logits.mul_(scale)
        allowed = None
        if mask is not None:
            allowed = (
                mask[..., start:stop, :] if mask.dim() >= 2 and mask.shape[-2] == q_len else mask
            )
        if is_causal:
            causal = torch.arange(k_len, device=q.device) <= torch.arange(
                start, stop, device=q.device
            ).unsqueeze(1)
            allowed = causal if allowed is None else allowed & causal
        if allowed is not None:
            logits = logits.masked_fill(~allowed, _NEG_INF)
        head_max = logits.amax(dim=(0, 2, 3))
        result = head_max if result is None else torch.maximum(result, head_max)
    return result


class _MultiheadAttentionRecorder:
    """Forward pre-hook of an ``nn.MultiheadAttention``: records its max logits."""

    def __init__(self, layer: QKClipLayer) -> None:
        self.layer = layer

    def __call__(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        layer = self.layer
        if not layer._clip._recording():
            return
        bound = dict(zip(_MHA_ARG_NAMES, args))
        bound.update(kwargs)
        query, key = bound["query"], bound["key"]
        attn_mask, padding = bound.get("attn_mask"), bound.get("key_padding_mask")
        with torch.no_grad():
            if query.dim() == 2:  # unbatched: (L, E)
                q_in, k_in = query.unsqueeze(0), key.unsqueeze(0)
            elif module.batch_first:
                q_in, k_in = query, key
            else:
                q_in, k_in = query.transpose(0, 1), key.transpose(0, 1)
            batch, q_len, k_len = q_in.shape[0], q_in.shape[1], k_in.shape[1]
            heads, head_dim = module.num_heads, module.head_dim
            q_b = layer._q_bias() if layer._q_bias is not None else None
            k_b = layer._k_bias() if layer._k_bias is not None else None
            q = F.linear(q_in, layer._q_weight(), q_b).view(batch, q_len, heads, head_dim)
            k = F.linear(k_in, layer._k_weight(), k_b).view(batch, k_len, heads, head_dim)
            allowed = None
            if attn_mask is not None:
                allowed = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask != _NEG_INF
                if allowed.dim() == 3:  # (batch * heads, L, S)
                    allowed = allowed.view(batch, heads, q_len, k_len)
            if padding is not None:
                keep = ~padding if padding.dtype == torch.bool else padding != _NEG_INF
                keep = keep.view(batch, 1, 1, k_len)
                allowed = keep if allowed is None else allowed & keep
            layer._fold(
                _max_logits(q.transpose(1, 2), k.transpose(1, 2), allowed, False, None, heads)
            )


def _scale_rows_(t: Tensor, start: int, factor: Tensor) -> None:
    """``t[start + i] *= factor[i]`` in place, for the rows of ``t`` this rank holds.

    ``t`` is a plain tensor or a DTensor (FSDP2 ``fully_shard`` shards dim 0 with
    ``torch.chunk`` sizes): then only the local shard is written, each local row scaled by the
    factor of its global row; a shard may start or end inside a head, or be empty. No
    collective, no host synchronisation (the row ranges come from shapes).

    Rows whose factor is exactly 1 are selected unchanged by ``torch.where`` rather than
    multiplied, so they stay bit-identical whatever the float environment (flush-to-zero
    would otherwise turn a subnormal times 1.0 into 0).
    """
    local = _local(t).detach()
    first, held = _dim0_local_range(t)
    lo, hi = max(start, first), min(start + factor.shape[0], first + held)
    if lo >= hi:
        return
    rows = local[lo - first : hi - first]
    f = factor[lo - start : hi - start].to(rows.device)
    f = f.reshape(f.shape + (1,) * (rows.dim() - 1))
    compute = torch.promote_types(rows.dtype, torch.float32)
    wide = rows.to(compute)
    rows.copy_(torch.where(f == 1.0, wide, wide * f.to(compute)))


def _is_dtensor(t: Tensor) -> bool:
    return any(c.__name__ == "DTensor" for c in type(t).__mro__)


def _local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (``to_local``, a view), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _chunk_range(size: int, chunks: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` when ``torch.chunk`` splits ``size`` into ``chunks``.

    ``torch.chunk`` takes ``ceil(size / chunks)`` per chunk, so the last chunks may be shorter
    or empty (9 over 2: 5 + 4; 2 over 3: 1 + 1 + 0). Empty chunks are placed at ``size``.
    """
    per = -(-size // chunks)
    first = min(size, per * index)
    return first, min(size, first + per) - first


def _dim0_local_range(t: Tensor) -> tuple[int, int]:
    """(global offset, local rows) of this rank's part of ``t`` along dim 0.

    A plain tensor is whole: ``(0, rows)``. For a DTensor every ``Shard(0)`` placement splits
    the current range with ``torch.chunk`` sizes at this rank's coordinate on that mesh dim
    (DTensor's and FSDP2's rule, nested in mesh order); ``Replicate``, ``Partial`` and shards
    of other dims keep it. Interleaved shardings of dim 0 (``_StridedShard``, FSDP2 on top of
    tensor parallelism) do not hold a contiguous row range and are refused.
    """
    if not _is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard

    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return 0, 0
    first, held = 0, t.shape[0]
    for mesh_dim, placement in enumerate(t.placements):
        dim = getattr(placement, "dim", None)  # Shard-like placements name their dim
        if not isinstance(dim, int) or dim % t.dim() != 0:
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(
                f"QKClip: a DTensor sharded on dim 0 by {placement!r} holds no contiguous row "
                "range; only Shard(0) (FSDP2 fully_shard), Replicate and shards of other dims "
                "are supported"
            )
        offset, held = _chunk_range(held, t.device_mesh.size(mesh_dim), coordinate[mesh_dim])
        first += offset
    local_rows = _local(t).shape[0]
    if local_rows != held:
        raise RuntimeError(
            f"QKClip: DTensor of shape {tuple(t.shape)} with placements {t.placements}: the "
            f"local shard has {local_rows} rows, the chunk rule gives {held}"
        )
    return first, held


def _weight_and_bias(proj: Source, bias: Tensor | None, what: str) -> tuple[_Rows, _Rows | None]:
    if isinstance(proj, nn.Linear):
        if bias is not None:
            raise ValueError(
                f"QKClip: {what} is an nn.Linear; its own bias is used, do not pass one"
            )
        linear = proj
        own_bias = _Rows(lambda: linear.bias) if proj.bias is not None else None
        return _Rows(lambda: linear.weight), own_bias
    if not isinstance(proj, Tensor):
        raise TypeError(
            f"QKClip: {what} must be an nn.Linear or a Tensor, got {type(proj).__name__}"
        )
    weight_t, bias_t = proj, bias
    return _Rows(lambda: weight_t), (None if bias_t is None else _Rows(lambda: bias_t))


def _check_rows(t: Tensor, heads: int, rows_per_head: int | None, what: str) -> int:
    """Checks that ``t`` splits into ``heads`` equal row blocks; returns the rows per head.

    Splitting dim 0 is always a view, whatever the strides, so a scaled block writes through.
    A DTensor is checked on its global shape, and its placements once (see
    ``_dim0_local_range``).
    """
    try:
        _dim0_local_range(t)
    except NotImplementedError as e:
        raise NotImplementedError(f"{what}: {e}") from None
    if not t.is_floating_point():
        raise ValueError(f"QKClip: {what} must be floating point, got {t.dtype}")
    if t.dim() < 1 or t.shape[0] % heads:
        raise ValueError(
            f"QKClip: {what} of shape {tuple(t.shape)} does not split into {heads} heads"
        )
    per_head = t.shape[0] // heads
    if rows_per_head is not None and per_head != rows_per_head:
        raise ValueError(
            f"QKClip: {what} of shape {tuple(t.shape)} has {per_head} rows per head, "
            f"expected {rows_per_head}"
        )
    return per_head


def _check_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"QKClip: {name} must be a positive int, got {value!r}")
