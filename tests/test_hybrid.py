"""MuonWithAdamW: equal, bit for bit, to muon_ext.Muon + torch.optim.AdamW run side by side;
one state_dict; LR schedulers, GradScaler, hooks; validation; a tiny model learns."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muon_ext import Muon, MuonWithAdamW, muon_param_groups

MUON_KW = {"lr": 0.02, "weight_decay": 0.05, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}
ADAMW_KW = {"lr": 3e-3, "betas": (0.8, 0.97), "eps": 1e-9, "weight_decay": 0.02}


def _hybrid_kwargs(**adamw_impl):
    return {
        **MUON_KW,
        **{f"adamw_{k}": v for k, v in ADAMW_KW.items()},
        **{f"adamw_{k}": v for k, v in adamw_impl.items()},
    }


class TinyLM(nn.Module):
    """GPT-2 layout in miniature: tied head, norms, biases, a 3-D expert stack, odd shapes."""

    def __init__(self, vocab: int = 37, dim: int = 24, hidden: int = 61, dtype=torch.float32):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(11, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.experts = nn.Parameter(torch.randn(3, dim, 7) / math.sqrt(dim))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.05)
        with torch.no_grad():  # norms and biases away from their init, so decay has work to do
            for name, p in self.named_parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        self.to(dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        h = F.gelu(self.fc(self.ln_1(x)))
        x = x + self.proj(h)
        mix = torch.einsum("btd,edk->btk", x, self.experts).mean(-1, keepdim=True)
        return self.lm_head(self.ln_f(x + mix))


def _random_grads(model: nn.Module, step: int) -> dict[str, torch.Tensor | None]:
    """Fresh grads by name; some params skip some steps (grad None: no update, no state)."""
    grads: dict[str, torch.Tensor | None] = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        grads[name] = None if (i + step) % 5 == 0 else torch.randn_like(p)
    return grads


def _apply(model: nn.Module, grads: dict[str, torch.Tensor | None]) -> None:
    for name, p in model.named_parameters():
        g = grads[name]
        p.grad = None if g is None else g.clone()


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name}: max diff {(pa.double() - pb.double()).abs().max()}"


def _state_by_name(model: nn.Module, *optimizers) -> dict[str, dict]:
    out = {}
    for name, p in model.named_parameters():
        for opt in optimizers:
            if p in opt.state:
                out[name] = dict(opt.state[p])
    return out


def _assert_same_state(sa: dict[str, dict], sb: dict[str, dict]) -> None:
    assert sa.keys() == sb.keys()
    for name, state in sa.items():
        assert state.keys() == sb[name].keys(), name
        for key, va in state.items():
            vb = sb[name][key]
            assert va.dtype == vb.dtype and va.device == vb.device, (name, key)
            assert torch.equal(va, vb), f"{name}.{key} differs"


ADAMW_IMPLS = {
    # id: (our adamw_* switches, the same torch.optim.AdamW switches)
    "auto=fused": ({}, {"fused": True}),
    "fused": ({"fused": True}, {"fused": True}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "for-loop": ({"fused": False, "foreach": False}, {"fused": False, "foreach": False}),
}


@pytest.mark.parametrize("impl", list(ADAMW_IMPLS), ids=list(ADAMW_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_muon_plus_torch_adamw_bit_for_bit(seed, impl, dtype):
    ours_impl, torch_impl = ADAMW_IMPLS[impl]
    model = TinyLM(dtype=dtype)
    twin = copy.deepcopy(model)

    hybrid = MuonWithAdamW(muon_param_groups(model), **_hybrid_kwargs(**ours_impl))
    muon_group, adamw_group = muon_param_groups(twin)
    muon = Muon([muon_group], **MUON_KW)
    adamw = torch.optim.AdamW([adamw_group], **ADAMW_KW, **torch_impl)
    assert len(adamw_group["params"]) > len(muon_group["params"]) > 0

    def schedule(step: int) -> float:
        return 0.5 + 0.5 * math.cos(step / 3)

    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (hybrid, muon, adamw)]
    for step in range(6):
        grads = _random_grads(model, step)
        _apply(model, grads)
        _apply(twin, grads)
        hybrid.step()
        muon.step()
        adamw.step()
        for s in scheds:
            s.step()
        _assert_same_params(model, twin)
        _assert_same_state(_state_by_name(model, hybrid), _state_by_name(twin, muon, adamw))
        assert [g["lr"] for g in hybrid.param_groups] == [
            muon.param_groups[0]["lr"],
            adamw.param_groups[0]["lr"],
        ]
    # The run changed every param (a test that compares two frozen models cannot fail).
    assert all(
        not torch.equal(p, q) for p, q in zip(model.parameters(), TinyLM(dtype=dtype).parameters())
    )


def test_state_keys_and_dtypes_follow_muon_and_torch_adamw(seed):
    model = TinyLM(dtype=torch.bfloat16)
    opt = MuonWithAdamW(muon_param_groups(model))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if group["use_muon"]:
                assert set(state) == {"momentum_buffer"}
                assert state["momentum_buffer"].dtype == torch.float32
            else:
                assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
                assert state["exp_avg"].dtype == torch.bfloat16  # as torch.optim.AdamW
                assert state["step"].item() == 1.0


def test_state_dict_round_trip_continues_bit_for_bit(seed):
    model = TinyLM(dtype=torch.bfloat16)
    opt = MuonWithAdamW(muon_param_groups(model), **_hybrid_kwargs())
    for step in range(3):
        _apply(model, _random_grads(model, step))
        opt.step()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = MuonWithAdamW(muon_param_groups(twin))  # other defaults: the checkpoint wins
    twin_opt.load_state_dict(torch.load(buffer, weights_only=True))

    assert [g["lr"] for g in twin_opt.param_groups] == [MUON_KW["lr"], ADAMW_KW["lr"]]
    assert twin_opt.param_groups[1]["betas"] == ADAMW_KW["betas"]
    for group in twin_opt.param_groups:
        for p in group["params"]:
            if group["use_muon"] and twin_opt.state[p]:
                assert twin_opt.state[p]["momentum_buffer"].dtype == torch.float32
    for step in range(3, 6):
        grads = _random_grads(model, step)
        _apply(model, grads)
        _apply(twin, grads)
        opt.step()
        twin_opt.step()
        _assert_same_params(model, twin)
        _assert_same_state(_state_by_name(model, opt), _state_by_name(twin, twin_opt))


def test_load_state_dict_rejects_other_group_kinds():
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    sd = opt.state_dict()
    swapped = copy.deepcopy(sd)
    swapped["param_groups"][0]["use_muon"] = False
    with pytest.raises(ValueError, match=r"param_groups\[0\] has use_muon=False"):
        opt.load_state_dict(swapped)
    plain = copy.deepcopy(sd)
    del plain["param_groups"][1]["use_muon"]
    with pytest.raises(ValueError, match="not a MuonWithAdamW state_dict"):
        opt.load_state_dict(plain)


def test_deepcopy_and_defaults_rebuild_the_optimizer(seed):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model), adamw_lr=1e-3, adamw_betas=(0.5, 0.6))
    rebuilt = MuonWithAdamW(muon_param_groups(model), **opt.defaults)
    assert rebuilt.param_groups[1]["betas"] == (0.5, 0.6)
    clone = copy.deepcopy(opt)
    extra = nn.Parameter(torch.randn(5))
    # torch: once groups carry param_names (muon_param_groups' do), every group must.
    clone.add_param_group({"params": [extra], "param_names": ["extra"], "use_muon": False})
    assert clone.param_groups[-1]["lr"] == 1e-3 and clone.param_groups[-1]["betas"] == (0.5, 0.6)


def test_added_groups_get_their_own_kinds_defaults_only():
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model), adamw_eps=1e-6)
    opt.add_param_group(
        {"params": [nn.Parameter(torch.randn(4, 6))], "param_names": ["a"], "use_muon": True}
    )
    opt.add_param_group(
        {"params": [nn.Parameter(torch.randn(6))], "param_names": ["b"], "use_muon": False}
    )
    muon_group, adamw_group = opt.param_groups[-2:]
    assert muon_group["eps"] == 1e-7 and "betas" not in muon_group and "foreach" not in muon_group
    assert adamw_group["eps"] == 1e-6 and "momentum" not in adamw_group
    assert not any(k.startswith("adamw_") for g in opt.param_groups for k in g)


def test_distributed_options_are_passed_to_the_muon_machinery():
    if "distributed_mode" not in inspect.signature(Muon).parameters:
        pytest.skip("muon_ext.Muon has no distributed options")
    assert MuonWithAdamW(muon_param_groups(TinyLM())).distributed_mode is None
    with pytest.raises(ValueError, match="distributed_mode"):
        MuonWithAdamW(muon_param_groups(TinyLM()), distributed_mode="everywhere")


# ---------------------------------------------------------------------- validation


def test_params_without_use_muon_point_to_muon_param_groups():
    model = TinyLM()
    with pytest.raises(ValueError, match="use_muon.*muon_param_groups"):
        MuonWithAdamW(model.parameters())
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([{"params": [model.fc.weight]}])


def test_use_muon_on_a_vector_names_the_parameter():
    model = TinyLM()
    groups = muon_param_groups(model)
    i = groups[1]["param_names"].index("ln_f.weight")
    groups[0]["params"].append(groups[1]["params"].pop(i))
    groups[0]["param_names"].append(groups[1]["param_names"].pop(i))
    with pytest.raises(ValueError, match=r"'ln_f.weight'.*shape \(24,\).*use_muon=False"):
        MuonWithAdamW(groups)


@pytest.mark.parametrize(
    "group,match",
    [
        ({"use_muon": "yes"}, "use_muon must be True or False"),
        ({"use_muon": False, "momentum": 0.9}, r"Muon-only option\(s\) \['momentum'\]"),
        ({"use_muon": True, "betas": (0.9, 0.9)}, r"AdamW-only option\(s\) \['betas'\]"),
        ({"use_muon": False, "betas": (0.9, 1.0)}, "betas"),
        ({"use_muon": False, "betas": (0.9,)}, "betas"),
        ({"use_muon": False, "eps": -1.0}, "eps"),
        ({"use_muon": False, "lr": float("nan")}, "lr"),
        ({"use_muon": False, "lr": torch.tensor([1.0, 2.0])}, "lr"),
        ({"use_muon": False, "weight_decay": -0.1}, "weight_decay"),
        ({"use_muon": False, "fused": "auto"}, "fused"),
        ({"use_muon": False, "fused": True, "foreach": True}, "cannot be set together"),
        ({"use_muon": False, "amsgrad": True}, "amsgrad"),
        ({"use_muon": True, "ns_steps": 0}, "ns_steps"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_group_is_rejected_and_not_added(group, match):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    shape = (5, 3) if group["use_muon"] is True else (5,)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.randn(shape))], "param_names": ["new"], **group}
        )
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"adamw_lr": -1.0}, "lr"),
        ({"adamw_betas": (1.2, 0.9)}, "betas"),
        ({"adamw_eps": float("inf")}, "eps"),
        ({"adamw_weight_decay": -1.0}, "weight_decay"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_constructor_argument_is_rejected_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuonWithAdamW(muon_param_groups(TinyLM()), **kwargs)


def test_integer_param_in_adamw_group_is_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        MuonWithAdamW([{"params": [torch.zeros(3, dtype=torch.long)], "use_muon": False}])


def test_bad_setting_found_at_step_changes_nothing(seed):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    _apply(model, _random_grads(model, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: betas"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


def test_sparse_grad_in_adamw_group_names_it_and_changes_nothing(seed):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    _apply(model, _random_grads(model, 1))
    model.wpe.weight.grad = model.wpe.weight.grad.to_sparse()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="sparse.*'wpe.weight'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


# ---------------------------------------------------------------------- torch.optim idioms


def test_each_group_follows_its_own_lr_under_a_scheduler():
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model), lr=0.04, adamw_lr=4e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(2):
        opt.step()
        sched.step()
    factor = 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04 * factor)
    assert opt.param_groups[1]["lr"] == pytest.approx(4e-3 * factor)


def test_one_cycle_scheduler_cycles_the_muon_momentum_the_step_uses(seed):
    """OneCycleLR (cycle_momentum=True) writes group["momentum"] (MuonWithAdamW's defaults have
    no "betas"): the Muon step must use the cycled value, each step's. AdamW groups keep betas."""
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 3e-3], total_steps=6)
    muon_group = opt.param_groups[0]
    p = muon_group["params"][0]
    used = []
    prev = torch.zeros_like(p, dtype=torch.float32)
    for step in range(5):
        g = torch.randn_like(p)
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        p.grad = g.clone()
        beta = muon_group["momentum"]
        used.append(beta)
        opt.step()
        # momentum_buffer = lerp(buf, g, 1 - beta) with this step's beta: exact up to fp32 rounding
        expected = prev.lerp(g.float(), 1 - beta)
        buf = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(buf, expected, rtol=1e-6, atol=1e-6)
        prev = buf.clone()
        sched.step()
    assert len(set(used)) == len(used), f"momentum was not cycled: {used}"
    assert min(used) < 0.9 < max(used) <= 0.95  # base_momentum 0.85, max_momentum 0.95
    assert opt.param_groups[1]["betas"] == (0.9, 0.95)


