"""The modern training loop: AMP GradScaler, CUDA graphs, torch.compile, no host sync.

CPU (always run): ``grad_scale`` / ``found_inf`` through the optimizer (skip = bit-unchanged,
even with inf/NaN grads), GradScaler with and without ``unscale_``, fp16 training against an
fp32 run, the capture checks (capture simulated), ``torch.compile`` (one graph with the op in
it, no recompile when a Tensor lr changes, a compiled training step), ``opcheck``.

CUDA (``@pytest.mark.cuda``): the same on CUDA tensors, plus ``set_sync_debug_mode("error")``
around the step, ``scaler.step(opt); scaler.update()`` and a whole training step captured in
``torch.cuda.graph`` with replays that follow an LR scheduler, and the capture errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import muon_ext.optim
from muon_ext import Muon, MuonWithAdamW, muon_param_groups
from muon_ext.coefficients import flat_coefficients, resolve_ns_coefficients, update_scale

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FUSED_PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLAT = flat_coefficients(resolve_ns_coefficients("jordan", 5))
# A power of two: scaling and unscaling are exact, so scaled runs can be compared bit for bit.
SCALE = 2.0**10


# ---------------------------------------------------------------------- helpers


def _mlp(device, bias: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Linear(24, 48, bias=bias),
        nn.GELU(),
        nn.Linear(48, 48, bias=bias),
        nn.GELU(),
        nn.Linear(48, 8, bias=bias),
    ).to(device)


def _make_opt(kind: str, model: nn.Module, lr=0.02, **kw):
    """A ``Muon`` over all (2-D) params, or a ``MuonWithAdamW`` (biases go to AdamW)."""
    if kind == "muon":
        return Muon(model.parameters(), lr=lr, weight_decay=0.01, **kw)
    adamw_lr = lr.clone() / 10 if isinstance(lr, torch.Tensor) else lr / 10
    return MuonWithAdamW(muon_param_groups(model), lr=lr, adamw_lr=adamw_lr, **kw)


def _data(device, n: int = 32, generator=None):
    x = torch.randn(n, 24, device=device, generator=generator)
    return x, torch.tanh(x[:, :8] - x[:, 8:16])


def _state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer state (momentum; AdamW's step, exp_avg, exp_avg_sq)."""
    return [
        opt.state[p][k]
        for group in opt.param_groups
        for p in group["params"]
        if p in opt.state
        for k in sorted(opt.state[p])
    ]


def _snapshot(model, opt) -> list[torch.Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + _state_tensors(opt)]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs (max abs diff {(x - y).abs().max()})"


def _assert_skipped(model, opt, before: list[torch.Tensor]) -> None:
    """After a skipped step: params and the state that existed bit-unchanged; state that the
    step created (a skipped first step) is all zeros, as a fresh optimizer's would be."""
    n = len(list(model.parameters()))
    after = _snapshot(model, opt)
    _assert_same(after[:n], before[:n])
    if len(before) > n:
        _assert_same(after[n:], before[n:])
    else:
        assert all(torch.count_nonzero(t) == 0 for t in after[n:])


def _matrices(device, dtype):
    shapes = [(8, 16), (16, 8), (3, 5, 7), (11, 11)]
    return [nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]


