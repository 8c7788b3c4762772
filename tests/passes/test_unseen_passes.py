"""Approximate passes on architectures they were not written against (examples/unseen_sweep.py).

Parallel transformer blocks (GPT-J, GPT-NeoX, Falcon, PaLM, ViT-22B): one residual adds both
``attn(ln1(x))`` and ``mlp(ln2(x))`` to the stream. `find_blocks` used to report "attention
residual is not followed by an MLP residual" and find no block, so skip_layers could not run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ember.frontends import fx
from ember.ir import run_graph, verify
from ember.passes._blocks import find_blocks
from ember.passmanager import PassContext, PassManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import unseen_models  # noqa: E402


class _ParallelBlock(nn.Module):
    def __init__(self, d: int, heads: int, shared_norm: bool) -> None:
        super().__init__()
        self.h = heads
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = self.ln1 if shared_norm else nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.h, d // self.h).permute(
            2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        a = self.o(a.transpose(1, 2).reshape(b, n, d))
        return self.mlp(self.ln2(x)) + a + x


class _ParallelEncoder(nn.Module):
    """A bidirectional encoder of parallel blocks with a CLS pooler."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 3,
                 shared_norm: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ParallelBlock(d, heads, shared_norm)
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)[:, 0])


def _graph(shared_norm: bool = False):
    torch.manual_seed(0)
    m = _ParallelEncoder(shared_norm=shared_norm).eval()
    x = torch.randn(2, 8, 32)
    return m, x, fx.import_module(m, (x,), {"x": {0: "batch", 1: "seq"}}, ["x"])


@pytest.mark.parametrize("pipeline", ["O0", "O2"])
@pytest.mark.parametrize("shared_norm", [False, True])
def test_parallel_blocks_are_found(pipeline: str, shared_norm: bool) -> None:
    _, _, g = _graph(shared_norm)
    g = PassManager(pipeline).run(g, PassContext())
    rep = find_blocks(g)
    assert rep.ok and len(rep.blocks) == 3, rep.explain()
    assert all(b.parallel and b.mid == b.input for b in rep.blocks)
    assert not rep.causal and not rep.post_norm
    # block i's output is block i+1's input: the stream is chained
    assert [b.output for b in rep.blocks[:-1]] == [b.input for b in rep.blocks[1:]]


def test_skip_layers_static_on_parallel_blocks() -> None:
    m, x, g = _graph()
    g = PassManager("O2").run(g, PassContext())
    ctx = PassContext(calib=[(x,)])
    g2 = PassManager("skip_layers{method=static,num_layers=1}", verify_each=True).run(g, ctx)
    verify(g2)
    rec = ctx.records["skip_layers"]
    assert rec["applied"] and len(rec["removed"]) == 1
    assert rec["flops_after"] < rec["flops_before"]
    # bypassing block i is exactly the model without block i
    i = rec["removed"][0]
    m.blocks = nn.ModuleList(b for j, b in enumerate(m.blocks) if j != i)
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(run_graph(g2, x)[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pipeline", ["merge_tokens{r=2}",
                                      "prune_tokens{method=attention,keep=0.5}"])
def test_token_passes_refuse_parallel_blocks_with_a_reason(pipeline: str) -> None:
    _, x, g = _graph()
    ctx = PassContext()
    g2 = PassManager("O2," + pipeline).run(g, ctx)
    rec = ctx.records[pipeline.split("{")[0]]
    assert rec["applied"] is False and "parallel" in rec["reason"]
    assert run_graph(g2, x)[0].shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_neox", "falcon"])
def test_skip_layers_on_parallel_hf_decoders(name: str) -> None:
    z = unseen_models.UNSEEN[name]()
    g = fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)
    g = PassManager("O2").run(g, PassContext())
    rep = find_blocks(g)
    assert len(rep.blocks) == 2 and rep.causal and all(b.parallel for b in rep.blocks)
    ctx = PassContext(calib=[z.example_inputs])
    g2 = PassManager("skip_layers{method=static,num_layers=1}").run(g, ctx)
    assert ctx.records["skip_layers"]["applied"]
    out = run_graph(g2, *z.example_inputs)[0]
    assert out.shape == (2, 8, 100) and bool(torch.isfinite(out).all())


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["merge_tokens{r=2}",
                                      "prune_tokens{method=attention,keep=0.5}"])
def test_token_passes_on_encoder_decoder_bart(pipeline: str) -> None:
    # BART's decoder layer is self-attention (causal), cross-attention, MLP: find_blocks pairs
    # the cross-attention with the MLP and used to drop the causal self-attention from the
    # report, so the token passes shortened the decoder stream under a causal mask and the
    # rewritten graph failed at run time ("size of tensor a (8) must match ... (4)")
    z = unseen_models.UNSEEN["bart"]()
    g = fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)
    g = PassManager("O2").run(g, PassContext())
    assert find_blocks(g).causal
    ctx = PassContext()
    g2 = PassManager(pipeline).run(g, ctx)
    rec = ctx.records[pipeline.split("{")[0]]
    assert rec["applied"] is False and "causal" in rec["reason"]
    out = run_graph(g2, *z.example_inputs)[0]
    assert out.shape == (2, 8, 32)
