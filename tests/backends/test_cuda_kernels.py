"""CUDA backend: every Triton kernel against its IR reference (Triton interpreter on CPU),
ahead-of-time cubin/PTX builds for sm_80/sm_90, and a zoo model compiled to a CUDA artifact.

``TRITON_INTERPRET=1`` is set before anything imports triton, so the kernels run on CPU
tensors. Shapes are small and ragged (never multiples of the block sizes) so every masked
edge is exercised; the interpreter is slow, so each case is a single launch or two.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the imports below)

import json  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from ember.backends.cuda import CudaBackend, ops  # noqa: E402
from ember.backends.cuda.aot import build_kernels  # noqa: E402
from ember.backends.cuda.launch import record_launches  # noqa: E402
from ember.ir import get_op  # noqa: E402
from ember.ir.opset_quant import (  # noqa: E402
    EPILOGUE_ATTRS,
    encode_sparse,
    quantize_weight_groups,
    quantize_weight_per_channel,
)

needs_gpu = pytest.mark.gpu
HAVE_GPU = torch.cuda.is_available()


def _epi(**kw: object) -> dict:
    return {**EPILOGUE_ATTRS, **kw}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(want.abs().max()))
    err = float((got.float() - want.float()).abs().max()) / scale
    assert err < tol, f"max rel error {err:.3g} >= {tol}"


# ----------------------------------------------------------------------------- W8A8
@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_qlinear_dynamic_matches_ir_reference(act: str) -> None:
    x = torch.randn(3, 7, 45)
    w = torch.randn(37, 45)
    wq, ws = quantize_weight_per_channel(w)
    b = torch.randn(37)
    res = torch.randn(3, 7, 37)
    a = _epi(activation=act, residual="after_act")
    op = get_op("qlinear_dynamic")
    want = op.reference([x, wq, ws, b, res], op.normalize_attrs(a))
    sc, zp = ops.u7_qparams(x)
    got = ops.w8a8_linear(x, wq, ws, b, a_scale=sc, a_zp=zp, post=res,
                          act=ops.act_params(a))  # type: ignore[arg-type]
    # fbgemm rounds half to even, the kernel half up: a tie moves one code by one step
    _close(got, want, 2e-3)


def test_u7_qparams_match_fbgemm() -> None:
    from ember.ir.opset_quant import choose_u7_qparams

    for x in (torch.randn(50) * 3 + 1, torch.rand(30) + 0.5, -torch.rand(20)):
        sc, zp = ops.u7_qparams(x)
        want = choose_u7_qparams(float(x.min()), float(x.max()))
        assert abs(float(sc) - want[0]) < 1e-6 * want[0] and int(zp) == want[1]


def test_w8a8_per_token_exact_against_fake_quant() -> None:
    x = torch.randn(19, 70)
    w = torch.randn(33, 70)
    wq, ws = quantize_weight_per_channel(w)
    got = ops.w8a8_linear(x, wq, ws, act=(ops.act_params({"activation": "silu"}) or (0, 0, 0)))
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.floor(x / s + 0.5).clamp(-127, 127)
    want = F.silu((xq @ wq.float().T) * s * ws)
    _close(got, want, 1e-5)


# ----------------------------------------------------------------------------- weight-only
@pytest.mark.parametrize("bits,group,m", [(4, 32, 1), (4, 64, 9), (4, 128, 3), (8, 32, 6)])
def test_linear_woq(bits: int, group: int, m: int) -> None:
    k = 2 * group if group < 128 else group
    w = torch.randn(41, k)
    wq, s = quantize_weight_groups(w, bits, group)
    x = torch.randn(m, k)
    b = torch.randn(41)
    a = _epi(activation="gelu", approximate="tanh", bits=bits, group_size=group)
    want = get_op("linear_woq").reference([x, wq, s, b], a)
    got = ops.woq_linear(x, wq, s, bits, group, b, act=ops.act_params(a))  # type: ignore
    _close(got, want)


def test_linear_woq_w4a8_lowering_rounds_activations() -> None:
    """act_quant=block on CUDA: the activations' int8 rounding, then the int4 kernel."""
    from ember.ir import GraphBuilder, TensorType, run_graph

    gen = torch.Generator().manual_seed(0)
    wq, s = quantize_weight_groups(torch.randn(24, 64, generator=gen), 4, 32)
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (3, 64)))
    y = b.op("linear_woq", [x, b.add_param("q", wq), b.add_param("s", s)],
             {"bits": 4, "group_size": 32, "act_quant": "block"})
    b.set_outputs([y])
    g = b.build()
    prog = CudaBackend().compile(g, [torch.randn(3, 64)], device="cpu")
    xin = torch.randn(3, 64, generator=gen) * 4
    want = run_graph(g, xin)[0]
    _close(prog(xin)[0], want)
    plain = get_op("linear_woq").reference([xin, wq, s], _epi(bits=4, group_size=32))
    assert float((plain - want).abs().max()) > 1e-4  # the rounding is really applied


