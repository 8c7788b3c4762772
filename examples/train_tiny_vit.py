"""Trains the two tiny ViTs of the token-reduction evaluation on sklearn digits (seeded).

- ``tiny_vit_mha``: the TinyViT recipe of docs/evaluation.md (``nn.MultiheadAttention``, whose
  fused path hides q/k/v), on digits upsampled 8x8 -> 16x16 with 2x2 patches: 64 + 1 tokens,
  so token reduction has room (the 8x8 recipe has only 16 + 1 tokens).
- ``tiny_vit_hf``: transformers ``ViTForImageClassification`` with explicit q/k/v projections.

Both: AdamW 3e-3, OneCycle, batch 64, +-1 px rolls, 1347/450 split by ``torch.randperm(1797,
generator seed 0)``. Writes ``examples/checkpoints/<name>.safetensors``.

    python examples/train_tiny_vit.py [--epochs 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

CKPT = Path(__file__).resolve().parent / "checkpoints"
IMG, PATCH, DIM, DEPTH, HEADS = 16, 2, 64, 4, 4


class Block(nn.Module):
    def __init__(self, d: int, h: int, r: int = 2) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.n2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, r * d), nn.GELU(), nn.Linear(r * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class TinyViT(nn.Module):
    def __init__(self, patch: int = PATCH, d: int = DIM, depth: int = DEPTH, heads: int = HEADS,
                 ncls: int = 10, img: int = IMG, ch: int = 1) -> None:
        super().__init__()
        n = (img // patch) ** 2
        self.embed = nn.Conv2d(ch, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, ncls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


class HFViT(nn.Module):
    """ViTForImageClassification returning plain logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=IMG, patch_size=PATCH, num_channels=1, hidden_size=DIM,
                        num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=2 * DIM, num_labels=10)
        self.vit = ViTForImageClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), images standardised and upsampled to 16x16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1347], perm[1347:]
    return x[tr], y[tr], x[te], y[te]


def build(name: str) -> nn.Module:
    return TinyViT() if name == "tiny_vit_mha" else HFViT()


def train(name: str, epochs: int) -> float:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_split()
    model = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            xb = xtr[idx]
            sh = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=sh, dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean())
    CKPT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(CKPT / f"{name}.safetensors"))
    print(f"{name}: test top-1 {acc:.4f} after {epochs} epochs, {time.time() - t0:.0f} s")
    return acc


def load(name: str) -> nn.Module:
    from safetensors.torch import load_file

    m = build(name)
    m.load_state_dict(load_file(str(CKPT / f"{name}.safetensors")))
    return m.eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    torch.set_num_threads(2)
    np.random.seed(0)
    for nm in ("tiny_vit_mha", "tiny_vit_hf"):
        if not a.only or a.only == nm:
            train(nm, a.epochs)
