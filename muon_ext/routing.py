"""Which parameters of a model go to Muon and which to AdamW, by rule and by name.

Muon is for hidden weight matrices. Everything else goes to AdamW:

1. embedding weights (``nn.Embedding`` / ``nn.EmbeddingBag``), found by identity, so an
   output head tied to the embedding goes with it whatever it is called;
2. tensors with fewer than 2 dims (norm gains, biases, scalars), and biases of any shape:
   a local name ``bias`` or ending in ``_bias`` (GPT-OSS's stacked expert biases
   ``experts.gate_up_proj_bias`` (E, 2I) and ``experts.down_proj_bias``);
3. parameters any of whose names matches one of ``adamw_patterns`` (regular expressions,
   ``re.search`` on the dotted name; defaults cover GPT-2's ``wte``/``wpe``/``lm_head`` and
   Llama's ``embed_tokens``/``lm_head``);
4. tensors whose leading dim is 1 (``(1, T, d)`` position tables, ``(1, d)`` heads);
5. complex tensors (Muon is real-only).

Frozen parameters (``requires_grad=False``) are left out; a tensor registered under several
names (tied weights) is counted once, under its first name. The order is
``model.named_parameters()``'s, so the same model always gives the same groups.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_ADAMW_PATTERNS",
    "ParamRoute",
    "format_routing_report",
    "muon_param_groups",
    "route_parameters",
]

# Anchored on whole name components: ``wte`` matches ``transformer.wte.weight``, not ``bwte``.
DEFAULT_ADAMW_PATTERNS: tuple[str, ...] = (
    r"(^|\.)wte(\.|$)",  # GPT-2 token embedding
    r"(^|\.)wpe(\.|$)",  # GPT-2 position embedding
    r"(^|\.)embed_tokens(\.|$)",  # Llama / Mistral / Qwen token embedding
    r"(^|\.)lm_head(\.|$)",  # GPT-2 / Llama output head, tied or not
)

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

Destination = Literal["muon", "adamw", "excluded"]


@dataclass(frozen=True)
class ParamRoute:
    """Where one parameter tensor goes and why."""

    name: str  # first name in model.named_parameters()
    aliases: tuple[str, ...]  # its other names (tied or shared weights)
    shape: tuple[int, ...]
    numel: int
    destination: Destination
    reason: str
    param: Tensor = field(repr=False, compare=False)

    @property
    def use_muon(self) -> bool:
        return self.destination == "muon"


def route_parameters(
    model: nn.Module, *, adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS
) -> list[ParamRoute]:
    """One :class:`ParamRoute` per distinct parameter tensor, in ``named_parameters()`` order
    (frozen ones included, with ``destination="excluded"``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    patterns = _compile_patterns(adamw_patterns)

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), [])
        if name not in names[id(p)]:
            names[id(p)].append(name)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for local, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, local))

    embeddings: dict[int, str] = {}  # id -> name, for the embedding weights
    embedding_memory: dict[tuple, str] = {}  # where they live, to catch `.data`-tied copies
    for name, p in model.named_parameters():
        if any(
            isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and local == "weight"
            for m, local in owners.get(id(p), ())
        ):
            embeddings[id(p)] = name
            key = _memory_key(p)
            if key is not None:
                embedding_memory.setdefault(key, name)

    routes = []
    for name, p in model.named_parameters():
        aliases = tuple(n for n in names.get(id(p), [name]) if n != name)
        destination, reason = _route_one(
            p,
            [name, *aliases],
            aliases,
            owners.get(id(p), []),
            embeddings,
            embedding_memory,
            patterns,
        )
        routes.append(
            ParamRoute(
                name=name,
                aliases=aliases,
                shape=tuple(p.shape),
                numel=p.numel(),
                destination=destination,
                reason=reason,
                param=p,
            )
        )
    return routes


