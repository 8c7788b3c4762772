"""The IR verifier: SSA, topological order, op arity/attrs, and types equal to inference."""

from __future__ import annotations

from ..errors import VerificationError
from .graph import Graph, Node
from .ops import OpTypeError, get_op
from .opset import check_types_equal
from .printer import format_node
from .shapes import ShapeError
from .types import from_torch_dtype

__all__ = ["verify"]


def _context(g: Graph, i: int) -> str:
    lo, hi = max(0, i - 5), min(len(g.nodes), i + 6)
    rows = []
    for j in range(lo, hi):
        mark = ">>" if j == i else "  "
        rows.append(f"{mark} {format_node(g.nodes[j])}")
    return "\n".join(rows)


def _fail(g: Graph, i: int, n: Node, msg: str, pass_name: str | None) -> VerificationError:
    where = f" after pass '{pass_name}'" if pass_name else ""
    return VerificationError(
        f"IR verification failed{where} at node {i} ({n.op}, {n.loc}): {msg}\n{_context(g, i)}"
    )


def verify(g: Graph, pass_name: str | None = None) -> None:
    """Checks the graph; raises `VerificationError` naming the node, its location and context."""
    defined: dict[str, object] = {}
    for v in (*g.inputs, *g.params):
        if v.name in defined:
            raise VerificationError(f"value %{v.name} defined twice (input/param)")
        defined[v.name] = v
    for v in g.params:
        t = g.weights.get(v.name)
        if t is None:
            raise VerificationError(f"param %{v.name} has no weight tensor")
        if from_torch_dtype(t.dtype) != v.type.dtype or tuple(t.shape) != tuple(v.type.shape):
            raise VerificationError(
                f"param %{v.name}: weight is {t.dtype}{tuple(t.shape)} but type is {v.type}")
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if v is None:
                continue
            d = defined.get(v.name)
            if d is None:
                raise _fail(g, i, n, f"input %{v.name} is used before it is defined", pass_name)
            if d != v:
                raise _fail(g, i, n, f"input %{v.name} has type {v.type} but was defined "
                            f"as {d.type}", pass_name)  # type: ignore[attr-defined]
        try:
            opdef = get_op(n.op)
        except KeyError as e:
            raise _fail(g, i, n, str(e), pass_name) from None
        try:
            attrs = opdef.normalize_attrs(dict(n.attrs))
            want = opdef.infer([None if v is None else v.type for v in n.inputs], attrs)
        except (OpTypeError, ShapeError, ValueError) as e:
            raise _fail(g, i, n, f"type inference failed: {e}", pass_name) from None
        if len(want) != len(n.outputs):
            raise _fail(g, i, n, f"{len(n.outputs)} outputs, op defines {len(want)}", pass_name)
        for v, t in zip(n.outputs, want):
            if not check_types_equal(v.type, t):
                raise _fail(g, i, n, f"output %{v.name} is {v.type}, inference says {t}",
                            pass_name)
            if v.name in defined:
                raise _fail(g, i, n, f"value %{v.name} defined twice", pass_name)
            defined[v.name] = v
    for v in g.outputs:
        if v.name not in defined:
            raise VerificationError(f"graph output %{v.name} is never defined")
    if g.output_names and len(g.output_names) != len(g.outputs):
        raise VerificationError("output_names and outputs differ in length")
