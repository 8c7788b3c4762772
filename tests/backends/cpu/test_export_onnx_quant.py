"""ONNX forms of the quantized linears: each emitter run by ONNX Runtime against the op's
reference, then a quantized BERT compiled by `ember.compile` must ship the ``onnxruntime``
program and match the reference interpreter.

The references round activations (u7 codes) and ONNX Runtime may round a tie or a scale's last
bit differently, so one-op outputs are compared within a few quantization steps (relative to the
output's max), as the CPU backend's `ort_tolerance` (2e-2) accepts them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ember
from ember.backends.cpu.onnx import export_onnx
from ember.hostinfo import has_int8_dot
from ember.ir import GraphBuilder, TensorType, run_graph, sym
from ember.passes.quantize import SchemeSpec, prepare

ort = pytest.importorskip("onnxruntime")

QTOL = 5e-3  # max |ORT - reference| / max |reference|: well under one u7 step of the output

# full-range u8 codes are exact in ORT only where its u8 x s8 dot products cannot saturate
VNNI = has_int8_dot()
ACT_MODES = ["tensor", "token",
             pytest.param("tensor_u8", marks=pytest.mark.skipif(
                 not VNNI, reason="no VNNI/AMX: MLAS's u8 x s8 pair sums can saturate"))]


def _run_ort(path: Path, feeds: list[torch.Tensor]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feeds)})


def _check(b: GraphBuilder, out, feeds: list[torch.Tensor], tmp_path: Path,  # noqa: ANN001
           tol: float = QTOL) -> float:
    b.set_outputs([out])
    g = b.build()
    rep = export_onnx(g, tmp_path / "m.onnx")
    assert rep.runnable_by_onnxruntime, rep.custom
    (got,) = _run_ort(tmp_path / "m.onnx", feeds)
    (want,) = run_graph(g, *feeds)
    want = want.numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    err = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
    assert err <= tol, err
    return err


def _x(shape: tuple[int, ...], seed: int, outlier: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    if outlier is not None:
        x[..., outlier] *= 30  # a massive-activation channel
    return x


def _linear_node(b: GraphBuilder, x, spec: SchemeSpec, w: torch.Tensor,  # noqa: ANN001
                 bias: bool, epi: dict, outliers: tuple[int, ...] = (),
                 x_range: tuple[float, float] | None = None, extra: dict | None = None,
                 res=None):  # noqa: ANN001
    prep = prepare(spec, w, x_range=x_range, outlier_idx=outliers)
    ins = [x] + [b.add_param(f"w_{s}", t) for s, t in prep.tensors]
    ins.append(b.add_param("bias", torch.randn(w.shape[0]) * 0.1) if bias else None)
    ins.append(res)
    if prep.outlier is not None:
        ins += [b.add_param("oidx", prep.outlier[0]), b.add_param("ow", prep.outlier[1])]
    while ins[-1] is None:
        ins.pop()
    return b.op(prep.op, ins, {**prep.attrs, **epi, **(extra or {})})


EPILOGUES = [{}, {"activation": "gelu"}, {"activation": "relu", "residual": "after_act"}]


@pytest.mark.parametrize("act_quant", ACT_MODES)
@pytest.mark.parametrize("epi", EPILOGUES)
@pytest.mark.parametrize("rank3", [False, True])
def test_qlinear_dynamic(tmp_path: Path, act_quant: str, epi: dict, rank3: bool) -> None:
    k, n = 64, 48
    b = GraphBuilder()
    shape = (sym("batch"), 5, k) if rank3 else (sym("rows"), k)
    x = b.add_input("x", TensorType("float32", shape))
    res = b.add_input("r", TensorType("float32", (*shape[:-1], n))) if "residual" in epi else None
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.1
    y = _linear_node(b, x, SchemeSpec("w8a8-dynamic", "dynamic"), w, True, epi,
                     extra={"act_quant": act_quant}, res=res)
    feeds = [_x((3, 5, k) if rank3 else (7, k), 2)]
    if res is not None:
        feeds.append(_x((*feeds[0].shape[:-1], n), 3))
    _check(b, y, feeds, tmp_path)


@pytest.mark.parametrize("act_quant", ACT_MODES)
def test_qlinear_dynamic_many_rows(tmp_path: Path, act_quant: str) -> None:
    """Rows split over ORT's threads keep their own scales (per-row a_scale)."""
    k, n = 128, 96
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("rows"), k)))
    w = torch.randn(n, k) * 0.1
    y = _linear_node(b, x, SchemeSpec("w8a8-dynamic", "dynamic"), w, True,
                     {"activation": "gelu"}, extra={"act_quant": act_quant})
    xin = _x((333, k), 8)
    xin[::7] *= 40  # rows of very different magnitude
    b.set_outputs([y])
    g = b.build()
    export_onnx(g, tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": xin.numpy()})
    (want,) = run_graph(g, xin)
    err = np.abs(got - want.numpy()).max(1) / np.maximum(1.0, np.abs(want.numpy()).max(1))
    assert err.max() <= QTOL, err.max()  # per row, so small rows cannot hide behind big ones


@pytest.mark.parametrize("act_quant", ACT_MODES)
def test_qlinear_dynamic_outlier_channels(tmp_path: Path, act_quant: str) -> None:
    k, n = 96, 40
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("rows"), k)))
    w = torch.randn(n, k) * 0.1
    y = _linear_node(b, x, SchemeSpec("w8a8-dynamic", "dynamic", outliers=True), w, True, {},
                     outliers=(3, 50), extra={"act_quant": act_quant})
    xin = _x((9, k), 4, outlier=50)
    xin[:, 3] *= 30
    _check(b, y, [xin], tmp_path)