def _route_one(
    p: Tensor,
    all_names: list[str],
    aliases: tuple[str, ...],
    owners: list[tuple[nn.Module, str]],
    embeddings: dict[int, str],
    embedding_memory: dict[tuple, str],
    patterns: list[tuple[str, re.Pattern[str]]],
) -> tuple[Destination, str]:
    tied = f", tied with {', '.join(aliases)}" if aliases else ""
    if not p.requires_grad:
        return "excluded", "frozen (requires_grad=False)"
    if id(p) in embeddings:
        return "adamw", f"embedding{tied}"
    key = _memory_key(p)
    if key is not None and key in embedding_memory:
        return "adamw", f"shares memory with embedding {embedding_memory[key]}"
    if torch.is_complex(p):
        return "adamw", "complex"
    if any(_is_bias_name(local) for _, local in owners) and not any(
        isinstance(m, _NORM_TYPES) for m, _ in owners
    ):
        return "adamw", "bias"
    if p.ndim < 2:
        if any(isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower() for m, _ in owners):
            return "adamw", "norm"
        return "adamw", "scalar" if p.ndim == 0 else "1-D"
    for pattern, compiled in patterns:
        if any(compiled.search(n) for n in all_names):
            return "adamw", f"name matches {pattern!r}"
    if p.shape[0] == 1:
        return "adamw", "leading dim of size 1"
    return "muon", f"hidden matrix{tied.replace('tied', 'shared')}"


def _is_bias_name(local: str) -> bool:
    """``bias`` or ``*_bias`` (``gate_up_proj_bias``), not ``biased_weight``."""
    return local == "bias" or local.endswith("_bias")


def _memory_key(p: Tensor) -> tuple | None:
    if p.device.type == "meta" or p.numel() == 0:
        return None
    # A DTensor (FSDP2) is a storage-less wrapper whose own data_ptr() is 0 for every param: its
    # identity is its local shard's memory. Other wrappers without storage are not identified.
    local = getattr(p, "_local_tensor", None)
    t = local if isinstance(local, Tensor) else p
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # tensor subclasses without storage
        return None
    if ptr == 0:
        return None
    return (t.device, ptr, tuple(t.shape), tuple(t.stride()), t.dtype)


def _compile_patterns(adamw_patterns: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    if isinstance(adamw_patterns, str):
        raise TypeError(
            "adamw_patterns must be a sequence of regular expressions; wrap a single pattern "
            f"in a tuple: ({adamw_patterns!r},)"
        )
    compiled = []
    for pattern in adamw_patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except (re.error, TypeError) as exc:
            raise ValueError(
                f"adamw_patterns: {pattern!r} is not a valid regular expression: {exc}"
            ) from None
    return compiled


def muon_param_groups(
    model: nn.Module,
    *,
    adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
    muon_lr: float | None = None,
    adamw_lr: float | None = None,
    muon_weight_decay: float | None = None,
    adamw_weight_decay: float | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    report: bool | Callable[[str], Any] = False,
) -> list[dict[str, Any]]:
    """Param groups for :class:`muon_ext.MuonWithAdamW`: ``[muon_group, adamw_group]``, then
    one Muon group per entry of ``overrides``.

    Each group has ``params``, ``param_names`` and ``use_muon``, plus ``lr`` /
    ``weight_decay`` when given here (otherwise the optimizer's defaults apply). The groups
    also work one at a time: ``Muon([groups[0]])`` and ``torch.optim.AdamW([groups[1]])``.

    Args:
        model: the module whose trainable parameters are routed (see the module docstring
            for the rules).
        adamw_patterns: regular expressions (``re.search`` on every name of a parameter) that
            send a parameter to AdamW. Extend the defaults with
            ``(*DEFAULT_ADAMW_PATTERNS, r"my_head")``.
        overrides: ``{pattern: {key: value, ...}}``: Muon group settings for the Muon
            parameters any of whose names matches the glob ``pattern`` (``fnmatch``, case
            sensitive, on the whole dotted name: ``"*.attn.c_attn.weight"``), e.g.
            ``{"*.q_proj.weight": {"num_heads": 32}}``. Each pattern gets a group of its own
            (``use_muon=True``, after the two default groups, in the order of ``overrides``)
            holding those parameters, which leave ``groups[0]``; a parameter matched by several
            patterns goes to the first. The settings are checked by the optimizer; a pattern
            that matches no Muon parameter is an error (a typo would otherwise be silent).
            ``muon_lr`` / ``muon_weight_decay`` apply to these groups too unless overridden.
        report: ``True`` prints where each parameter went (layers collapsed); a callable
            (``logging.info``, Lightning's ``self.print``) receives the text instead.
    """
    overrides = _check_overrides(overrides)
    routes = route_parameters(model, adamw_patterns=adamw_patterns)
    if not any(r.destination != "excluded" for r in routes):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)"
        )
    groups: list[dict[str, Any]] = []
    for use_muon, lr, wd in (
        (True, muon_lr, muon_weight_decay),
        (False, adamw_lr, adamw_weight_decay),
    ):
        chosen = [r for r in routes if r.destination == ("muon" if use_muon else "adamw")]
        group: dict[str, Any] = {
            "params": [r.param for r in chosen],
            "param_names": [r.name for r in chosen],
            "use_muon": use_muon,
        }
        if lr is not None:
            group["lr"] = lr
        if wd is not None:
            group["weight_decay"] = wd
        groups.append(group)
    if overrides:
        groups.extend(_override_groups(groups[0], routes, overrides))
    if report:
        text = format_routing_report(routes)
        if callable(report):
            report(text)
        else:
            print(text)
    return groups