# ---------------------------------------------------------------------- AMP: found_inf, grad_scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*FUSED_PARAM_DTYPES, torch.float64], ids=str)
def test_found_inf_skips_everything_even_with_nan_grads(seed, device, dtype):
    """found_inf == 1: params and momentum bit-unchanged (float64 takes the pure-PyTorch path)."""
    params = _matrices(device, dtype)
    opt = Muon(params, lr=0.05, weight_decay=0.1)
    for _ in range(2):  # momentum buffers exist and are non-zero
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = [t.clone() for t in params + _state_tensors(opt)]
    for p in params:
        p.grad = torch.randn_like(p) * SCALE
    params[0].grad[0, 0] = float("nan")
    params[1].grad[-1, -1] = float("inf")
    params[2].grad[1, 0, 0] = -float("inf")
    opt.grad_scale = torch.tensor(SCALE, device=device)
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    _assert_same(params + _state_tensors(opt), before)

    # the first step skipped: momentum is created (zeros), params unchanged
    fresh = _matrices(device, dtype)
    fresh_before = [p.detach().clone() for p in fresh]
    fresh_opt = Muon(fresh, lr=0.05)
    for p in fresh:
        p.grad = torch.full_like(p, float("nan"))
    fresh_opt.grad_scale, fresh_opt.found_inf = torch.tensor(SCALE), torch.tensor(1.0)
    fresh_opt.step()
    _assert_same(list(fresh), fresh_before)
    assert all(torch.count_nonzero(t) == 0 for t in _state_tensors(fresh_opt))

    # found_inf == 0 with the same scale: a real step
    for p in params:
        p.grad = torch.randn_like(p) * SCALE
    opt.found_inf = torch.zeros((), device=device)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*FUSED_PARAM_DTYPES, torch.float64], ids=str)
def test_grad_scale_unscales_inside_the_step(seed, device, dtype):
    params = _matrices(device, dtype)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = Muon(params, lr=0.05), Muon(twin, lr=0.05)
    opt.grad_scale = torch.tensor(SCALE, device=device)
    for _ in range(3):
        for p, q in zip(params, twin):
            q.grad = torch.randn_like(q)
            p.grad = q.grad * SCALE
        opt.step()
        ref.step()
    _assert_same(params + _state_tensors(opt), twin + _state_tensors(ref))


