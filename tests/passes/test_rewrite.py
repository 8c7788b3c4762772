"""The rule engine: Fail is falsy, fixed point, hit counting, replacement type checks."""

from __future__ import annotations

import pytest
import torch
from helpers import run_pass

from ember.ir import GraphBuilder, Node, TensorType
from ember.passes._rewrite import Fail, GraphIndex, Rule, apply_rules, rebuild
from ember.passmanager import PassContext


def _chain(n: int) -> object:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3)))
    y = x
    for _ in range(n):
        y = b.op("neg", [y])
    b.set_outputs([y])
    return b.build()


def test_fail_is_falsy_with_reason() -> None:
    f = Fail("weights are not params")
    assert not f and f.reason == "weights are not params"


def test_fixed_point_and_hit_counts() -> None:
    """neg(neg(x)) -> x, applied until none is left; nested matches count once."""

    def match(n: Node, idx: GraphIndex) -> object:
        inner = idx.producer(n.inputs[0], "neg")
        if inner is None:
            return Fail("input is not a neg")
        return lambda e: [e.v(inner.inputs[0])]

    rule = Rule("double_neg", ("neg",), match)
    ctx = PassContext()
    g = _chain(5)
    out = apply_rules(g, [rule], ctx, "t")
    assert out.op_counts() == {"neg": 1}
    assert ctx.records["t"]["misses"] == {"double_neg: input is not a neg": 1}
    assert len(g.nodes) == 5  # input untouched
    ctx = PassContext()
    out = apply_rules(_chain(2), [rule], ctx, "t")
    assert out.op_counts() == {} and ctx.records["t"]["hits"] == {"double_neg": 1}
    ctx = PassContext()
    apply_rules(_chain(1), [rule], ctx, "t")
    assert ctx.records["t"]["hits"] == {}


def test_replacement_of_another_type_is_rejected() -> None:
    g = _chain(1)
    plan = {g.nodes[0]: lambda e: [e.op("cast", [g.inputs[0]], {"dtype": "float64"})]}
    with pytest.raises(TypeError, match="replaces"):
        rebuild(g, plan)


def test_every_registered_exact_pass_is_pure_on_a_mixed_graph() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 4)))
    w = b.add_param("w", torch.randn(4, 4))
    y = b.op("relu", [b.op("linear", [x, w, None])])
    y = b.op("mul", [y, b.add_param("one", torch.ones(()))])
    b.set_outputs([y])
    out = run_pass(b.build(), "O2")
    assert out.op_counts() == {"fused_linear": 1}
