"""Backend registry, the reference backend as a Program, and the sympy dim evaluator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sympy
import torch

from ember.backends.base import IR_FILE, WEIGHTS_FILE, Backend, Program
from ember.backends.cpu.symdims import DimEvalError, FxArith, eval_dim
from ember.backends.registry import get_backend, register
from ember.errors import ArtifactError, CompilerError
from ember.ir import GraphBuilder, Node, SourceLoc, TensorType, Value, graph_to_json, sym
from ember.ir.shapes import ceil_div, floor_div

B, S = sym("batch"), sym("seq")


def test_builtin_backends_are_registered() -> None:
    for name in ("reference", "cpu"):
        be = get_backend(name)
        assert be.name == name and isinstance(be, Backend)
        assert be.available().ok, be.available().reason


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(CompilerError, match="known backends: .*cpu.*reference"):
        get_backend("tpu")


def test_register_refuses_a_second_backend_with_the_same_name() -> None:
    class Fake:
        name = "cpu"

    with pytest.raises(ValueError, match="registered twice"):
        register(Fake())  # type: ignore[arg-type]


def test_supports_reports_a_reason_for_unknown_ops() -> None:
    x = Value("x", TensorType("float32", (2,)))
    ok = Node("relu", (x,), (Value("y", x.type),))
    bad = Node("no_such_op", (x,), (Value("z", x.type),), {}, SourceLoc("m.py", 3))
    for name in ("cpu", "reference"):
        be = get_backend(name)
        assert be.supports(ok).ok
        sup = be.supports(bad)
        assert not sup.ok and "no_such_op" in sup.reason


def test_reference_program_loads_from_artifact_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    b = GraphBuilder("lin")
    x = b.add_input("x", TensorType("float32", (B, 4)))
    b.set_outputs([b.op("linear", [x, b.add_param("w", torch.randn(3, 4)), None])])
    g = b.build()
    be = get_backend("reference")
    prog = be.compile(g, [torch.randn(2, 4)])
    assert isinstance(prog, Program) and prog.save(tmp_path) == []
    with pytest.raises(ArtifactError, match="missing"):
        be.load(tmp_path, prog.info)
    (tmp_path / IR_FILE).write_text(json.dumps(graph_to_json(g)))
    save_file(dict(g.weights), str(tmp_path / WEIGHTS_FILE))
    again = be.load(tmp_path, prog.info)
    xx = torch.randn(5, 4)
    torch.testing.assert_close(again(xx)[0], prog(xx)[0])


# ----------------------------------------------------------------------------- sympy dims
_EXPRS = [
    B * S + 3,
    2 * floor_div(S, 2),
    floor_div(S + 2 * 1 - 3 * (7 - 1) // 1 + 21, 2) + 1,  # conv output length shape
    ceil_div(S, 4) * B,
    sympy.floor((S - 1) / 3) + sympy.ceiling(S / 5),
    sympy.Mod(S, 3) + B,
    sympy.Max(S, 7) - sympy.Min(B, 2),
    S**2 + B**3,
    sympy.Rational(1, 2) * (S * (S + 1)),  # integer for every S
]


@pytest.mark.parametrize("expr", _EXPRS, ids=str)
def test_eval_dim_matches_sympy(expr: sympy.Expr) -> None:
    rng = random.Random(0)
    for _ in range(20):
        env = {"batch": rng.randint(1, 9), "seq": rng.randint(1, 40)}
        want = int(expr.subs({B: env["batch"], S: env["seq"]}))
        assert eval_dim(expr, env) == want, env


@pytest.mark.parametrize("expr", _EXPRS, ids=str)
def test_fx_arith_emits_the_same_arithmetic(expr: sympy.Expr) -> None:
    graph = torch.fx.Graph()
    b, s = graph.placeholder("b"), graph.placeholder("s")
    graph.output(eval_dim(expr, {"batch": b, "seq": s}, FxArith(graph)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert all(n.op != "call_function" or n.target.__module__ in ("_operator", "torch")
               or n.target in (torch.sym_max, torch.sym_min) for n in graph.nodes)
    for bv, sv in [(1, 1), (3, 17), (8, 40)]:
        assert gm(bv, sv) == int(expr.subs({B: bv, S: sv}))


def test_eval_dim_traces_to_symints_under_export() -> None:
    expr = 2 * floor_div(S, 2) + sympy.Mod(S, 3)

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = eval_dim(expr, {"seq": x.shape[0]})
            return torch.zeros(n)

    ep = torch.export.export(M(), (torch.randn(6),),
                             dynamic_shapes=({0: torch.export.Dim("seq", min=1)},))
    for s in (1, 5, 6, 11):
        assert ep.module()(torch.randn(s)).shape[0] == int(expr.subs(S, s))


def test_eval_dim_rejects_symbolic_division() -> None:
    graph = torch.fx.Graph()
    env = {"batch": graph.placeholder("b"), "seq": graph.placeholder("s")}
    with pytest.raises(DimEvalError, match="symbolic"):
        eval_dim(S / B, env, FxArith(graph))
    with pytest.raises(DimEvalError, match="not bound"):
        eval_dim(S + 1, {"batch": 2})
