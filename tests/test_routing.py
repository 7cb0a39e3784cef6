"""muon_param_groups: which parameter goes where, on GPT-2-like and Llama-like module trees
(tied embeddings, LoRA adapters, frozen weights), deterministically, with a readable report."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from muon_ext import Muon, MuonWithAdamW, muon_param_groups
from muon_ext.routing import DEFAULT_ADAMW_PATTERNS, format_routing_report, route_parameters

# ---------------------------------------------------------------------- module trees


class Conv1D(nn.Module):
    """GPT-2's transposed linear: weight (in, out) and bias (out,) as bare Parameters."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))


class GPT2Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(d, 3 * d)
        self.attn.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(d, 4 * d)
        self.mlp.c_proj = Conv1D(4 * d, d)


class GPT2LMHead(nn.Module):
    """Hugging Face GPT2LMHeadModel's names: transformer.{wte,wpe,h.N,ln_f}, tied lm_head."""

    def __init__(self, vocab: int = 50, d: int = 16, n_layer: int = 2, n_pos: int = 12) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, d)
        self.transformer.wpe = nn.Embedding(n_pos, d)
        self.transformer.h = nn.ModuleList(GPT2Block(d) for _ in range(n_layer))
        self.transformer.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


class LlamaRMSNorm(nn.Module):  # not a torch norm class: recognized by its name
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class LlamaLayer(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, ffn, bias=False)
        self.mlp.up_proj = nn.Linear(d, ffn, bias=False)
        self.mlp.down_proj = nn.Linear(ffn, d, bias=False)
        self.input_layernorm = LlamaRMSNorm(d)
        self.post_attention_layernorm = LlamaRMSNorm(d)


class LlamaForCausalLM(nn.Module):
    """Hugging Face LlamaForCausalLM's names: model.{embed_tokens,layers.N,norm}, lm_head."""

    def __init__(self, vocab: int = 40, d: int = 16, ffn: int = 24, n_layer: int = 2) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(LlamaLayer(d, ffn) for _ in range(n_layer))
        self.model.norm = LlamaRMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)  # untied: AdamW by name


class LoraLinear(nn.Module):
    """PEFT's layout: the frozen base layer plus lora_A.default / lora_B.default."""

    def __init__(self, base: nn.Linear, r: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})


class LoraEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, r: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict(
            {"default": nn.Parameter(torch.randn(r, base.num_embeddings))}
        )
        self.lora_embedding_B = nn.ParameterDict(
            {"default": nn.Parameter(torch.zeros(base.embedding_dim, r))}
        )


def _with_lora(model: LlamaForCausalLM) -> LlamaForCausalLM:
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name)))
    model.model.embed_tokens = LoraEmbedding(model.model.embed_tokens)
    model.lm_head = LoraLinear(model.lm_head)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return model


def _where(groups) -> dict[str, str]:
    out = {}
    for group in groups:
        for name in group["param_names"]:
            assert name not in out, f"{name} routed twice"
            out[name] = "muon" if group["use_muon"] else "adamw"
    return out


# ---------------------------------------------------------------------- routing rules


def test_gpt2_tree_routes_hidden_matrices_to_muon_and_the_rest_to_adamw():
    model = GPT2LMHead()
    groups = muon_param_groups(model)
    where = _where(groups)
    expected_muon = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert {n for n, d in where.items() if d == "muon"} == expected_muon
    assert set(where) == {n for n, _ in model.named_parameters()}  # all trainable, once
    assert "lm_head.weight" not in where  # the tied head is the embedding: counted once
    assert where["transformer.wte.weight"] == "adamw"
    assert [g["use_muon"] for g in groups] == [True, False]
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])


def test_llama_tree_routes_untied_head_by_name_and_rmsnorm_by_rule():
    model = LlamaForCausalLM()
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["lm_head.weight"].destination == "adamw"
    assert "lm_head" in routes["lm_head.weight"].reason
    assert routes["model.embed_tokens.weight"].reason == "embedding"
    assert routes["model.layers.0.input_layernorm.weight"].reason == "norm"
    assert routes["model.norm.weight"].destination == "adamw"
    muon = {n for n, r in routes.items() if r.use_muon}
    assert muon == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }


def test_without_name_patterns_an_untied_head_is_just_a_matrix():
    where = _where(muon_param_groups(LlamaForCausalLM(), adamw_patterns=()))
    assert where["lm_head.weight"] == "muon"
    assert where["model.embed_tokens.weight"] == "adamw"  # by type, not by name


