"""skip_layers: static block removal, early exit heads, per-token halting, on zoo models."""

from __future__ import annotations

import functools

import pytest
import torch
import zoo

from ember.frontends import fx
from ember.ir import get_op, run_graph, verify
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
    g0 = PassManager("skip_layers{method=halting,threshold=0.0,start=0}",
                     verify_each=True).run(g, ctx)
    for a, b in zip(run_graph(g0, *x), want):  # nothing halts at threshold 0: exact
        torch.testing.assert_close(a, b)
    assert ctx.records["skip_layers"]["token_block_share_skippable"] == 0.0
    g1 = PassManager("skip_layers{method=halting,threshold=10.0,start=0}").run(g, ctx)
    assert ctx.records["skip_layers"]["halted_share"][0] == 1.0  # every token halts
    assert any(not torch.equal(a, b) for a, b in zip(run_graph(g1, *x), want))


def test_premature_share() -> None:
    from ember.passes.skip_layers import premature_share

    # token 0 halts after block 1 and then changes again in block 3: premature; token 1
    # halts after block 2 and stays; token 2 never halts
    rel = torch.tensor([[0.5, 0.01, 0.3, 0.9], [0.5, 0.4, 0.02, 0.01], [0.5, 0.5, 0.5, 0.5]])
    assert premature_share(rel, 0.05, 0, 4) == 0.5
    assert premature_share(rel, 0.05, 2, 4) == 0.0  # token 0 no longer halts (0.3, 0.9)
    assert premature_share(rel, 0.05, 0, 3) == 0.5  # block 3 runs for every token: token 0
    assert premature_share(rel, 0.05, 0, 2) == 0.0  # ... and block 2 as well
    assert premature_share(rel, 0.0, 0, 4) == 0.0  # nothing halts


def test_halting_start_picked_on_calibration() -> None:
    from ember.passes.skip_layers import block_changes, premature_share, skippable_share

    z = zoo.get("llama", size="base")  # 8 blocks
    g = PassManager("O2").run(fx.import_module(z.model, z.example_inputs,
                                               dynamic_dims=z.dynamic_dims,
                                               input_names=z.input_names))
    ctx = PassContext(calib=[z.make_inputs(i, batch=2, seq=16) for i in range(3)])
    rep = find_blocks(g)
    n = len(rep.blocks)
    rel = block_changes(g, rep, ctx.calib)
    assert rel.shape == (3 * 2 * 16, n)
    th = float(rel.quantile(0.3))  # some token-blocks change less, some halts premature
    g1 = PassManager(f"skip_layers{{method=halting,threshold={th},guard=0.0,keep_last=0}}",
                     verify_each=True).run(g, ctx)
    rec = ctx.records["skip_layers"]
    start = rec["start"]
    assert 0 < start < n and rec["premature_share"] == 0.0
    assert premature_share(rel, th, start, n) == 0.0
    assert all(premature_share(rel, th, s, n) > 0 for s in range(start))
    assert sum(nd.op == "halt_update" for nd in g1.nodes) == n - start
    assert rec["token_block_share_skippable"] > 0
    # keep_last: the last blocks run for every token
    g2 = PassManager(f"skip_layers{{method=halting,threshold={th},start=0,keep_last=2}}"
                     ).run(g, ctx)
    assert sum(nd.op == "halt_update" for nd in g2.nodes) == n - 2
    assert ctx.records["skip_layers"]["end"] == n - 2
    # keep_last=-1 (the default) picks the (start, end) pair that skips the most
    PassManager(f"skip_layers{{method=halting,threshold={th},guard=0.0}}").run(g, ctx)
    rec = ctx.records["skip_layers"]
    best = max(skippable_share(rel, th, s, e) for e in range(1, n + 1) for s in range(e)
               if premature_share(rel, th, s, e) == 0.0)
    assert skippable_share(rel, th, rec["start"], rec["end"]) == best > 0
    # a guard no start meets: the graph is left as it was, and the record says why
    g3 = PassManager(f"skip_layers{{method=halting,threshold={th},guard=0.0,"
                     f"keep_last={n - start - 1}}}").run(g, ctx)
    rec = ctx.records["skip_layers"]
    assert not rec["applied"] and "premature" in rec["reason"]
    assert not any(nd.op == "halt_update" for nd in g3.nodes)
    with pytest.raises(Exception, match="calibration"):
        PassManager("skip_layers{method=halting,threshold=0.1}").run(g, PassContext())


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


