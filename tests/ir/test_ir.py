"""IR core: verifier failures, printer, JSON, symbolic shape helpers, op type inference."""

from __future__ import annotations

import pytest
import sympy
import torch

from ember.errors import VerificationError
from ember.ir import (
    Graph,
    GraphBuilder,
    Node,
    OpTypeError,
    ShapeError,
    TensorType,
    Value,
    bind_symbols,
    evaluate,
    format_graph,
    graph_from_json,
    graph_to_json,
    run_graph,
    sym,
    verify,
)
from ember.ir.shapes import ceil_div, dim_from_json, dim_to_json, dims_equal, floor_div, numel


def small_graph() -> Graph:
    b = GraphBuilder("g")
    x = b.add_input("x", TensorType("float32", (sym("batch"), 4)))
    w = b.add_param("w", torch.randn(3, 4))
    y = b.op("linear", [x, w])
    z = b.op("relu", [y])
    b.set_outputs([z], ["out"])
    return b.build()


def with_nodes(g: Graph, nodes: list[Node], outputs: tuple[Value, ...] | None = None) -> Graph:
    return Graph(g.inputs, g.params, tuple(nodes), outputs or g.outputs, g.weights, g.name,
                 g.input_names, g.output_names)


def test_valid_graph_verifies_and_runs() -> None:
    g = small_graph()
    verify(g)
    x = torch.randn(5, 4)
    (out,) = run_graph(g, x)
    torch.testing.assert_close(out, torch.relu(x @ g.weights["w"].T))


def test_verifier_catches_use_before_def() -> None:
    g = small_graph()
    lin, relu = g.nodes
    with pytest.raises(VerificationError, match="used before it is defined"):
        verify(with_nodes(g, [relu, lin]))


def test_verifier_catches_wrong_output_type() -> None:
    g = small_graph()
    lin, relu = g.nodes
    bad = Value(relu.output.name, TensorType("float32", (sym("batch"), 7)))
    with pytest.raises(VerificationError, match="inference says"):
        verify(with_nodes(g, [lin, Node("relu", relu.inputs, (bad,))], (bad,)))
    bad_dtype = Value(relu.output.name, TensorType("int64", (sym("batch"), 3)))
    with pytest.raises(VerificationError, match="inference says"):
        verify(with_nodes(g, [lin, Node("relu", relu.inputs, (bad_dtype,))], (bad_dtype,)))


def test_verifier_catches_unknown_op() -> None:
    g = small_graph()
    lin, relu = g.nodes
    with pytest.raises(VerificationError, match="unknown IR op 'frobnicate'"):
        verify(with_nodes(g, [lin, Node("frobnicate", relu.inputs, relu.outputs)]))


def test_verifier_catches_double_definition() -> None:
    g = small_graph()
    lin, relu = g.nodes
    again = Node("relu", relu.inputs, (lin.output,))
    with pytest.raises(VerificationError, match="defined twice"):
        verify(with_nodes(g, [lin, again, relu]))


def test_verifier_catches_mismatched_use_type_and_bad_attrs() -> None:
    g = small_graph()
    lin, relu = g.nodes
    wrong_use = Value(lin.output.name, TensorType("float16", lin.output.type.shape))
    with pytest.raises(VerificationError, match="was defined as"):
        verify(with_nodes(g, [lin, Node("relu", (wrong_use,), relu.outputs)]))
    with pytest.raises(VerificationError, match="unknown attribute"):
        verify(with_nodes(g, [lin, Node("relu", relu.inputs, relu.outputs, {"alpha": 1})]))


def test_verifier_catches_bad_weight_and_undefined_output() -> None:
    g = small_graph()
    bad = Graph(g.inputs, g.params, g.nodes, g.outputs, {"w": torch.randn(4, 4)})
    with pytest.raises(VerificationError, match="weight is"):
        verify(bad)
    ghost = Value("ghost", TensorType("float32", (1,)))
    with pytest.raises(VerificationError, match="never defined"):
        verify(with_nodes(g, list(g.nodes), (ghost,)))


def test_verifier_reports_the_pass_and_context() -> None:
    g = small_graph()
    lin, relu = g.nodes
    with pytest.raises(VerificationError) as ei:
        verify(with_nodes(g, [relu, lin]), pass_name="my_pass")
    msg = str(ei.value)
    assert "after pass 'my_pass'" in msg and ">> " in msg and "relu" in msg


