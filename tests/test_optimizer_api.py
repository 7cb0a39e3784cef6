"""The optimizer's contract: validation, failure atomicity, state_dict, hooks and torch.optim idioms."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from muon_ext import Muon


def _params(*shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _set_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


# ---------------------------------------------------------------------- validation

BAD_HYPERPARAMETERS = [
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"lr": torch.tensor([1e-3, 2e-3])}, "lr"),
    ({"lr": torch.tensor(-1.0)}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": float("nan")}, "momentum"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"eps": -1e-8}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"ns_steps": 2.5}, "ns_steps"),
    ({"ns_steps": 100}, "ns_steps"),
    ({"ns_coefficients": "newton"}, "ns_coefficients"),
    ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
    ({"ns_coefficients": [(1.0, 2.0, 3.0), (1.0, float("nan"), 0.0)]}, "ns_coefficients"),
    ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
    ({"nesterov": "yes"}, "nesterov"),
    ({"fused": "auto"}, "fused"),
]


@pytest.mark.parametrize("kwargs,name", BAD_HYPERPARAMETERS, ids=[n for _, n in BAD_HYPERPARAMETERS])
def test_bad_hyperparameter_is_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon(_params((4, 4)), **kwargs)


@pytest.mark.parametrize("kwargs,name", BAD_HYPERPARAMETERS[:4], ids=["neg", "nan", "inf", "vec"])
def test_bad_group_override_is_rejected_and_group_not_added(kwargs, name):
    opt = Muon(_params((4, 4)))
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": _params((3, 3)), **kwargs})
    assert len(opt.param_groups) == 1


def test_bad_lr_set_later_is_caught_at_step_before_any_change():
    params = _params((5, 7), (7, 5))
    opt = Muon(params)
    _set_grads(params)
    before, _ = _snapshot(opt, params)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: torch.nn.Parameter(torch.randn(5)), "2 or more dims"),
        (lambda: torch.nn.Parameter(torch.tensor(1.0)), "2 or more dims"),
        (lambda: torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64)), "complex"),
        (lambda: torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.int32), requires_grad=False),
         "floating-point"),
    ],
    ids=["1d", "0d", "complex", "int"],
)
def test_unsupported_param_is_rejected_with_its_position(make, match):
    with pytest.raises(ValueError, match=match) as info:
        Muon([torch.nn.Parameter(torch.randn(3, 3)), make()])
    assert "[1]" in str(info.value)


def test_unsupported_param_is_named_when_names_are_given():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="'bias'"):
        Muon(model.named_parameters())


def test_sparse_grad_fails_the_whole_step_atomically():
    ok = _params((6, 4), (4, 6))
    bad = _params((5, 3))
    opt = Muon([{"params": ok}, {"params": bad}])
    _set_grads(ok)
    bad[0].grad = torch.randn(5, 3).to_sparse()
    before, _ = _snapshot(opt, ok + bad)
    with pytest.raises(RuntimeError, match=r"sparse.*param_groups\[1\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ok + bad))
    assert len(opt.state) == 0, "a failed step must not create state"


def test_mismatched_momentum_from_a_checkpoint_is_reported_before_any_change():
    params = _params((6, 4), (4, 6))
    opt = Muon(params)
    _set_grads(params)
    opt.step()
    opt.state[params[1]]["momentum_buffer"] = torch.zeros(3, 3)
    before, _ = _snapshot(opt, params)
    momentum0 = opt.state[params[0]]["momentum_buffer"].clone()
    _set_grads(params)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert torch.equal(opt.state[params[0]]["momentum_buffer"], momentum0)


def test_fused_true_on_float64_is_an_error_naming_the_param():
    with pytest.raises(ValueError, match=r"fused=True.*float64"):
        Muon(_params((3, 3), dtype=torch.float64), fused=True)


# ---------------------------------------------------------------------- step semantics


def test_grads_are_never_modified():
    params = _params((9, 4), (2, 4, 9), (4, 2, 3, 3))
    opt = Muon(params, nesterov=False)
    _set_grads(params)
    grads = [p.grad.clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_none_grads_are_skipped_without_state():
    a, b = _params((4, 6), (6, 4))
    opt = Muon([a, b])
    a.grad = torch.randn_like(a)
    b0 = b.detach().clone()
    opt.step()
    assert b not in opt.state and a in opt.state
    assert torch.equal(b, b0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_zero_grads_give_a_zero_update_not_nan(dtype):
    params = _params((4, 6), (1, 1), (3, 5, 2), dtype=dtype)
    opt = Muon(params, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()


def test_tensor_lr_equals_float_lr():
    shapes = [(7, 5), (5, 7), (2, 3, 4), (1, 9), (9, 1)]
    grads = [torch.randn(s) for s in shapes]
    init = [torch.randn(s) for s in shapes]
    results = []
    for lr in (0.02, torch.tensor(0.02), torch.tensor(0.02, dtype=torch.float64)):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = Muon(params, lr=lr)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        results.append([p.detach() for p in params])
    # A float64 tensor holds exactly the float's value: bit for bit.
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)
    # A float32 tensor holds float32(0.02), 2.2e-8 relative off. The step computes
    # r = fl(fl(p * d) - fl(s * x)) with d = 1 - lr*wd and s = lr*scale rounded to fp32, each of
    # which may move by one ulp; each of the three roundings may go the other way. So
    # |dr| <= eps * (|p| + |s x|) + eps * (|p d| + |s x| + |r|) <= 4 eps (|p| + |r|), using
    # |s x| <= |p| + |r|. (Measured worst over 1500 draws: about half of this bound.)
    eps = torch.finfo(torch.float32).eps
    for p0, a, b in zip(init, results[0], results[1]):
        bound = 4 * eps * (p0.abs() + a.abs())
        assert ((a - b).abs() <= bound).all(), ((a - b).abs() / bound).max()


def test_repeated_steps_are_deterministic():
    init = [torch.randn(s) for s in [(33, 17), (17, 33), (4, 9, 9)]]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]
    runs = []
    for _ in range(2):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = Muon(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_plan_is_built_once_and_rebuilt_when_grads_change():
    params = _params((8, 4), (4, 8), (8, 4))
    opt = Muon(params)
    _set_grads(params)
    opt.step()
    plan = opt._plans[0]
    _set_grads(params)
    opt.step()
    assert opt._plans[0] is plan
    params[1].grad = None
    opt.step()
    assert opt._plans[0] is not plan
    (call,) = opt._plans[0][2]
    assert len(call.indices) == 2


def test_a_param_reshaped_in_place_is_seen_by_the_cached_plan():
    """`p.data = p.data.view(...)` keeps the storage: the plan's key must still change, so the
    momentum buffer of the old shape is reported instead of stepped through stale views."""
    params = _params((8, 4), (4, 8))
    opt = Muon(params)
    for _ in range(2):
        _set_grads(params)
        opt.step()
    params[0].data = params[0].data.view(4, 8)
    params[0].grad = torch.randn(4, 8)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"momentum_buffer of .* has shape \(8, 4\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("edit", ["del", "new dict"])
def test_a_param_whose_state_is_dropped_starts_afresh(edit):
    """`del opt.state[p]` or `opt.state[p] = {}` between steps: the cached plan must not keep
    stepping the old dict's momentum (torch.optim starts such a param afresh)."""
    params = _params((8, 4), (4, 8))
    opt = Muon(params, momentum=0.9)
    for _ in range(2):
        _set_grads(params)
        opt.step()
    if edit == "del":
        del opt.state[params[0]]
    else:
        opt.state[params[0]] = {}
    _set_grads(params)
    opt.step()
    m = opt.state[params[0]]["momentum_buffer"]
    torch.testing.assert_close(m, 0.1 * params[0].grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
def test_step_facts_reads_grads_and_keys_params(native, monkeypatch):
    from muon_ext import dispatch

    if native and not dispatch.extension_available():
        pytest.skip("the compiled core is not built")
    if not native:
        monkeypatch.setattr(dispatch, "extension_available", lambda: False)
    a, b, c = torch.zeros(4, 6), torch.zeros(3, 3), torch.zeros(2, 2)
    a.grad, c.grad = torch.ones(4, 6), torch.ones(2, 2)
    c.data = torch.zeros(4)  # torch refuses a mismatched grad, but not a param changed later
    grads, bad, _ = dispatch.step_facts([a, b, c])
    assert grads[0] is a.grad and grads[1] is None and grads[2] is c.grad
    assert bad == 2  # c's grad has another shape
    c.data = torch.zeros(2, 2, dtype=torch.float64)
    assert dispatch.step_facts([a, b, c])[1] == 2  # and now another dtype
    c.data = torch.zeros(2, 2)
    _, bad, key = dispatch.step_facts([a, b, c])
    assert bad == -1 and dispatch.step_facts([a, b, c])[2] == key
    a.data = a.data.view(6, 4)  # same storage, another shape
    a.grad = torch.ones(6, 4)
    _, _, reshaped = dispatch.step_facts([a, b, c])
    b.grad = torch.ones(3, 3)  # which params have grads
    _, _, more = dispatch.step_facts([a, b, c])
    assert len({key, reshaped, more}) == 3
    assert dispatch.tensors_hash([a, c]) == dispatch.tensors_hash([a, c])
    assert dispatch.tensors_hash([a, c]) != dispatch.tensors_hash([a, c.double()])


def test_non_contiguous_and_channels_last_params():
    base = torch.randn(6, 10)
    p_t = torch.nn.Parameter(base.t())  # (10, 6), non-contiguous
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last))
    twins = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in (p_t, conv)]
    grads = [torch.randn(10, 6), torch.randn(8, 3, 3, 3)]
    for ps in ([p_t, conv], twins):
        opt = Muon(ps)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    assert not p_t.is_contiguous()
    for a, b in zip([p_t, conv], twins):
        assert torch.equal(a.detach().contiguous(), b.detach())


