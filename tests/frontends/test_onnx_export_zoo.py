"""ONNX export round trip on the model zoo: FX import -> O2 -> ONNX -> ONNX Runtime.

The exported model must pass onnx.checker, run in ONNX Runtime at a batch/seq other than the
one it was traced with (symbolic dims become dim_params), and match the reference interpreter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import zoo

from ember.backends.cpu.onnx import checkable, export_onnx
from ember.driver import relative_error
from ember.frontends.fx import import_module
from ember.ir import run_graph
from ember.passmanager import PassManager

ort = pytest.importorskip("onnxruntime")

MODELS = ["mlp", "bert", "bert_eager", "vit", "gpt2", "llama", "resnet", "mobilenet_v2"]


# ONNX Runtime's fused contrib ops each O2 graph must export to with contrib_ops=True
# (GPT-2's residual sums are 2-D and reshaped before their LayerNorm: no SkipLayerNorm yet);
# fused attention as MultiHeadAttention (bool padding mask, no mask, causal)
CONTRIB = {"bert": {"SkipLayerNormalization", "Gelu", "MultiHeadAttention"},
           "vit": {"Gelu", "SkipLayerNormalization", "MultiHeadAttention"},
           "gpt2": {"FastGelu", "MultiHeadAttention"}, "llama": {"MultiHeadAttention"}}


@pytest.mark.slow
@pytest.mark.parametrize("contrib", [False, True], ids=["standard", "contrib"])
@pytest.mark.parametrize("name", MODELS)
def test_zoo_onnx_round_trip(name: str, contrib: bool, tmp_path: Path) -> None:
    zm = zoo.get(name)
    g = import_module(zm.model, zm.example_inputs, dynamic_dims=zm.dynamic_dims,
                      input_names=zm.input_names)
    g = PassManager("O2", verify_each=True).run(g)
    path = tmp_path / f"{name}.onnx"
    rep = export_onnx(g, path, contrib_ops=contrib)
    assert not rep.custom, f"{name}: ops exported to the custom domain: {rep.custom}"
    model = onnx.load(str(path))
    # no schemas for com.microsoft, nor for ORT's default-domain SimplifiedLayerNormalization
    onnx.checker.check_model(checkable(model), full_check=not contrib)
    ms_ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    if contrib:
        assert CONTRIB.get(name, set()) <= ms_ops, ms_ops
        if any(n.op == "rms_norm" for n in g.nodes):   # ORT's one-pass kernel, not six nodes
            assert "SimplifiedLayerNormalization" in {n.op_type for n in model.graph.node}
    else:
        assert not ms_ops
    dims = {s: v for s, v in (("batch", 3), ("seq", 5)) if any(
        s in d.values() for d in zm.dynamic_dims.values())}
    inputs = zm.make_inputs(**dims)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    got = [torch.from_numpy(np.asarray(a)) for a in sess.run(None, feeds)]
    want = run_graph(g, *inputs)
    assert relative_error(got, want) <= 1e-4
    with torch.no_grad():
        eager = zm.model(*inputs)
    first = eager if isinstance(eager, torch.Tensor) else eager[0]
    assert relative_error(got[:1], [first]) <= 1e-4
