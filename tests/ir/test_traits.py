"""Op traits (`ember.ir.ops_with` / `has_trait`), the graph evaluator and the rebuild primitive."""

from __future__ import annotations

import pytest
import torch

from ember.ir import (
    TRAITS,
    GraphBuilder,
    Rebuilder,
    TensorType,
    all_ops,
    evaluate_values,
    has_trait,
    ops_with,
    run_graph,
)


def test_every_op_declares_known_traits() -> None:
    for name, d in all_ops().items():
        assert d.traits <= TRAITS, name
        assert d.elementwise == ("elementwise" in d.traits)


def test_trait_queries() -> None:
    assert {"linear", "fused_linear", "qlinear_dynamic"} <= ops_with("linear")
    assert "matmul" not in ops_with("linear")
    assert ops_with("token_reduction") == {"token_merge", "token_select"}
    assert has_trait("reshape", "movement") and not has_trait("add", "movement")
    assert not has_trait("no_such_op", "gemm")
    with pytest.raises(ValueError):
        ops_with("no_such_trait")


def _graph():  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3)))
    y = b.op("relu", [x])
    z = b.op("add", [y, x])
    b.set_outputs([z])
    return b.build()


def test_evaluator_watch_and_values() -> None:
    g = _graph()
    x = torch.randn(2, 3)
    seen: list[str] = []
    (out,) = run_graph(g, x, watch=lambda name, t: seen.append(name))
    torch.testing.assert_close(out, torch.relu(x) + x)
    assert seen == ["x", g.nodes[0].output.name, "x"]
    vals = evaluate_values(g, [x], [g.nodes[0].output.name])
    torch.testing.assert_close(vals[g.nodes[0].output.name], torch.relu(x))


def test_rebuilder_replaces_a_node() -> None:
    g = _graph()
    rb = Rebuilder(g)
    for n in g.nodes:
        if n.op == "relu":
            rb.replace(n, [rb.b.op("sigmoid", [rb.map(n.inputs[0])])])
        else:
            rb.keep(n)
    g2 = rb.finish()
    assert [n.op for n in g2.nodes] == ["sigmoid", "add"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(run_graph(g2, x)[0], torch.sigmoid(x) + x)
