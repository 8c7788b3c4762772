"""cse: same op, inputs and attrs -> one node; identical small params merge."""

from __future__ import annotations

import torch
from helpers import check_pass

from ember.ir import GraphBuilder, TensorType
from ember.passmanager import PassContext


def test_merges_equal_nodes_transitively() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3, 4)))
    a1 = b.op("permute", [x], {"perm": (0, 2, 1)})
    a2 = b.op("permute", [x], {"perm": (0, 2, 1)})
    other = b.op("permute", [x], {"perm": (2, 1, 0)})
    e1, e2 = b.op("exp", [a1]), b.op("exp", [a2])  # equal once a1 == a2
    s = b.op("add", [e1, e2])
    b.set_outputs([s, other])
    ctx = PassContext()
    out = check_pass(b.build(), "cse", ctx=ctx)
    assert out.op_counts() == {"add": 1, "exp": 1, "permute": 2}
    add = next(n for n in out.nodes if n.op == "add")
    assert add.inputs[0].name == add.inputs[1].name
    assert ctx.records["cse"]["merged_nodes"] == 2


def test_attr_types_distinguish_nodes() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4,)))
    c1 = b.op("clamp", [x], {"min": 0.0})
    c2 = b.op("clamp", [x], {"min": 1.0})
    g1 = b.op("gelu", [x], {"approximate": "tanh"})
    g2 = b.op("gelu", [x])
    b.set_outputs([c1, c2, g1, g2])
    out = check_pass(b.build(), "cse")
    assert out.op_counts() == {"clamp": 2, "gelu": 2}


def test_merges_identical_params_only() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4,)))
    p1 = b.add_param("p", torch.tensor(2.0))
    p2 = b.add_param("p", torch.tensor(2.0))
    p3 = b.add_param("p", torch.tensor(2.0, dtype=torch.float64))  # other dtype: distinct
    y = b.op("add", [b.op("mul", [x, p1]), b.op("mul", [x, p2])])
    b.set_outputs([y, b.op("mul", [x, p3])])
    out = check_pass(b.build(), "cse")
    assert len(out.params) == 2
    assert out.op_counts() == {"add": 1, "mul": 2}
    off = check_pass(b.build(), "cse{merge_params=false}")
    assert len(off.params) == 3 and off.op_counts() == {"add": 1, "mul": 3}
