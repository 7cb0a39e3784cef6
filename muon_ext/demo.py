"""``python -m muon_ext.demo``: train a small GPT on Python's own standard library, Muon vs AdamW.

The corpus is the source of the standard library of the running Python (every installation
has it), read in-process: nothing is downloaded. A byte-level GPT is trained twice at the
same budget (same steps, batches and initialization), once with Muon on the hidden matrices
(AdamW on embeddings, head, norms and biases; one ``MuonWithAdamW`` optimizer) and once with
AdamW everywhere. Prints tokens/s, optimizer step time and the final losses; writes the loss
curves as JSON and, when matplotlib is installed, as PNG charts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PRESETS = {
    # name: (layers, heads, d_model, context, batch, steps, corpus bytes)
    "tiny": (1, 2, 32, 32, 8, 30, 200_000),
    "cpu": (2, 4, 128, 64, 16, 250, 2_000_000),
    "small": (4, 8, 256, 128, 32, 1000, 8_000_000),
    "medium": (8, 8, 512, 256, 32, 2000, 32_000_000),
}


@dataclass
class Config:
    preset: str = "cpu"
    layers: int = 2
    heads: int = 4
    d_model: int = 128
    context: int = 64
    batch: int = 16
    steps: int = 250
    corpus_bytes: int = 2_000_000
    eval_every: int = 25
    eval_batches: int = 8
    muon_lr: float = 0.02
    adamw_lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    out: str = "demo_out"
    runs: tuple = ("muon", "adamw")
    plot: bool = True
    progress: bool = True


# ---------------------------------------------------------------------- corpus


def stdlib_corpus(max_bytes: int) -> bytes:
    """The standard library's .py sources, in sorted path order (deterministic), up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise RuntimeError(f"the standard library folder {root} does not exist")
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 10_000:
        raise RuntimeError(f"found only {len(corpus)} bytes of Python sources under {root}")
    return corpus