def _grad_scaler_run(kind, device, unscale_first, steps=3):
    """GradScaler-driven optimizer vs an unscaled twin; returns both and what step() saw."""
    model = _mlp(device, bias=kind == "hybrid")
    twin = copy.deepcopy(model)
    opt, ref = _make_opt(kind, model), _make_opt(kind, twin)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE)
    seen = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            (getattr(o, "grad_scale", "unset"), getattr(o, "found_inf", "unset"))
        )
    )
    for _ in range(steps):
        x, y = _data(device)
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6)  # a no-op clip
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        F.mse_loss(twin(x), y).backward()
        ref.step()
    return model, opt, twin, ref, scaler, seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["muon", "hybrid"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_+step"])
def test_grad_scaler_matches_unscaled_and_skips_inf(seed, device, kind, unscale_first):
    model, opt, twin, ref, scaler, seen = _grad_scaler_run(kind, device, unscale_first)
    _assert_same(_snapshot(model, opt), _snapshot(twin, ref))
    for grad_scale, found_inf in seen:
        assert isinstance(found_inf, torch.Tensor) and found_inf.device.type == device
        if unscale_first:  # grads already unscaled: GradScaler passes grad_scale=None
            assert grad_scale is None
        else:
            assert isinstance(grad_scale, torch.Tensor) and float(grad_scale) == SCALE
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler's cleanup

    # an overflowing step: skipped on the device, the scale backs off, nothing changes
    before, scale = _snapshot(model, opt), scaler.get_scale()
    x, y = _data(device)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    _assert_same(_snapshot(model, opt), before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["autocast", "fp16_params"])
def test_fp16_training_with_grad_scaler_matches_fp32(seed, device, mode):
    """Many fp16 steps with GradScaler against the same model trained in fp32.

    ``autocast``: fp32 params, fp16 forward/backward (the usual AMP). ``fp16_params``: the
    params themselves are fp16 (momentum stays fp32). The initial scale is too large on
    purpose: the first steps overflow, GradScaler skips them (the fp32 run skips the same
    steps) and backs off. Tolerance: 2% of how far training moved the weights (measured:
    ~0.3%), and the losses agree within 1%.
    """
    model = _mlp(device)
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in ref.parameters()]
    if mode == "fp16_params":
        model.half()
    opt, opt_ref = _make_opt("muon", model), _make_opt("muon", ref)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**22, growth_interval=10)
    skipped = 0
    for _ in range(30):
        x, y = _data(device)
        with torch.autocast(device, dtype=torch.float16, enabled=mode == "autocast"):
            out = model(x.half() if mode == "fp16_params" else x)
        loss = F.mse_loss(out.float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        before, scale = _snapshot(model, opt), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        loss_ref = F.mse_loss(ref(x), y)
        if scaler.get_scale() < scale:  # GradScaler found an inf: the step changed nothing
            skipped += 1
            _assert_skipped(model, opt, before)
            continue
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
    assert 1 <= skipped <= 10, f"{skipped} steps skipped (the overflow warm-up did not happen?)"
    for p, q, q0 in zip(model.parameters(), ref.parameters(), start):
        moved = (q - q0).norm()
        err = (p.float() - q).norm()
        assert err <= 0.02 * moved, f"fp16 run is {err / moved:.2%} of the distance moved away"
    assert abs(loss.item() - loss_ref.item()) <= 0.01 * loss_ref.item()


# ---------------------------------------------------------------------- capture checks on CPU


@pytest.fixture
def simulate_capture(monkeypatch):
    """Makes step() believe a CUDA graph is being captured (the checks are pure Python)."""
    monkeypatch.setattr(muon_ext.optim, "_capturing", lambda: True)


@pytest.mark.parametrize("kind", ["muon", "hybrid"])
def test_capture_checks_run_before_anything_changes(seed, simulate_capture, kind):
    model = _mlp("cpu", bias=kind == "hybrid")
    x, y = _data("cpu")
    F.mse_loss(model(x), y).backward()
    name = "Muon" if kind == "muon" else "MuonWithAdamW"

    opt = _make_opt(kind, model)  # capturable=False
    before = _snapshot(model, opt)
    with pytest.raises(
        RuntimeError, match=f"capture of step\\(\\) for an instance of {name}.*capturable=True"
    ):
        opt.step()
    _assert_same(_snapshot(model, opt), before)
    assert not opt.state

    opt = _make_opt(kind, model, capturable=True)  # a float lr would be frozen into the graph
    with pytest.raises(RuntimeError, match="float lr .*torch.tensor\\(0.02, device="):
        opt.step()
    assert not opt.state

    opt = _make_opt(kind, model, lr=torch.tensor(0.02), capturable=True)
    with pytest.raises(RuntimeError, match="CPU parameter; a CUDA graph cannot capture"):
        opt.step()
    _assert_same(_snapshot(model, opt), before)


def test_capturable_must_be_a_bool():
    with pytest.raises(ValueError, match="capturable must be a bool"):
        Muon([nn.Parameter(torch.randn(3, 4))], capturable="yes")


def test_capturable_on_cpu_steps_as_usual(seed):
    """No graphs on the CPU: capturable changes nothing there (float64 too)."""
    for dtype in (torch.float32, torch.float64):
        params = _matrices("cpu", dtype)
        twin = [nn.Parameter(p.detach().clone()) for p in params]
        opt = Muon(params, lr=torch.tensor(0.03), capturable=True)
        ref = Muon(twin, lr=torch.tensor(0.03))
        for p, q in zip(params, twin):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        _assert_same(params, twin)


# ---------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


class _RecordingBackend:
    """A torch.compile backend that keeps each Dynamo graph, then runs it (eagerly or
    through inductor)."""

    def __init__(self, inductor: bool = False):
        self.graphs = []
        self.inductor = inductor

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    def op_calls(self) -> list[int]:
        ops = (torch.ops.muon_ext.muon_step_, torch.ops.muon_ext.muon_step_.default)
        return [sum(n.target in ops for n in g.graph.nodes) for g in self.graphs]


def test_compiled_step_is_one_graph_and_a_new_lr_does_not_recompile(seed, fresh_dynamo):
    params = _matrices("cpu", torch.float32)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    lr, lr_twin = torch.tensor(0.02), torch.tensor(0.02)
    opt, ref = Muon(params, lr=lr), Muon(twin, lr=lr_twin)
    backend = _RecordingBackend()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)  # fullgraph: no graph break

    def both_step(scale=1.0):
        for p, q in zip(params, twin):
            q.grad = torch.randn_like(q)
            p.grad = q.grad * scale
        step()
        ref.step()

    for value in (0.02, 0.01, 0.005):  # the first call also creates the momentum buffers
        lr.fill_(value)
        lr_twin.fill_(value)
        both_step()
        _assert_same(params + _state_tensors(opt), twin + _state_tensors(ref))
    assert backend.op_calls() == [1], "one graph, with the fused op in it once"

    # GradScaler's attributes appear: one more graph; their values change without recompiles
    opt.grad_scale, opt.found_inf = torch.tensor(SCALE), torch.tensor(0.0)
    both_step(SCALE)
    _assert_same(params + _state_tensors(opt), twin + _state_tensors(ref))
    before = [t.clone() for t in params + _state_tensors(opt)]
    opt.found_inf.fill_(1.0)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    step()
    _assert_same(params + _state_tensors(opt), before)
    assert backend.op_calls() == [1, 1]
    assert not fresh_dynamo["graph_break"]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager(seed, device, fresh_dynamo):
    """Forward, backward, opt.step() and opt.zero_grad() in one torch.compile'd function
    (inductor). Dynamo breaks the graph at ``loss.backward()`` and at ``zero_grad`` (torch
    marks ``Optimizer.zero_grad`` as not to be traced), never inside the step; a scheduled
    Tensor lr recompiles nothing. The break after the step makes Dynamo restart its analysis
    of that frame once, after ``_init_group`` created the momentum buffers: the step must take
    the same path on both passes."""
    model = _mlp(device)
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.02, device=device)
    lr_twin = lr.clone()
    capturable = device != "cpu"
    opt = _make_opt("muon", model, lr=lr, capturable=capturable)
    ref = _make_opt("muon", twin, lr=lr_twin, capturable=capturable)

    def train_step(model, opt, x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # CPU Newton-Schulz is fp32: inductor's reordered forward/backward rounding stays tiny.
    # CUDA's is bf16, where a rounding flip moves an update by ~lr * 1e-3.
    tol = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-4}
    backend = _RecordingBackend(inductor=True)
    compiled = torch.compile(train_step, backend=backend)
    graphs_after_first = None
    for i in range(4):
        x, y = _data(device)
        lr.fill_(0.02 / (i + 1))
        lr_twin.fill_(0.02 / (i + 1))
        loss = compiled(model, opt, x, y)
        loss_ref = train_step(twin, ref, x, y)
        torch.testing.assert_close(loss, loss_ref, **tol)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **tol)
        if graphs_after_first is None:
            graphs_after_first = len(backend.graphs)
    assert len(backend.graphs) == graphs_after_first, "a new lr value recompiled"
    assert sum(backend.op_calls()) == 1, "the fused op is in exactly one graph, once"
    reasons = list(fresh_dynamo["graph_break"])  # older torch names zero_grad's skip file
    assert all(any(w in r for w in ("backward", "zero_grad", "_compile.py")) for r in reasons)


