"""Exact passes on HF BERT (sdpa and eager attention): attention, QKV, epilogues, O2."""

from __future__ import annotations

from pathlib import Path

from zoo_graphs import check_o2, hits

LAYERS = 2


def test_bert_eager_attention_is_fused(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("bert_eager", zoo_cache, batch=3, seq=6)
    before, after = g.op_counts(), out.op_counts()
    assert before["softmax"] == LAYERS and "softmax" not in after
    assert hits(ctx, "fuse_attention") == {"attention": LAYERS}
    assert "matmul" not in after
    for n in out.nodes:
        if n.op == "attention":
            assert len(n.inputs) == 4 and n.inputs[3].type.dtype == "float32"  # padding mask
            assert abs(n.attrs["scale"] - 8 ** -0.5) < 1e-6
    _check_bert_linears(ctx, after)


def test_bert_sdpa_o2(zoo_cache: Path) -> None:
    g, out, ctx = check_o2("bert", zoo_cache, batch=2, seq=7)
    after = out.op_counts()
    assert after["attention"] == LAYERS
    _check_bert_linears(ctx, after)


def _check_bert_linears(ctx: object, after: dict[str, int]) -> None:
    assert hits(ctx, "fuse_qkv") == {"qkv": LAYERS}
    # per layer: gelu(intermediate), residual into attention-output and output dense; pooler tanh
    la = hits(ctx, "fuse_linear_act")
    assert la["activation"] == LAYERS + 1 and la["residual"] == 2 * LAYERS
    assert "gelu" not in after and "tanh" not in after
