"""ONNX export round trips: ONNX -> Ember -> ONNX runs in ONNX Runtime like the interpreter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.backends.cpu.onnx import EMBER_DOMAIN, export_onnx
from ember.frontends.onnx import import_onnx
from ember.ir import GraphBuilder, TensorType, run_graph, sym

ort = pytest.importorskip("onnxruntime")


def _roundtrip(g, feeds: list[np.ndarray], tmp_path: Path, tol: float = 1e-5):
    path = tmp_path / "m.onnx"
    rep = export_onnx(g, path)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), feeds)})
    want = run_graph(g, *[torch.from_numpy(a) for a in feeds])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=tol, atol=tol)
    return rep, m


def _mlp_attention_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    g = numpy_helper.from_array(np.ones(16, np.float32), "g")
    nodes = [
        helper.make_node("Gemm", ["x2", "w", "b"], ["h"], transB=1),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["h", "s"], ["h3"]),
        helper.make_node("LayerNormalization", ["h3", "g"], ["ln"], axis=-1),
        helper.make_node("Transpose", ["ln"], ["lt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["ln", "lt"], ["sc"]),
        helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "ln"], ["o"]),
        helper.make_node("Erf", ["o"], ["e"]),
        helper.make_node("Add", ["e", "x"], ["y"]),
    ]
    # x2 = x viewed as [batch*seq, 16] via exporter shape arithmetic
    nodes = [helper.make_node("Constant", [], ["m1"], value=numpy_helper.from_array(
                 np.array([-1, 16], np.int64))),
             helper.make_node("Reshape", ["x", "m1"], ["x2"])] + nodes
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], [w, b, g])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_symbolic_roundtrip(tmp_path: Path) -> None:
    g = import_onnx(_mlp_attention_model())
    assert [str(d) for d in g.inputs[0].type.shape] == ["batch", "seq", "16"]
    reshapes = [n for n in g.nodes if n.op == "reshape"]
    assert reshapes and all(any(str(d) in ("batch", "seq", "batch*seq") for d in n.attrs["shape"])
                            for n in reshapes)
    rep, m = _roundtrip(g, [np.random.default_rng(1).standard_normal((2, 5, 16))
                            .astype(np.float32)], tmp_path, tol=1e-4)
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "seq"]
    assert rep.runnable_by_onnxruntime and not rep.custom
    # other sizes through the same exported file
    sess = ort.InferenceSession(rep.path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((3, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0],
                               run_graph(g, torch.from_numpy(x))[0].numpy(), rtol=1e-4, atol=1e-4)


def test_unmapped_op_goes_to_custom_domain(tmp_path: Path) -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("n"), 4)))
    y = b.op("softplus", [x], {"beta": 2.0})
    b.set_outputs([y], ["y"])
    rep = export_onnx(b.build(), tmp_path / "c.onnx")
    assert rep.custom == {"softplus": 1} and not rep.runnable_by_onnxruntime
    m = onnx.load(str(tmp_path / "c.onnx"))
    assert any(n.domain == EMBER_DOMAIN and n.op_type == "softplus" for n in m.graph.node)


def test_fused_linear_decomposes(tmp_path: Path) -> None:
    from ember.ir import has_op

    if not has_op("fused_linear"):
        pytest.skip("fused_linear is not registered")
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("n"), 8)))
    w = b.add_param("w", torch.randn(4, 8))
    bias = b.add_param("b", torch.randn(4))
    try:
        y = b.op("fused_linear", [x, w, bias], {"activation": "relu"})
    except Exception as e:  # attribute schema owned by the fusion passes
        pytest.skip(f"fused_linear schema differs: {e}")
    b.set_outputs([y], ["y"])
    rep, _ = _roundtrip(b.build(), [np.random.default_rng(0).standard_normal((3, 8))
                                    .astype(np.float32)], tmp_path)
    assert rep.decomposed.get("fused_linear") == 1


@pytest.mark.slow
def test_ppocr_cls_roundtrip(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime not installed")
    d = Path(spec.submodule_search_locations[0]) / "models"
    (path,) = d.glob("*_cls_*.onnx")
    g = import_onnx(path, {"x": ["batch", 3, 48, 192]})
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 192)).astype(np.float32)
    rep, _ = _roundtrip(g, [x], tmp_path, tol=1e-4)
    assert not rep.custom


def test_hard_sigmoid_and_global_pool_come_back_as_one_op(tmp_path: Path) -> None:
    """ONNX HardSigmoid / GlobalAveragePool, decomposed by the importer (mul, add, clamp /
    mean), export back as the single ops ONNX Runtime fuses into its NCHWc convolutions."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("HardSigmoid", ["c"], ["h"], alpha=0.2, beta=0.5),
             helper.make_node("GlobalAveragePool", ["h"], ["p"]),
             helper.make_node("Mul", ["h", "p"], ["y"])]
    graph = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 6, 8, 8])], [w])
    g = import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert {"clamp", "mean"} <= set(g.op_counts())
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 4
    _, m = _roundtrip(g, [x], tmp_path)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("HardSigmoid") == 1 and ops.count("GlobalAveragePool") == 1, ops
    assert "Clip" not in ops and "ReduceMean" not in ops, ops
    # no initializer is left that no node reads (ORT drops those before taking external data)
    used = {i for n in m.graph.node for i in n.input}
    assert all(t.name in used for t in m.graph.initializer)
