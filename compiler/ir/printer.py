"""Readable text form of the IR.

It formats anything shaped like a `ember.ir.graph.Node` / `Graph` (the protocols below), so it
imports nothing of the IR: `graph.py` imports it for ``str(node)`` and ``str(graph)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["format_graph", "format_node", "format_attr"]


class _Value(Protocol):
    name: str
    type: Any


class _Node(Protocol):
    op: str
    inputs: Sequence[_Value | None]
    outputs: Sequence[_Value]
    attrs: Mapping[str, Any]
    loc: Any


class _Graph(Protocol):
    name: str
    inputs: Sequence[_Value]
    params: Sequence[_Value]
    nodes: Sequence[_Node]
    outputs: Sequence[_Value]

    def param_bytes(self) -> int: ...


def format_attr(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    return str(v)


def format_node(n: _Node, with_loc: bool = False) -> str:
    outs = ", ".join(f"%{v.name}" for v in n.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in n.inputs)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in n.attrs.items())
    types = ", ".join(str(v.type) for v in n.outputs)
    s = f"{outs} = {n.op}({ins})" + (f" {{{attrs}}}" if attrs else "") + f" : {types}"
    if with_loc and (n.loc.file or n.loc.frontend_node):
        s += f"  # {n.loc}"
    return s


def format_graph(g: _Graph, with_loc: bool = False, max_nodes: int | None = None) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"graph {g.name}({ins}) {{"]
    if g.params:
        nbytes = g.param_bytes()
        lines.append(f"  # {len(g.params)} params, {nbytes / 1e6:.2f} MB")
    nodes = g.nodes if max_nodes is None else g.nodes[:max_nodes]
    lines += ["  " + format_node(n, with_loc) for n in nodes]
    if max_nodes is not None and len(g.nodes) > max_nodes:
        lines.append(f"  ... {len(g.nodes) - max_nodes} more nodes")
    lines.append("  return " + ", ".join(f"%{v.name}" for v in g.outputs))
    lines.append("}")
    return "\n".join(lines)
