"""Transformer-block recognition (`find_blocks`) on zoo models, from FX and from ONNX."""

from __future__ import annotations

import pytest
import torch
import zoo

from ember.frontends import fx
from ember.ir import GraphBuilder, TensorType
from ember.passes._blocks import find_blocks
from ember.passmanager import PassManager


def _import(name: str, pipeline: str = "O0"):  # noqa: ANN202
    z = zoo.get(name)
    g = fx.import_module(z.model, z.example_inputs, dynamic_dims=z.dynamic_dims,
                         input_names=z.input_names)
    return z, PassManager(pipeline).run(g) if pipeline != "O0" else g


@pytest.mark.parametrize("pipeline", ["O0", "O2"])
@pytest.mark.parametrize("name,post_norm,protect,all_tokens,causal", [
    ("bert", True, 1, True, False),
    ("vit", False, 1, False, False),
    ("gpt2", False, 0, True, True),
    ("llama", False, 0, True, True),
])
def test_blocks_on_zoo(name: str, post_norm: bool, protect: int, all_tokens: bool,
                       causal: bool, pipeline: str) -> None:
    z, g = _import(name, pipeline)
    rep = find_blocks(g)
    assert rep.ok, rep.explain()
    assert len(rep.blocks) == 2  # every small zoo transformer has two layers
    assert rep.post_norm is post_norm
    assert rep.protect == protect
    assert rep.reads_all_tokens is all_tokens
    assert rep.causal is causal
    vals = g.values()
    for b in rep.blocks:
        for v in (b.input, b.mid, b.output):
            assert vals[v].type.rank == 3 and vals[v].type.shape[2] == rep.hidden
    assert rep.blocks[0].output == rep.blocks[1].input


def test_blocks_on_explicit_attention() -> None:
    _, g = _import("bert_eager")
    rep = find_blocks(g)
    assert rep.ok and not rep.blocks[0].fused_attention


def test_no_blocks_reports_why() -> None:
    _, g = _import("mlp")
    rep = find_blocks(g)
    assert not rep.ok
    assert "residual" in rep.explain()
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 4, 8)))
    w = b.add_param("w", torch.randn(8, 8))
    y = b.op("add", [x, b.op("linear", [x, w])])
    b.set_outputs([y])
    rep = find_blocks(b.build())  # a residual MLP without attention is not a block
    assert not rep.ok and "attention" in rep.explain()


def test_blocks_on_onnx_export(tmp_path) -> None:  # noqa: ANN001
    onnx_frontend = pytest.importorskip("ember.frontends.onnx")
    z = zoo.get("vit")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(z.model, z.example_inputs, str(path), input_names=z.input_names,
                      dynamo=False, opset_version=17)
    g = onnx_frontend.import_onnx(str(path))
    rep = find_blocks(g)
    assert rep.ok, rep.explain()
    assert len(rep.blocks) == 2 and rep.protect == 1
