"""Pruning masks, sparse storage formats, and the sparsify pass on a real graph."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ember
from ember.errors import CompilerError
from ember.ir import get_op, run_graph, verify
from ember.ir.opset_quant import decode_sparse, encode_sparse
from ember.passes import _qkernels
from ember.passes.sparsify import parse_pattern, prune_mask
from ember.passmanager import PassContext, PassManager


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small graphs: one thread avoids OpenMP barrier stalls on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_gate_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    _qkernels.clear_cache()


# ----------------------------------------------------------------------------- masks
def test_unstructured_mask_prunes_smallest_per_row() -> None:
    w = torch.randn(6, 40)
    keep = prune_mask(w, "unstructured", 0.25)
    assert (keep.sum(1) == 30).all()
    for i in range(6):  # every pruned weight is no larger than every kept one in its row
        assert w[i][~keep[i]].abs().max() <= w[i][keep[i]].abs().min()


def test_wanda_uses_activation_norms() -> None:
    w = torch.ones(4, 8)
    norms = torch.arange(1.0, 9.0)
    keep = prune_mask(w, "unstructured", 0.5, norms)
    assert keep[:, 4:].all() and not keep[:, :4].any()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_n_of_each_m(n: int, m: int) -> None:
    w = torch.randn(5, 32)
    keep = prune_mask(w, f"{n}:{m}", 0.0)
    assert (keep.reshape(5, -1, m).sum(-1) == n).all()
    g = w.abs().reshape(5, -1, m)
    k = keep.reshape(5, -1, m)
    assert (g.masked_fill(~k, float("inf")).amin(-1) >= g.masked_fill(k, -1).amax(-1)).all()


@pytest.mark.parametrize("bh,bw", [(4, 4), (1, 16)])
def test_block_mask_prunes_whole_blocks(bh: int, bw: int) -> None:
    w = torch.randn(16, 64)
    keep = prune_mask(w, f"block{bh}x{bw}", 0.5)
    blocks = keep.reshape(16 // bh, bh, 64 // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)
    assert ((blocks.all(1)) | (~blocks.any(1))).all()  # each block kept or dropped whole
    assert abs(float(keep.float().mean()) - 0.5) < 1e-6


def test_bad_patterns_are_rejected() -> None:
    for p in ("3:2", "block0x4", "random"):
        with pytest.raises(ValueError):
            parse_pattern(p)
    with pytest.raises(CompilerError):
        PassManager("sparsify{pattern=unstructured,ratio=1.5}")


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("pattern,fmt,extra", [
    ("2:4", "nm", {"n": 2, "m": 4}), ("block4x4", "block", {"block": (4, 4)}),
    ("block1x16", "block", {"block": (1, 16)}), ("unstructured", "csr", {})])
def test_sparse_linear_storage_round_trip(pattern: str, fmt: str, extra: dict) -> None:
    w = torch.randn(32, 64)
    wp = w * prune_mask(w, pattern, 0.6)
    vals, idx = encode_sparse(wp, fmt, **extra)
    attrs = {"shape": (32, 64), "format": fmt, **extra}
    assert torch.equal(decode_sparse(vals, idx, {"n": 2, "m": 4, **attrs}), wp)
    nbytes = vals.numel() * 4 + idx.numel() * idx.element_size()
    assert nbytes < wp.numel() * 4  # compressed storage really is smaller
    op = get_op("sparse_linear")
    x, b = torch.randn(3, 7, 64), torch.randn(32)
    y = op.reference([x, vals, idx, b], op.normalize_attrs(attrs))
    torch.testing.assert_close(y, F.linear(x, wp, b), rtol=1e-5, atol=1e-5)
    if fmt == "csr" or (fmt == "block" and extra["block"][0] == extra["block"][1]):
        ys = op.reference([x, vals, idx, b], op.normalize_attrs({**attrs, "compute": "sparse"}))
        torch.testing.assert_close(ys, F.linear(x, wp, b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the pass
@pytest.fixture(scope="module")
def bert() -> tuple:
    import zoo

    from ember.frontends.fx import import_module

    z = zoo.bert(seq=16)
    g = import_module(z.model, z.example_inputs, dynamic_dims=z.dynamic_dims,
                      input_names=z.input_names)
    return z, PassManager("O2").run(g, PassContext())


def _ctx(z: object) -> PassContext:
    ctx = PassContext(calib=[z.make_inputs(seq=16) for _ in range(2)])
    ctx.example_inputs = list(z.example_inputs)
    return ctx


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                     dim=-1).mean())


@pytest.mark.parametrize("pipeline,min_cos", [
    ("sparsify{pattern=unstructured,ratio=0.5}", 0.98),
    ("sparsify{pattern=2:4,method=wanda,storage=compressed}", 0.98),
    ("sparsify{pattern=block4x4,ratio=0.3,storage=compressed}", 0.98),
    ("sparsify{pattern=block1x16,ratio=0.3,storage=compressed}", 0.98),
    ("sparsify{pattern=channel,ratio=0.5,gate=always}", 0.95),
    ("sparsify{pattern=channel,ratio=0.5,method=wanda,gate=always}", 0.95),
])
def test_sparsify_on_bert(bert: tuple, pipeline: str, min_cos: float) -> None:
    z, g = bert
    ctx = _ctx(z)
    q = PassManager(pipeline, verify_each=True).run(g, ctx)
    verify(q)
    rec = ctx.records["sparsify"]
    assert rec["layers"]
    ins = z.make_inputs(batch=3, seq=11)
    a, b = run_graph(g, *ins)[0], run_graph(q, *ins)[0]
    assert _cos(a, b) >= min_cos
    assert not torch.allclose(a, b)  # pruning changed the function
    if "channel" in pipeline:
        assert rec["pruned"] == rec["pairs"] == 2  # one FFN per layer
        assert all(la["kept"] == 32 for la in rec["layers"])
        assert rec["param_bytes_after"] < rec["param_bytes_before"]
        return
    for la in rec["layers"]:
        want = 0.5 if "2:4" in pipeline or "0.5" in pipeline else 0.3
        assert abs(la["sparsity"] - want) < 0.02
    if "compressed" in pipeline:
        assert q.op_counts().get("sparse_linear", 0) == len(rec["layers"])
        assert rec["param_bytes_after"] < rec["param_bytes_before"]
    else:  # dense storage: ordinary linears holding pruned weights
        assert "sparse_linear" not in q.op_counts()
        assert q.op_counts() == g.op_counts()


def test_sparse_compute_gating_is_measured_and_recorded(bert: tuple) -> None:
    z, g = bert
    ctx = _ctx(z)
    PassManager("sparsify{pattern=block4x4,ratio=0.5}").run(g, ctx)
    for la in ctx.records["sparsify"]["layers"]:
        gr = la["gate"]
        assert gr["measured"] is not None and gr["fp32_ms"] > 0 and gr["kernel_ms"] > 0
        faster = gr["measured"] >= 1.05
        assert la["decision"].startswith("sparse_linear (sparse") == faster
    ctx = _ctx(z)
    q = PassManager("sparsify{pattern=block4x4,ratio=0.5,gate=always}").run(g, ctx)
    sl = [n for n in q.nodes if n.op == "sparse_linear"]
    assert sl and all(n.attrs["compute"] == "sparse" for n in sl)


def test_wanda_needs_calibration(bert: tuple) -> None:
    z, g = bert
    with pytest.raises(CompilerError, match="calibration"):
        PassManager("sparsify{method=wanda}").run(g, PassContext())


def test_compressed_artifact_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 256)).eval()
    x = torch.randn(2, 8, 256)
    common = {"target": "cpu", "backend_options": {"mode": "eager"}, "check_fidelity": False}
    fp = ember.compile(m, (x,), passes="O2", **common)
    sp = ember.compile(m, (x,), passes="O2,sparsify{pattern=block4x4,ratio=0.75,"
                       "storage=compressed}", **common)
    p_fp, p_sp = fp.save(tmp_path / "fp.ember"), sp.save(tmp_path / "sp.ember")
    assert p_sp.stat().st_size < 0.4 * p_fp.stat().st_size
    loaded = ember.load(p_sp, trust_native=True)
    torch.testing.assert_close(loaded(x), sp(x))
    assert loaded.records["sparsify"]["pruned"] == 2
