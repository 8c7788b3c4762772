"""Synthetic TRAINING models for the ORT latency model (never the zoo models it is judged on).

Random MLPs, CNNs (plain, depthwise-separable, residual) and transformer encoders/decoders
(learned or rotary positions, LayerNorm or RMSNorm, GELU or gated-SiLU MLPs, SDPA or
hand-written attention, optional padding mask) of random widths and depths, each with the
symbol grid it is timed at. `synth_models(n, seed)` is deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SynthModel", "synth_models"]


@dataclass
class SynthModel:
    """One training model: module, example inputs, dynamic dims and the symbol points to time."""

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_dims: dict[str, dict[int, str]]
    input_names: list[str]
    points: list[dict[str, int]] = field(default_factory=list)
    vocab: int = 0

    def make_inputs(self, **dims: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(7)
        out = []
        for name, x in zip(self.input_names, self.example_inputs):
            shape = list(x.shape)
            for d, s in self.dynamic_dims.get(name, {}).items():
                shape[d] = dims.get(s, shape[d])
            if x.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=g))
            elif name == "mask":
                out.append(torch.ones(shape, dtype=x.dtype))
            else:
                out.append(torch.randint(0, self.vocab, shape, generator=g))
        return tuple(out)


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class _MLP(nn.Module):
    def __init__(self, r: random.Random, d_in: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(r.randint(1, 4)):
            h = r.choice([16, 32, 64, 128, 256, 512, 1024])
            layers.append(nn.Linear(d, h, bias=r.random() < 0.8))
            if r.random() < 0.3:
                layers.append(nn.LayerNorm(h))
            layers.append(_ACTS[r.choice(list(_ACTS))]())
            d = h
        layers.append(nn.Linear(d, r.choice([10, 64, 100, 256])))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _CNN(nn.Module):
    def __init__(self, r: random.Random, c_in: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.kinds: list[str] = []
        c = r.choice([8, 16, 32])
        self.stem = nn.Sequential(nn.Conv2d(c_in, c, 3, stride=r.choice([1, 2]), padding=1,
                                            bias=False), nn.BatchNorm2d(c), nn.ReLU())
        for _ in range(r.randint(1, 4)):
            kind = r.choice(["conv", "dw", "res"])
            stride = r.choice([1, 1, 2])
            c2 = r.choice([c, 2 * c]) if kind != "res" else c
            if kind == "conv":
                blk = nn.Sequential(nn.Conv2d(c, c2, r.choice([1, 3]), stride, padding="same"
                                              if stride == 1 else 1), nn.BatchNorm2d(c2),
                                    _ACTS[r.choice(["relu", "silu"])]())
            elif kind == "dw":
                e = c * r.choice([1, 4, 6])
                blk = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e),
                                    nn.ReLU6(), nn.Conv2d(e, e, 3, stride, 1, groups=e,
                                                          bias=False),
                                    nn.BatchNorm2d(e), nn.ReLU6(), nn.Conv2d(e, c2, 1),
                                    nn.BatchNorm2d(c2))
            else:
                stride = 1
                blk = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                    nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(c))
            if kind == "conv" and stride == 2:
                blk[0].padding = (1, 1)
            self.blocks.append(blk)
            self.kinds.append(kind)
            c = c2
        self.pool = r.choice(["avg", "max_then_avg"])
        self.head = nn.Linear(c, r.choice([10, 100]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for kind, blk in zip(self.kinds, self.blocks):
            x = F.relu(x + blk(x)) if kind == "res" else blk(x)
        if self.pool == "max_then_avg":
            x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class _RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + 1e-6) * self.w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


class _Block(nn.Module):
    def __init__(self, r: random.Random, d: int, heads: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg, self.h = cfg, heads
        norm = _RMSNorm if cfg["rms"] else nn.LayerNorm
        self.n1, self.n2 = norm(d), norm(d)
        self.fused_qkv = r.random() < 0.4
        if self.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=not cfg["rms"]) for _ in range(3))
        self.o = nn.Linear(d, d)
        f = d * r.choice([2, 4])
        if cfg["gated"]:
            self.up, self.gate, self.down = nn.Linear(d, f, False), nn.Linear(d, f, False), \
                nn.Linear(f, d, False)
        else:
            self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)
        self.act = r.choice(["gelu", "gelu_tanh", "relu"])

    def attn(self, x: torch.Tensor, mask: torch.Tensor | None, rope: Any) -> torch.Tensor:
        b, s, d = x.shape
        if self.fused_qkv:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(b, s, self.h, d // self.h).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        if self.cfg["sdpa"]:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=self.cfg["causal"] and mask is None)
        else:
            sc = q @ k.transpose(-1, -2) / (d // self.h) ** 0.5
            if mask is not None:
                sc = sc + mask
            y = sc.softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg["gated"]:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.up(x)
        h = F.relu(h) if self.act == "relu" else F.gelu(h, approximate="tanh" if
                                                        self.act == "gelu_tanh" else "none")
        return self.down(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: Any) -> torch.Tensor:
        x = x + self.attn(self.n1(x), mask, rope)
        return x + self.mlp(self.n2(x))


class _Transformer(nn.Module):
    def __init__(self, r: random.Random, vocab: int) -> None:
        super().__init__()
        # up to BERT/ViT-base widths: predictions are judged on real models of 10-500 ms
        d = r.choice([32, 64, 96, 128, 192, 256, 384, 512, 768])
        heads = r.choice([h for h in (2, 4, 8, 12) if d % h == 0 and (d // h) % 2 == 0])
        self.cfg = {"rms": r.random() < 0.4, "gated": r.random() < 0.35,
                    "sdpa": r.random() < 0.6, "causal": r.random() < 0.5,
                    "rope": r.random() < 0.35, "mask": r.random() < 0.3}
        self.emb = nn.Embedding(vocab, d)
        self.pos = None if self.cfg["rope"] else nn.Embedding(288, d)
        self.hd = d // heads
        self.blocks = nn.ModuleList(_Block(r, d, heads, self.cfg) for _ in range(r.randint(1, 3)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False) if r.random() < 0.6 else None
        self.pool = self.head is None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = ids.shape[1]
        x = self.emb(ids)
        rope = None
        pos = torch.arange(s, device=ids.device)
        if self.pos is not None:
            x = x + self.pos(pos)
        else:
            inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
            fr = torch.outer(pos.float(), inv)
            emb = torch.cat((fr, fr), dim=-1)
            rope = (emb.cos(), emb.sin())
        add = None
        if mask is not None:
            add = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        for blk in self.blocks:
            x = blk(x, add, rope)
        x = self.norm(x)
        return x.mean(1) if self.pool else self.head(x)


def synth_models(n: int, seed: int = 0) -> Iterator[SynthModel]:
    """``n`` random training models (deterministic in ``seed``), families in rotation."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    for i in range(n):
        fam = ("transformer", "mlp", "cnn", "transformer")[i % 4]
        if fam == "mlp":
            d = r.choice([16, 64, 128, 256, 784])
            seqd = r.random() < 0.3
            x = torch.randn(2, 8, d) if seqd else torch.randn(2, d)
            dims = {"x": {0: "batch", 1: "seq"} if seqd else {0: "batch"}}
            pts = ([{"batch": b, "seq": s} for b, s in r.sample(
                [(1, 8), (2, 32), (4, 16), (8, 64), (1, 128), (4, 4)], 3)] if seqd else
                [{"batch": b} for b in sorted(r.sample([1, 2, 8, 32, 128, 512], 3))])
            yield SynthModel(f"mlp{i}", _MLP(r, d).eval(), (x,), dims, ["x"], pts)
        elif fam == "cnn":
            c, hw = r.choice([1, 3]), r.choice([16, 28, 32, 48, 64])
            pts = [{"batch": b} for b in sorted(r.sample([1, 2, 4, 8], 3))]
            yield SynthModel(f"cnn{i}", _CNN(r, c).eval(), (torch.randn(2, c, hw, hw),),
                             {"x": {0: "batch"}}, ["x"], pts)
        else:
            vocab = r.choice([100, 128, 512, 1000])
            m = _Transformer(r, vocab).eval()
            ids = torch.randint(0, vocab, (2, 8))
            names, ins = ["ids"], [ids]
            dims: dict[str, dict[int, str]] = {"ids": {0: "batch", 1: "seq"}}
            if m.cfg["mask"]:
                names.append("mask")
                ins.append(torch.ones(2, 8, dtype=torch.int64))
                dims["mask"] = {0: "batch", 1: "seq"}
            pts = [{"batch": b, "seq": s} for b, s in r.sample(
                [(1, 8), (1, 32), (2, 16), (2, 64), (4, 8), (4, 32), (1, 128), (8, 16),
                 (4, 128), (1, 256), (8, 64), (2, 256)], 3)]
            yield SynthModel(f"tf{i}", m, tuple(ins), dims, names, pts, vocab)
