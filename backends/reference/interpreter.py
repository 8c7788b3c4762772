"""The reference interpreter: runs an IR graph op by op with eager torch.

It is the oracle of every test and the always-available fallback. Symbolic dims in attributes
are bound from the concrete input shapes at each call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import sympy
import torch

from ember.errors import CompilerError
from ember.ir import Graph, bind_symbols, evaluate, get_op, to_torch_dtype

__all__ = ["Interpreter", "run_graph", "concretize"]

log = logging.getLogger(__name__)


def concretize(v: Any, env: Mapping[str, int]) -> Any:
    """Evaluates every sympy dim inside an attribute value."""
    if isinstance(v, sympy.Basic):
        return evaluate(v, env)
    if isinstance(v, tuple | list):
        return type(v)(concretize(x, env) for x in v)
    return v


class Interpreter:
    """Callable wrapper around a graph. ``Interpreter(g)(*tensors) -> list[Tensor]``."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._steps = []
        for n in graph.nodes:
            opdef = get_op(n.op)
            # trailing optional inputs absent from the node reach the reference as None;
            # variadic ops (concat, einsum, ...: more than 8 inputs allowed) are not padded
            pad = max(0, opdef.max_inputs - len(n.inputs)) if opdef.max_inputs <= 8 else 0
            self._steps.append((n, opdef.reference, _has_sym(n.attrs), pad))

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        g = self.graph
        if len(args) != len(g.inputs):
            raise CompilerError(f"graph '{g.name}' takes {len(g.inputs)} inputs, got {len(args)}")
        tensors = [_as_tensor(a, v.type.dtype) for a, v in zip(args, g.inputs)]
        env = bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in tensors],
                           list(g.input_names or [v.name for v in g.inputs]))
        vals: dict[str, torch.Tensor] = {v.name: t for v, t in zip(g.inputs, tensors)}
        vals.update(g.weights)
        for n, ref, has_sym, pad in self._steps:
            attrs = {k: concretize(a, env) for k, a in n.attrs.items()} if has_sym else n.attrs
            ins = [None if v is None else vals[v.name] for v in n.inputs] + [None] * pad
            try:
                out = ref(ins, attrs)
            except Exception as e:  # name the node: the user sees which op broke
                raise CompilerError(f"reference op '{n.op}' failed at {n.loc} "
                                    f"(output %{n.outputs[0].name}): {e}") from e
            if isinstance(out, torch.Tensor):
                vals[n.outputs[0].name] = out
            else:
                for v, t in zip(n.outputs, out):
                    vals[v.name] = t
        return [vals[v.name] for v in g.outputs]


def _has_sym(attrs: Mapping[str, Any]) -> bool:
    def rec(v: Any) -> bool:
        if isinstance(v, sympy.Basic):
            return True
        if isinstance(v, tuple | list):
            return any(rec(x) for x in v)
        return False
    return any(rec(v) for v in attrs.values())


def _as_tensor(a: Any, dtype: str) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    want = to_torch_dtype(dtype)
    if t.dtype != want:
        t = t.to(want)
    return t


def run_graph(g: Graph, *args: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return Interpreter(g)(*args)


