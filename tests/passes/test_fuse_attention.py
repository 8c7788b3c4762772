"""fuse_attention: matmul-softmax-matmul with scale/mask variants -> attention."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import check_pass, random_inputs

from ember.ir import Graph, GraphBuilder, TensorType, Value, sym
from ember.passmanager import PassContext

B, S = sym("batch"), sym("seq")


def _c(b: GraphBuilder, v: float) -> Value:
    return b.add_param("c", torch.tensor(v))


def _attn(variant: str, mask: str = "none", split_heads: bool = False) -> Graph:
    b = GraphBuilder()
    if split_heads:  # [b, s, h*d] -> [b, h, s, d], then k's transpose composes with the split
        xs = [b.add_input(n, TensorType("float32", (B, S, 32))) for n in "qkv"]
        q, k, v = (b.op("permute", [b.op("reshape", [x], {"shape": (B, S, 4, 8)})],
                        {"perm": (0, 2, 1, 3)}) for x in xs)
    else:
        q, k, v = (b.add_input(n, TensorType("float32", (B, 4, S, 8))) for n in "qkv")
    if variant == "q_scaled":
        q = b.op("mul", [q, _c(b, 8 ** -0.5)])
    if variant == "qk_scaled":
        q = b.op("mul", [q, _c(b, 8 ** -0.25)])
        k = b.op("mul", [_c(b, 8 ** -0.25), k])
    kt = b.op("permute", [k], {"perm": (0, 1, 3, 2)})
    if variant == "qkt_scaled":  # torch.onnx's SDPA: sqrt(scale) on q and on k^T
        q = b.op("mul", [q, _c(b, 8 ** -0.25)])
        kt = b.op("mul", [kt, _c(b, 8 ** -0.25)])
    s = b.op("matmul", [q, kt])
    if variant == "div":
        s = b.op("div", [s, _c(b, math.sqrt(8))])
    elif variant == "mul":
        s = b.op("mul", [_c(b, 8 ** -0.5), s])
    if mask == "additive":
        m = b.add_input("mask", TensorType("float32", (B, 1, 1, S)))
        s = b.op("add", [s, m])
    elif mask in ("keep", "drop"):
        m = b.add_input("mask", TensorType("bool", (B, 1, S, S)))
        ninf = _c(b, -math.inf)
        s = b.op("where", [m, s, ninf] if mask == "keep" else [m, ninf, s])
    p = b.op("softmax", [s], {"dim": -1})
    if variant == "cast":
        p = b.op("cast", [b.op("softmax", [b.op("cast", [s], {"dtype": "float64"})], {"dim": 3}),
                          ], {"dtype": "float32"})
    b.set_outputs([b.op("matmul", [p, v])])
    return b.build()


def _inputs(g: Graph, mask: str) -> list[torch.Tensor]:
    ins = random_inputs(g, batch=2, seq=5)
    if mask in ("keep", "drop"):  # keep at least one key per row
        ins[-1][..., 0] = mask == "keep"
    return ins


@pytest.mark.parametrize("variant", ["none", "div", "mul", "q_scaled", "qk_scaled", "qkt_scaled",
                                     "cast"])
@pytest.mark.parametrize("mask", ["none", "additive", "keep", "drop"])
def test_fuses_variants(variant: str, mask: str) -> None:
    g = _attn(variant, mask)
    ctx = PassContext()
    out = check_pass(g, "fuse_attention", _inputs(g, mask), ctx=ctx)
    counts = out.op_counts()
    assert counts.pop("attention") == 1
    assert counts == ({"logical_not": 1} if mask == "drop" else {})
    node = next(n for n in out.nodes if n.op == "attention")
    want = {"none": 1.0, "cast": 1.0}.get(variant, 8 ** -0.5)
    assert node.attrs["scale"] == pytest.approx(want, rel=1e-6)
    assert [v.name for v in node.inputs[:3]] == ["q", "k", "v"]
    assert (len(node.inputs) == 4) == (mask != "none")
    assert ctx.records["fuse_attention"]["hits"] == {"attention": 1}


def test_head_split_key_permute_composed_by_fold_constants() -> None:
    g = _attn("mul", "additive", split_heads=True)
    out = check_pass(g, "fold_constants,fuse_attention", _inputs(g, "additive"))
    counts = out.op_counts()
    assert counts["attention"] == 1 and "softmax" not in counts and "matmul" not in counts


def test_softmax_over_other_dim_is_not_fused() -> None:
    b = GraphBuilder()
    q, k, v = (b.add_input(n, TensorType("float32", (2, 6, 6))) for n in "qkv")
    s = b.op("matmul", [q, b.op("permute", [k], {"perm": (0, 2, 1)})])
    b.set_outputs([b.op("matmul", [b.op("softmax", [s], {"dim": 1}), v])])
    ctx = PassContext()
    out = check_pass(b.build(), "fuse_attention", ctx=ctx)
    assert "attention" not in out.op_counts()
    assert "attention: softmax is not over the last dim" in ctx.records["fuse_attention"]["misses"]


def test_finite_fill_where_mask_is_not_fused() -> None:
    b = GraphBuilder()
    q, k, v = (b.add_input(n, TensorType("float32", (2, 6, 8))) for n in "qkv")
    m = b.add_input("m", TensorType("bool", (2, 6, 6)))
    s = b.op("matmul", [q, b.op("permute", [k], {"perm": (0, 2, 1)})])
    s = b.op("where", [m, s, _c(b, -1e4)])  # not -inf: fully masked rows differ from sdpa
    b.set_outputs([b.op("matmul", [b.op("softmax", [s], {"dim": -1}), v])])
    out = check_pass(b.build(), "fuse_attention")
    assert "attention" not in out.op_counts()
