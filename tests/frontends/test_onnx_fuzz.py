"""Fuzz the ONNX frontend: mutated models may only raise Ember errors (CompilerError)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ember.errors import CompilerError
from ember.frontends.onnx import import_onnx


def _seed_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0], name="tr"),
             helper.make_node("Softmax", ["t"], ["y"], axis=0, name="sm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "n"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


SEED = _seed_model().SerializeToString()
FIELD_MUTATIONS = ("op_type", "input", "output", "attr", "opset", "dtype", "init_dims",
                   "drop_node", "swap_nodes", "domain")


def _mutate_proto(m: onnx.ModelProto, kind: str, i: int, v: int) -> None:
    nodes = m.graph.node
    n = nodes[i % len(nodes)]
    if kind == "op_type":
        n.op_type = ["Relu", "Conv", "Gemm", "Foo", "Reshape", "Gather", "Split", ""][v % 8]
    elif kind == "input":
        n.input.append(["x", "w", "nope", ""][v % 4]) if v % 2 else n.ClearField("input")
    elif kind == "output":
        n.output[0] = ["x", "h", "zz", ""][v % 4]
    elif kind == "attr":
        n.attribute.append(helper.make_attribute(["axis", "perm", "to", "k"][v % 4], v - 50))
    elif kind == "opset":
        m.opset_import[0].version = [0, 1, 6, 12, 99, 23, -1][v % 7]
    elif kind == "dtype":
        m.graph.input[0].type.tensor_type.elem_type = v % 30
    elif kind == "init_dims":
        m.graph.initializer[0].dims[v % 2] = v - 3
    elif kind == "drop_node":
        del nodes[i % len(nodes)]
    elif kind == "swap_nodes":
        a, b = i % len(nodes), v % len(nodes)
        na, nb = onnx.NodeProto(), onnx.NodeProto()
        na.CopyFrom(nodes[a])
        nb.CopyFrom(nodes[b])
        nodes[a].CopyFrom(nb)
        nodes[b].CopyFrom(na)
    elif kind == "domain":
        n.domain = ["com.microsoft", "ai.onnx.ml", "bogus", ""][v % 4]


@settings(max_examples=1200, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(SEED)))
def test_byte_mutations_raise_only_ember_errors(flips: list, cut: int) -> None:
    data = bytearray(SEED)
    for pos, val in flips:
        data[pos] = val
    try:
        import_onnx(bytes(data[:cut]))
    except CompilerError:
        pass


@settings(max_examples=1200, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(FIELD_MUTATIONS), st.integers(0, 9),
                          st.integers(0, 100)), min_size=1, max_size=3))
def test_proto_mutations_raise_only_ember_errors(muts: list) -> None:
    m = _seed_model()
    for kind, i, v in muts:
        if not m.graph.node:
            break
        _mutate_proto(m, kind, i, v)
    try:
        import_onnx(m)
    except CompilerError:
        pass


def test_malformed_inputs_give_one_line_errors(tmp_path) -> None:
    import pytest

    from ember.errors import FrontendError

    p = tmp_path / "t.onnx"
    p.write_bytes(SEED[: len(SEED) // 2])
    with pytest.raises(FrontendError) as e:
        import_onnx(p)
    assert "\n" not in str(e.value)
    m = _seed_model()
    m.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(FrontendError, match="missing_weight"):
        import_onnx(m)
    m = _seed_model()
    m.opset_import[0].version = 99
    with pytest.raises(FrontendError, match="opset 99"):
        import_onnx(m)