def _check_overrides(
    overrides: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            "overrides must be a mapping {name pattern: {setting: value}}, "
            f"got {type(overrides).__name__}"
        )
    out = {}
    for pattern, settings in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"overrides: patterns must be strings, got {pattern!r}")
        if not isinstance(settings, Mapping):
            raise TypeError(
                f"overrides[{pattern!r}] must be a mapping of group settings, got {settings!r}"
            )
        reserved = [k for k in ("params", "param_names", "use_muon") if k in settings]
        if reserved:
            raise ValueError(
                f"overrides[{pattern!r}] sets {reserved}, which muon_param_groups decides"
            )
        out[pattern] = dict(settings)
    return out


def _override_groups(
    muon_group: dict[str, Any], routes: Sequence[ParamRoute], overrides: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Moves the Muon params matched by each pattern out of ``muon_group`` into a group of
    their own (in place on ``muon_group``)."""
    all_names = {id(r.param): (r.name, *r.aliases) for r in routes}
    taken: dict[str, list[int]] = {pattern: [] for pattern in overrides}
    for pos, p in enumerate(muon_group["params"]):
        for pattern in overrides:
            if any(fnmatch.fnmatchcase(n, pattern) for n in all_names[id(p)]):
                taken[pattern].append(pos)
                break
    groups = []
    for pattern, settings in overrides.items():
        if not taken[pattern]:
            raise ValueError(
                f"overrides: pattern {pattern!r} matches no parameter routed to Muon "
                "(patterns are fnmatch globs on the dotted names, e.g. '*.attn.c_attn.weight')"
            )
        group = {
            "params": [muon_group["params"][i] for i in taken[pattern]],
            "param_names": [muon_group["param_names"][i] for i in taken[pattern]],
            "use_muon": True,
        }
        group.update({k: muon_group[k] for k in ("lr", "weight_decay") if k in muon_group})
        group.update(settings)
        groups.append(group)
    moved = {i for positions in taken.values() for i in positions}
    for key in ("params", "param_names"):
        muon_group[key] = [v for i, v in enumerate(muon_group[key]) if i not in moved]
    return groups


def format_routing_report(routes: Sequence[ParamRoute], *, collapse_layers: bool = True) -> str:
    """A short table of where the parameters went; with ``collapse_layers`` numbered layers
    (``h.0``, ``h.1``, ...) share one line, ``h.*``, with a count."""
    totals = {d: [0, 0] for d in ("muon", "adamw", "excluded")}
    rows: dict[tuple, list[int]] = {}
    for r in routes:
        totals[r.destination][0] += 1
        totals[r.destination][1] += r.numel
        name = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", r.name) if collapse_layers else r.name
        key = (r.destination, name, r.shape, r.reason)
        rows.setdefault(key, [0])[0] += 1
    trainable = totals["muon"][1] + totals["adamw"][1]
    share = 100.0 * totals["muon"][1] / trainable if trainable else 0.0
    header = (
        f"muon_param_groups: Muon {totals['muon'][0]} tensors ({_count(totals['muon'][1])} "
        f"params, {share:.1f}%), AdamW {totals['adamw'][0]} tensors "
        f"({_count(totals['adamw'][1])} params), frozen {totals['excluded'][0]} tensors "
        f"({_count(totals['excluded'][1])} params, excluded)"
    )
    lines = [header]
    width = max((len(k[1]) for k in rows), default=0)
    shape_width = max((len(str(k[2])) for k in rows), default=0)
    for (destination, name, shape, reason), (count,) in rows.items():
        times = f"x{count}" if count > 1 else ""
        lines.append(
            f"  {destination:<8} {name:<{width}} {times:>4} {shape!s:<{shape_width}}  {reason}"
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
