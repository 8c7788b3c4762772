"""Breadth of the ATen mapping: ops that the zoo does not reach, a few modules each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fx import assert_matches, eager_outputs
from torch import nn

from ember.frontends import fx
from ember.ir import run_graph, verify


class Elementwise(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = F.hardswish(x) + F.hardsigmoid(y) + F.leaky_relu(x, 0.2) + F.elu(y) + F.mish(x)
        b = F.softplus(x, beta=2.0) * torch.erf(y) - torch.rsqrt(x.abs() + 1) / (y.exp() + 1)
        c = torch.clamp(x, min=y) + x.clamp_max(0.3) + torch.log1p(x.abs()) + x.sign()
        d = torch.where(x > y, x, 0.5) + (x >= 0).float() + torch.pow(2.0, y) + x ** 3
        e = torch.floor(x * 3) + torch.ceil(y) + torch.round(x, decimals=1) + torch.trunc(y)
        f = torch.atan2(x, y) + torch.remainder(x, 0.7) + (x // 0.5) + torch.logical_xor(
            x > 0, y > 0).to(torch.float32) + torch.maximum(x, y) - torch.minimum(x, y)
        g = F.selu(x) + F.celu(y, 0.5) + F.relu6(x * 8) + F.silu(y) + torch.sigmoid(x) * 2
        return a, b, c, d, e, f, g, (~(x > 0)) | (y < 0), torch.nan_to_num(torch.log(x))


class Reductions(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vmax, imax = x.max(dim=1)
        return (x.sum(), x.mean((0, 2), keepdim=True), x.var(-1), x.std(1, keepdim=True),
                x.amax(-1), x.min(), vmax, imax, x.argmin(), torch.logsumexp(x, -1),
                torch.linalg.vector_norm(x, dim=-1), x.norm(p=1, dim=1), x.prod(-1),
                (x > 0).all(-1), (x > 1).any(), x.cumsum(1), torch.topk(x, 2, dim=-1)[0],
                F.log_softmax(x, -1), torch.softmax(x.double(), 0).float(),
                torch.var_mean(x, 2, correction=0)[1])


class Shapes(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = x.chunk(2, dim=-1)
        parts = x.unbind(0)
        s = torch.stack([a, b], dim=1)
        return (s, torch.stack(parts, -1), x.flip(-1).roll(1, 1), x.roll(2), torch.tril(x[0]),
                torch.triu(x[0], 1), x.repeat(1, 2, 1), x.expand(2, *x.shape), x.narrow(2, 1, 2),
                x.movedim(0, -1), x.reshape(-1).view(x.shape[0], -1), x.unflatten(-1, (2, 2)),
                torch.gather(x, 2, torch.zeros(2, 3, 1, dtype=torch.long)),
                x.index_select(1, torch.tensor([2, 0])), x[:, None, 1:, ::2], x.mT,
                F.pad(x, (1, 2)), F.pad(x, (1, 1), mode="reflect"), x.squeeze(0).unsqueeze(-1),
                torch.zeros_like(x) + torch.ones(3, 4) + torch.full((4,), 2.0),
                torch.arange(0, 8, 2) * 1.5, torch.linspace(0, 1, 5), x.new_zeros(2),
                F.one_hot(torch.tensor([0, 2]), 3), x.repeat_interleave(2, dim=1))


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding="same", dilation=2)
        self.c2 = nn.Conv2d(4, 8, 3, groups=2, stride=2, padding=1)
        self.ct = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.LayerNorm([4, 8, 8], elementwise_affine=False)
        self.rms = nn.RMSNorm(8, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.c1(x.flatten(2)[:, :, :16])
        y = self.ct(F.relu(self.c2(x)))
        p = F.avg_pool2d(x, 2) + F.max_pool2d(x, 3, 2, 1, ceil_mode=False)[:, :, :4, :4]
        q = F.adaptive_avg_pool2d(x, (2, 2)) + F.adaptive_avg_pool2d(x, 1)
        up = F.interpolate(x, scale_factor=2, mode="nearest") + F.interpolate(
            x, size=(16, 16), mode="bilinear", align_corners=True)
        return h, y, p, q, up, self.gn(x), self.inorm(x), self.rms(x), F.avg_pool1d(h, 2)


CASES = {
    "elementwise": (Elementwise, lambda: (torch.randn(3, 5), torch.randn(3, 5))),
    "reductions": (Reductions, lambda: (torch.randn(2, 3, 4),)),
    "shapes": (Shapes, lambda: (torch.randn(2, 3, 4),)),
    "convs": (Convs, lambda: (torch.randn(2, 4, 8, 8),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_breadth(name: str) -> None:
    cls, make = CASES[name]
    torch.manual_seed(0)
    model = cls().eval()
    inputs = make()
    g = fx.import_module(model, inputs)
    verify(g)
    assert_matches(run_graph(g, *inputs), eager_outputs(model, inputs))


def test_supported_op_list_is_broad() -> None:
    ops = fx.supported_aten_ops()
    assert len(ops) > 200
    for op in ("aten.linear", "aten.scaled_dot_product_attention", "aten.conv2d",
               "aten._native_batch_norm_legit_no_training", "aten.index", "aten.view",
               "aten.upsample_bilinear2d"):
        assert op in ops
