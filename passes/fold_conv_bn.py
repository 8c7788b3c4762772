"""Fold inference BatchNorm into the convolution before it.

Before -> After::

    %c = conv(%x, %w, %b?) {...}                    %c' = conv(%x, %w', %b') {...}
    %y = batch_norm(%c, %mean, %var, %g?, %beta?) -> (params w' = w * s, b' = (b - mean) * s + beta,
                                                      s = g / sqrt(var + eps))

Requires the conv weight/bias and every BatchNorm operand to be params, and the conv output to
feed only the BatchNorm (otherwise the unnormalized conv would still be needed). The folded
params are computed in float64 and cast back to the weight dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.ir import Graph, Node, Value
from ember.passmanager import PassContext, register_pass

from ._rewrite import EmitFn, Emitter, Fail, GraphIndex, Rule, apply_rules

__all__ = ["FoldConvBnConfig", "fold_conv_bn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldConvBnConfig:
    """No knobs: the fold is exact up to float rounding."""


def _match(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    c = idx.producer(n.inputs[0], "conv")
    if c is None:
        return Fail("input is not a conv")
    if not idx.single_use(c.output):
        return Fail("conv output has other users")
    w, b = c.inputs[1], c.inputs[2] if len(c.inputs) > 2 else None
    wt, bt = idx.const(w), idx.const(b)
    if wt is None or (b is not None and bt is None):
        return Fail("conv weight/bias are not params")
    if not wt.dtype.is_floating_point:
        return Fail("conv weight is not float")
    ops = list(n.inputs[1:]) + [None] * (5 - len(n.inputs))
    mean, var, gamma, beta = (idx.const(v) for v in ops)
    if mean is None or var is None or any(v is not None and idx.const(v) is None for v in ops):
        return Fail("batch_norm operands are not params")
    cout = wt.shape[0]
    if any(t is not None and t.numel() != cout for t in (mean, var, gamma, beta)):
        return Fail("batch_norm channel count differs from conv out-channels")
    eps = float(n.attrs["eps"])
    f64 = torch.float64
    scale = torch.rsqrt(var.to(f64).reshape(-1) + eps)
    if gamma is not None:
        scale = scale * gamma.to(f64).reshape(-1)
    shift = -mean.to(f64).reshape(-1) * scale
    if bt is not None:
        shift = shift + bt.to(f64).reshape(-1) * scale
    if beta is not None:
        shift = shift + beta.to(f64).reshape(-1)
    new_w = (wt.to(f64) * scale.reshape(-1, *([1] * (wt.dim() - 1)))).to(wt.dtype)
    new_b = shift.to(wt.dtype)
    if c.output.type.dtype != n.output.type.dtype:
        return Fail("batch_norm changes the dtype")

    def emit(e: Emitter) -> list[Value]:
        wv = e.param(f"{w.name}_bn", new_w)  # type: ignore[union-attr]
        bv = e.param(f"{w.name}_bn_bias", new_b)  # type: ignore[union-attr]
        return [e.op("conv", [c.inputs[0], wv, bv], c.attrs)]

    return emit


@register_pass(config=FoldConvBnConfig, numerics="exact",
               requires=("types", "shapes"))
def fold_conv_bn(g: Graph, cfg: FoldConvBnConfig, ctx: PassContext) -> Graph:
    """Folds batch_norm(conv(x)) with constant statistics into the conv weight and bias."""
    rule = Rule("conv_bn", ("batch_norm",), _match, "batch_norm(conv) -> conv")
    return apply_rules(g, [rule], ctx, "fold_conv_bn")