def test_closure_is_called_with_grad_enabled_and_returns_loss():
    model = torch.nn.Linear(6, 4, bias=False)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    opt = Muon(model.parameters(), lr=0.05)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(10)]
    assert losses[-1] < losses[0]


def test_step_hooks_run():
    params = _params((4, 4))
    opt = Muon(params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    _set_grads(params)
    opt.step()
    assert calls == ["pre", "post"]


def test_deepcopy_gives_an_independent_optimizer():
    params = _params((5, 3))
    opt = Muon(params)
    _set_grads(params)
    opt.step()
    clone = copy.deepcopy(opt)
    p_clone = clone.param_groups[0]["params"][0]
    assert p_clone is not params[0]
    assert torch.equal(clone.state[p_clone]["momentum_buffer"], opt.state[params[0]]["momentum_buffer"])
    p_clone.grad = torch.randn_like(p_clone)
    clone.step()
    assert not torch.equal(p_clone, params[0])


def test_add_param_group_then_step():
    a, b = _params((4, 6), (6, 4))
    opt = Muon([a], lr=0.01)
    opt.add_param_group({"params": [b], "lr": 0.03, "ns_coefficients": "polar_express"})
    assert opt.param_groups[1]["momentum"] == 0.95
    _set_grads([a, b])
    opt.step()
    assert a in opt.state and b in opt.state


def test_trains_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 8)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    muon, adam = Muon(matrices, lr=0.02, weight_decay=0.0), torch.optim.Adam(others, lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        muon.zero_grad()
        adam.zero_grad()
        loss.backward()
        muon.step()
        adam.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0] and math.isfinite(losses[-1])