def test_qlinear_token_beats_tensor_on_outlier_rows() -> None:
    """The reason for act_quant=token: one token with huge values does not flatten the others."""
    from ember.ir import get_op
    from ember.ir.opset_quant import quantize_weight_per_channel

    x = torch.randn(16, 128)
    x[0] *= 100
    w = torch.randn(64, 128) * 0.1
    wq, ws = quantize_weight_per_channel(w)
    want = x @ w.T
    d = get_op("qlinear_dynamic")
    errs = {}
    for mode in ("tensor", "token"):
        y = d.reference([x, wq, ws], d.normalize_attrs({"act_quant": mode}))
        errs[mode] = float((y[1:] - want[1:]).abs().max())
    assert errs["token"] < errs["tensor"] / 10, errs


def test_u8_codes_match_ort_dynamic_quantize_linear() -> None:
    """tensor_u8's (scale, zero point, codes) are ONNX Runtime's DynamicQuantizeLinear, bit for
    bit (the quantization half of DynamicQuantizeMatMul; no GEMM, so exact on any CPU)."""
    from onnx import TensorProto, helper

    from ember.ir.opset_quant import U8_QMAX, u8_qparams

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    gr = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", 1, [None, None])],
                           [helper.make_tensor_value_info("y", TensorProto.UINT8, None),
                            helper.make_tensor_value_info("s", 1, None),
                            helper.make_tensor_value_info("z", TensorProto.UINT8, None)])
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed, shift in [(0, 0.0), (1, 4.0), (2, -4.0), (3, 0.3)]:
        x = _x((37, 53), seed) + shift
        y, s, z = sess.run(None, {"x": x.numpy()})
        scale, zp = u8_qparams(x)
        q = torch.clamp(torch.round(x / scale) + zp, 0.0, float(U8_QMAX))
        assert float(scale) == float(s) and int(zp) == int(z)
        assert np.array_equal(q.numpy().astype(np.uint8), y)


@pytest.mark.parametrize("bias", [False, True])
def test_qlinear_dynamic_u8_unsaturated_on_any_cpu(tmp_path: Path, bias: bool) -> None:
    """DynamicQuantizeMatMul against the tensor_u8 reference with weights |w_q| <= 64, whose u8
    pair sums (255 * 64 * 2 < 2**15) cannot saturate AVX2's int16 either: the export's scales,
    zero point, per-column weight scales and fused bias checked on every CPU."""
    k, n = 80, 24
    g = torch.Generator().manual_seed(5)
    wq = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 3, k)))
    ins = [x, b.add_param("w_q", wq), b.add_param("w_scale", ws)]
    if bias:
        ins.append(b.add_param("bias", torch.randn(n, generator=g)))
    y = b.op("qlinear_dynamic", ins, {"act_quant": "tensor_u8", "activation": "gelu"})
    err = _check(b, y, [_x((2, 3, k), 9) + 1.0], tmp_path, tol=1e-5)
    import onnx
    ops = [nd.op_type for nd in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "DynamicQuantizeMatMul" in ops and "Add" not in ops, ops  # bias inside the kernel
    assert err <= 1e-5


@pytest.mark.parametrize("outliers", [(), (7,)])
def test_qlinear_static(tmp_path: Path, outliers: tuple[int, ...]) -> None:
    k, n = 64, 32
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("rows"), k)))
    w = torch.randn(n, k) * 0.1
    y = _linear_node(b, x, SchemeSpec("w8a8-static", "static", outliers=bool(outliers)), w,
                     True, {"activation": "gelu"}, outliers=outliers, x_range=(-3.0, 4.0))
    _check(b, y, [_x((6, k), 5, outlier=7)], tmp_path)  # values beyond the range clip


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, 24), (8, 32), (8, 64)])
def test_linear_woq(tmp_path: Path, bits: int, group: int) -> None:
    k, n = 384, 40
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 3, k)))
    w = torch.randn(n, k) * 0.1
    spec = SchemeSpec(f"w{bits}", "woq", bits, group)
    y = _linear_node(b, x, spec, w, True, {"activation": "silu"})
    _check(b, y, [_x((2, 3, k), 6)], tmp_path, tol=1e-4)  # fp32 compute: no activation rounding


