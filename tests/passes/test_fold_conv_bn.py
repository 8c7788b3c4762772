"""fold_conv_bn: conv (+bias) -> inference batch_norm folds into the conv's weight and bias."""

from __future__ import annotations

import pytest
import torch
from helpers import check_pass

from ember.ir import Graph, GraphBuilder, TensorType, sym
from ember.passmanager import PassContext


def _conv_bn(bias: bool, groups: int = 1, affine: bool = True, extra_use: bool = False) -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 4, 9, 9)))
    w = b.add_param("w", torch.randn(8, 4 // groups, 3, 3))
    bb = b.add_param("b", torch.randn(8)) if bias else None
    c = b.op("conv", [x, w, bb], {"stride": 2, "padding": 1, "groups": groups})
    ops = [b.add_param("mean", torch.randn(8) * 0.1), b.add_param("var", torch.rand(8) + 0.5)]
    if affine:
        ops += [b.add_param("gamma", torch.rand(8) + 0.5), b.add_param("beta", torch.randn(8))]
    else:
        ops += [None, None]  # the core reference indexes all five operands
    y = b.op("batch_norm", [c, *ops], {"eps": 1e-3})
    b.set_outputs([y, c] if extra_use else [y])
    return b.build()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("affine", [False, True])
def test_folds_into_conv(bias: bool, groups: int, affine: bool) -> None:
    g = _conv_bn(bias, groups, affine)
    ctx = PassContext()
    out = check_pass(g, "fold_conv_bn", [torch.randn(3, 4, 9, 9)], ctx=ctx)
    assert out.op_counts() == {"conv": 1}
    conv = out.nodes[0]
    assert conv.attrs == g.nodes[0].attrs and conv.inputs[2] is not None
    assert ctx.records["fold_conv_bn"]["hits"] == {"conv_bn": 1}
    # the dead original weights are gone: only the folded weight and bias remain
    assert len(out.params) == 2


def test_conv_with_other_users_is_not_folded() -> None:
    g = _conv_bn(True, extra_use=True)
    ctx = PassContext()
    out = check_pass(g, "fold_conv_bn", ctx=ctx)
    assert out.op_counts() == {"batch_norm": 1, "conv": 1}
    assert "conv_bn: conv output has other users" in ctx.records["fold_conv_bn"]["misses"]


def test_runtime_statistics_are_not_folded() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 4, 5, 5)))
    mean = b.add_input("mean", TensorType("float32", (4,)))
    c = b.op("conv", [x, b.add_param("w", torch.randn(4, 4, 1, 1)), None])
    b.set_outputs([b.op("batch_norm", [c, mean, b.add_param("v", torch.rand(4) + 1), None, None])])
    out = check_pass(b.build(), "fold_conv_bn")
    assert out.op_counts() == {"batch_norm": 1, "conv": 1}
