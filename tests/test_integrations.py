"""The trainers users reach for: Lightning's automatic optimization and the Hugging Face
Trainer, each given one MuonWithAdamW (skipped when the package is not installed; they are
the optional ``integrations`` extra), plus the HF factory's contract, which needs neither."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from muon_ext import MuonWithAdamW
from muon_ext import muon_param_groups as muon_param_groups_of
from muon_ext.integrations import hf_optimizer_cls_and_kwargs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"muon_ext_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_lightning():
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        pytest.importorskip("pytorch_lightning")


def _assert_covers_trainable_params_once(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in in_opt} == trainable


# ---------------------------------------------------------------------- no trainer needed


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)


def _hf_build(cls, kwargs, model):
    """What Trainer.create_optimizer does with ``optimizer_cls_and_kwargs`` (transformers 5)."""
    kwargs = dict(kwargs)
    if not issubclass(cls, torch.optim.Optimizer):  # a factory: called with the Trainer's model
        return cls()(model, **kwargs)
    return cls(kwargs.pop("params"), **kwargs)


def test_hf_factory_gives_all_trainable_params_once_and_builds_the_optimizer():
    pytest.importorskip("transformers")
    model = _Net()
    result = hf_optimizer_cls_and_kwargs(model, lr=0.01, adamw_lr=1e-3)
    cls, kwargs = result
    assert set(kwargs) <= {"params", "lr", "adamw_lr"}
    for _ in range(2):  # the same result serves a second Trainer
        opt = _hf_build(cls, kwargs, model)
        assert type(opt) is MuonWithAdamW
        _assert_covers_trainable_params_once(model, opt)
        assert [g["lr"] for g in opt.param_groups] == [0.01, 1e-3]
        assert opt.param_groups[0]["param_names"] == ["body.weight"]
    # Built from the model the Trainer passes, not the one given here (model_init).
    other = _Net()
    _assert_covers_trainable_params_once(other, _hf_build(cls, kwargs, other))


def test_hf_factory_rejects_unknown_arguments_early():
    with pytest.raises(TypeError, match="adamw_beta"):
        hf_optimizer_cls_and_kwargs(_Net(), adamw_beta=(0.9, 0.95))


# ---------------------------------------------------------------------- Lightning


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint")
def test_lightning_automatic_optimization_trains_and_resumes(tmp_path):
    _require_lightning()
    example = _load_example("lightning_example")
    common = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "default_root_dir": tmp_path,
    }
    module = example.main(max_steps=30, **common)
    trainer = module.trainer
    assert len(trainer.optimizers) == 1
    opt = trainer.optimizers[0]
    assert type(opt) is MuonWithAdamW
    _assert_covers_trainable_params_once(module, opt)
    losses = module.losses
    assert losses[0] > 0.8 * math.log(64) and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::5]
    # the per-step scheduler scaled both groups' own lr by the same factor
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 30
    assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(0.02 / 3e-3)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if group["use_muon"]:
                assert state["momentum_buffer"].dtype == torch.float32
            else:
                assert state["step"].item() == 30

    # Checkpoint and resume: Lightning saves and loads the one optimizer's state_dict.
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = example.LitTinyGPT(max_steps=34)
    pl = example.pl
    data = torch.utils.data.DataLoader(example.permutation_walks(256, 16, 64), batch_size=32)
    resumer = pl.Trainer(
        max_steps=34, logger=False, enable_checkpointing=False, enable_model_summary=False, **common
    )
    resumer.fit(resumed, data, ckpt_path=ckpt)
    opt2 = resumer.optimizers[0]
    adamw_param = opt2.param_groups[1]["params"][0]
    assert opt2.state[adamw_param]["step"].item() == 34
    assert sum(resumed.losses) / len(resumed.losses) < 0.5 * losses[0]


# On CPU Lightning turns "16-mixed" into "bf16-mixed" (no fp16 AMP there): the GradScaler path
# that 16-mixed takes is checked without Lightning in the test below.
@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_lightning_mixed_precision_with_gradient_clipping_trains(tmp_path, precision):
    """The example's optimizer (after unscale_before_step) under AMP with gradient_clip_val: the
    grads are unscaled before clipping and every parameter moves; the plain optimizer is refused
    by Lightning with its "unscaling of gradients internally" error (why the switch exists)."""
    _require_lightning()
    example = _load_example("lightning_example")
    pl = example.pl
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(example.permutation_walks(64, 16, 64), batch_size=16)
    common = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
              "default_root_dir": tmp_path, "max_steps": 3, "logger": False,
              "enable_checkpointing": False, "enable_model_summary": False,
              "gradient_clip_val": 1.0, "precision": precision}
    module = example.LitTinyGPT(dim=32, n_layers=1, max_steps=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    pl.Trainer(**common).fit(module, data)
    assert len(module.losses) == 3 and all(math.isfinite(v) for v in module.losses)
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), set(before) - set(changed)

    class Plain(example.LitTinyGPT):
        def configure_optimizers(self):
            return MuonWithAdamW(example.muon_param_groups(self), lr=0.02, adamw_lr=3e-3)

    with pytest.raises(RuntimeError, match="unscaling of gradients internally"):
        pl.Trainer(**common).fit(Plain(dim=32, n_layers=1, max_steps=3), data)


def test_unscale_before_step_grad_scaler_unscale_clip_step_matches_unscaled(seed):
    """What Lightning's 16-mixed does: scaler.unscale_(opt), clip, scaler.step(opt). Same params as
    stepping the unscaled, clipped grads directly; with an inf grad nothing changes."""
    from muon_ext.integrations import unscale_before_step

    model = _Net()
    twin = _Net()
    twin.load_state_dict(model.state_dict())
    groups = [p for p in model.parameters() if p.requires_grad]
    opt = unscale_before_step(MuonWithAdamW(muon_param_groups_of(model), lr=0.02, adamw_lr=1e-3))
    ref = MuonWithAdamW(muon_param_groups_of(twin), lr=0.02, adamw_lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for k in range(3):
        grads = [torch.randn_like(p) for p in groups]
        if k == 1:
            grads[0][0, 0] = float("inf")
        scaler.scale(torch.ones(()))  # what scaler.scale(loss).backward() does to the scaler
        for p, g in zip(groups, grads):
            p.grad = g * scaler.get_scale()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(groups, 1.0)
        scaler.step(opt)
        scaler.update()
        if k != 1:
            tgroups = [p for p in twin.parameters() if p.requires_grad]
            for p, g in zip(tgroups, grads):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(tgroups, 1.0)
            ref.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            # scaling by a power of 2 and back is exact in fp32; clipping computes the same norm
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- Hugging Face


def test_hf_model_trees_route_as_expected():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )
    muon_group, adamw_group = _hf_build(*hf_optimizer_cls_and_kwargs(gpt2), gpt2).param_groups
    assert all(
        re.fullmatch(
            r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", n
        )
        for n in muon_group["param_names"]
    )
    assert len(muon_group["params"]) == 8
    assert "transformer.wte.weight" in adamw_group["param_names"]
    assert "lm_head.weight" not in adamw_group["param_names"]  # tied: counted once

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    opt = _hf_build(*hf_optimizer_cls_and_kwargs(llama), llama)
    muon_group, adamw_group = opt.param_groups
    assert len(muon_group["params"]) == 2 * 7
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(
        adamw_group["param_names"]
    )
    _assert_covers_trainable_params_once(llama, opt)


def test_hf_moe_expert_biases_go_to_adamw():
    """GPT-OSS stacks its expert biases as (E, 2I) / (E, d) tensors named ``*_proj_bias``: biases
    whatever their shape, so AdamW; the expert weight stacks stay with Muon."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("transformers without GPT-OSS")
    model = transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2,
        )
    )
    muon_group, adamw_group = _hf_build(*hf_optimizer_cls_and_kwargs(model), model).param_groups
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert any(n.endswith("experts.gate_up_proj_bias") for n in biases)
    assert any(n.endswith("experts.down_proj_bias") for n in biases)
    assert set(biases) <= set(adamw_group["param_names"])
    assert not any("bias" in n for n in muon_group["param_names"])
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= set(
        muon_group["param_names"]
    )