@pytest.mark.parametrize("group", [16, 32, 64, 128, 24])
def test_linear_woq_w4a8(tmp_path: Path, group: int) -> None:
    """act_quant=block: MatMulNBits at accuracy level 4 (power-of-two groups) or the rounding
    in standard ops (others) must reproduce the reference's int8 activation codes: only fp32
    summation order may differ."""
    k, n = 384, 40
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 3, k)))
    w = torch.randn(n, k) * 0.1
    y = _linear_node(b, x, SchemeSpec("w4a8", "woq", 4, group, act="block"), w, True,
                     {"activation": "silu"})
    feeds = [_x((2, 3, k), 6, outlier=5)]
    _check(b, y, feeds, tmp_path, tol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_linear(tmp_path: Path, bits: int) -> None:
    k, n = 128, 24
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("rows"), k)))
    w = torch.randn(n, k) * 0.1
    y = _linear_node(b, x, SchemeSpec(f"lut{bits}", "lut", bits, 32), w, True, {})
    _check(b, y, [_x((5, k), 7)], tmp_path, tol=1e-4)


def test_woq_int4_uses_matmulnbits(tmp_path: Path) -> None:
    import onnx

    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (1, 64)))
    y = _linear_node(b, x, SchemeSpec("w4g32", "woq", 4, 32), torch.randn(16, 64), False, {})
    y8 = _linear_node(b, x, SchemeSpec("w4a8g32", "woq", 4, 32, act="block"),
                      torch.randn(16, 64), False, {})
    b.set_outputs([y, y8])
    export_onnx(b.build(), tmp_path / "m.onnx")
    nbits = [nd for nd in onnx.load(str(tmp_path / "m.onnx")).graph.node
             if (nd.domain, nd.op_type) == ("com.microsoft", "MatMulNBits")]
    # weight-only keeps fp32 compute (level 0); W4A8 asks for MLAS's int8 kernels (level 4)
    levels = sorted(a.i for nd in nbits for a in nd.attribute if a.name == "accuracy_level")
    assert levels == [0, 4]


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("act_quant", ACT_MODES)
def test_quantized_bert_ships_onnxruntime(act_quant: str) -> None:
    import zoo

    torch.set_num_threads(1)
    z = zoo.bert(seq=16)
    passes = f"O2,quantize{{scheme=w8a8-dynamic,gate=always,act_quant={act_quant}}}"
    cm = ember.compile(z.model, z.example_inputs, target="cpu", passes=passes,
                       dynamic_dims=z.dynamic_dims, input_names=z.input_names,
                       check_fidelity=False, backend_options={"mode": "onnxruntime"})
    assert cm.program.info.get("kind") == "onnxruntime", cm.program.info
    assert cm.records["quantize"]["quantized"] > 0
    ins = z.make_inputs(batch=2, seq=11)
    got = cm(*ins)
    got = list(got) if isinstance(got, list | tuple) else [got]
    want = run_graph(cm.graph, *ins)
    assert len(got) == len(want)
    for a, w in zip(got, want):
        err = float((a - w).abs().max() / max(1.0, float(w.abs().max())))
        assert err <= 2e-2, err


def test_quantized_bert_auto_mode_can_choose_onnxruntime() -> None:
    """In auto mode the ORT candidate of a quantized graph is built and accepted (not skipped
    for custom ops or for differing from the eager program)."""
    import zoo

    torch.set_num_threads(1)
    z = zoo.bert(seq=16)
    cm = ember.compile(z.model, z.example_inputs, target="cpu",
                       passes="O2,quantize{scheme=w8a8-dynamic,gate=always}",
                       dynamic_dims=z.dynamic_dims, input_names=z.input_names,
                       check_fidelity=False, backend_options={"mode": "auto"})
    info = cm.program.info.get("onnxruntime", {})
    assert "skipped" not in info, info
    assert info.get("max_rel_error", 1.0) <= 2e-2