def test_printer() -> None:
    text = format_graph(small_graph())
    assert text.splitlines()[0] == "graph g(%x: float32[batch, 4]) {"
    assert "%linear = linear(%x, %w) : float32[batch, 3]" in text
    assert "%relu = relu(%linear) : float32[batch, 3]" in text
    assert text.splitlines()[-2] == "  return %relu"
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 6)))
    y = b.op("softmax", [x], {"dim": 1})
    b.set_outputs([y])
    assert "softmax(%x) {dim=1} : float32[2, 6]" in str(b.build())


def test_json_round_trip_keeps_symbols_attrs_and_locations() -> None:
    b = GraphBuilder()
    s = sym("seq")
    x = b.add_input("x", TensorType("float32", (2, s)))
    y = b.op("reshape", [x], {"shape": (2, s, 1)})
    z = b.op("slice", [y], {"dim": 1, "start": 1, "end": s - 1})
    f = b.op("full", [], {"shape": (), "value": float("-inf"), "dtype": "float32"})
    w = b.op("add", [z, f])
    b.set_outputs([w], ["y"])
    g = b.build()
    g2 = graph_from_json(graph_to_json(g), g.weights)
    verify(g2)
    assert str(g2) == str(g)
    assert g2.nodes[1].attrs["end"] == s - 1
    assert g2.nodes[2].attrs["value"] == float("-inf")
    with pytest.raises(ValueError, match="version"):
        graph_from_json({**graph_to_json(g), "version": 99}, {})


def test_symbolic_shape_helpers() -> None:
    b, s = sym("batch"), sym("seq")
    assert sym("batch") is b
    assert evaluate(b * s + 1, {"batch": 2, "seq": 3}) == 7
    with pytest.raises(ShapeError, match="seq"):
        evaluate(b * s, {"batch": 2})
    assert dims_equal(2 * (s + 1), 2 * s + 2)
    assert not dims_equal(s, b)
    assert numel((b, 4, 2)) == 8 * b
    assert numel((3, 4)) == 12
    assert floor_div(7, 2) == 3 and ceil_div(7, 2) == 4
    assert evaluate(floor_div(s, 2), {"seq": 7}) == 3
    assert evaluate(ceil_div(s, 2), {"seq": 7}) == 4
    for d in (5, b, b * s + 3, sympy.floor(s / 2) + 1):
        assert dims_equal(dim_from_json(dim_to_json(d)), d)


def test_bind_symbols() -> None:
    b, s = sym("batch"), sym("seq")
    env = bind_symbols([(b, s), (b, s, 4)], [(2, 5), (2, 5, 4)], ["ids", "h"])
    assert env == {"batch": 2, "seq": 5}
    with pytest.raises(ShapeError, match="'batch' is 2 elsewhere but 3"):
        bind_symbols([(b, s), (b, s)], [(2, 5), (3, 5)], ["a", "c"])
    with pytest.raises(ShapeError, match="expected rank 2"):
        bind_symbols([(b, s)], [(2, 5, 1)], ["a"])
    with pytest.raises(ShapeError, match="dim 1: expected 4"):
        bind_symbols([(b, 4)], [(2, 5)], ["a"])


def test_type_inference_rejects_bad_operands() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3)))
    y = b.add_input("y", TensorType("float32", (4, 5)))
    with pytest.raises(OpTypeError, match="inner dims"):
        b.op("matmul", [x, y])
    with pytest.raises(OpTypeError, match="do not broadcast"):
        b.op("add", [x, y])
    with pytest.raises(OpTypeError, match="takes 2 inputs"):
        b.op("add", [x])
    with pytest.raises(OpTypeError, match="missing required attribute 'perm'"):
        b.op("permute", [x])


def test_symbolic_type_inference() -> None:
    b = GraphBuilder()
    n, s = sym("batch"), sym("seq")
    x = b.add_input("x", TensorType("float32", (n, s, 8)))
    r = b.op("reshape", [x], {"shape": (n, s, 2, -1)})
    assert r.type.shape == (n, s, 2, 4)
    c = b.op("concat", [x, x], {"dim": 1})
    assert c.type.shape == (n, 2 * s, 8)
    p = b.op("permute", [x], {"perm": (0, 2, 1)})
    m = b.op("matmul", [x, p])
    assert m.type.shape == (n, s, s)
    a = b.op("arange", [], {"end": s})
    assert a.type == TensorType("int64", (s,))
    img = b.add_input("img", TensorType("float32", (n, 3, 32, 32)))
    w = b.add_param("w", torch.randn(8, 3, 3, 3))
    conv = b.op("conv", [img, w], {"stride": 2, "padding": 1})
    assert conv.type.shape == (n, 8, 16, 16)
    up = b.op("interpolate", [conv], {"size": (32, 32), "mode": "bilinear"})
    assert up.type.shape == (n, 8, 32, 32)
