"""fuse_norms: decomposed LayerNorm / RMSNorm -> layer_norm / rms_norm."""

from __future__ import annotations

import pytest
import torch
from helpers import check_pass

from ember.ir import Graph, GraphBuilder, TensorType, Value, sym
from ember.passmanager import PassContext

H = 16


def _c(b: GraphBuilder, v: float) -> Value:
    return b.add_param("c", torch.tensor(v))


def _layer_norm(b: GraphBuilder, x: Value, square: str, root: str, affine: str,
                dims: tuple[int, ...] = (-1,)) -> Value:
    u = b.op("mean", [x], {"dims": dims, "keepdim": True})
    d = b.op("sub", [x, u])
    sq = b.op("pow", [d, _c(b, 2.0)]) if square == "pow" else b.op("mul", [d, d])
    v = b.op("mean", [sq], {"dims": dims, "keepdim": True})
    t = b.op("add", [v, _c(b, 1e-5)])
    if root == "rsqrt":
        n = b.op("mul", [d, b.op("rsqrt", [t])])
    else:
        n = b.op("div", [d, b.op("sqrt", [t])])
    shape = tuple(x.type.shape[len(x.type.shape) - len(dims):])
    if "w" in affine:
        n = b.op("mul", [n, b.add_param("gamma", torch.rand(1, *shape) + 0.5)])
    if "b" in affine:
        n = b.op("add", [b.add_param("beta", torch.randn(*shape)), n])
    return n


def _rms_norm(b: GraphBuilder, x: Value, casts: bool) -> Value:
    h = b.op("cast", [x], {"dtype": "float32"}) if casts else x
    v = b.op("mean", [b.op("pow", [h, _c(b, 2.0)])], {"dims": (-1,), "keepdim": True})
    n = b.op("mul", [h, b.op("rsqrt", [b.op("add", [v, _c(b, 1e-6)])])])
    if casts:
        n = b.op("cast", [n], {"dtype": x.type.dtype})
    return b.op("mul", [b.add_param("w", torch.rand(H, dtype=torch.float32) + 0.5), n])


def _graph(build: object) -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 5, H)))
    b.set_outputs([build(b, x)])  # type: ignore[operator]
    return b.build()


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("root", ["rsqrt", "sqrt"])
@pytest.mark.parametrize("affine", ["", "w", "b", "wb"])
def test_layer_norm_variants(square: str, root: str, affine: str) -> None:
    g = _graph(lambda b, x: _layer_norm(b, x, square, root, affine))
    ctx = PassContext()
    out = check_pass(g, "fuse_norms", ctx=ctx)
    assert out.op_counts() == {"layer_norm": 1}
    ln = out.nodes[0]
    assert ln.inputs[0].name == "x" and ln.attrs["axes"] == 1
    assert abs(ln.attrs["eps"] - 1e-5) < 1e-9
    assert (ln.inputs[1] is None) == (affine == "")
    assert (len(ln.inputs) > 2 and ln.inputs[2] is not None) == ("b" in affine)
    assert ctx.records["fuse_norms"]["hits"] == {"norm": 1}


def test_layer_norm_over_two_trailing_dims() -> None:
    g = _graph(lambda b, x: _layer_norm(b, x, "pow", "rsqrt", "wb", dims=(-2, -1)))
    out = check_pass(g, "fuse_norms")
    assert out.op_counts() == {"layer_norm": 1} and out.nodes[0].attrs["axes"] == 2


def test_norm_over_a_leading_dim_is_not_fused() -> None:
    g = _graph(lambda b, x: _layer_norm(b, x, "pow", "rsqrt", "", dims=(1,)))
    out = check_pass(g, "fuse_norms")
    assert "layer_norm" not in out.op_counts()


@pytest.mark.parametrize("casts", [False, True])
def test_llama_rms_norm(casts: bool) -> None:
    out = check_pass(_graph(lambda b, x: _rms_norm(b, x, casts)), "fuse_norms")
    if casts:  # casts to the same dtype stay (fold_constants removes them); weight outside
        assert out.op_counts() == {"cast": 2, "mul": 1, "rms_norm": 1}
    else:
        assert out.op_counts() == {"rms_norm": 1}
        assert out.nodes[0].inputs[1] is not None
    full = check_pass(_graph(lambda b, x: _rms_norm(b, x, casts)), "fold_constants,fuse_norms")
    assert full.op_counts() == {"rms_norm": 1}


def test_rms_norm_in_half_precision_keeps_casts() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("bfloat16", (2, 3, H)))
    h = b.op("cast", [x], {"dtype": "float32"})
    v = b.op("mean", [b.op("pow", [h, _c(b, 2.0)])], {"dims": (-1,), "keepdim": True})
    n = b.op("mul", [h, b.op("rsqrt", [b.op("add", [v, _c(b, 1e-6)])])])
    y = b.op("mul", [b.add_param("w", torch.rand(H).to(torch.bfloat16)),
                     b.op("cast", [n], {"dtype": "bfloat16"})])
    b.set_outputs([y])
    out = check_pass(b.build(), "fold_constants,fuse_norms", rtol=1e-2)
    assert out.op_counts() == {"cast": 2, "mul": 1, "rms_norm": 1}
    assert next(n for n in out.nodes if n.op == "rms_norm").output.type.dtype == "float32"


def test_weight_of_wrong_shape_is_left_outside() -> None:
    def build(b: GraphBuilder, x: Value) -> Value:
        n = _layer_norm(b, x, "pow", "rsqrt", "")
        return b.op("mul", [n, b.add_param("g", torch.rand(5, 1) + 0.5)])  # per-row scale
    out = check_pass(_graph(build), "fuse_norms")
    assert out.op_counts() == {"layer_norm": 1, "mul": 1}