def test_tied_head_is_found_by_identity_whatever_its_name():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Linear(8, 30, bias=False)  # registered before the embedding
            self.tokens = nn.Embedding(30, 8)
            self.decoder.weight = self.tokens.weight
            self.readout = nn.Linear(8, 30, bias=False)  # same shape, not tied: a matrix
            self.mixer = nn.Linear(8, 8)

    model = Odd()
    routes = route_parameters(model, adamw_patterns=())
    by_name = {r.name: r for r in routes}
    assert [r.name for r in routes] == [
        "decoder.weight",
        "readout.weight",
        "mixer.weight",
        "mixer.bias",
    ]
    assert by_name["decoder.weight"].destination == "adamw"
    assert by_name["decoder.weight"].aliases == ("tokens.weight",)
    assert "embedding" in by_name["decoder.weight"].reason
    assert by_name["readout.weight"].use_muon and by_name["mixer.weight"].use_muon


def test_head_sharing_memory_with_the_embedding_goes_with_it():
    model = GPT2LMHead()
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.data)  # `.data` tying
    routes = {r.name: r for r in route_parameters(model, adamw_patterns=())}
    assert routes["lm_head.weight"].destination == "adamw"
    assert "shares memory" in routes["lm_head.weight"].reason


def test_lora_adapters_route_by_rule_and_frozen_base_weights_are_left_out():
    model = _with_lora(LlamaForCausalLM())
    groups = muon_param_groups(model)
    where = _where(groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == trainable and all("lora_" in n for n in trainable)
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            for ab in ("lora_A", "lora_B"):
                assert where[f"model.layers.{i}.self_attn.{proj}.{ab}.default.weight"] == "muon"
    # adapters of the embedding and of the head go where their layer goes: AdamW
    assert where["model.embed_tokens.lora_embedding_A.default"] == "adamw"
    assert where["model.embed_tokens.lora_embedding_B.default"] == "adamw"
    assert where["lm_head.lora_A.default.weight"] == "adamw"
    assert where["lm_head.lora_B.default.weight"] == "adamw"
    frozen = [r for r in route_parameters(model) if r.destination == "excluded"]
    assert {r.name for r in frozen} == {
        n for n, p in model.named_parameters() if not p.requires_grad
    }


def test_lora_adapters_can_be_sent_to_adamw_by_pattern():
    model = _with_lora(LlamaForCausalLM())
    where = _where(muon_param_groups(model, adamw_patterns=(*DEFAULT_ADAMW_PATTERNS, r"\.lora_")))
    assert set(where.values()) == {"adamw"}


@pytest.mark.parametrize(
    "shape,destination,reason",
    [
        ((1, 12, 16), "adamw", "leading dim of size 1"),  # a learned (1, T, d) position table
        ((1, 16), "adamw", "leading dim of size 1"),  # a (1, d) scalar head
        ((), "adamw", "scalar"),
        ((16,), "adamw", "1-D"),
        ((4, 16, 8), "muon", "hidden matrix"),  # a 3-D expert stack
        ((8, 3, 3, 3), "muon", "hidden matrix"),  # a conv weight
        ((16, 1), "muon", "hidden matrix"),
    ],
    ids=str,
)
def test_shape_rules(shape, destination, reason):
    model = nn.Module()
    model.thing = nn.Parameter(torch.randn(shape))
    (route,) = route_parameters(model)
    assert (route.destination, route.reason) == (destination, reason)


def test_complex_matrix_goes_to_adamw():
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    (route,) = route_parameters(model)
    assert (route.destination, route.reason) == ("adamw", "complex")


def test_shared_module_is_counted_once_and_order_is_named_parameters_order():
    class Albert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Linear(8, 8)
            self.layers = nn.ModuleList([shared, nn.Linear(8, 8), shared])

    model = Albert()
    groups = muon_param_groups(model)
    assert groups[0]["param_names"] == ["layers.0.weight", "layers.1.weight"]
    routes = route_parameters(model)
    assert routes[0].aliases == ("layers.2.weight",) and "shared with" in routes[0].reason
    assert [r.name for r in routes] == [n for n, _ in model.named_parameters()]


def test_routing_is_deterministic_across_calls_and_fresh_models():
    a = muon_param_groups(GPT2LMHead())
    b = muon_param_groups(GPT2LMHead())
    assert [g["param_names"] for g in a] == [g["param_names"] for g in b]
    model = LlamaForCausalLM()
    first, second = muon_param_groups(model), muon_param_groups(model)
    for g1, g2 in zip(first, second):
        assert all(p is q for p, q in zip(g1["params"], g2["params"], strict=True))


def test_group_overrides_and_defaults():
    groups = muon_param_groups(GPT2LMHead(), muon_lr=0.05, adamw_weight_decay=0.1)
    assert groups[0]["lr"] == 0.05 and "weight_decay" not in groups[0]
    assert groups[1]["weight_decay"] == 0.1 and "lr" not in groups[1]
    opt = MuonWithAdamW(groups, weight_decay=0.2, adamw_lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.1]


def test_groups_also_work_with_muon_and_torch_adamw_separately(seed):
    model = GPT2LMHead()
    muon_group, adamw_group = muon_param_groups(model)
    muon = Muon([muon_group], lr=0.02)
    adamw = torch.optim.AdamW([adamw_group], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    muon.step()
    adamw.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="MuonWithAdamW"):  # both groups: Muon refuses vectors
        Muon(muon_param_groups(model))


# ---------------------------------------------------------------------- the report


def test_report_collapses_layers_and_names_every_destination(capsys):
    model = _with_lora(LlamaForCausalLM(n_layer=3))
    groups = muon_param_groups(model, report=True)
    text = capsys.readouterr().out
    muon_count = len(groups[0]["params"])
    assert re.search(rf"Muon {muon_count} tensors", text)
    assert re.search(r"frozen \d+ tensors", text)
    line = next(
        ln
        for ln in text.splitlines()
        if "model.layers.*.self_attn.q_proj.lora_A.default.weight" in ln
    )
    assert line.split()[0] == "muon" and "x3" in line and "(4, 16)" in line
    assert "model.layers.0." not in text  # numbered layers share one line
    head = next(ln for ln in text.splitlines() if "lm_head.lora_A" in ln)
    assert head.split()[0] == "adamw" and "lm_head" in head


def test_report_can_go_to_a_callable_and_keeps_names_uncollapsed_on_request():
    seen = []
    model = GPT2LMHead()
    muon_param_groups(model, report=seen.append)
    assert len(seen) == 1 and "embedding, tied with lm_head.weight" in seen[0]
    full = format_routing_report(route_parameters(model), collapse_layers=False)
    assert "transformer.h.1.attn.c_attn.weight" in full


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_are_explained():
    with pytest.raises(TypeError, match="wrap a single pattern"):
        muon_param_groups(GPT2LMHead(), adamw_patterns="lm_head")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        muon_param_groups(GPT2LMHead(), adamw_patterns=("lm_head(",))
    with pytest.raises(TypeError, match="nn.Module"):
        muon_param_groups([nn.Parameter(torch.randn(3, 3))])
    frozen = GPT2LMHead().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        muon_param_groups(frozen)


def test_biases_of_any_shape_go_to_adamw():
    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 12))
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 12))
            self.down_proj_bias = nn.Parameter(torch.zeros(4, 8))
            self.biased_w = nn.Parameter(torch.randn(8, 8))  # a name containing "bias": a matrix

    routes = {r.name: r for r in route_parameters(Experts())}
    assert routes["gate_up_proj_bias"].destination == "adamw"
    assert routes["gate_up_proj_bias"].reason == "bias"
    assert routes["down_proj_bias"].destination == "adamw"
    assert routes["gate_up_proj"].destination == "muon"
    assert routes["biased_w"].destination == "muon"


def test_default_adamw_patterns_importable_from_the_package():
    import muon_ext

    assert muon_ext.DEFAULT_ADAMW_PATTERNS is DEFAULT_ADAMW_PATTERNS


def test_fsdp2_params_of_the_embedding_shape_are_not_taken_for_tied():
    """Under FSDP2 every param is a DTensor whose own data_ptr() is 0: identity must come from
    the local shard, else every matrix shaped like the embedding looks tied to it (AdamW)."""
    import torch.distributed as dist

    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential()
        model.add_module("embed", nn.Embedding(16, 8))
        model.add_module("proj", nn.Linear(8, 16, bias=False))  # weight (16, 8): embedding-shaped
        model.add_module("mix", nn.Linear(8, 8, bias=False))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        routed = {
            name: ("muon" if group.get("use_muon") else "adamw")
            for group in muon_param_groups(model)
            for name in group.get("param_names", [])
        }
        assert routed["proj.weight"] == "muon", routed
        assert routed["mix.weight"] == "muon", routed
        assert routed["embed.weight"] == "adamw", routed
    finally:
        dist.destroy_process_group()
