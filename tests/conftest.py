"""Shared test helpers: fresh random seeds, the ratio tolerance, the cuda marker."""

from __future__ import annotations

import os
import random

import pytest
import torch

import muon_ext  # noqa: F401  (loads the compiled ops)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (MUON_EXT_TEST_SEED pins it); printed so a failure can be replayed."""
    value = int(os.environ.get("MUON_EXT_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    print(f"\n[{request.node.name}] seed={value} (rerun with MUON_EXT_TEST_SEED={value})")
    return value


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_within_ratio(
    err_impl: float, err_ref: float, atol: float, what: str, ratio: float = 2.0
) -> None:
    """DESIGN.md numerics contract: an implementation's error against the float64 oracle may be at
    most ``ratio`` times the error of the reference implementation in the same precision, plus a
    small absolute slack (a few ulps of the output, for rounding-boundary flips)."""
    bound = ratio * err_ref + atol
    assert err_impl <= bound, (
        f"{what}: error {err_impl:.3e} vs float64 oracle exceeds {ratio} x reference error "
        f"{err_ref:.3e} + atol {atol:.1e} = {bound:.3e}"
    )