# ---------------------------------------------------------------------- opcheck


def _opcheck_cases():
    cases = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for scalars in ("device", "cpu") if device == "cuda" else ("device",):
            for dtype in FUSED_PARAM_DTYPES:
                for found_inf in (0.0, 1.0):
                    cases.append(
                        pytest.param(
                            device,
                            scalars,
                            dtype,
                            found_inf,
                            marks=marks,
                            id=f"{device}-{scalars}_scalars-{str(dtype)[6:]}-found_inf{found_inf:g}",
                        )
                    )
    return cases


@pytest.mark.parametrize("device,scalars,dtype,found_inf", _opcheck_cases())
def test_opcheck_muon_step_amp_inputs(seed, device, scalars, dtype, found_inf):
    """Schema, fake kernel, autograd registration and AOT dispatch of the op with GradScaler's
    tensors, on the params' device or (CUDA only) on the CPU."""
    shapes = [(1, 5, 9), (2, 9, 5), (1, 1, 7), (1, 0, 3)]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) * SCALE for s in shapes]
    bufs = [torch.randn(s, device=device) for s in shapes]
    scales = [update_scale(s[1], s[2], None) for s in shapes]
    on = device if scalars == "device" else "cpu"
    lr = torch.tensor(
        0.02, device=on, dtype=torch.float32 if scalars == "device" else torch.float64
    )
    grad_scale = torch.tensor(SCALE, device=on)
    flag = torch.tensor(found_inf, device=on)
    args = (params, grads, bufs, lr, 0.95, True, 0.1, 1e-7, FLAT, scales, grad_scale, flag)
    torch.library.opcheck(torch.ops.muon_ext.muon_step_.default, args)


