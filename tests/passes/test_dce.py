"""dce: unused nodes and params go; inputs, outputs and multi-output nodes stay whole."""

from __future__ import annotations

import torch
from helpers import check_pass

from ember.ir import GraphBuilder, TensorType
from ember.passmanager import PassContext


def test_drops_dead_nodes_and_params_keeps_inputs() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 8)))
    unused_in = b.add_input("unused", TensorType("float32", (2,)))
    w = b.add_param("w", torch.randn(8))
    b.add_param("dead_w", torch.randn(8))
    dead = b.op("exp", [b.op("mul", [x, w])])
    b.op("relu", [dead])
    vals, _ = b.op("topk", [x], {"k": 2})  # multi-output node, only one output used
    b.set_outputs([b.op("add", [x, w]), vals])
    ctx = PassContext()
    out = check_pass(b.build(), "dce", ctx=ctx)
    assert out.op_counts() == {"add": 1, "topk": 1}
    assert [v.name for v in out.params] == ["w"] and set(out.weights) == {"w"}
    assert [v.name for v in out.inputs] == ["x", unused_in.name]
    assert ctx.records["dce"] == {"removed_nodes": 3, "removed_params": 1}


def test_graph_without_dead_code_is_returned_as_is() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4,)))
    b.set_outputs([b.op("neg", [x])])
    g = b.build()
    out = check_pass(g, "dce")
    assert str(out) == str(g)
