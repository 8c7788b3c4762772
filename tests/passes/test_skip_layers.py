"""skip_layers: static block removal, early exit heads, per-token halting, on zoo models."""

from __future__ import annotations

import functools

import pytest
import torch
import zoo

from ember.backends.reference.interpreter import run_graph
from ember.frontends import fx
from ember.ir import get_op, verify
from ember.passes._blocks import find_blocks, graph_flops
from ember.passes.skip_layers import block_cosines, remove_blocks
from ember.passmanager import PassContext, PassManager, get_pass


@functools.cache
def _graph(name: str):  # noqa: ANN202
    z = zoo.get(name)
    g = fx.import_module(z.model, z.example_inputs, dynamic_dims=z.dynamic_dims,
                         input_names=z.input_names)
    return z, PassManager("O2").run(g)


def _ctx(z: zoo.ZooModel) -> PassContext:
    return PassContext(calib=[z.example_inputs, z.make_inputs(batch=2)])


def test_declared_approx() -> None:
    assert get_pass("skip_layers").numerics == "approx"


@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_static_removes_most_similar_block(name: str) -> None:
    z, g = _graph(name)
    ctx = _ctx(z)
    g2 = PassManager("skip_layers{method=static,num_layers=1}", verify_each=True).run(g, ctx)
    rec = ctx.records["skip_layers"]
    cos = block_cosines(g, find_blocks(g), ctx.calib)
    assert rec["removed"] == [max(range(len(cos)), key=lambda i: cos[i])]
    assert rec["flops_after"] < rec["flops_before"]
    assert len(find_blocks(g2).blocks) == 1
    out, want = run_graph(g2, *z.example_inputs), run_graph(g, *z.example_inputs)
    assert [o.shape for o in out] == [w.shape for w in want]


def test_static_zero_layers_is_identity() -> None:
    z, g = _graph("vit")
    assert PassManager("skip_layers{method=static,num_layers=0}").run(g, _ctx(z)) is g


def test_remove_blocks_equals_manual_bypass() -> None:
    z, g = _graph("vit")
    rep = find_blocks(g)
    g2 = remove_blocks(g, rep, [0, 1])  # both blocks gone: head reads the embeddings
    verify(g2)
    env = {"batch": 2}
    assert graph_flops(g2, env) < graph_flops(g, env)
    assert not any(n.op == "attention" for n in g2.nodes)


def test_early_exit_selects_first_confident_exit() -> None:
    z, g = _graph("vit")
    ctx = _ctx(z)
    g_all = PassManager("skip_layers{method=early_exit,layers=0,threshold=0.0}").run(g, ctx)
    verify(g_all)
    assert ctx.records["skip_layers"]["exit_share"][0] == 1.0
    g_none = PassManager("skip_layers{method=early_exit,layers=0,threshold=1.01}").run(g, ctx)
    assert ctx.records["skip_layers"]["exit_share"][-1] == 1.0
    x = z.example_inputs
    torch.testing.assert_close(run_graph(g_none, *x)[0], run_graph(g, *x)[0])
    bypass = remove_blocks(g, find_blocks(g), [1])  # exiting after block 0 = dropping block 1
    torch.testing.assert_close(run_graph(g_all, *x)[0], run_graph(bypass, *x)[0])


def test_early_exit_op_reference() -> None:
    e0 = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    e1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out, which = get_op("early_exit").reference([e0, e1], {"threshold": 0.9})
    assert which.tolist() == [0, 1]
    torch.testing.assert_close(out, torch.stack([e0[0], e1[1]]))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_halting(name: str) -> None:
    z, g = _graph(name)
    x = z.example_inputs
    want = run_graph(g, *x)
    ctx = _ctx(z)
    g0 = PassManager("skip_layers{method=halting,threshold=0.0}", verify_each=True).run(g, ctx)
    for a, b in zip(run_graph(g0, *x), want):  # nothing halts at threshold 0: exact
        torch.testing.assert_close(a, b)
    assert ctx.records["skip_layers"]["token_block_share_skippable"] == 0.0
    g1 = PassManager("skip_layers{method=halting,threshold=10.0,start=0}").run(g, ctx)
    assert ctx.records["skip_layers"]["halted_share"][0] == 1.0  # every token halts
    assert any(not torch.equal(a, b) for a, b in zip(run_graph(g1, *x), want))


def test_halt_update_reference() -> None:
    prev, new = torch.ones(1, 3, 2), torch.ones(1, 3, 2)
    new[0, 0] += 1.0
    halted = torch.tensor([[False, False, True]])
    out, h = get_op("halt_update").reference([prev, new, halted], {"threshold": 0.1})
    assert h.tolist() == [[False, True, True]]
    torch.testing.assert_close(out, new)
    new2 = new * 3
    out2, _ = get_op("halt_update").reference([prev, new2, h], {"threshold": 0.1})
    torch.testing.assert_close(out2[0, 1:], prev[0, 1:])
