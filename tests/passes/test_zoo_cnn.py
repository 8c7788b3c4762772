"""Exact passes on the CNN and MLP zoo models: Conv+BN folding, conv/linear epilogues, O2."""

from __future__ import annotations

from pathlib import Path

from zoo_graphs import check_o2, hits


def test_resnet_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("resnet", zoo_cache, batch=3)
    before, after = g.op_counts(), out.op_counts()
    assert hits(ctx, "fold_conv_bn") == {"conv_bn": before["batch_norm"]}
    assert "batch_norm" not in after and "relu" not in after
    assert after["fused_conv"] + after.get("conv", 0) == before["conv"]
    modes = {(n.attrs["activation"], n.attrs["residual"]) for n in out.nodes
             if n.op == "fused_conv"}
    assert modes == {("relu", "none"), ("relu", "before_act")}  # relu(bn3(conv3) + identity)


def test_mobilenet_v2_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("mobilenet_v2", zoo_cache, batch=3)
    before, after = g.op_counts(), out.op_counts()
    assert "batch_norm" not in after and "clamp" not in after
    acts = [n.attrs for n in out.nodes if n.op == "fused_conv"]
    relu6 = [a for a in acts if a["activation"] == "clamp"]
    assert len(relu6) == before["clamp"] and all((a["min"], a["max"]) == (0.0, 6.0) for a in relu6)
    assert sum(a["residual"] != "none" for a in acts) == before["add"]  # x + conv(x) blocks


def test_mlp_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("mlp", zoo_cache, batch=5)
    assert out.op_counts() == {"fused_linear": 2, "layer_norm": 1, "linear": 1}
    acts = sorted(n.attrs["activation"] for n in out.nodes if n.op == "fused_linear")
    assert acts == ["gelu", "relu"]