def test_hf_trainer_trains_with_one_muon_with_adamw(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = _load_example("hf_trainer_example")
    torch.manual_seed(0)
    model = example.build_model()
    trainer = example.build_trainer(model, str(tmp_path), max_steps=30, logging_steps=5)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate wraps it
    assert type(opt) is MuonWithAdamW
    _assert_covers_trainable_params_once(model, opt)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    # the Trainer's schedule scaled each group's own lr
    assert opt.param_groups[0]["initial_lr"] == 3e-3 and opt.param_groups[1]["initial_lr"] == 3e-3
    assert opt.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    factors = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
    assert factors[0] == pytest.approx(factors[1], abs=1e-12)
    for group in opt.param_groups:
        for p in group["params"]:
            assert opt.state[p], "every trainable parameter was updated"


def test_hf_one_result_serves_two_trainers_and_model_init(tmp_path):
    """The same hf_optimizer_cls_and_kwargs result for a second Trainer, and for a Trainer with
    model_init (the model is built inside the Trainer): both train every parameter."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    example = _load_example("hf_trainer_example")
    torch.manual_seed(0)
    result = hf_optimizer_cls_and_kwargs(lr=3e-3, adjust_lr_fn="match_rms_adamw", adamw_lr=3e-3)

    def args(sub):
        return TrainingArguments(
            output_dir=str(tmp_path / sub), max_steps=2, per_device_train_batch_size=8,
            save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
        )

    def dataset(model):
        return example.PermutationWalks(64, model.config.n_positions, model.config.vocab_size)

    built = []

    def model_init():
        built.append(example.build_model(dim=32, n_layers=1))
        return built[-1]

    first, second = example.build_model(dim=32, n_layers=1), example.build_model(dim=32, n_layers=1)
    trainers = [
        Trainer(model=first, args=args("a"), train_dataset=dataset(first),
                optimizer_cls_and_kwargs=result),
        Trainer(model=second, args=args("b"), train_dataset=dataset(second),
                optimizer_cls_and_kwargs=result),
        Trainer(model_init=model_init, args=args("c"), train_dataset=dataset(first),
                optimizer_cls_and_kwargs=result),
    ]
    for trainer in trainers:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        model = trainer.model
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert type(opt) is MuonWithAdamW
        _assert_covers_trainable_params_once(model, opt)
        # the model the Trainer trains (after model_init: the newly built one) is the one updated
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len(before), set(before) - set(changed)
    assert trainers[2].model is built[-1]