# ----------------------------------------------------------------------------- linear bridges
def _calib(z: zoo.ZooModel, n: int = 6) -> list[tuple[torch.Tensor, ...]]:
    dims = {"batch": 4} if z.name == "vit" else {"batch": 4, "seq": 16}
    return [z.make_inputs(100 + i, **dims) for i in range(n)]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_bridge_identity_map_is_the_bypass(name: str) -> None:
    from ember.passes.skip_layers import bridge_blocks

    z, g = _graph(name)
    rep = find_blocks(g)
    d = int(rep.hidden)
    eye = torch.cat([torch.eye(d), torch.zeros(1, d)]).double()
    g_b = bridge_blocks(g, rep, [(0, 0)], [eye])
    verify(g_b)
    assert sum(n.op == "attention" for n in g_b.nodes) == len(rep.blocks) - 1
    x = z.example_inputs
    for a, b in zip(run_graph(g_b, *x), run_graph(remove_blocks(g, rep, [0]), *x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
@pytest.mark.parametrize("bridge", ["token", "mean"])
def test_bridge_keeps_outputs_closer_than_bypass(name: str, bridge: str) -> None:
    z, g = _graph(name)
    ctx = PassContext(calib=_calib(z))
    g_b = PassManager(f"skip_layers{{layers=0,bridge={bridge}}}", verify_each=True).run(g, ctx)
    rec = ctx.records["skip_layers"]
    assert rec["applied"] and rec["removed"] == [0] and rec["bridge"] == bridge
    assert rec["flops_after"] < rec["flops_before"]
    g_skip = PassManager("skip_layers{layers=0}").run(g, PassContext())
    held = z.make_inputs(7, batch=3) if name == "vit" else z.make_inputs(7, batch=3, seq=16)
    want = run_graph(g, *held)[0]
    got, bypass = run_graph(g_b, *held)[0], run_graph(g_skip, *held)[0]
    assert got.shape == want.shape
    assert 1 - _cos(got, want) < 0.9 * (1 - _cos(bypass, want))


def test_bridge_reproduces_an_affine_block_exactly() -> None:
    # a pre-norm block whose attention and MLP output projections are zero adds two constant
    # biases to its input: an affine map the least-squares bridge must recover on new inputs
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                    num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                    num_labels=10)
    m = ViTForImageClassification(cfg).eval()
    layer = m.vit.layers[1]
    with torch.no_grad():
        for lin in (layer.attention.o_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    g = PassManager("O2").run(fx.import_module(m, (x,), dynamic_dims={"x": {0: "batch"}},
                                               input_names=["x"]))
    calib = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)),)
             for i in range(4)]
    ctx = PassContext(calib=calib)
    g_b = PassManager("skip_layers{num_layers=1,bridge=token}").run(g, ctx)
    assert ctx.records["skip_layers"]["removed"] == [1]
    assert ctx.records["skip_layers"]["fit_residual"][0] < 1e-9
    held = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(run_graph(g_b, held)[0], run_graph(g, held)[0],
                               rtol=1e-4, atol=1e-4)


