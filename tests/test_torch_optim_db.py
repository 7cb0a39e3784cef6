"""torch's own Muon OptimizerInfo (error inputs and generic configurations) run against muon_ext.Muon.

Uses torch.testing._internal.common_optimizers from the installed torch (it needs `expecttest`).
Two documented differences from torch.optim.Muon are named here: N-D (e.g. 3-D) params are
accepted, and complex params are rejected at construction instead of at the first step.
"""

import warnings

import pytest
import torch

import muon_ext

pytest.importorskip("expecttest")
common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
if not hasattr(torch.optim, "Muon"):
    pytest.skip("this torch has no torch.optim.Muon", allow_module_level=True)

_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.Muon)
_ENUM = common_optimizers.OptimizerErrorEnum
_ERRORS = list(_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32))
_CONFIGS = list(_INFO.optim_inputs_func(device="cpu"))


def _is_3d_case(e):
    return "2D" in e.error_regex


def _is_complex_case(e):
    return "complex" in e.error_regex


@pytest.mark.parametrize("err", _ERRORS, ids=[e.optimizer_error_input.desc for e in _ERRORS])
def test_torch_error_inputs(err):
    inp = err.optimizer_error_input
    params, kwargs = inp.params, dict(inp.kwargs)
    if _is_3d_case(err):
        # Documented difference: N-D params are viewed as batches of matrices and accepted.
        opt = muon_ext.Muon(params, **kwargs)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
        return
    if _is_complex_case(err):
        # Documented difference: complex params are rejected at construction, not at step.
        with pytest.raises((ValueError, RuntimeError), match="complex"):
            muon_ext.Muon(params, **kwargs)
        return
    # Every other torch error input fails (or warns) at construction.
    assert err.error_on == _ENUM.CONSTRUCTION_ERROR
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            muon_ext.Muon(params, **kwargs)
        return
    with pytest.raises(err.error_type, match=err.error_regex), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        muon_ext.Muon(params, **kwargs)

def _params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8, 16), (12, 12)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    gs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return ps, gs


@pytest.mark.parametrize("cfg", _CONFIGS, ids=[c.desc for c in _CONFIGS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_torch_generic_configs(cfg, device):
    init, grads = _params(0)
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cfg.kwargs.items()}
    ours = [p.clone().to(device).requires_grad_() for p in init]
    opt = muon_ext.Muon(ours, **kwargs)
    theirs = [p.clone().requires_grad_() for p in init]
    ref = torch.optim.Muon(theirs, **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                      for k, v in cfg.kwargs.items()})
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad = g.to(device)
            q.grad = g.clone()
        opt.step()
        ref.step()
    if device == "meta":
        assert all(p.device.type == "meta" and p.shape == q.shape for p, q in zip(ours, theirs))
        assert all("momentum_buffer" in opt.state[p] for p in ours)
        return
    for p, q, p0 in zip(ours, theirs, init):
        d_ours, d_ref = p.detach() - p0, q.detach() - p0
        # torch orthogonalizes in bf16, muon_ext in fp32: compare the total updates loosely.
        rel = (d_ours - d_ref).norm() / d_ref.norm().clamp_min(1e-12)
        assert rel < 0.1, (cfg.desc, float(rel))
    # checkpoints move both ways
    ref.load_state_dict(opt.state_dict())
    opt.load_state_dict(ref.state_dict())


def test_meta_params_step_with_fused_none():
    p = torch.nn.Parameter(torch.empty(8, 4, device="meta"))
    opt = muon_ext.Muon([p], lr=0.02, fused=None)
    p.grad = torch.empty_like(p)
    opt.step()
    assert opt.state[p]["momentum_buffer"].device.type == "meta"
