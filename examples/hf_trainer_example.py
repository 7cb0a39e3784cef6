"""A small GPT-2 (random init, nothing downloaded) trained by the Hugging Face Trainer with
one MuonWithAdamW.

    python examples/hf_trainer_example.py           # needs `pip install transformers accelerate`

The Trainer builds its own param groups unless it gets ``params``;
``muon_ext.integrations.hf_optimizer_cls_and_kwargs(model, ...)`` hands it an optimizer
factory that builds ``MuonWithAdamW(muon_param_groups(model), ...)`` from the model the Trainer
passes when it creates the optimizer: every trainable parameter once, Muon for the hidden matrices, AdamW for ``wte``/``wpe``/the tied ``lm_head``, norms and
biases. The Trainer's LR schedule (warmup + cosine here) scales each group's own lr.
Without ``optimizer_cls_and_kwargs`` (older transformers), pass
``optimizers=(MuonWithAdamW(muon_param_groups(model), ...), None)`` instead.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from muon_ext.integrations import hf_optimizer_cls_and_kwargs


class PermutationWalks(Dataset):
    """Sequences x[t+1] = perm[x[t]] from random starts; the model learns the permutation."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab_size, generator=gen)
        seqs = torch.empty(n, seq_len, dtype=torch.long)
        seqs[:, 0] = torch.randint(vocab_size, (n,), generator=gen)
        for t in range(seq_len - 1):
            seqs[:, t + 1] = perm[seqs[:, t]]
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.seqs[i], "labels": self.seqs[i]}  # the model shifts labels


def build_model(vocab_size: int = 64, dim: int = 64, n_layers: int = 2, seq_len: int = 16):
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=dim,
        n_layer=n_layers,
        n_head=4,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def build_trainer(model, output_dir: str, max_steps: int = 200, **training_args) -> Trainer:
    options = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": 32,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
        "seed": 0,
    }
    options.update(training_args)
    return Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=PermutationWalks(4096, model.config.n_positions, model.config.vocab_size),
        # GPT-2's Conv1D weights are stored (in, out): the "original" rule would read them
        # transposed; match_rms_adamw does not depend on the orientation and takes the AdamW lr.
        # AdamW: embeddings, tied head, norms, biases.
        optimizer_cls_and_kwargs=hf_optimizer_cls_and_kwargs(
            model, lr=3e-3, adjust_lr_fn="match_rms_adamw", adamw_lr=3e-3, report=True
        ),
    )


def main(output_dir: str = "hf_trainer_example_out", max_steps: int = 200) -> Trainer:
    torch.manual_seed(0)
    trainer = build_trainer(build_model(), output_dir, max_steps)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss every {trainer.args.logging_steps} steps: {[round(v, 3) for v in losses]}")
    return trainer


if __name__ == "__main__":
    main()
