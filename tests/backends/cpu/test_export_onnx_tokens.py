"""ONNX forms of the token ops: each emitter run by ONNX Runtime against the op's reference.

One-op graphs (static and symbolic token counts, random data and data with ties) go through
`export_onnx` and ONNX Runtime and must equal the reference interpreter; then whole merged and
pruned ViTs compiled by `ember.compile` must ship the ``onnxruntime`` program.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.backends.cpu.onnx import export_onnx
from ember.ir import GraphBuilder, TensorType, run_graph, sym

ort = pytest.importorskip("onnxruntime")


def _check(b: GraphBuilder, outs, feeds: list[torch.Tensor], tmp_path: Path,  # noqa: ANN001
           tol: float = 1e-5) -> list[np.ndarray]:
    b.set_outputs(outs if isinstance(outs, tuple | list) else [outs])
    g = b.build()
    rep = export_onnx(g, tmp_path / "m.onnx")
    assert rep.runnable_by_onnxruntime, rep.custom  # the op has a standard ONNX form
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feeds)})
    want = run_graph(g, *feeds)
    assert len(got) == len(want)
    for a, w in zip(got, want):
        w = w.numpy()
        assert a.shape == w.shape and a.dtype == w.dtype, (a.shape, w.shape, a.dtype, w.dtype)
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(a, w, rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(a, w)
    return got


def _stream(b: GraphBuilder, name: str, n, d: int = 8):  # noqa: ANN001, ANN202
    return b.add_input(name, TensorType("float32", (sym("batch"), n, d)))


def _ties(x: torch.Tensor) -> torch.Tensor:
    """Every other token duplicated (equal similarities / scores, like padding tokens)."""
    x = x.clone()
    x[:, 3::4] = x[:, 1:2]
    return x


@pytest.mark.parametrize("n,r,p,with_size", [(9, 3, 1, False), (10, 4, 0, True),
                                             (17, 8, 1, True), (6, 0, 2, False)])
@pytest.mark.parametrize("symbolic", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_token_merge(tmp_path: Path, n: int, r: int, p: int, with_size: bool,
                     symbolic: bool, ties: bool) -> None:
    b = GraphBuilder()
    nd = sym("seq") if symbolic else n
    x = _stream(b, "x", nd)
    m = _stream(b, "metric", nd, 4)
    s = b.add_input("size", TensorType("float32", (sym("batch"), nd, 1))) if with_size else None
    outs = b.op("token_merge", [x, m, s], {"r": r if not symbolic else r, "protect": p})
    g = torch.Generator().manual_seed(n * 7 + r)
    feeds = [torch.randn(3, n, 8, generator=g), torch.randn(3, n, 4, generator=g)]
    if ties:
        feeds[1] = _ties(feeds[1])
    if with_size:
        feeds.append(torch.randint(1, 4, (3, n, 1), generator=g).float())
    _check(b, outs, feeds, tmp_path)


def test_token_merge_symbolic_r(tmp_path: Path) -> None:
    """``ratio`` on a symbolic length: r itself is an expression of ``seq``."""
    b = GraphBuilder()
    seq = sym("seq")
    x = _stream(b, "x", seq)
    r = (seq - 1) // 4
    outs = b.op("token_merge", [x, x, None], {"r": r, "protect": 1})
    assert str(outs[0].type.shape[1]) != str(seq)
    _check(b, outs, [torch.randn(2, 13, 8)], tmp_path)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("weighting", ["size", "score"])
@pytest.mark.parametrize("p", [0, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_token_select(tmp_path: Path, fuse: bool, weighting: str, p: int, ties: bool) -> None:
    b = GraphBuilder()
    x = _stream(b, "x", 11)
    sc = b.add_input("score", TensorType("float32", (sym("batch"), 11)))
    sz = b.add_input("size", TensorType("float32", (sym("batch"), 11, 1)))
    outs = b.op("token_select", [x, sc, sz], {"keep": 4, "protect": p, "fuse": fuse,
                                              "weighting": weighting})
    g = torch.Generator().manual_seed(5)
    score = torch.randn(3, 11, generator=g)
    if ties:
        score = score.round()  # many equal scores: the lower position must win everywhere
    _check(b, outs, [torch.randn(3, 11, 8, generator=g), score,
                     torch.randint(1, 3, (3, 11, 1), generator=g).float()], tmp_path)


def test_token_select_symbolic_keep(tmp_path: Path) -> None:
    b = GraphBuilder()
    seq = sym("seq")
    x = _stream(b, "x", seq)
    sc = b.add_input("score", TensorType("float32", (sym("batch"), seq)))
    outs = b.op("token_select", [x, sc, None], {"keep": (seq - 1) // 2, "protect": 1,
                                                "fuse": True, "weighting": "score"})
    _check(b, outs, [torch.randn(2, 9, 8), torch.randn(2, 9)], tmp_path)


@pytest.mark.parametrize("fallback", [False, True])
def test_token_unmerge(tmp_path: Path, fallback: bool) -> None:
    b = GraphBuilder()
    y = _stream(b, "y", 5)
    mp = b.add_input("map", TensorType("int64", (sym("batch"), 9)))
    fb = _stream(b, "fb", 9) if fallback else None
    out = b.op("token_unmerge", [y, mp, fb])
    g = torch.Generator().manual_seed(1)
    feeds = [torch.randn(2, 5, 8, generator=g), torch.randint(-1, 5, (2, 9), generator=g)]
    if fallback:
        feeds.append(torch.randn(2, 9, 8, generator=g))
    _check(b, out, feeds, tmp_path)


@pytest.mark.parametrize("shape,dim", [((1, 1, 9, 9), 3), ((1, 1, 9, 9), 2), ((2, 9), 1),
                                       ((2, 4, 9, 3), 2)])
def test_token_gather(tmp_path: Path, shape: tuple, dim: int) -> None:
    b = GraphBuilder()
    t = b.add_input("t", TensorType("float32", shape))
    idx = b.add_input("idx", TensorType("int64", (2, 5)))
    out = b.op("token_gather", [t, idx], {"dim": dim})
    g = torch.Generator().manual_seed(2)
    _check(b, out, [torch.randn(shape, generator=g), torch.randint(0, 9, (2, 5), generator=g)],
           tmp_path)


@pytest.mark.parametrize("query", [None, 0])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_score(tmp_path: Path, query: int | None, mask: str | None,
                         kv_heads: int) -> None:
    b = GraphBuilder()
    q = b.add_input("q", TensorType("float32", (2, 4, 7, 8)))
    k = b.add_input("k", TensorType("float32", (2, kv_heads, 7, 8)))
    g = torch.Generator().manual_seed(3)
    feeds = [torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, kv_heads, 7, 8, generator=g)]
    m = None
    if mask == "float":
        m = b.add_input("mask", TensorType("float32", (2, 1, 1, 7)))
        feeds.append(torch.where(torch.rand(2, 1, 1, 7, generator=g) > 0.3, 0.0, -1e4))
    elif mask == "bool":
        m = b.add_input("mask", TensorType("bool", (2, 1, 7, 7)))
        mm = torch.rand(2, 1, 7, 7, generator=g) > 0.3
        mm[..., 0] = True
        feeds.append(mm)
    out = b.op("attention_score", [q, k, m], {"scale": None, "query": query})
    _check(b, out, feeds, tmp_path)


@pytest.mark.parametrize("method,p", [("shift", 0), ("dart", 0), ("dart", 2)])
def test_token_score(tmp_path: Path, method: str, p: int) -> None:
    b = GraphBuilder()
    x = _stream(b, "x", 10)
    ref = _stream(b, "ref", 10) if method == "shift" else None
    out = b.op("token_score", [x, ref], {"method": method, "pivots": 3, "protect": p})
    g = torch.Generator().manual_seed(4)
    feeds = [torch.randn(2, 10, 8, generator=g)]
    if ref is not None:
        feeds.append(torch.randn(2, 10, 8, generator=g))
    _check(b, out, feeds, tmp_path)


def test_halt_update_and_early_exit(tmp_path: Path) -> None:
    b = GraphBuilder()
    prev, new = _stream(b, "prev", 6), _stream(b, "new", 6)
    halted = b.add_input("halted", TensorType("bool", (sym("batch"), 6)))
    o, h = b.op("halt_update", [prev, new, halted], {"threshold": 0.5})
    l1 = b.add_input("l1", TensorType("float32", (sym("batch"), 5)))
    l2 = b.add_input("l2", TensorType("float32", (sym("batch"), 5)))
    e, which = b.op("early_exit", [l1, l2], {"threshold": 0.6})
    g = torch.Generator().manual_seed(6)
    pv = torch.randn(4, 6, 8, generator=g)
    feeds = [pv, pv + 0.6 * torch.randn(4, 6, 8, generator=g),
             torch.rand(4, 6, generator=g) > 0.5, 3 * torch.randn(4, 5, generator=g),
             torch.randn(4, 5, generator=g)]
    got = _check(b, [o, h, e, which], feeds, tmp_path)
    assert 0 < got[3].sum() < 4  # both exits are taken by some sample


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("passes", ["O2,merge_tokens{r=4}",
                                    "O2,prune_tokens{method=attention,keep=0.5,start=1}",
                                    "O2,prune_tokens{keep=0.6,start=1},merge_tokens{r=2}"])
def test_reduced_vit_ships_onnxruntime(tmp_path: Path, passes: str) -> None:
    """A merged / pruned ViT compiles to the ONNX Runtime program and matches the reference."""
    import zoo

    import ember

    z = zoo.get("vit")
    cm = ember.compile(z.model, z.example_inputs, passes=passes, target="cpu",
                       dynamic_dims=z.dynamic_dims, input_names=z.input_names,
                       backend_options={"mode": "onnxruntime"})
    assert cm.program.kind == "onnxruntime"
    g = cm.graph
    ops = g.op_counts()
    assert ops.get("token_merge", 0) + ops.get("token_select", 0) > 0
    x = z.make_inputs(batch=3)
    want = run_graph(g, *x)
    got = cm(*x)
    got = got if isinstance(got, list | tuple) else [got]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)
