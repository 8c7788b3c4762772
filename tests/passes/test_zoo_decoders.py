"""Exact passes on HF GPT-2 and LLaMA: GELU recognition, RMSNorm, gate/up and QKV, O2."""

from __future__ import annotations

from pathlib import Path

from zoo_graphs import check_o2, hits

LAYERS = 2


def test_gpt2_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("gpt2", zoo_cache, batch=2, seq=5)
    before, after = g.op_counts(), out.op_counts()
    assert before["tanh"] == LAYERS and "tanh" not in after and "pow" not in after
    la = hits(ctx, "fuse_linear_act")
    assert la["gelu"] == LAYERS and la["residual"] == 2 * LAYERS
    gelus = [n for n in out.nodes if n.op == "fused_linear" and n.attrs["activation"] == "gelu"]
    assert len(gelus) == LAYERS and all(n.attrs["approximate"] == "tanh" for n in gelus)


def test_llama_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("llama", zoo_cache, batch=3, seq=6)
    before, after = g.op_counts(), out.op_counts()
    norms = 2 * LAYERS + 1
    assert hits(ctx, "fuse_norms") == {"norm": norms}
    assert after["rms_norm"] == norms and "rsqrt" not in after and "mean" not in after
    # q/k/v and gate/up per layer
    assert hits(ctx, "fuse_qkv") == {"qkv": 2 * LAYERS}
    assert ctx.records["fuse_qkv"]["group_sizes"] == [3, 2] * LAYERS
    assert hits(ctx, "fuse_linear_act")["residual"] == 2 * LAYERS
    assert before["linear"] - after["linear"] >= 3 * LAYERS
