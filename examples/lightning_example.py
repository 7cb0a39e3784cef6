"""A tiny GPT trained with Lightning's automatic optimization and one MuonWithAdamW.

    python examples/lightning_example.py            # needs `pip install lightning`

``configure_optimizers`` returns a single optimizer (plus a per-step LR schedule), so
Lightning's automatic optimization, gradient clipping, accumulation and checkpointing all
work unchanged: Muon for the hidden matrices, AdamW for embeddings, the tied head and norms.
The data are random walks through a fixed permutation of the vocabulary, so the loss falls
from ln(vocab) towards 0 within a few hundred steps on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from muon_ext import MuonWithAdamW, muon_param_groups
from muon_ext.integrations import unscale_before_step


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.fc_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """GPT-2 layout (``wte``, ``wpe``, blocks, ``ln_f``, ``lm_head`` tied to ``wte``)."""

    def __init__(self, vocab_size: int, dim: int, n_layers: int, heads: int, max_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: routed to AdamW with the embedding
        for module in self.modules():  # GPT-2's init: small embeddings keep the first logits sane
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def permutation_walks(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> TensorDataset:
    """Sequences x[t+1] = perm[x[t]] from random starts: (inputs, next-token targets)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab_size, generator=gen)
    seqs = torch.empty(n, seq_len + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab_size, (n,), generator=gen)
    for t in range(seq_len):
        seqs[:, t + 1] = perm[seqs[:, t]]
    return TensorDataset(seqs[:, :-1], seqs[:, 1:])


class LitTinyGPT(pl.LightningModule):
    def __init__(
        self,
        vocab_size: int = 64,
        dim: int = 64,
        n_layers: int = 2,
        heads: int = 4,
        seq_len: int = 16,
        lr: float = 0.02,
        adamw_lr: float = 3e-3,
        warmup_steps: int = 10,
        max_steps: int = 200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyGPT(vocab_size, dim, n_layers, heads, seq_len)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = MuonWithAdamW(
            muon_param_groups(self, report=self.print),  # Muon: hidden matrices; AdamW: the rest
            lr=hp.lr,
            adamw_lr=hp.adamw_lr,
        )
        # Lightning unscales the grads itself before clipping (gradient_clip_val) under
        # precision="16-mixed" / "bf16-mixed"; without this it refuses optimizers that unscale
        # inside their step. Harmless at full precision.
        unscale_before_step(optimizer)

        def warmup_cosine(step: int) -> float:  # multiplies each group's own lr
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def main(max_steps: int = 200, **trainer_kwargs) -> LitTinyGPT:
    torch.manual_seed(0)
    module = LitTinyGPT(max_steps=max_steps)
    data = DataLoader(
        permutation_walks(4096, module.hparams.seq_len, module.hparams.vocab_size),
        batch_size=32,
        shuffle=True,
    )
    options = {
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "gradient_clip_val": 1.0,
    }
    options.update(trainer_kwargs)
    pl.Trainer(**options).fit(module, data)
    print(f"loss: first {module.losses[0]:.3f}, last {module.losses[-1]:.3f}")
    return module


if __name__ == "__main__":
    main()