# ----------------------------------------------------------------------------- sparse
def test_sparse_2_4_and_unstructured() -> None:
    torch.manual_seed(1)
    w = torch.randn(35, 72).reshape(35, 18, 4)
    keep = torch.rand(35, 18, 4).argsort(-1)[..., :2]
    w = (w * torch.zeros_like(w, dtype=torch.bool).scatter(2, keep, True)).reshape(35, 72)
    x = torch.randn(5, 72)
    vals, pos = encode_sparse(w, "nm")
    a = _epi(shape=(35, 72), format="nm", n=2, m=4, block=(4, 4), compute="dense",
             activation="relu")
    want = get_op("sparse_linear").reference([x, vals, pos], a)
    _close(ops.nm_linear(x, vals, pos, 2, 4, 72, act=(1, 0.0, 0.0)), want)

    u = torch.randn(29, 100)
    u[torch.rand_like(u) < 0.8] = 0
    u[3] = 0  # an empty row
    vals, idx = encode_sparse(u, "csr")
    a = _epi(shape=(29, 100), format="csr", compute="dense", n=2, m=4, block=(4, 4))
    want = get_op("sparse_linear").reference([x[:, :1].expand(5, 100).contiguous() * 0 +
                                              torch.randn(5, 100), vals, idx], a)
    from ember.backends.cuda.lowering import KERNEL_OPS

    crow, col = idx[:30].long(), idx[30:].long()
    rows = torch.repeat_interleave(torch.arange(29), crow.diff())
    bm, start, v = ops.bitmap_from_triplets(rows, col, vals, (29, 100))
    assert bm.shape == (29, 13) and start.shape == (29, 2)
    x2 = torch.randn(4, 100)
    _close(ops.bitmap_linear(x2, bm, start, v, 100), x2 @ u.T)
    assert "sparse_linear" in KERNEL_OPS and want.shape == (5, 29)


