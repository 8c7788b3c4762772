"""The Ember IR: a typed SSA list of nodes in topological order.

``Graph(inputs, params, nodes, outputs, weights)``: ``inputs`` are runtime tensors, ``params``
are named constants whose tensors live in ``weights`` (they become ``weights.safetensors`` in an
artifact), ``nodes`` are in topological order and each defines fresh ``Value``s. Graphs are
treated as immutable: passes build new graphs with `GraphBuilder`, and rebuild existing ones
with `Rebuilder` (the one rebuilding primitive) or its callback form `rewrite`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import get_op
from .printer import format_graph, format_node
from .types import TensorType, from_torch_dtype

__all__ = [
    "Value",
    "SourceLoc",
    "Node",
    "Graph",
    "GraphBuilder",
    "Rebuilder",
    "rewrite",
    "NO_LOC",
]


@dataclass(frozen=True, slots=True)
class Value:
    """An SSA value: a unique name in its graph and a static type."""

    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True, slots=True)
class SourceLoc:
    """Where a node came from: a file:line, the frontend node name and its op."""

    file: str = ""
    line: int = 0
    frontend_node: str = ""
    frontend_op: str = ""

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.frontend_node:
            parts.append(f"node '{self.frontend_node}'")
        if self.frontend_op:
            parts.append(f"op {self.frontend_op}")
        return ", ".join(parts) or "<unknown location>"

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("file", "line", "frontend_node", "frontend_op")
                if getattr(self, k)}

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> SourceLoc:
        return SourceLoc(**(d or {}))


NO_LOC = SourceLoc()


@dataclass(frozen=True, eq=False, slots=True)
class Node:
    """One operation. ``inputs`` may hold ``None`` for an absent optional operand."""

    op: str
    inputs: tuple[Value | None, ...]
    outputs: tuple[Value, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    loc: SourceLoc = NO_LOC

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.op} has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __str__(self) -> str:
        return format_node(self)


@dataclass(frozen=True, eq=False)
class Graph:
    inputs: tuple[Value, ...]
    params: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    weights: Mapping[str, torch.Tensor]
    name: str = "main"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    # ----- analysis helpers -------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v.name, []).append(n)
        return out

    def values(self) -> dict[str, Value]:
        vals = {v.name: v for v in itertools.chain(self.inputs, self.params)}
        for n in self.nodes:
            for v in n.outputs:
                vals[v.name] = v
        return vals

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def to_nx(self) -> Any:
        """A networkx DiGraph view (node index -> node index edges) for analyses."""
        import networkx as nx

        g = nx.DiGraph()
        prod = {}
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op, node=n)
            for v in n.outputs:
                prod[v.name] = i
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v is not None and v.name in prod:
                    g.add_edge(prod[v.name], i, value=v.name)
        return g

    def __str__(self) -> str:
        return format_graph(self)


_NAME_RE = re.compile(r"[^A-Za-z0-9_]")


def _clean(name: str) -> str:
    name = _NAME_RE.sub("_", name).strip("_") or "v"
    return name if not name[0].isdigit() else "v" + name


class GraphBuilder:
    """Builds a `Graph` op by op; types come from each op's `OpDef.infer`."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.params: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.meta: dict[str, Any] = {}
        self._taken: set[str] = set()
        self._counter = itertools.count()

    @classmethod
    def seeded_from(cls, g: Graph) -> GraphBuilder:
        """A builder holding ``g``'s inputs, params and meta, with every value name of ``g``
        reserved: the start of a rewrite of ``g`` that keeps its names."""
        b = cls(g.name)
        b.meta = dict(g.meta)
        for v, name in zip(g.inputs, g.input_names or [v.name for v in g.inputs]):
            b.reserve(v.name)
            b.inputs.append(v)
            b.input_names.append(name)
        for v in g.params:
            b.add_existing_param(v, g.weights[v.name])
        for n in g.nodes:
            for v in n.outputs:
                b.reserve(v.name)
        return b

    def fresh(self, hint: str = "v") -> str:
        base = _clean(hint)
        if base not in self._taken:
            self._taken.add(base)
            return base
        while True:
            cand = f"{base}_{next(self._counter)}"
            if cand not in self._taken:
                self._taken.add(cand)
                return cand

    def reserve(self, name: str) -> None:
        self._taken.add(name)

    def add_input(self, name: str, ty: TensorType) -> Value:
        v = Value(self.fresh(name), ty)
        self.inputs.append(v)
        self.input_names.append(name)
        return v

    def add_param(self, name: str, tensor: torch.Tensor) -> Value:
        t = tensor.detach()
        v = Value(self.fresh(name), TensorType(from_torch_dtype(t.dtype), tuple(t.shape)))
        self.params.append(v)
        self.weights[v.name] = t
        return v

    def add_existing_param(self, v: Value, tensor: torch.Tensor) -> Value:
        self.reserve(v.name)
        self.params.append(v)
        self.weights[v.name] = tensor
        return v

    def op(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any] | None = None,
        loc: SourceLoc = NO_LOC,
        name: str | None = None,
    ) -> Value | tuple[Value, ...]:
        """Appends a node, inferring output types. Returns one Value or a tuple."""
        opdef = get_op(op)
        attrs = opdef.normalize_attrs(dict(attrs or {}))
        types = opdef.infer([None if v is None else v.type for v in inputs], attrs)
        hint = name or op
        outs = tuple(
            Value(self.fresh(hint if len(types) == 1 else f"{hint}_{i}"), t)
            for i, t in enumerate(types)
        )
        self.nodes.append(Node(op, tuple(inputs), outs, attrs, loc))
        return outs[0] if len(outs) == 1 else outs

    def append(self, node: Node) -> None:
        for v in node.outputs:
            self.reserve(v.name)
        self.nodes.append(node)

    def set_outputs(self, outs: Iterable[Value], names: Iterable[str] | None = None) -> None:
        self.outputs = list(outs)
        self.output_names = list(names) if names is not None else [
            f"output_{i}" for i in range(len(self.outputs))
        ]

    def build(self) -> Graph:
        return Graph(
            tuple(self.inputs), tuple(self.params), tuple(self.nodes), tuple(self.outputs),
            dict(self.weights), self.name, tuple(self.input_names), tuple(self.output_names),
            dict(self.meta),
        )


