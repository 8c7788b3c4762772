"""fuse_qkv: linears reading one input -> one linear over concatenated weights + slices."""

from __future__ import annotations

import torch
from helpers import check_pass

from ember.ir import GraphBuilder, TensorType, sym
from ember.passmanager import PassContext


def test_qkv_with_mixed_biases() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 5, 16)))
    q = b.op("linear", [x, b.add_param("wq", torch.randn(16, 16)), b.add_param("bq", torch.randn(16))])
    k = b.op("linear", [x, b.add_param("wk", torch.randn(8, 16)), None])
    v = b.op("linear", [x, b.add_param("wv", torch.randn(8, 16)), b.add_param("bv", torch.randn(8))])
    other = b.op("linear", [q, b.add_param("wo", torch.randn(16, 16)), None])  # other input
    b.set_outputs([other, k, v])
    g = b.build()
    ctx = PassContext()
    out = check_pass(g, "fuse_qkv", ctx=ctx)
    assert out.op_counts() == {"linear": 2, "slice": 3}
    fused = out.nodes[0]
    assert fused.op == "linear" and fused.output.type.shape[-1] == 32
    w, bias = out.weights[fused.inputs[1].name], out.weights[fused.inputs[2].name]
    assert torch.equal(w, torch.cat([g.weights["wq"], g.weights["wk"], g.weights["wv"]]))
    assert torch.equal(bias[16:24], torch.zeros(8))
    assert [(n.attrs["start"], n.attrs["end"]) for n in out.nodes if n.op == "slice"] == [
        (0, 16), (16, 24), (24, 32)]
    assert ctx.records["fuse_qkv"]["group_sizes"] == [3]


def test_gate_up_without_bias_and_separate_groups() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (3, 8)))
    y = b.add_input("y", TensorType("float32", (3, 8)))
    gate = b.op("linear", [x, b.add_param("wg", torch.randn(12, 8)), None])
    up = b.op("linear", [x, b.add_param("wu", torch.randn(12, 8)), None])
    h = b.op("mul", [b.op("silu", [gate]), up])
    lone = b.op("linear", [y, b.add_param("wl", torch.randn(4, 8)), None])  # group of one
    b.set_outputs([h, lone])
    out = check_pass(b.build(), "fuse_qkv")
    assert out.op_counts() == {"linear": 2, "mul": 1, "silu": 1, "slice": 2}
    fused = next(n for n in out.nodes if n.op == "linear" and n.inputs[0].name == "x")
    assert fused.inputs[2] is None


def test_runtime_weights_and_other_dtypes_stay_apart() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (3, 8)))
    wrt = b.add_input("w_runtime", TensorType("float32", (4, 8)))
    a = b.op("linear", [x, wrt, None])
    c = b.op("linear", [x, b.add_param("w", torch.randn(4, 8)), None])
    b.set_outputs([a, c])
    out = check_pass(b.build(), "fuse_qkv")
    assert out.op_counts() == {"linear": 2}
