"""Glue for trainers that build the optimizer themselves.

Lightning needs none: return ``MuonWithAdamW(muon_param_groups(self), ...)`` from
``configure_optimizers`` (see ``examples/lightning_example.py``). The Hugging Face ``Trainer``
builds its own two param groups (decay / no decay); :func:`hf_optimizer_cls_and_kwargs` gives it
an optimizer factory instead, which routes the model the Trainer passes when it creates the
optimizer (see ``examples/hf_trainer_example.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn
from torch.optim import Optimizer

from .hybrid import MuonWithAdamW
from .routing import DEFAULT_ADAMW_PATTERNS, _compile_patterns, muon_param_groups

_O = TypeVar("_O", bound=Optimizer)

__all__ = ["hf_optimizer_cls_and_kwargs", "unscale_before_step"]


class MuonWithAdamWFactory:
    """transformers' optimizer-factory protocol: ``Trainer.create_optimizer`` calls
    ``factory()(model, **kwargs)`` with the model it trains (also one from ``model_init``)."""

    adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS
    report: bool | Callable[[str], Any] = False

    def __call__(self, model: nn.Module, **optimizer_kwargs: Any) -> MuonWithAdamW:
        groups = muon_param_groups(model, adamw_patterns=self.adamw_patterns, report=self.report)
        return MuonWithAdamW(groups, **optimizer_kwargs)


def unscale_before_step(optimizer: _O) -> _O:
    """Lets a trainer unscale the grads itself (``scaler.unscale_(opt)``) before the step.

    ``Muon`` / ``MuonWithAdamW`` take ``grad_scale`` / ``found_inf`` from ``GradScaler`` and
    unscale inside the step (``_step_supports_amp_scaling``), which Lightning refuses to combine
    with ``gradient_clip_val`` under ``precision="16-mixed"`` or ``"bf16-mixed"`` ("does not allow
    for gradient clipping because it performs unscaling of gradients internally"). After this
    call the optimizer is an ordinary one to ``GradScaler``: the grads are unscaled before
    clipping, and a step with inf/NaN grads is skipped by the scaler (one host sync per step, as
    for any optimizer). Returns ``optimizer``, for ``return unscale_before_step(MuonWithAdamW(...))``.
    """
    optimizer._step_supports_amp_scaling = False  # type: ignore[attr-defined]
    return optimizer


def _trainer_takes_factories() -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401
    except ImportError:
        return False
    return True


def hf_optimizer_cls_and_kwargs(
    model: nn.Module | None = None,
    *,
    adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
    report: bool | Callable[[str], Any] = False,
    **optimizer_kwargs: Any,
) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    The factory builds ``MuonWithAdamW(muon_param_groups(model), **kwargs)`` when the Trainer
    creates its optimizer, from the model the Trainer passes: after ``model_init``, freezing or
    adapter insertion (PEFT), and again for every Trainer the same result is given to. ``model``
    is not needed then (it is only checked to route). ``kwargs`` holds ``MuonWithAdamW``'s
    arguments (``lr``, ``adamw_lr``, ...); ``TrainingArguments``' ``learning_rate`` and
    ``weight_decay`` do not reach this optimizer: set them here. The Trainer's LR scheduler
    scales each group's own lr.

    With transformers that has no optimizer factories, this is ``(MuonWithAdamW,
    {"params": muon_param_groups(model), ...})`` and needs ``model`` (the Trainer pops
    ``params``: build a fresh result for each Trainer there).
    """
    try:
        inspect.signature(MuonWithAdamW).bind(None, **optimizer_kwargs)
    except TypeError as exc:
        raise TypeError(f"hf_optimizer_cls_and_kwargs: bad MuonWithAdamW argument: {exc}") from None
    if _trainer_takes_factories():
        # Bad patterns (or a model that cannot be routed) fail here, not inside trainer.train().
        _compile_patterns(adamw_patterns)
        if model is not None:
            muon_param_groups(model, adamw_patterns=adamw_patterns)
        factory = type(
            "MuonWithAdamWFactory",
            (MuonWithAdamWFactory,),
            {"adamw_patterns": tuple(adamw_patterns), "report": report},
        )
        return factory, dict(optimizer_kwargs)
    if model is None:
        raise TypeError(
            "hf_optimizer_cls_and_kwargs: this transformers has no optimizer factories; pass the "
            "model given to the Trainer"
        )
    groups = muon_param_groups(model, adamw_patterns=adamw_patterns, report=report)
    return MuonWithAdamW, {"params": groups, **optimizer_kwargs}
