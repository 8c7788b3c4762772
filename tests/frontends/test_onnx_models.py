"""Real ONNX models from other people's exporters: import, run, match ONNX Runtime (fp32).

* PP-OCRv4 det/rec and PP-OCR mobile v2 cls (paddle2onnx) from ``rapidocr-onnxruntime``.
* The attention GRU decoder (torch.onnx, opset 17, symbolic batch/lengths) of
  ``arabic-name-romanizer``; its encoder uses GRU, which must be reported as unsupported.

Install: ``pip install --no-deps rapidocr-onnxruntime==1.4.4 arabic-name-romanizer==0.2.0``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ember.errors import UnsupportedOpError
from ember.frontends.onnx import import_onnx
from ember.ir import run_graph, verify

ort = pytest.importorskip("onnxruntime")


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _image(h: int, w: int) -> np.ndarray:
    """A real photo crop (sklearn's bundled sample), PP-OCR normalised, NCHW float32."""
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[0][100:100 + h, 200:200 + w].astype(np.float32)
    x = (img / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _check(got: list[torch.Tensor], want: list[np.ndarray], tol: float = 1e-4,
           scale_floor: float = 1e-6) -> float:
    """Max abs error relative to the output scale (max |ref|, at least ``scale_floor``)."""
    worst = 0.0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert tuple(g.shape) == w.shape
        scale = max(float(np.abs(w).max()), scale_floor)
        err = float(np.abs(g.numpy().astype(np.float64) - w).max())
        assert err <= tol * scale, f"max abs err {err:.3g} > {tol} x output scale {scale:.3g}"
        worst = max(worst, err / scale)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("kind,shape", [("det", (1, 3, 96, 128)), ("rec", (1, 3, 48, 160)),
                                        ("cls", (1, 3, 48, 192))])
def test_rapidocr_models_match_onnxruntime(kind: str, shape: tuple[int, ...]) -> None:
    d = _pkg_dir("rapidocr_onnxruntime") / "models"
    (path,) = [p for p in d.glob("*.onnx") if f"_{kind}_" in p.name]
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    # batch stays symbolic; H/W are fixed (the det model's fully dynamic H/W would make every
    # shape a nested floor() expression through ~60 strided convs)
    g = import_onnx(path, {name: ["batch", *shape[1:]]})
    verify(g)
    assert str(g.inputs[0].type.shape[0]) == "batch"
    x = _image(shape[2], shape[3])
    torch.set_num_threads(2)
    # det outputs a text-probability map: its scale is 1 even where the crop has no text
    floor = 1.0 if kind == "det" else 1e-6
    got = run_graph(g, torch.from_numpy(x))
    _check(got, _ort(path, {name: x}), scale_floor=floor)
    # the same graph serves another batch size
    x2 = np.concatenate([x, x[:, :, ::-1].copy()])
    got2 = run_graph(g, torch.from_numpy(x2))
    _check(got2, _ort(path, {name: x2}), scale_floor=floor)


def test_romanizer_decoder_symbolic_dims_match_onnxruntime() -> None:
    path = _pkg_dir("arabic_name_romanizer") / "resources" / "decoder.onnx"
    g = import_onnx(path)
    verify(g)
    shapes = {v: [str(d) for d in v.type.shape] for v in g.inputs}
    assert [s[0] for s in shapes.values()] == ["batch"] * 4
    rng = np.random.default_rng(0)
    for batch, tgt, src in ((1, 1, 5), (3, 4, 9)):
        feeds = {
            "prefix": rng.integers(0, 40, (batch, tgt)).astype(np.int64),
            "memory": rng.standard_normal((batch, src, 256)).astype(np.float32),
            "src_mask": rng.random((batch, src)) > 0.2,
            "hidden": rng.standard_normal((batch, 2, 256)).astype(np.float32),
        }
        feeds["src_mask"][:, 0] = True
        got = run_graph(g, *[torch.from_numpy(feeds[n]) for n in g.input_names])
        _check(got, _ort(path, feeds))


def test_romanizer_encoder_lists_every_unsupported_gru() -> None:
    path = _pkg_dir("arabic_name_romanizer") / "resources" / "encoder.onnx"
    with pytest.raises(UnsupportedOpError) as e:
        import_onnx(path)
    assert [o.op for o in e.value.ops] == ["GRU", "GRU"]
    assert all("node '" in o.loc for o in e.value.ops)


def test_expand_of_a_constant_to_a_symbolic_batch(tmp_path) -> None:
    """HF ViT exported with a dynamic batch expands its CLS-token initializer to [batch, 1, d]:
    the importer must emit an expand, not fold the constant with a symbolic shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ember.frontends.onnx import import_onnx
    from ember.ir import run_graph

    cls = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 1, 4), "cls")
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "z", "o"], ["b"]),
             helper.make_node("Concat", ["b", "one_d"], ["shp"], axis=0),
             helper.make_node("Expand", ["cls", "shp"], ["e"]),
             helper.make_node("Concat", ["e", "x"], ["y"], axis=1)]
    inits = [cls, numpy_helper.from_array(np.array([0], np.int64), "z"),
             numpy_helper.from_array(np.array([1], np.int64), "o"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "one_d")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["batch", 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])], inits)
    p = tmp_path / "e.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    ir = import_onnx(str(p))
    assert any(n.op == "expand" for n in ir.nodes)
    x = torch.randn(5, 3, 4)
    (y,) = run_graph(ir, x)
    assert y.shape == (5, 4, 4) and torch.equal(y[:, 0], torch.arange(4.0).expand(5, 4))