def test_step_hooks_run_once_per_step():
    Muon([nn.Parameter(torch.randn(3, 3))])  # patches Muon.step's hooks wrapper first
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.step()
    opt.step()
    assert calls == ["pre", "post", "pre", "post"]


def test_closure_is_called_with_grad_enabled(seed):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    idx = torch.randint(37, (2, 5))

    def closure():
        opt.zero_grad()
        loss = model(idx).square().mean()
        loss.backward()
        return loss

    before = model.fc.weight.detach().clone()
    loss = opt.step(closure)
    assert loss.requires_grad and not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize(
    "adamw_impl", [{}, {"foreach": True}], ids=["fused-adamw", "foreach-adamw"]
)
def test_grad_scaler_matches_unscaled_and_skips_inf(seed, adamw_impl):
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = MuonWithAdamW(muon_param_groups(model), **_hybrid_kwargs(**adamw_impl))
    ref = MuonWithAdamW(muon_param_groups(twin), **_hybrid_kwargs(**adamw_impl))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        idx = torch.randint(37, (3, 6))
        ref.zero_grad()
        F.cross_entropy(twin(idx).flatten(0, 1), idx.flatten()).backward()
        ref.step()
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())).backward()
        assert torch.equal(model.fc.weight.grad, ref_grad := twin.fc.weight.grad * 2.0**12)
        assert not torch.equal(ref_grad, twin.fc.weight.grad)  # the grads really are scaled
        scaler.step(opt)
        scaler.update()
        _assert_same_params(model, twin)
        _assert_same_state(_state_by_name(model, opt), _state_by_name(twin, ref))

    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(_state_by_name(model, opt))
    opt.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    model.proj.bias.grad[0] = float("inf")
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _assert_same_state(_state_by_name(model, opt), state_before)


