"""CPU backend: fx lowering (eager kind), AOTInductor kind, dynamic dims, save/load, auto mode.

AOTInductor compiles take ~20 s each, so the AOTI programs are module-scoped fixtures shared by
several tests; the eager-kind tests cover many small graphs cheaply.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch

from ember.backends.base import IR_FILE, WEIGHTS_FILE
from ember.backends.cpu import CpuProgram, compile_graph, find_pickles, load_program
from ember.backends.cpu.lowering import lower_graph
from ember.backends.cpu.program import PACKAGE_FILE
from ember.errors import UnsupportedOpError
from ember.ir import (
    Graph,
    GraphBuilder,
    Node,
    SourceLoc,
    TensorType,
    Value,
    graph_to_json,
    run_graph,
    sym,
    verify,
)
from ember.ir.shapes import floor_div

B, S = sym("batch"), sym("seq")


# ----------------------------------------------------------------------------- graphs
def block_graph(d: int = 32, heads: int = 4) -> Graph:
    """A pre-norm transformer block with dynamic batch/seq: LN, QKV, SDPA, MLP, residuals."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    b = GraphBuilder("block")
    x = b.add_input("x", TensorType("float32", (B, S, d)))
    h = b.op("layer_norm", [x, b.add_param("ln_w", w(d) + 1), b.add_param("ln_b", w(d))])
    qkv = b.op("linear", [h, b.add_param("qkv_w", w(3 * d, d)), b.add_param("qkv_b", w(3 * d))])
    qkv = b.op("reshape", [qkv], {"shape": (B, S, 3, heads, d // heads)})
    q, k, v = (b.op("permute", [b.op("select", [qkv], {"dim": 2, "index": i})],
                    {"perm": (0, 2, 1, 3)}) for i in range(3))
    o = b.op("attention", [q, k, v], {"is_causal": True})
    o = b.op("reshape", [b.op("permute", [o], {"perm": (0, 2, 1, 3)})], {"shape": (B, S, d)})
    x = b.op("add", [x, b.op("linear", [o, b.add_param("o_w", w(d, d)), None])])
    m = b.op("gelu", [b.op("linear", [x, b.add_param("fc1", w(2 * d, d)), None])])
    x = b.op("add", [x, b.op("linear", [m, b.add_param("fc2", w(d, 2 * d)), None])])
    flat = b.op("reshape", [x], {"shape": (B * S, d)})
    b.set_outputs([x, b.op("mean", [flat], {"dims": (1,)})], ["y", "row_mean"])
    out = b.build()
    verify(out)
    return out


def conv_graph() -> Graph:
    """conv -> batch_norm -> relu -> max_pool -> global pool -> flatten -> linear."""
    g = torch.Generator().manual_seed(1)
    b = GraphBuilder("cnn")
    x = b.add_input("x", TensorType("float32", (B, 3, 16, 16)))
    y = b.op("conv", [x, b.add_param("cw", torch.randn(8, 3, 3, 3, generator=g)),
                      b.add_param("cb", torch.randn(8, generator=g))],
             {"stride": 2, "padding": 1})
    y = b.op("batch_norm", [y, b.add_param("mean", torch.randn(8, generator=g)),
                            b.add_param("var", torch.rand(8, generator=g) + 0.5), None, None])
    y = b.op("max_pool", [b.op("relu", [y])], {"kernel": 2})
    y = b.op("adaptive_avg_pool", [y], {"output_size": 1})
    y = b.op("reshape", [y], {"shape": (B, 8)})
    b.set_outputs([b.op("linear", [y, b.add_param("fw", torch.randn(4, 8, generator=g)), None])])
    out = b.build()
    verify(out)
    return out


def floor_graph() -> Graph:
    """Attributes with floor(seq/2): slice to an even length, then split it in pairs."""
    b = GraphBuilder("pairs")
    x = b.add_input("x", TensorType("float32", (B, S, 8)))
    half = floor_div(S, 2)
    y = b.op("slice", [x], {"dim": 1, "start": 0, "end": 2 * half})
    y = b.op("reshape", [y], {"shape": (B, half, 2, 8)})
    y = b.op("sum", [y], {"dims": (2,)})
    n = b.op("arange", [], {"end": half, "dtype": "float32"})
    y = b.op("add", [y, b.op("reshape", [n], {"shape": (half, 1)})])
    b.set_outputs([y])
    out = b.build()
    verify(out)
    return out


def close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-4) -> None:
    """Max abs difference within ``tol`` of each output's scale (its max |value|)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = max(float(b.abs().max()), 1e-6) if b.numel() else 1.0
        err = float((a - b).abs().max()) / scale if b.numel() else 0.0
        assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def write_ir(g: Graph, directory: Path) -> None:
    """What the artifact writer stores next to the backend payload."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / IR_FILE).write_text(json.dumps(graph_to_json(g)))
    save_file({k: v.contiguous() for k, v in g.weights.items()}, str(directory / WEIGHTS_FILE))


# ----------------------------------------------------------------------------- eager kind
@pytest.mark.parametrize("make,shapes", [
    (block_graph, [(1, 5, 32), (3, 9, 32)]),
    (conv_graph, [(1, 3, 16, 16), (4, 3, 16, 16)]),
    (floor_graph, [(2, 7, 8), (1, 10, 8), (3, 1, 8)]),
])
def test_eager_kind_matches_reference(make, shapes) -> None:
    g = make()
    prog = compile_graph(g, [torch.randn(*shapes[0])], mode="eager")
    assert prog.kind == "eager" and prog.info["chosen"] == "eager"
    for shp in shapes:
        x = torch.randn(*shp)
        close(prog(x), run_graph(g, x))


def test_fx_module_has_one_call_per_node_and_weights_as_attributes() -> None:
    g = block_graph()
    gm = lower_graph(g)
    calls = [n for n in gm.graph.nodes if "ember_op" in n.meta]
    assert [n.meta["ember_op"] for n in calls] == [n.op for n in g.nodes]
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert len(attrs) == len(g.params)
    # symbolic reshape dims are computed from input sizes, not baked in
    assert any(n.target is torch.ops.aten.sym_size.int for n in gm.graph.nodes)


def test_unsupported_op_names_op_and_location() -> None:
    x = Value("x", TensorType("float32", (4,)))
    y = Value("y", TensorType("float32", (4,)))
    node = Node("frobnicate", (x,), (y,), {}, SourceLoc("model.py", 42, "frob_1", "aten.frob"))
    g = Graph((x,), (), (node,), (y,), {}, input_names=("x",))
    with pytest.raises(UnsupportedOpError) as ei:
        compile_graph(g, [torch.randn(4)], mode="eager")
    msg = str(ei.value)
    assert "frobnicate" in msg and "model.py:42" in msg and "backend 'cpu'" in msg


def test_symbol_not_bound_by_an_input_is_a_clear_error() -> None:
    b = GraphBuilder("free")
    x = b.add_input("x", TensorType("float32", (B, 6)))
    b.set_outputs([b.op("reshape", [x], {"shape": (sym("other"), 3)})])
    g = b.build()
    with pytest.raises(UnsupportedOpError, match="symbol 'other'"):
        compile_graph(g, [torch.randn(1, 6)], mode="eager")


def test_eager_kind_saves_nothing_and_loads_from_the_artifact_ir(tmp_path: Path) -> None:
    g = conv_graph()
    prog = compile_graph(g, [torch.randn(2, 3, 16, 16)], mode="eager")
    assert prog.save(tmp_path) == []
    write_ir(g, tmp_path)
    again = load_program(tmp_path, json.loads(json.dumps(prog.info)))
    x = torch.randn(3, 3, 16, 16)
    close(again(x), prog(x), tol=1e-6)


# ----------------------------------------------------------------------------- pickle scan
def test_find_pickles_detects_pickled_members(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("m/data/weights.bin", pickle.dumps({"a": [1, 2]}, protocol=4))
        z.writestr("m/data.pkl", b"not even a pickle")
        z.writestr("m/ok.json", b'{"a": 1}')
    assert sorted(find_pickles(p)) == ["m/data.pkl", "m/data/weights.bin"]


def _pickle_members(path: Path) -> list[str]:
    """Independent scan: any member that pickletools can walk to a STOP opcode."""
    bad = []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            data = z.read(name)
            if name.endswith(".pkl"):
                bad.append(name)
                continue
            try:
                ops = list(pickletools.genops(io.BytesIO(data)))
            except Exception:
                continue
            if ops and ops[-1][0].name == "STOP" and len(ops) > 1:
                bad.append(name)
    return bad


# ----------------------------------------------------------------------------- AOTI kind
@pytest.fixture(scope="module")
def aoti_block(tmp_path_factory: pytest.TempPathFactory) -> tuple[Graph, CpuProgram]:
    g = block_graph()
    work = tmp_path_factory.mktemp("aoti_block")
    prog = compile_graph(g, [torch.randn(1, 6, 32)], mode="aoti", workdir=work)
    return g, prog


def test_aoti_dynamic_batch_and_seq(aoti_block: tuple[Graph, CpuProgram]) -> None:
    g, prog = aoti_block
    assert prog.kind == "aoti"
    assert prog.info["aoti"]["dynamic_dims"] in ("named", "auto")
    for shp in [(1, 6, 32), (3, 11, 32), (2, 1, 32)]:
        x = torch.randn(*shp)
        close(prog(x), run_graph(g, x))


def test_aoti_package_has_no_pickle(aoti_block: tuple[Graph, CpuProgram],
                                    tmp_path: Path) -> None:
    _, prog = aoti_block
    assert prog.save(tmp_path) == [PACKAGE_FILE]
    pkg = tmp_path / PACKAGE_FILE
    assert zipfile.is_zipfile(pkg)
    assert find_pickles(pkg) == []
    assert _pickle_members(pkg) == []


def test_aoti_save_load_round_trip(aoti_block: tuple[Graph, CpuProgram],
                                   tmp_path: Path) -> None:
    g, prog = aoti_block
    files = prog.save(tmp_path / "payload")
    info = json.loads(json.dumps(prog.info))  # what the manifest keeps
    fresh = load_program(tmp_path / "payload", info)
    assert files == [PACKAGE_FILE] and fresh is not prog and fresh.kind == "aoti"
    x = torch.randn(2, 7, 32)
    close(fresh(x), run_graph(g, x))
    close(fresh(x), prog(x), tol=1e-6)


def test_aoti_load_refuses_other_torch_version(aoti_block: tuple[Graph, CpuProgram],
                                               tmp_path: Path) -> None:
    from ember.errors import ArtifactError

    _, prog = aoti_block
    prog.save(tmp_path)
    with pytest.raises(ArtifactError, match="torch"):
        load_program(tmp_path, {**prog.info, "torch": "1.0.0"})


def test_auto_mode_measures_both_and_ships_the_faster(tmp_path: Path) -> None:
    g = floor_graph()
    prog = compile_graph(g, [torch.randn(2, 9, 8)], mode="auto", workdir=tmp_path)
    info = prog.info
    cand = info["candidates"]
    assert {"aoti", "eager"} <= set(cand) and all(v > 0 for v in cand.values())
    # ONNX Runtime on the exported IR is a candidate too, or says why it is not
    assert "onnxruntime" in cand or info["onnxruntime"]["skipped"]
    assert info["chosen"] == min(cand, key=cand.get) == prog.kind
    assert "aoti" in info["why"] and "eager" in info["why"]
    json.dumps(info)
    for shp in [(2, 9, 8), (1, 4, 8), (5, 13, 8)]:
        x = torch.randn(*shp)
        close(prog(x), run_graph(g, x))


# ----------------------------------------------------------------------------- zoo models
def _zoo_graph(name: str, **kw: object) -> tuple[object, Graph]:
    import zoo

    from ember.frontends.fx import import_module
    from ember.passmanager import PassContext, PassManager

    zm = zoo.get(name, **kw)
    g0 = import_module(zm.model, tuple(zm.example_inputs), dynamic_dims=zm.dynamic_dims,
                       input_names=zm.input_names)
    g = PassManager("O2", verify_each=True).run(g0, PassContext(target="cpu"))
    return zm, g


def _check_zoo(name: str, sizes: list[dict[str, int]], tmp_path: Path) -> CpuProgram:
    zm, g = _zoo_graph(name)
    prog = compile_graph(g, list(zm.example_inputs), mode="aoti", workdir=tmp_path)
    for dims in sizes:
        xs = zm.make_inputs(**dims)
        close(prog(*xs), run_graph(g, *xs))
        with torch.no_grad():
            want = zm.model(*xs)
        want_t = want if isinstance(want, torch.Tensor) else want[0]
        close(prog(*xs)[:1], [want_t])
    return prog


def test_zoo_mlp_aoti_matches_reference_and_eager_model(tmp_path: Path) -> None:
    _check_zoo("mlp", [{}, {"batch": 7}], tmp_path)


@pytest.mark.slow
def test_zoo_bert_small_aoti_dynamic(tmp_path: Path) -> None:
    _check_zoo("bert", [{}, {"batch": 3, "seq": 13}], tmp_path)


@pytest.mark.slow
def test_zoo_resnet_small_aoti(tmp_path: Path) -> None:
    _check_zoo("resnet", [{}, {"batch": 3}], tmp_path)


def test_export_narrows_named_dims_with_export_suggested_bounds() -> None:
    """Slicing a 16-row table by seq forces seq <= 16: the dims stay named, min stays 1."""
    from ember.backends.cpu.program import _export, _trace_inputs

    b = GraphBuilder("pos")
    x = b.add_input("x", TensorType("float32", (B, S, 4)))
    pe = b.op("slice", [b.add_param("pe", torch.randn(16, 4))], {"dim": 0, "end": S})
    b.set_outputs([b.op("add", [x, pe])])
    g = b.build()
    ep, how = _export(lower_graph(g), g, _trace_inputs(g, [torch.randn(1, 5, 4)], True), True)
    assert how.startswith("named") and "'max': 16" in how
    ranges = sorted((r.lower, r.upper) for r in ep.range_constraints.values())
    assert (1, 16) in ranges
    mod = ep.module()
    for shp in [(1, 1, 4), (3, 16, 4)]:
        xx = torch.randn(*shp)
        close([mod(xx)[0]], run_graph(g, xx))


def test_onnxruntime_kind_round_trip(tmp_path: Path) -> None:
    g = floor_graph()
    prog = compile_graph(g, [torch.randn(2, 9, 8)], mode="onnxruntime", workdir=tmp_path / "b")
    assert prog.kind == "onnxruntime" and prog.info["onnxruntime"]["max_rel_error"] <= 1e-4
    assert isinstance(prog.info["onnxruntime"]["allow_spinning"], bool)
    files = prog.save(tmp_path / "p")
    fresh = load_program(tmp_path / "p", prog.info, graph=g)
    assert files == ["model.onnx"] and fresh.kind == "onnxruntime"
    for shp in [(2, 9, 8), (5, 13, 8)]:
        x = torch.randn(*shp)
        close(fresh(x), run_graph(g, x))
