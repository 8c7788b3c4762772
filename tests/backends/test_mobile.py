"""Mobile backend: TVM Relax -> aarch64 NEON library, verified under qemu-aarch64.

Every model is compiled for aarch64, run by the aarch64 runner under qemu with the aarch64 TVM
runtime, and compared with the reference interpreter (fp32: max abs error <= 1e-4 of the
output scale). Tests that need the toolchain skip, with what is missing, only when it is not
installed (``backends/mobile/setup_toolchain.sh`` installs it; ``make test`` runs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo

import ember
import ember.backends.mobile as mobile
from ember.backends.mobile.toolchain import find_toolchain
from ember.driver import relative_error
from ember.errors import BackendUnavailableError, CompilerError, UnsupportedOpError
from ember.frontends import import_model
from ember.ir import GraphBuilder, OpDef, TensorType, has_op, register_op, run_graph
from ember.passmanager import PassContext, PassManager, parse_pipeline

TOOLCHAIN = find_toolchain()
needs_toolchain = pytest.mark.skipif(not TOOLCHAIN.ok, reason=f"mobile toolchain absent: "
                                     f"{TOOLCHAIN.reason()}")
TOL = 1e-4


def _optimized(z: zoo.ZooModel) -> tuple[object, list[torch.Tensor]]:
    g = import_model(z.model, z.example_inputs, None, z.input_names)
    g = PassManager(parse_pipeline("O2")).run(g, PassContext(target="mobile"))
    return g, list(z.example_inputs)


# ----------------------------------------------------------------------------- no toolchain
def test_available_says_what_is_missing(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu, no cross g++, no objdump
    monkeypatch.setenv("EMBER_TVM_AARCH64", str(tmp_path / "nowhere"))
    avail = mobile.MobileBackend().available()
    assert not avail.ok
    for piece in ("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64 TVM runtime",
                  "setup_toolchain.sh"):
        assert piece in avail.reason
    z = zoo.mlp()
    g, ex = _optimized(z)
    with pytest.raises(BackendUnavailableError, match="aarch64-linux-gnu-g\\+\\+"):
        mobile.compile_graph(g, ex)


def test_backend_is_registered_once() -> None:
    from ember.backends.registry import get_backend, register

    assert get_backend("mobile") is mobile.MobileBackend()
    register(mobile.MobileBackend())  # re-registering the same backend is a no-op


def test_setup_script_parses() -> None:
    res = subprocess.run(["bash", "-n", str(mobile.SETUP_SCRIPT)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


@needs_toolchain
def test_setup_script_is_idempotent() -> None:
    """On a machine it already set up, the script changes nothing and says so."""
    res = subprocess.run(["bash", str(mobile.SETUP_SCRIPT), sys.prefix], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for msg in ("cross toolchain are present", "already installed", "runtime present"):
        assert msg in res.stderr, res.stderr


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mlp_program() -> tuple[object, list[torch.Tensor], object]:
    if not TOOLCHAIN.ok:
        pytest.skip(f"mobile toolchain absent: {TOOLCHAIN.reason()}")
    z = zoo.mlp()
    g, ex = _optimized(z)
    return mobile.compile_graph(g, ex), ex, g


@needs_toolchain
def test_mlp_matches_reference_under_qemu(mlp_program: tuple) -> None:
    prog, ex, g = mlp_program
    got = prog(*ex)
    want = run_graph(g, *ex)
    assert relative_error(got, want) <= TOL
    assert prog.info["rules"].get("tiled_contraction", 0) >= 2, prog.info["kernels"]
    with pytest.raises(CompilerError, match="static shape"):
        prog(torch.randn(3, 16))


@needs_toolchain
def test_generated_code_uses_neon(mlp_program: tuple) -> None:
    from ember.backends.mobile.analysis import neon_report

    prog, _, _ = mlp_program
    rep = neon_report(prog.library)
    assert rep.kernels >= 3
    assert rep.fmla_4s >= 16, rep.to_json()  # a 4x16 register tile: 16 fmla v.4s per k step
    assert rep.q_loads > 0, rep.to_json()


@needs_toolchain
def test_ember_compile_save_load_run(tmp_path: Path) -> None:
    z = zoo.mlp(batch=2)
    cm = ember.compile(z.model, z.example_inputs, target="mobile")
    assert cm.backend == "mobile" and not cm.placement.get("fallback")
    assert cm.fidelity["example_max_rel_error"] <= TOL
    path = cm.save(tmp_path / "mlp.ember")
    import zipfile

    names = set(zipfile.ZipFile(path).namelist())
    assert {"payload/model.so", "payload/weights.params", "payload/runner.cc"} <= names
    loaded = ember.load(path, trust_native=True)  # built by this test: its own .so
    x = z.make_inputs(batch=2)[0]
    with torch.no_grad():
        want = z.model(x)
    got = loaded(x.numpy())
    assert isinstance(got, np.ndarray)
    assert relative_error([torch.from_numpy(got)], [want]) <= TOL


@needs_toolchain
def test_cli_compile_and_run_pt2(tmp_path: Path) -> None:
    z = zoo.mlp(batch=2)
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(z.model, z.example_inputs), str(pt2))
    x = z.example_inputs[0].numpy()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "m.ember"
    # the backend registers on import; the CLI runs in a process that imports it first
    code = ("import sys, ember.backends.mobile; from ember.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for args in (["compile", str(pt2), "--target", "mobile", "-o", str(out), "-q"],
                 ["run", str(out), "--input", str(tmp_path / "x.npy"), "--output",
                  str(tmp_path / "y.npy")]):
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        want = z.model(torch.from_numpy(x))
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert relative_error([got], [want]) <= TOL


# ----------------------------------------------------------------------------- unsupported
def _bessel_op() -> str:
    name = "test_mobile_bessel_j0"
    if not has_op(name):
        register_op(OpDef(name, lambda ts, a: [ts[0]],
                          lambda xs, a: torch.special.bessel_j0(xs[0]),
                          traits=frozenset({"elementwise"}),
                          doc="test-only op whose ATen form TVM cannot convert"))
    return name


@needs_toolchain
def test_unsupported_ops_are_all_listed() -> None:
    op = _bessel_op()
    b = GraphBuilder("bad")
    x = b.add_input("x", TensorType("float32", (2, 8)))
    y = b.op(op, [x], name="first")
    y = b.op("relu", [y])
    y = b.op(op, [y], name="second")
    b.set_outputs([y])
    g = b.build()
    with pytest.raises(UnsupportedOpError) as ei:
        mobile.compile_graph(g, [torch.randn(2, 8)])
    err = ei.value
    assert len(err.ops) == 2 and all(o.op == op for o in err.ops)
    assert {"%first", "%second"} <= {o.loc.split()[-1] for o in err.ops}
    assert "special_bessel_j0" in str(err) and "mobile" in str(err)
    assert not mobile.MobileBackend().supports(g.nodes[0]).ok
    assert mobile.MobileBackend().supports(g.nodes[1]).ok


# ----------------------------------------------------------------------------- zoo
@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "bert"])
def test_zoo_model_matches_reference(name: str) -> None:
    z = zoo.get(name, batch=1)
    g, ex = _optimized(z)
    prog = mobile.compile_graph(g, ex)
    got = prog(*ex)
    want = run_graph(g, *ex)
    assert relative_error(got, want) <= TOL
    assert prog.info["rules"].get("tiled_contraction", 0) >= 1


@needs_toolchain
@pytest.mark.slow
def test_neon_schedules_execute_10x_fewer_instructions() -> None:
    from ember.backends.mobile.analysis import compare_schedules

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128)).eval()
    x = torch.randn(8, 128)
    g = import_model(model, (x,))
    res = compare_schedules(g, [x], repeat=2)
    assert res["neon"]["neon"]["fmla_4s"] > 0
    assert res["ratio"] >= 10.0, res


# ----------------------------------------------------------------------------- ONNX via the CLI
# Issue #8: `ember compile m.onnx --target mobile -o m.ember` then `ember run m.ember` under qemu.
# The ONNX files come from torch's TorchScript exporter (dynamo=False), not Ember's own.
# case -> (zoo model, symbolic batch dim in the file?, extra compile arguments)
ONNX_CASES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "mlp": ("mlp", False, ()),
    "mlp_dynbatch": ("mlp", True, ()),
    "resnet": ("resnet", False, ()),
    "resnet_dynbatch": ("resnet", True, ()),
    "mobilenet_v2": ("mobilenet_v2", False, ()),
    "mobilenet_v2_dynbatch": ("mobilenet_v2", True, ()),
    "bert": ("bert", False, ()),
    "bert_dynbatch": ("bert", True, ()),
    "mlp_int8": ("mlp", False, ("--passes", "O2,quantize{scheme=w8a8-dynamic,gate=always}", "--strict")),
}
INT8_COSINE = 0.999  # the quantize pass's w8a8-dynamic budget (tests/passes/test_quantize.py)


class _Positional(torch.nn.Module):
    """Calls a zoo model with its inputs by name and returns a tuple of tensors (HF models
    take keyword arguments and return ModelOutput objects, which the exporter does not)."""

    def __init__(self, z: zoo.ZooModel) -> None:
        super().__init__()
        self.model, self.names = z.model, list(z.input_names)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, xs)))
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(t for t in out.to_tuple() if isinstance(t, torch.Tensor))


def _export_onnx(z: zoo.ZooModel, path: Path, dynamic: bool) -> int:
    """Writes ``z`` as ONNX with torch's TorchScript exporter; returns its output count."""
    m = _Positional(z).eval()
    with torch.no_grad():
        n_out = len(m(*z.example_inputs))
        axes = {n: {0: "batch"} for n in z.input_names} if dynamic else None
        torch.onnx.export(m, z.example_inputs, str(path), input_names=z.input_names,
                          output_names=[f"y{i}" for i in range(n_out)], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    return n_out


def _cli(*args: str) -> None:
    from ember.cli import main

    assert main(list(args)) == 0, f"ember {' '.join(args)} failed (its error is above)"


@pytest.fixture(scope="module", params=list(ONNX_CASES))
def onnx_run(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One ONNX model compiled by the CLI for mobile and run by the CLI under qemu (once)."""
    if not TOOLCHAIN.ok:
        pytest.skip(f"mobile toolchain absent: {TOOLCHAIN.reason()}")
    name, dynamic, extra = ONNX_CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    z = zoo.get(name, batch=1)
    onnx_path = d / f"{name}.onnx"
    n_out = _export_onnx(z, onnx_path, dynamic)
    import onnx

    batch_dims = [i.type.tensor_type.shape.dim[0] for i in onnx.load(str(onnx_path)).graph.input]
    assert all(bool(d.dim_param) == dynamic for d in batch_dims), batch_dims
    args = ["compile", str(onnx_path), "--target", "mobile", "-o", str(d / "m.ember"), "-q",
            *extra]
    if dynamic:  # the symbolic batch gets its concrete size on the command line
        args += ["--input-shape", *(f"{n}={','.join(str(s) for s in x.shape)}"
                                    for n, x in zip(z.input_names, z.example_inputs))]
    _cli(*args)
    xs = []
    for i, x in enumerate(z.example_inputs):
        xs.append(str(d / f"x{i}.npy"))
        np.save(xs[-1], x.numpy())
    ys = [str(d / f"y{i}.npy") for i in range(n_out)]
    _cli("run", str(d / "m.ember"), "--trust-native", "--input", *xs, "--output", *ys)
    got = [torch.from_numpy(np.load(y)) for y in ys]
    return {"case": request.param, "zoo": z, "onnx": onnx_path, "artifact": d / "m.ember",
            "got": got, "int8": bool(extra)}


@needs_toolchain
def test_onnx_cli_artifact_is_aarch64_and_matches_reference(onnx_run: dict) -> None:
    from ember.artifact import read_manifest

    man = read_manifest(onnx_run["artifact"])
    text = json.dumps(man)
    assert '"backend": "mobile"' in text and '"fallback"' not in text, text[:2000]
    cm = ember.load(onnx_run["artifact"], trust_native=True)  # built here, by this test
    assert cm.backend == "mobile" and isinstance(cm.program, mobile.MobileProgram)
    res = subprocess.run([TOOLCHAIN.objdump or "aarch64-linux-gnu-objdump", "-f",
                          str(cm.program.library)], capture_output=True, text=True)
    assert "elf64-littleaarch64" in res.stdout, res.stdout + res.stderr
    # `ember inspect`: the phone spec, its kernels named for what they are (not "inductor")
    assert "predicted latency on phone (fused kernels" in cm.summary()
    z, got = onnx_run["zoo"], onnx_run["got"]
    src = import_model(str(onnx_run["onnx"]), dynamic_dims={
        n: list(x.shape) for n, x in zip(z.input_names, z.example_inputs)})
    want = run_graph(src, *z.example_inputs)  # the unoptimized ONNX graph on the interpreter
    with torch.no_grad():
        eager = list(_Positional(z).eval()(*z.example_inputs))
    if not onnx_run["int8"]:
        assert relative_error(got, want) <= TOL
        assert relative_error(got, eager) <= TOL
        return
    assert cm.graph.op_counts().get("qlinear_dynamic", 0) >= 1, cm.graph.op_counts()
    # the aarch64 code does the quantized graph's own arithmetic (measured: 1e-7 apart), so the
    # fp32 tolerance holds against the interpreter run of that graph; the fp32 model is held to
    # the quantize pass's budget
    assert relative_error(got, run_graph(cm.graph, *z.example_inputs)) <= TOL
    cos = torch.nn.functional.cosine_similarity(got[0].flatten(), want[0].flatten(), dim=0)
    assert float(cos) >= INT8_COSINE, float(cos)


@needs_toolchain
def test_onnx_symbolic_batch_needs_a_shape(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ember.cli import main

    z = zoo.get("resnet", batch=1)
    path = tmp_path / "resnet.onnx"
    _export_onnx(z, path, dynamic=True)
    rc = main(["compile", str(path), "--target", "mobile", "-o", str(tmp_path / "m.ember")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "static shapes" in err and "'x'" in err and "--input-shape x=1,3,32,32" in err, err
    assert not (tmp_path / "m.ember").exists()


@pytest.mark.parametrize("act_quant", ["tensor", "token", "tensor_u8"])
@pytest.mark.parametrize("outliers", [False, True])
def test_int8_lowering_matches_the_op_reference(act_quant: str, outliers: bool) -> None:
    """The plain-ATen qlinear_dynamic that TVM compiles does the reference's (fbgemm's) math."""
    from ember.backends.mobile.lowering import MOBILE_LOWERINGS
    from ember.ir import get_op
    from ember.ir.opset_quant import quantize_weight_per_channel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * 2 + 0.3
    w = torch.randn(48, 64, generator=g) * 0.1
    wq, ws = quantize_weight_per_channel(w)
    ins: list[torch.Tensor | None] = [x, wq, ws, torch.randn(48, generator=g), None]
    if outliers:
        idx = torch.tensor([3, 17])
        ins += [idx, w[:, idx]]
    a = {"act_quant": act_quant, "activation": "relu", "residual": "none",
         "approximate": "none"}
    got = MOBILE_LOWERINGS["qlinear_dynamic"](ins, a)
    want = get_op("qlinear_dynamic").reference(ins, a)
    assert relative_error([got], [want]) <= TOL


# ----------------------------------------------------------------------------- real int8
def _int8_graph() -> tuple[object, object, list[torch.Tensor]]:
    """A quantized Linear stack (fp32 graph, w8a8-dynamic graph, example): the last layer's 34
    outputs are not a multiple of 4, so a +dotprod build has one sdot GEMM and one fallback."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 34)).eval()
    x = torch.randn(8, 128)
    g32 = PassManager(parse_pipeline("O2")).run(import_model(model, (x,)),
                                                PassContext(target="mobile"))
    g8 = PassManager(parse_pipeline("O2,quantize{scheme=w8a8-dynamic,gate=always}")).run(
        import_model(model, (x,)), PassContext(target="mobile"))
    return g32, g8, [x]


@pytest.fixture(scope="module")
def int8_builds() -> dict[str, object]:
    if not TOOLCHAIN.ok:
        pytest.skip(f"mobile toolchain absent: {TOOLCHAIN.reason()}")
    g32, g8, ex = _int8_graph()
    assert g8.op_counts().get("qlinear_dynamic", 0) == 2, g8.op_counts()
    return {"graph": g8, "example": ex, "fp32": mobile.compile_graph(g32, ex),
            "generic": mobile.compile_graph(g8, ex, cpu="generic"),
            "cortex-a76": mobile.compile_graph(g8, ex, cpu="cortex-a76")}


@needs_toolchain
@pytest.mark.parametrize("cpu", ["generic", "cortex-a76"])
def test_int8_weights_ship_as_int8(int8_builds: dict, cpu: str) -> None:
    from ember.backends.mobile.build import load_tensors

    prog = int8_builds[cpu]
    w = load_tensors(prog.weights)
    big = {k: t for k, t in w.items() if t.numel() >= 34 * 128}
    assert len(big) == 2 and all(t.dtype == torch.int8 for t in big.values()), \
        {k: (t.dtype, tuple(t.shape)) for k, t in w.items()}
    assert sorted(t.numel() for t in big.values()) == [34 * 128, 128 * 128]
    if cpu == "cortex-a76":  # the sdot layer's weight packed in 4x4 blocks
        assert any(tuple(t.shape) == (32, 32, 4, 4) for t in big.values())
    ratio = int8_builds["fp32"].weights.stat().st_size / prog.weights.stat().st_size
    assert ratio >= 3.5, ratio  # measured 3.7 (fp32 biases and scales stay fp32)


@needs_toolchain
@pytest.mark.parametrize("cpu", ["generic", "cortex-a76"])
def test_int8_gemm_is_integer_neon_and_matches_reference(int8_builds: dict, cpu: str) -> None:
    from ember.backends.mobile.analysis import neon_report

    prog, g, ex = int8_builds[cpu], int8_builds["graph"], int8_builds["example"]
    rep = neon_report(prog.library)
    if cpu == "cortex-a76":
        assert prog.info["rules"].get("sdot_gemm", 0) >= 1, prog.info["kernels"]
        assert rep.dot >= 16, rep.to_json()  # a 4 x 16 int32 tile: 16 sdot per 4 k steps
    else:
        assert rep.dot == 0 and rep.int_mac >= 16, rep.to_json()
    got = prog(*ex)
    want = run_graph(g, *ex)
    # integer products summed in int32 on both sides: only the fp rescale rounds differently
    # (measured 6e-8)
    assert relative_error(got, want) <= 1e-6