def test_params_without_grad_get_no_state(seed):
    model = TinyLM()
    opt = MuonWithAdamW(muon_param_groups(model))
    model.fc.weight.grad = torch.randn_like(model.fc.weight)
    model.ln_1.bias.grad = torch.randn_like(model.ln_1.bias)
    opt.step()
    assert set(opt.state) == {model.fc.weight, model.ln_1.bias}


# ---------------------------------------------------------------------- end to end


def test_tiny_model_learns(seed):
    """Random walks through a fixed permutation: next-token loss falls from ln(vocab)."""
    vocab, seq_len = 37, 10
    perm = torch.randperm(vocab)
    model = TinyLM(vocab=vocab)
    groups = muon_param_groups(model)
    start = {
        name: p.detach().clone() for name, p in zip(groups[0]["param_names"], groups[0]["params"])
    }
    opt = MuonWithAdamW(groups, lr=0.02, adamw_lr=1e-2)
    losses = []
    for _ in range(60):
        seqs = torch.empty(32, seq_len + 1, dtype=torch.long)
        seqs[:, 0] = torch.randint(vocab, (32,))
        for t in range(seq_len):
            seqs[:, t + 1] = perm[seqs[:, t]]
        loss = F.cross_entropy(model(seqs[:, :-1]).flatten(0, 1), seqs[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0.8 * math.log(vocab)
    assert sum(losses[-5:]) / 5 < 0.05 * losses[0], losses[::10]
    for name, p in zip(groups[0]["param_names"], groups[0]["params"]):  # Muon did its share
        assert (p - start[name]).norm() > 0.2 * start[name].norm(), name