def split_corpus(corpus: bytes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    cut = int(0.9 * data.numel())
    return data[:cut].to(device), data[cut:].to(device)


def batch_at(data: torch.Tensor, context: int, batch: int, generator: torch.Generator):
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx.to(data.device)]
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-shaped byte-level language model (vocabulary: the 256 byte values)."""

    def __init__(self, layers: int, heads: int, d_model: int, context: int):
        super().__init__()
        self.wte = nn.Embedding(256, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


# ---------------------------------------------------------------------- training


def build_optimizer(kind: str, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.adamw_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
    from . import MuonWithAdamW, muon_param_groups

    groups = muon_param_groups(model)
    return MuonWithAdamW(
        groups, lr=cfg.muon_lr, momentum=0.95, weight_decay=cfg.weight_decay,
        adamw_lr=cfg.adamw_lr, adamw_betas=(0.9, 0.95), adamw_weight_decay=cfg.weight_decay,
    )


@torch.no_grad()
def evaluate(model, data, cfg: Config, seed: int) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [loss_of(model, *batch_at(data, cfg.context, cfg.batch, gen)).item()
              for _ in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


class Progress:
    """A one-line progress bar on stderr (no dependency); silent when disabled or not a TTY."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        frac = done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(frac, 1e-9) - elapsed
        sys.stderr.write(
            f"\r{self.label:>6} [{bar}] {done}/{self.total} loss {loss:.3f} eta {eta:5.0f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def train(kind: str, cfg: Config, train_data, val_data, device) -> dict:
    torch.manual_seed(cfg.seed)  # same initialization for every run
    model = TinyGPT(cfg.layers, cfg.heads, cfg.d_model, cfg.context).to(device)
    opt = build_optimizer(kind, model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for every run
    curve = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "wall_s": [],
             "val_wall_s": []}
    opt_time, tokens, wall = 0.0, 0, 0.0
    bar = Progress(cfg.steps, kind, cfg.progress)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        x, y = batch_at(train_data, cfg.context, cfg.batch, gen)
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        opt_time += t2 - t1
        wall += t2 - t0
        tokens += x.numel()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{kind}: loss became {value} at step {step}")
        curve["step"].append(step)
        curve["train_loss"].append(value)
        curve["wall_s"].append(wall)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve["val_step"].append(step)
            curve["val_loss"].append(evaluate(model, val_data, cfg, cfg.seed + 2))
            curve["val_wall_s"].append(wall)
        bar.update(step, value)
    bar.close()
    tail = curve["train_loss"][-max(1, cfg.steps // 10):]
    return {
        "optimizer": kind,
        "curve": curve,
        "final_train_loss": sum(tail) / len(tail),
        "final_val_loss": curve["val_loss"][-1],
        "first_val_loss": curve["val_loss"][0],
        "tokens_per_s": tokens / wall,
        "optimizer_step_ms": 1e3 * opt_time / cfg.steps,
        "wall_s": wall,
        "params": sum(p.numel() for p in model.parameters()),
    }


def plot(results: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG charts (pip install matplotlib)")
        return []
    written = []
    for xkey, vkey, name, label in [("step", "val_step", "loss_vs_step.png", "optimizer step"),
                                    ("wall_s", "val_wall_s", "loss_vs_wall_clock.png",
                                     "wall-clock seconds")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            c = r["curve"]
            line, = ax.plot(c[xkey], c["train_loss"], alpha=0.35, lw=1)
            ax.plot(c[vkey], c["val_loss"], color=line.get_color(), lw=2,
                    label=f"{r['optimizer']} (val {r['final_val_loss']:.3f})")
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.set_title("byte-level GPT on the Python standard library")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(str(out / name))
    return written


# ---------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m muon_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="model/budget size (default: cpu, about 30 s on 2 CPU cores)")
    for name in ("layers", "heads", "d-model", "context", "batch", "steps", "corpus-bytes",
                 "eval-every", "eval-batches"):
        p.add_argument(f"--{name}", type=_positive_int, default=None)
    p.add_argument("--muon-lr", type=_positive_float, default=0.02)
    p.add_argument("--adamw-lr", type=_positive_float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the fused CUDA step)")
    p.add_argument("--out", default="demo_out", help="folder for the JSON and PNG results")
    p.add_argument("--only", choices=["muon", "adamw"], default=None, help="train just one run")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    layers, heads, d_model, context, batch, steps, corpus = PRESETS[a.preset]
    cfg = Config(
        preset=a.preset, layers=a.layers or layers, heads=a.heads or heads,
        d_model=a.d_model or d_model, context=a.context or context, batch=a.batch or batch,
        steps=a.steps or steps, corpus_bytes=a.corpus_bytes or corpus,
        eval_every=a.eval_every or max(1, (a.steps or steps) // 10),
        eval_batches=a.eval_batches or 8, muon_lr=a.muon_lr, adamw_lr=a.adamw_lr,
        weight_decay=a.weight_decay, seed=a.seed, device=a.device, out=a.out,
        runs=(a.only,) if a.only else ("muon", "adamw"), plot=not a.no_plot,
        progress=not a.no_progress,
    )
    if cfg.d_model % cfg.heads:
        p.error(f"--d-model ({cfg.d_model}) must be divisible by --heads ({cfg.heads})")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        p.error(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available on this machine")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.corpus_bytes < 20 * cfg.context:
        p.error(f"--corpus-bytes ({cfg.corpus_bytes}) is too small for --context {cfg.context}")
    return cfg


def run(cfg: Config) -> dict:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    corpus = stdlib_corpus(cfg.corpus_bytes)
    train_data, val_data = split_corpus(corpus, device)
    print(f"corpus: {len(corpus):,} bytes of Python {sys.version.split()[0]} standard library "
          f"sources ({train_data.numel():,} train / {val_data.numel():,} validation)")
    print(f"model: {cfg.layers} layers, {cfg.heads} heads, d_model {cfg.d_model}, context "
          f"{cfg.context}; {cfg.steps} steps of {cfg.batch}x{cfg.context} tokens on {device}")
    results = [train(kind, cfg, train_data, val_data, device) for kind in cfg.runs]
    print(f"\n{'optimizer':<10}{'train loss':>12}{'val loss':>10}{'tokens/s':>11}"
          f"{'opt step ms':>13}{'wall s':>9}")
    for r in results:
        print(f"{r['optimizer']:<10}{r['final_train_loss']:>12.3f}{r['final_val_loss']:>10.3f}"
              f"{r['tokens_per_s']:>11,.0f}{r['optimizer_step_ms']:>13.2f}{r['wall_s']:>9.1f}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": asdict(cfg), "torch": torch.__version__, "python": sys.version.split()[0],
              "results": results}
    (out / "curves.json").write_text(json.dumps(record, indent=1))
    written = [str(out / "curves.json")] + (plot(results, out) if cfg.plot else [])
    print("wrote " + ", ".join(written))
    return record


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    run(cfg)


if __name__ == "__main__":
    main()
