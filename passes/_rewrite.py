"""A small rewrite-rule engine shared by Ember's graph passes.

A `Rule` names the ops it can be rooted at and a ``match(node, index)`` function. ``match``
returns a `Fail` (falsy, with a reason, for ``--explain`` style reporting) or an emit function.
`apply_rules` matches every node of a snapshot of the graph, rebuilds the graph (with
`ember.ir.graph.Rebuilder`, the IR's one rebuilding primitive) with the
matched nodes replaced by what their emit functions build, removes dead code, and repeats until
no rule fires (a fixed point). Matching always reads the snapshot (its users and producers are
complete); emitting maps snapshot values to their current replacements through `Emitter.v`.
Because every replacement computes the same value as what it replaces, matches that overlap
are still correct; a later round picks up what an earlier one exposed.

Before -> After (one round)::

    %a = op1(%x); %b = op2(%a)        %b' = fused(%x)       (rule rooted at op2 matched)
    return %b                  ->     return %b'
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from ember.ir import Graph, Node, Rebuilder, Value
from ember.ir.opset import check_types_equal
from ember.passmanager import PassContext

__all__ = [
    "Fail",
    "Rule",
    "Emitter",
    "EmitFn",
    "GraphIndex",
    "apply_rules",
    "rebuild",
    "eliminate_dead",
    "has_symbolic",
    "same_type",
]

log = logging.getLogger(__name__)


class Fail:
    """A failed match: falsy, and carries the reason (``Fail("bias is not a param")``)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Fail({self.reason!r})"


class Emitter:
    """What an emit function builds with: the rebuild's `GraphBuilder` plus the value mapping."""

    def __init__(self, rb: Rebuilder, root: Node) -> None:
        self._rb = rb
        self.b = rb.b
        self.root = root

    def v(self, value: Value | None) -> Value | None:
        """The current value standing for snapshot value ``value``."""
        return self._rb.map(value)

    def op(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None,
           name: str | None = None) -> Value:
        """Appends ``op``; ``inputs`` are snapshot values (mapped here) or emitted values."""
        out = self.b.op(op, [self.v(x) for x in inputs], attrs, loc=self.root.loc, name=name)
        if not isinstance(out, Value):
            raise TypeError(f"Emitter.op: '{op}' has several outputs; use op_multi")
        return out

    def param(self, hint: str, tensor: torch.Tensor) -> Value:
        return self.b.add_param(hint, tensor.detach().contiguous())


EmitFn = Callable[[Emitter], Sequence[Value | None]]


@dataclass(frozen=True)
class Rule:
    """A rewrite rule rooted at nodes whose op is in ``ops``."""

    name: str
    ops: tuple[str, ...]
    match: Callable[[Node, GraphIndex], EmitFn | Fail]
    doc: str = ""


@dataclass
class GraphIndex:
    """Producers, use counts and constants of one graph snapshot."""

    g: Graph
    producers: dict[str, Node] = field(init=False)
    uses: Counter = field(init=False)
    params: set[str] = field(init=False)
    outputs: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.producers = self.g.producers()
        self.uses = Counter(v.name for n in self.g.nodes for v in n.inputs if v is not None)
        self.params = {v.name for v in self.g.params}
        self.outputs = {v.name for v in self.g.outputs}

    def producer(self, v: Value | None, op: str | tuple[str, ...] | None = None) -> Node | None:
        """The node defining ``v`` (if its op is ``op`` / in ``op`` when given)."""
        if v is None:
            return None
        n = self.producers.get(v.name)
        if n is None or op is None:
            return n
        return n if (n.op == op if isinstance(op, str) else n.op in op) else None

    def single_use(self, v: Value) -> bool:
        """``v`` has exactly one consumer and is not a graph output."""
        return self.uses[v.name] == 1 and v.name not in self.outputs

    def is_param(self, v: Value | None) -> bool:
        return v is not None and v.name in self.params

    def const(self, v: Value | None) -> torch.Tensor | None:
        """The tensor of ``v`` if it is a param or a `full` with a static shape, else None."""
        if v is None:
            return None
        if v.name in self.params:
            return self.g.weights[v.name]
        n = self.producers.get(v.name)
        if n is not None and n.op == "full" and v.type.is_static and not has_symbolic(n.attrs):
            from ember.ir import get_op

            return get_op("full").reference([], n.attrs)
        return None

    def scalar(self, v: Value | None) -> float | None:
        """The value of ``v`` when it is a one-element constant, else None."""
        t = self.const(v)
        if t is None or t.numel() != 1:
            return None
        return float(t.reshape(()).item())