class Rebuilder:
    """Rebuilds a graph node by node: the one graph-rebuilding primitive of Ember.

    ``b`` is a `GraphBuilder` seeded from the old graph (its inputs and params, every old value
    name reserved); ``env`` maps an old value name to the value standing for it now; `map`
    reads through ``env`` and records in ``read`` the old names whose replacement was read.
    A rebuild walks the old nodes in order and, for each, either `keep`s it (its inputs
    remapped) or emits new nodes into ``b`` and `replace`s its outputs; `finish` builds the
    graph. `rewrite` is this walk with a callback; the rule engine
    (`ember.passes._rewrite.rebuild`) and the token rewrite drive a `Rebuilder` themselves.
    """

    def __init__(self, g: Graph, read: set[str] | None = None) -> None:
        self.g = g
        self.b = GraphBuilder.seeded_from(g)
        self.env: dict[str, Value] = {}
        self.read = read if read is not None else set()

    def map(self, v: Value | None) -> Value | None:
        """The value standing for old value ``v`` now (``v`` itself when not replaced)."""
        if v is None:
            return None
        if v.name in self.env:
            self.read.add(v.name)
            return self.env[v.name]
        return v

    def remapped(self, n: Node) -> Node:
        """Old node ``n`` with its inputs mapped (same outputs, attrs and location)."""
        return Node(n.op, tuple(self.map(v) for v in n.inputs), n.outputs, n.attrs, n.loc)

    def keep(self, n: Node) -> Node:
        """Appends old node ``n`` with its inputs mapped; returns the appended node."""
        n2 = self.remapped(n)
        self.b.nodes.append(n2)
        return n2

    def replace(self, n: Node, values: Sequence[Value | None],
                check: Callable[[Node, Value, Value], None] | None = None) -> None:
        """Old node ``n``'s outputs are now ``values`` (None: an output nothing reads);
        ``check(n, old, new)`` may reject a replacement by raising."""
        values = list(values)
        if len(values) != len(n.outputs):
            raise ValueError(f"rewrite of {n.op} gave {len(values)} values for {len(n.outputs)}")
        for old, new in zip(n.outputs, values):
            if new is None:
                continue
            if check is not None:
                check(n, old, new)
            if new.name != old.name:
                self.env[old.name] = new

    def finish(self, outputs: Sequence[Value] | None = None) -> Graph:
        """The rebuilt graph; its outputs are ``outputs``, or the old outputs mapped."""
        self.b.outputs = list(outputs) if outputs is not None else [
            self.map(v) for v in self.g.outputs]  # type: ignore[misc]
        self.b.output_names = list(self.g.output_names)
        return self.b.build()


# A rewrite callback gets the node (with inputs already remapped), the builder, and returns
# None to keep the node unchanged, or the replacement values for its outputs.
RewriteFn = Callable[[Node, GraphBuilder], Sequence[Value] | None]


def rewrite(g: Graph, fn: RewriteFn) -> Graph:
    """Rebuilds ``g`` node by node, letting ``fn`` replace nodes.

    Input and param values keep their names. Unused params are kept (run DCE to drop them).
    """
    rb = Rebuilder(g)
    for n in g.nodes:
        n2 = rb.remapped(n)
        repl = fn(n2, rb.b)
        if repl is None:
            rb.b.nodes.append(n2)
        else:
            rb.replace(n, repl)
    return rb.finish()