# ----------------------------------------------------------------------------- tokens
def test_token_ops_match_references() -> None:
    from ember.backends.cuda.lowering import KERNEL_OPS

    x = torch.randn(2, 13, 20)
    metric = torch.randn(2, 13, 8)
    size = torch.rand(2, 13, 1) + 0.5
    a = {"r": 4, "protect": 1}
    want = get_op("token_merge").reference([x, metric, size], a)
    got = KERNEL_OPS["token_merge"]([x, metric, size], a, {}, {})
    for g, w in zip(got, want):
        _close(g, w, 1e-5)
    score = torch.randn(2, 13)
    for fuse, weighting in ((False, "size"), (True, "score")):
        a = {"keep": 6, "protect": 1, "fuse": fuse, "weighting": weighting}
        want = get_op("token_select").reference([x, score, size], a)
        got = KERNEL_OPS["token_select"]([x, score, size], a, {}, {})
        for g, w in zip(got, want):
            _close(g, w, 1e-5)
    y = torch.randn(2, 9, 20)
    mp = torch.randint(-1, 9, (2, 13))
    fb = torch.randn(2, 13, 20)
    for args in ([y, mp, fb], [y, mp]):
        want = get_op("token_unmerge").reference(args, {})
        got = KERNEL_OPS["token_unmerge"](args + [None] * (3 - len(args)), {}, {}, {})
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- norms
def test_add_norm_layer_and_rms() -> None:
    x = torch.randn(3, 5, 50) + 4.0
    r = torch.randn(3, 5, 50)
    w, b = torch.randn(50), torch.randn(50)
    h, y = ops.add_norm(x, r, w, b, 1e-5, rms=False)
    assert h is not None
    _close(h, x + r, 1e-6)
    _close(y, get_op("layer_norm").reference([x + r, w, b], {"axes": 1, "eps": 1e-5}))
    _, y = ops.add_norm(x, None, w, None, 1e-6, rms=True)
    _close(y, get_op("rms_norm").reference([x, w], {"axes": 1, "eps": 1e-6}))
    _, y = ops.add_norm(torch.randn(2, 1100), None, None, None, 1e-5, rms=False)  # 2 chunks
    assert y.shape == (2, 1100)


# ----------------------------------------------------------------------------- attention
def test_flash_attention_mask_size_bias_gqa() -> None:
    q = torch.randn(2, 4, 19, 24)
    k, v = torch.randn(2, 2, 11, 24), torch.randn(2, 2, 11, 24)
    size = torch.rand(2, 11) + 1.0
    mask = torch.randn(2, 1, 19, 11)
    got = ops.flash_attention(q, k, v, mask=mask, size=size)
    att = get_op("attention").reference
    want = att([q, k, v, mask + size.log()[:, None, None, :]],
               {"scale": None, "is_causal": False, "enable_gqa": True})
    _close(got, want, 1e-5)
    keep = torch.rand(2, 1, 1, 11) > 0.3
    keep[..., 0] = True
    want = att([q, k, v, keep], {"scale": 0.3, "is_causal": False, "enable_gqa": True})
    _close(ops.flash_attention(q, k, v, mask=keep, scale=0.3), want, 1e-5)
    q2 = torch.randn(1, 2, 70, 16)
    want = att([q2, q2, q2], {"scale": None, "is_causal": True, "enable_gqa": False})
    _close(ops.flash_attention(q2, q2, q2, is_causal=True), want, 1e-5)


