"""Ember's ONNX export of ops the unseen-architecture sweep (examples/unseen_sweep.py) hit:
each graph is imported from a small module with symbolic dims, exported, and run in ONNX
Runtime against the reference interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ember.backends.cpu.onnx import export_onnx
from ember.frontends import fx
from ember.ir import run_graph

ort = pytest.importorskip("onnxruntime")


def _export_matches(m: nn.Module, ins: tuple, dyn: dict, names: list[str], new: tuple,
                    tmp_path: Path) -> onnx.ModelProto:
    g = fx.import_module(m, ins, dyn, names)
    path = tmp_path / "m.onnx"
    export_onnx(g, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed in (ins, new):
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, feed)})
        with torch.no_grad():
            want = m(*feed)
        np.testing.assert_allclose(got[0], run_graph(g, *feed)[0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-5, atol=1e-5)
    return model


class _Alibi(nn.Module):
    """BLOOM's ALiBi bias: a per-head slope tensor repeated batch times (tile by a symbol)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slopes = torch.arange(1, 5, dtype=torch.float32)[None, :, None]
        bias = slopes.repeat(x.shape[0], 1, 1)  # [batch, 4, 1]
        return x + bias


class _LastToken(nn.Module):
    """Selecting at a symbolic index (the last position of a symbolic sequence)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.select(1, x.shape[1] - 1) * 2


def test_tile_by_symbolic_repeats(tmp_path: Path) -> None:
    # was TypeError "Cannot convert symbols to int" deep in the exporter (BLOOM, DeBERTa-v2)
    m = _export_matches(_Alibi(), (torch.randn(2, 4, 3),), {"x": {0: "batch"}}, ["x"],
                        (torch.randn(3, 4, 3),), tmp_path)
    assert "Tile" in {n.op_type for n in m.graph.node}


def test_select_at_symbolic_index(tmp_path: Path) -> None:
    _export_matches(_LastToken(), (torch.randn(2, 5, 3),), {"x": {0: "batch", 1: "seq"}},
                    ["x"], (torch.randn(3, 7, 3),), tmp_path)


class _Roll(nn.Module):
    """Swin's shifted windows: roll by static shifts along symbolic and static dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=(-2, 3), dims=(1, 2)) + torch.roll(x, 1, 1)


def test_roll_exports(tmp_path: Path) -> None:
    m = _export_matches(_Roll(), (torch.randn(2, 6, 8),), {"x": {0: "batch", 1: "h"}}, ["x"],
                        (torch.randn(3, 9, 8),), tmp_path)
    assert {"Slice", "Concat"} <= {n.op_type for n in m.graph.node}


@pytest.mark.parametrize("mode,align", [("nearest", None), ("nearest-exact", None),
                                        ("bilinear", False), ("bilinear", True),
                                        ("bicubic", False)])
def test_interpolate_exports_as_resize(mode: str, align: bool | None, tmp_path: Path) -> None:
    class Up(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.interpolate(x, size=(7, 10), mode=mode, align_corners=align)
            return y + nn.functional.interpolate(x, scale_factor=2, mode=mode,
                                                 align_corners=align)[..., :7, :10]

    m = _export_matches(Up(), (torch.randn(2, 3, 4, 5),), {"x": {0: "batch"}}, ["x"],
                        (torch.randn(3, 3, 4, 5),), tmp_path)
    assert "Resize" in {n.op_type for n in m.graph.node}


class _PosTable(nn.Module):
    """BERT-style position ids: a static buffer sliced to the symbolic sequence length (the
    legacy torch.onnx exporter emits Shape -> Gather (0-d) -> Cast -> Unsqueeze -> Slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", torch.arange(64, dtype=torch.float32)[None] / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(1)
        return x * self.pos[:, :n] + self.pos[:, 2:n + 2]


def test_import_torch_onnx_symbolic_slice_bounds(tmp_path: Path) -> None:
    import warnings

    from ember.frontends.onnx import import_onnx

    m, x = _PosTable(), torch.randn(2, 8)
    path = tmp_path / "pos.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    # was AttributeError "'Symbol' object has no attribute 'astype'" (a 0-d symbolic Cast),
    # then "ends is symbolic (seq) where a constant is needed"
    g = import_onnx(path)
    assert [str(d) for d in g.inputs[0].type.shape] == ["batch", "seq"]
    for t in (x, torch.randn(3, 5)):
        with torch.no_grad():
            np.testing.assert_allclose(run_graph(g, t)[0].numpy(), m(t).numpy(), rtol=1e-6,
                                       atol=1e-6)


class _TileResize(nn.Module):
    """ALiBi-style ``repeat(batch, 1, 1)`` and an interpolate to a fixed size under a symbolic
    batch: torch.onnx computes Tile's repeats and Resize's sizes from Shape(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slopes = torch.arange(1, 4, dtype=torch.float32)[None, :, None, None]
        y = x + slopes.repeat(x.shape[0], 1, 1, 1)
        return nn.functional.interpolate(y, size=(6, 10), mode="bilinear", align_corners=False)


def test_import_torch_onnx_symbolic_tile_and_resize_sizes(tmp_path: Path) -> None:
    import warnings

    from ember.frontends.onnx import import_onnx

    m, x = _TileResize(), torch.randn(2, 3, 4, 5)
    path = tmp_path / "tr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    # was "repeats / sizes is symbolic (batch) where a constant is needed" (BLOOM, SegFormer)
    g = import_onnx(path)
    for t in (x, torch.randn(3, 3, 4, 5)):
        with torch.no_grad():
            np.testing.assert_allclose(run_graph(g, t)[0].numpy(), m(t).numpy(), rtol=1e-5,
                                       atol=1e-5)