def has_symbolic(attrs: Mapping[str, Any]) -> bool:
    """Whether any attribute value holds a sympy expression (a symbolic dim)."""

    def rec(x: Any) -> bool:
        if isinstance(x, sympy.Basic):
            return True
        if isinstance(x, tuple | list):
            return any(rec(y) for y in x)
        return False

    return any(rec(x) for x in attrs.values())


def same_type(a: Value, b: Value) -> bool:
    return check_types_equal(a.type, b.type)


def rebuild(g: Graph, plan: Mapping[Node, EmitFn],
            emitted: dict[Node, list[str]] | None = None, used: set[str] | None = None) -> Graph:
    """A new graph where each node in ``plan`` is replaced by what its emit function builds.

    Emit functions run at the position of their node, so they may use any value defined
    before it. A replacement must have the type of the value it replaces (checked). An emit
    function may return None for an output that has no users. ``emitted``, when given, gets
    the names of the replacement values of each planned node; ``used`` gets the names of the
    replaced values that something read (through their replacement).
    """
    rb = Rebuilder(g, used)
    for n in g.nodes:
        emit = plan.get(n)
        if emit is None:
            rb.keep(n)
            continue
        repl = list(emit(Emitter(rb, n)))
        if emitted is not None:
            emitted[n] = [v.name for v in repl if v is not None]
        rb.replace(n, repl, _check_type)
    return rb.finish()


def _check_type(n: Node, old: Value, new: Value) -> None:
    if not same_type(old, new):
        raise TypeError(f"rewrite of {n.op} at {n.loc} replaces %{old.name}: {old.type} "
                        f"with %{new.name}: {new.type}")


def eliminate_dead(g: Graph) -> Graph:
    """Drops nodes none of whose outputs are used, and params nothing reads."""
    live = {v.name for v in g.outputs}
    keep: list[Node] = []
    for n in reversed(g.nodes):
        if any(v.name in live for v in n.outputs):
            keep.append(n)
            live.update(v.name for v in n.inputs if v is not None)
    keep.reverse()
    params = tuple(v for v in g.params if v.name in live)
    if len(keep) == len(g.nodes) and len(params) == len(g.params):
        return g
    weights = {v.name: g.weights[v.name] for v in params}
    return Graph(g.inputs, params, tuple(keep), g.outputs, weights, g.name, g.input_names,
                 g.output_names, dict(g.meta))


def apply_rules(g: Graph, rules: Iterable[Rule], ctx: PassContext, pass_name: str,
                max_rounds: int = 8) -> Graph:
    """Applies ``rules`` to a fixed point; records hits and miss reasons in ``ctx``.

    Each round matches every node against the rules rooted at its op (first match wins),
    rebuilds the graph, and drops what became dead. Stops when a round fires nothing.
    """
    rules = list(rules)
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        for op in r.ops:
            by_op.setdefault(op, []).append(r)
    hits: Counter = Counter()
    misses: Counter = Counter()
    for _ in range(max_rounds):
        misses = Counter()  # keep the reasons of the last round: what is still unmatched
        idx = GraphIndex(g)
        plan: dict[Node, EmitFn] = {}
        rule_of: dict[Node, str] = {}
        for n in g.nodes:
            for r in by_op.get(n.op, ()):
                res = r.match(n, idx)
                if isinstance(res, Fail):
                    misses[f"{r.name}: {res.reason}"] += 1
                    continue
                plan[n] = res
                rule_of[n] = r.name
                break
        if not plan:
            break
        emitted: dict[Node, list[str]] = {}
        used: set[str] = set()
        g = eliminate_dead(rebuild(g, plan, emitted, used))
        # a match inside a bigger one of the same round is dead now: count only rewrites
        # whose replacement survives and was read by something
        live = {v.name for v in (*g.inputs, *g.params)} | {
            v.name for n in g.nodes for v in n.outputs}
        for n, names in emitted.items():
            if any(name in live for name in names) and any(v.name in used for v in n.outputs):
                hits[rule_of[n]] += 1
    ctx.record(pass_name, hits=dict(hits), misses=dict(misses))
    if hits:
        log.debug("%s: %s", pass_name, dict(hits))
    return g