# ---------------------------------------------------------------------- checkpoints


def _save_load(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_resumes_bit_exactly(dtype):
    shapes = [(7, 5), (5, 7), (3, 4, 6), (6, 2, 2, 2)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(4)]

    def run(steps, opt=None, params=None):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ref_opt = Muon(ref, ns_coefficients="polar_express")
    run(grads, ref_opt, ref)

    first = [torch.nn.Parameter(p.clone()) for p in init]
    first_opt = Muon(first, ns_coefficients="polar_express")
    run(grads[:2], first_opt, first)
    saved = _save_load(first_opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed_opt = Muon(resumed, ns_coefficients="polar_express")
    resumed_opt.load_state_dict(saved)
    assert resumed_opt.state[resumed[0]]["momentum_buffer"].dtype == torch.float32
    run(grads[2:], resumed_opt, resumed)
    assert all(torch.equal(a, b) for a, b in zip(ref, resumed))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon absent")
def test_checkpoints_move_both_ways_with_torch_optim_muon():
    shapes = [(7, 5), (5, 7)]
    init = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    topt = torch.optim.Muon(theirs, lr=0.01)
    for p, g in zip(theirs, grads):
        p.grad = g.clone()
    topt.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = Muon(ours, lr=0.01)
    opt.load_state_dict(_save_load(topt.state_dict()))
    for p, q in zip(ours, theirs):
        assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])

    for p in ours:
        p.grad = torch.randn_like(p)
    opt.step()
    back = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    topt2 = torch.optim.Muon(back, lr=0.01)
    topt2.load_state_dict(_save_load(opt.state_dict()))
    assert set(topt2.state_dict()["state"][0]) == {"momentum_buffer"}
    for p, q in zip(ours, back):
        assert torch.equal(opt.state[p]["momentum_buffer"], topt2.state[q]["momentum_buffer"])
        q.grad = torch.randn_like(q)
    topt2.step()  # torch steps on from our checkpoint
