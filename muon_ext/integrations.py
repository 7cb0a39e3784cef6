"""Glue for trainers that build the optimizer themselves.

Lightning needs none: return ``MuonWithAdamW(muon_param_groups(self), ...)`` from
``configure_optimizers`` (see ``examples/lightning_example.py``). The Hugging Face ``Trainer``
builds its own two param groups (decay / no decay) unless it is handed ``params``, which is
what :func:`hf_optimizer_cls_and_kwargs` does (see ``examples/hf_trainer_example.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .hybrid import MuonWithAdamW
from .routing import DEFAULT_ADAMW_PATTERNS, muon_param_groups

__all__ = ["hf_optimizer_cls_and_kwargs"]


def hf_optimizer_cls_and_kwargs(
    model: nn.Module,
    *,
    adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
    report: bool | Callable[[str], Any] = False,
    **optimizer_kwargs: Any,
) -> tuple[type[MuonWithAdamW], dict[str, Any]]:
    """``(MuonWithAdamW, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``kwargs["params"]`` holds :func:`muon_ext.muon_param_groups` of ``model`` (every trainable
    parameter, once), which the Trainer uses instead of its own groups; the other keys are
    ``MuonWithAdamW``'s arguments (``lr``, ``adamw_lr``, ...). ``TrainingArguments``'
    ``learning_rate`` and ``weight_decay`` do not reach this optimizer: set them here. The
    Trainer's LR scheduler scales each group's own lr. Call it with the same model object
    that is passed to the Trainer, after any freezing or adapter insertion (PEFT).
    """
    try:
        inspect.signature(MuonWithAdamW).bind(None, **optimizer_kwargs)
    except TypeError as exc:
        raise TypeError(f"hf_optimizer_cls_and_kwargs: bad MuonWithAdamW argument: {exc}") from None
    groups = muon_param_groups(model, adamw_patterns=adamw_patterns, report=report)
    return MuonWithAdamW, {"params": groups, **optimizer_kwargs}