def test_bridge_leaves_padding_out_of_the_fit() -> None:
    # padded positions' states depend on their (masked) token ids; the valid tokens' states
    # do not: calibration batches that differ only in padded ids must give the same bridge
    z, g = _graph("bert")
    maps = []
    for fill in (3, 77):
        calib = []
        for i in range(4):
            ids, mask = z.make_inputs(200 + i, batch=4, seq=16)
            mask = mask.clone()
            mask[:, 11:] = 0
            ids = ids.clone()
            ids[:, 11:] = fill
            calib.append((ids, mask))
        g_b = PassManager("skip_layers{layers=0,bridge=mean}").run(g, PassContext(calib=calib))
        maps.append({k: v for k, v in g_b.weights.items() if k.startswith("bridge")})
    assert maps[0].keys() == maps[1].keys() and maps[0]
    for k in maps[0]:
        torch.testing.assert_close(maps[0][k], maps[1][k], rtol=1e-5, atol=1e-6)


def test_valid_tokens_reads_bool_and_additive_masks() -> None:
    from ember.passes.skip_layers import _valid_tokens

    x = torch.zeros(2, 4, 8)
    b = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    b[1, ..., 2:] = False
    assert _valid_tokens(b, x).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    add = torch.zeros(2, 1, 1, 4)
    add[0, ..., 3] = torch.finfo(torch.float32).min
    assert _valid_tokens(add, x).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    causal = torch.full((4, 4), float("-inf")).triu(1)[None, None]  # every key seen once
    assert _valid_tokens(causal, x).tolist() == [[1] * 4] * 2
    assert _valid_tokens(None, x).tolist() == [[1] * 4] * 2


def test_bridge_mean_ridge_is_chosen_and_pulls_towards_the_token_fit() -> None:
    from ember.passes.skip_layers import RIDGES

    z, g = _graph("bert")
    calib = _calib(z)
    ctx = PassContext(calib=calib)
    PassManager("skip_layers{layers=1,bridge=mean}").run(g, ctx)
    assert ctx.records["skip_layers"]["ridge"][0] in RIDGES
    w = {}
    for spec in ("bridge=token", "bridge=mean,ridge=1000000"):
        g_b = PassManager(f"skip_layers{{layers=1,{spec}}}").run(g, PassContext(calib=calib))
        w[spec] = [v for k, v in sorted(g_b.weights.items()) if k.startswith("bridge")]
    for a, b in zip(*w.values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_bridge_errors_and_refusals() -> None:
    z, g = _graph("bert")
    with pytest.raises(Exception, match="calibration"):
        PassManager("skip_layers{num_layers=1,bridge=token}").run(g, PassContext())
    with pytest.raises(Exception, match="method=static"):
        PassManager("skip_layers{method=halting,bridge=token}").run(g, PassContext())
    with pytest.raises(Exception, match="bridge must be"):
        PassManager("skip_layers{num_layers=1,bridge=cubic}").run(g, PassContext())
    ctx = PassContext(calib=_calib(z, 2))
    merged = PassManager("merge_tokens{r=2}").run(g, PassContext())
    assert PassManager("skip_layers{num_layers=1,bridge=token}").run(merged, ctx) is merged
    assert "token reduction" in ctx.records["skip_layers"]["reason"]


def test_bridge_on_a_torch_onnx_export(tmp_path) -> None:  # noqa: ANN001
    onnx_frontend = pytest.importorskip("ember.frontends.onnx")
    z = zoo.get("vit")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(z.model, z.example_inputs, str(path), input_names=z.input_names,
                      dynamic_axes={"pixel_values": {0: "batch"}}, dynamo=False,
                      opset_version=17)
    g = PassManager("O2").run(onnx_frontend.import_onnx(str(path)))
    ctx = PassContext(calib=_calib(z))
    g_b = PassManager("skip_layers{num_layers=1,bridge=token}", verify_each=True).run(g, ctx)
    assert ctx.records["skip_layers"]["applied"]
    assert sum(n.op == "attention" for n in g_b.nodes) == len(find_blocks(g).blocks) - 1
    held = z.make_inputs(7, batch=3)
    assert _cos(run_graph(g_b, *held)[0], run_graph(g, *held)[0]) > 0.9