# ---------------------------------------------------------------------- CUDA only


def _cuda_opt(kind, model, lr_kind="tensor", **kw):
    lr = torch.tensor(0.02, device="cuda") if lr_kind == "tensor" else 0.02
    return _make_opt(kind, model, lr=lr, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["muon", "hybrid"])
@pytest.mark.parametrize("lr_kind", ["tensor", "float"])
def test_cuda_step_never_syncs_with_the_host(seed, kind, lr_kind):
    """torch.cuda.set_sync_debug_mode("error") turns any host sync into an error: plain steps,
    steps with device grad_scale/found_inf (set and not set), and scaler.step + update."""
    model = _mlp("cuda", bias=kind == "hybrid")
    opt = _cuda_opt(kind, model, lr_kind)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)

    def backward():
        opt.zero_grad(set_to_none=False)
        x, y = _data("cuda")
        scaler.scale(F.mse_loss(model(x), y)).backward()

    backward()
    opt.step()  # warm-up: momentum buffers, AdamW state, cuBLAS handles and workspaces
    scaler.step(opt)
    scaler.update()
    torch.cuda.synchronize()
    for found_inf in (0.0, 1.0):
        backward()
        opt.grad_scale = torch.tensor(SCALE, device="cuda")
        opt.found_inf = torch.tensor(found_inf, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf
    for _ in range(2):
        backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_cuda_capturable_rejects_what_could_not_be_captured():
    p = nn.Parameter(torch.randn(8, 16, device="cuda"))
    with pytest.raises(ValueError, match="capturable=True but .*the Tensor lr is on cpu"):
        Muon([p], lr=torch.tensor(0.02), capturable=True)
    with pytest.raises(ValueError, match="capturable=True but .*pure-PyTorch step"):
        Muon([p], lr=torch.tensor(0.02, device="cuda"), capturable=True, fused=False)
    p64 = nn.Parameter(torch.randn(8, 16, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="capturable=True but .*pure-PyTorch step"):
        Muon([p64], lr=torch.tensor(0.02, device="cuda"), capturable=True)
    opt = Muon([p], lr=torch.tensor(0.02, device="cuda"), capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.01)  # replaced after construction: step says so
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="capturable=True but .*the Tensor lr is on cpu"):
        opt.step()


def _capture_raises(opt, match):
    before = [t.clone() for g in opt.param_groups for t in g["params"]]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=match), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    _assert_same([t for g in opt.param_groups for t in g["params"]], before)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_cuda_capture_errors_are_clear(seed):
    model = _mlp("cuda")
    x, y = _data("cuda")
    F.mse_loss(model(x), y).backward()
    opt = _cuda_opt("muon", model)  # capturable=False
    opt.step()
    _capture_raises(opt, "capture of step\\(\\) for an instance of Muon.*capturable=True")
    opt = _cuda_opt("muon", model, lr_kind="float", capturable=True)
    opt.step()
    _capture_raises(opt, "float lr")
    opt = _cuda_opt("muon", model, capturable=True)
    opt.step()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)  # CPU: frozen at capture
    _capture_raises(opt, "optimizer.grad_scale is a CPU tensor")


