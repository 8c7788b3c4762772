"""Architectures that are NOT in the zoo: the frontend was not written against them.

Importing them proves the FX frontend generalises: DistilBERT, a T5 encoder (relative
position buckets: log, abs, min, where on integer tensors), a Whisper-style audio encoder
(conv1d stem, nn.MultiheadAttention, sinusoidal positions) and a small UNet (strided conv,
transposed conv, bilinear/nearest upsampling, skip concatenation, GroupNorm, SiLU).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from zoo import ZooModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["distilbert", "t5_encoder", "whisper_encoder", "unet", "UNSEEN", "WhisperEncoder",
           "UNet"]


def distilbert(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64)
    model = DistilBertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return ZooModel("distilbert", model, (ids, mask), dyn, ["input_ids", "attention_mask"])


def t5_encoder(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu")
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return ZooModel("t5_encoder", model, (ids,), {"input_ids": {0: "batch", 1: "seq"}},
                    ["input_ids"])


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class WhisperEncoder(nn.Module):
    """Log-mel frames [B, n_mels, T] -> conv1d x2 (stride 2) -> transformer encoder."""

    def __init__(self, n_mels: int = 16, d: int = 32, heads: int = 4, layers: int = 2,
                 max_frames: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("pos", self._sinusoids(max_frames, d), persistent=False)
        self.layers = nn.ModuleList(_EncoderLayer(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    @staticmethod
    def _sinusoids(length: int, channels: int) -> torch.Tensor:
        inc = math.log(10000) / (channels // 2 - 1)
        inv = torch.exp(-inc * torch.arange(channels // 2))
        t = torch.arange(length)[:, None] * inv[None, :]
        return torch.cat([torch.sin(t), torch.cos(t)], dim=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv1(mel))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


def whisper_encoder(batch: int = 2, frames: int = 16, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)
    model = WhisperEncoder().eval()
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, 16, frames, generator=g)
    return ZooModel("whisper_encoder", model, (mel,), {"mel": {0: "batch"}}, ["mel"])


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout),
                                  nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  nn.GroupNorm(4, cout), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    """Two-level UNet: downsample by strided conv and avg-pool, upsample by a transposed conv
    and by bilinear interpolation, skip connections by concatenation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inc = _Block(3, c)
        self.down1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.enc1 = _Block(c, 2 * c)
        self.down2 = nn.AvgPool2d(2)
        self.mid = _Block(2 * c, 2 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _Block(4 * c, c)
        self.up1 = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.dec1 = _Block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.inc(x)
        x1 = self.enc1(self.down1(x0))
        m = self.mid(self.down2(x1))
        y = self.dec2(torch.cat([self.up2(m), x1], dim=1))
        y = self.dec1(torch.cat([self.up1(y), x0], dim=1))
        y = nn.functional.interpolate(y, scale_factor=0.5, mode="nearest")
        return torch.sigmoid(self.out(y))


def unet(batch: int = 2, hw: int = 16, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)
    model = UNet().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, hw, hw, generator=g)
    return ZooModel("unet", model, (x,), {"x": {0: "batch"}}, ["x"])


UNSEEN = {"distilbert": distilbert, "t5_encoder": t5_encoder,
          "whisper_encoder": whisper_encoder, "unet": unet}
