"""Exact passes on HF ViT: QKV, GELU epilogues, residuals, O2."""

from __future__ import annotations

from pathlib import Path

from zoo_graphs import check_o2, hits

LAYERS = 2


def test_vit_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("vit", zoo_cache, batch=3)
    after = out.op_counts()
    assert hits(ctx, "fuse_qkv") == {"qkv": LAYERS}
    assert "gelu" not in after
    assert hits(ctx, "fuse_linear_act")["activation"] == LAYERS


def test_vit_from_torch_onnx_export_optimizes_like_its_fx_import(zoo_cache: Path,
                                                                 tmp_path: Path) -> None:
    # torch.onnx writes HF attention with sqrt(scale) on q and on k^T, erf-GELU as
    # (x * (1 + erf(x / sqrt 2))) * 0.5 and the projections as MatMul + Add: O2 must still
    # find the attention, the GELU epilogues and the QKV groups of the FX graph
    import pytest
    import torch
    from helpers import assert_close_outputs, run_pass
    from zoo_graphs import eager_outputs, zoo_graph

    from ember.ir import run_graph

    onnx_frontend = pytest.importorskip("ember.frontends.onnx")
    zm, g_fx = zoo_graph("vit", zoo_cache)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(zm.model, zm.example_inputs, str(path), input_names=zm.input_names,
                      dynamo=False, opset_version=17)
    g_onnx = run_pass(onnx_frontend.import_onnx(str(path)), "O2")
    fx_counts = run_pass(g_fx, "O2").op_counts()
    on_counts = g_onnx.op_counts()
    for op in ("attention", "fused_linear", "linear", "gelu", "matmul", "softmax", "erf"):
        assert on_counts.get(op, 0) == fx_counts.get(op, 0), (op, on_counts, fx_counts)
    assert on_counts["attention"] == LAYERS
    inputs = tuple(zm.example_inputs)
    assert_close_outputs(eager_outputs(zm, inputs)[:1], run_graph(g_onnx, *inputs)[:1],
                         rtol=1e-4)