def _lr_factor(epoch: int) -> float:
    return [1.0, 0.5, 0.0, 0.25, 1.0, 0.75, 0.5, 0.25][epoch % 8]


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("kind", ["muon", "hybrid"])
def test_cuda_graph_scaler_step_and_update_replays_follow_the_lr_schedule(seed, kind):
    """``scaler.step(opt); scaler.update()`` captured once, replayed with new grads (one of them
    inf) while LambdaLR changes the Tensor lr in place: every replay equals an eager twin,
    and the replay at lr == 0 leaves the params bit-unchanged."""
    model = _mlp("cuda", bias=kind == "hybrid")
    twin = copy.deepcopy(model)
    opt = _cuda_opt(kind, model, capturable=True)
    ref = _cuda_opt(kind, twin, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(ref, _lr_factor)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE, growth_interval=2)
    scaler_ref = torch.amp.GradScaler("cuda", init_scale=SCALE, growth_interval=2)
    for p in list(model.parameters()) + list(twin.parameters()):
        p.grad = torch.zeros_like(p)  # static grads: the graph reads these tensors

    def set_grads(step: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed + step)
        for p, q in zip(model.parameters(), twin.parameters()):
            g = torch.randn(p.shape, device="cuda", generator=gen) * SCALE
            if step == 5 and p.ndim == 2:
                g[0, 0] = float("inf")
            p.grad.copy_(g)
            q.grad.copy_(g)

    def eager_step(o, s):
        s.step(o)
        s.update()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, GradScaler's tensors, cuBLAS workspaces
        for step in range(3):
            set_grads(step)
            eager_step(opt, scaler)
            eager_step(ref, scaler_ref)
            sched.step()
            sched_ref.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaler.step(opt)
        scaler.update()

    for step in range(3, 11):
        set_grads(step)
        before = [p.detach().clone() for p in model.parameters()]
        lr_now = float(opt.param_groups[0]["lr"])
        graph.replay()
        eager_step(ref, scaler_ref)
        torch.cuda.synchronize()
        assert scaler.get_scale() == scaler_ref.get_scale()
        # Same kernels on the same inputs; the slack only allows for a different cuBLAS
        # algorithm under capture. Ignoring the schedule would be off by ~1e-3.
        for a, b in zip(_snapshot(model, opt), _snapshot(twin, ref)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if step == 5 or lr_now == 0.0:  # the inf step (skipped), or lr == 0: params unchanged
            _assert_same(list(model.parameters()), before)
        else:
            assert not torch.equal(next(model.parameters()), before[0])
        sched.step()
        sched_ref.step()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["muon", "hybrid"])
def test_cuda_graph_whole_amp_training_step(seed, kind):
    """Forward (autocast fp16), backward, scaler.step and scaler.update in one CUDA graph,
    replayed on new data and a new lr; an eager twin does the same steps."""
    model = _mlp("cuda", bias=kind == "hybrid")
    twin = copy.deepcopy(model)
    opt = _cuda_opt(kind, model, capturable=True)
    ref = _cuda_opt(kind, twin, capturable=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    scaler_ref = torch.amp.GradScaler("cuda", init_scale=SCALE)
    static_x, static_y = _data("cuda")

    def train_step(m, o, s, x, y):
        o.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            loss = F.mse_loss(m(x).float(), y)
        s.scale(loss).backward()
        s.step(o)
        s.update()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x, y = _data("cuda")
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(model, opt, scaler, static_x, static_y)
            train_step(twin, ref, scaler_ref, x, y)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(model, opt, scaler, static_x, static_y)

    for i in range(5):
        x, y = _data("cuda")
        static_x.copy_(x)
        static_y.copy_(y)
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"].fill_(0.02 / (i + 1) if group.get("use_muon", True) else 2e-3)
        graph.replay()
        loss_ref = train_step(twin, ref, scaler_ref, x, y)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, loss_ref, rtol=1e-3, atol=1e-5)
        for p, q in zip(model.parameters(), twin.parameters()):  # a stale lr: off by ~1e-3
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
        assert scaler.get_scale() == scaler_ref.get_scale()
