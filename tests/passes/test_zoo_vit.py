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