# ----------------------------------------------------------------------------- AOT
def test_aot_builds_cubin_and_ptx_for_sm80_and_sm90(tmp_path: Path) -> None:
    x = torch.empty(7, 50, device="meta")
    with record_launches() as specs:
        ops.add_norm(x, x, None, None, 1e-5, rms=True)
    assert [s.kernel for s in specs] == ["add_norm_kernel"]
    res = build_kernels(specs, (80, 90), tmp_path)
    (entry,) = res["kernels"]
    for arch in ("sm_80", "sm_90"):
        r = entry["archs"][arch]
        assert r["name"] == "add_norm_kernel"
        ptx = (tmp_path / r["files"]["ptx"]).read_text()
        assert ".entry add_norm_kernel" in ptx and f".target {arch}" in ptx
        cubin = (tmp_path / r["files"]["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and b"add_norm_kernel" in cubin
        meta = json.loads((tmp_path / r["files"]["json"]).read_text())
        assert meta["target"]["arch"] == int(arch[3:]) and meta["name"] == "add_norm_kernel"
    from triton.compiler.compiler import CompiledKernel

    files = entry["archs"]["sm_90"]["files"]
    ck = CompiledKernel(None, {f: str(tmp_path / f) for f in files.values()}, "h")
    assert ck.name == "add_norm_kernel" and ck.asm["cubin"][:4] == b"\x7fELF"


# ----------------------------------------------------------------------------- backend
def _mlp_w8a8() -> tuple:
    from zoo import mlp

    import ember

    z = mlp()
    cm = ember.compile(z.model, z.example_inputs, target="reference", check_fidelity=False,
                       passes="O2,quantize{scheme=w8a8-dynamic,gate=always}")
    return z, cm


def test_backend_availability_reasons() -> None:
    be = CudaBackend()
    if not HAVE_GPU:
        assert not be.available() and "torch.cuda.is_available() is False" in \
            be.available().reason
    assert be.available_for_compile().ok, be.available_for_compile().reason


def test_backend_compiles_zoo_model_to_cuda_artifact(tmp_path: Path) -> None:
    from ember.compiled import CompiledModel
    from ember.ir import run_graph

    z, cm = _mlp_w8a8()
    g = cm.graph
    assert "qlinear_dynamic" in g.op_counts()
    prog = CudaBackend().compile(g, list(z.example_inputs), device="cpu")
    assert prog.info["archs"] == ["sm_80", "sm_90"] and prog.info["kernels"] >= 3
    kinds = {p["op"]: p["impl"] for p in prog.info["plan"]}
    assert kinds["qlinear_dynamic"] == "kernel" and kinds["linear"] == "torch"
    assert all(p["h100_us"] and p["h100_us"] > 0 for p in prog.info["plan"])
    got = prog(*z.example_inputs)  # the same module, through the Triton interpreter
    _close(got[0], run_graph(g, *z.example_inputs)[0], 1e-4)

    art = CompiledModel(g, prog, target="cuda", backend="cuda", pipeline=cm.pipeline,
                        records={}).save(tmp_path / "mlp.ember")
    with zipfile.ZipFile(art) as zf:
        names = zf.namelist()
        man = json.loads(zf.read("payload/kernels/manifest.json"))
    assert "payload/plan.json" in names and "payload/kernels/src/gemm_int8.py" in names
    cubins = [n for n in names if n.endswith(".cubin")]
    assert any("w8a8_gemm_kernel" in n and n.endswith("sm90.cubin") for n in cubins)
    assert any("w8a8_gemm_kernel" in n and n.endswith("sm80.cubin") for n in cubins)
    assert {k["spec"]["kernel"] for k in man["kernels"]} >= {"quantize_rows_kernel",
                                                             "w8a8_gemm_kernel"}
    if not HAVE_GPU:
        import ember
        from ember.backends.registry import all_backends, register
        from ember.errors import ArtifactError

        if "cuda" not in all_backends():  # until the registry lists it as a builtin
            register(CudaBackend())

        with pytest.raises(ArtifactError, match="cannot run here"):
            ember.load(art)
        cm2 = ember.load(art, fallback="reference")  # what `ember inspect` does
        assert cm2.backend == "reference" and "target: cuda" in cm2.summary()


# ----------------------------------------------------------------------------- GPU
@needs_gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_gpu_artifact_runs_from_cubins(tmp_path: Path) -> None:  # pragma: no cover
    import ember
    from ember.ir import run_graph

    os.environ.pop("TRITON_INTERPRET", None)
    z, cm = _mlp_w8a8()
    prog = CudaBackend().compile(cm.graph, list(z.example_inputs))
    out = prog(*z.example_inputs)
    _close(out[0], run_graph(cm.graph, *z.example_inputs)[0], 1e-3)
    from ember.compiled import CompiledModel

    art = CompiledModel(cm.graph, prog, target="cuda", backend="cuda", pipeline="",
                        records={}).save(tmp_path / "m.ember")
    loaded = ember.load(art, trust_native=True)  # its own cubins
    assert loaded.program._table is not None and loaded.program._table.kernels
    _close(loaded.run(*z.example_inputs)[0], out[0], 1e-5)
