"""The graph evaluator: runs an IR graph on concrete tensors through each op's reference.

It is the one evaluator of the IR. The reference backend (`ember.backends.reference`) wraps
`Interpreter` as a program; the passes run it for calibration statistics and fidelity checks;
the tests use `run_graph` as their oracle. At each call the graph's symbolic dims are bound
from the concrete input shapes, and every symbolic attribute is evaluated at those values.

- ``Interpreter(g)(*tensors) -> list[Tensor]``: the graph outputs;
- ``run_graph(g, *tensors, watch=fn)``: the same without autograd; ``watch(name, tensor)``
  sees the operands of every node before it runs (once per use);
- ``evaluate_values(g, inputs, names) -> {name: tensor}``: intermediate values.

Values no later node reads are dropped as the run goes (long calibration runs stay small).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sympy
import torch

from ..errors import CompilerError
from .graph import Graph, Node
from .ops import get_op
from .shapes import bind_symbols, evaluate
from .types import to_torch_dtype

__all__ = ["Interpreter", "Watch", "run_graph", "evaluate_values", "concretize"]

# watch(value name, tensor): called with each operand of each node before the node runs
Watch = Callable[[str, torch.Tensor], None]


def concretize(v: Any, env: Mapping[str, int]) -> Any:
    """Evaluates every sympy dim inside an attribute value at the symbol values ``env``."""
    if isinstance(v, sympy.Basic):
        return evaluate(v, env)
    if isinstance(v, tuple | list):
        return type(v)(concretize(x, env) for x in v)
    return v


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


class Interpreter:
    """A graph prepared for evaluation. ``Interpreter(g)(*tensors) -> list[Tensor]``."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._steps: list[tuple[Node, Any, bool, int]] = []
        for n in graph.nodes:
            opdef = get_op(n.op)
            # trailing optional inputs absent from the node reach the reference as None;
            # variadic ops (concat, einsum, ...: more than 8 inputs allowed) are not padded
            pad = max(0, opdef.max_inputs - len(n.inputs)) if opdef.max_inputs <= 8 else 0
            self._steps.append((n, opdef.reference, _has_sym(n.attrs), pad))
        self._last_use: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs:
                if v is not None:
                    self._last_use[v.name] = i

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        return self.run(args)

    def run(self, args: Sequence[Any], watch: Watch | None = None) -> list[torch.Tensor]:
        """The graph's outputs on inputs ``args``; ``watch`` sees every node operand."""
        outs = [v.name for v in self.graph.outputs]
        vals = self._execute(args, set(outs), watch)
        return [vals[name] for name in outs]

    def values(self, args: Sequence[Any], names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The values called ``names`` (inputs, params or node outputs) on inputs ``args``."""
        want = set(names)
        vals = self._execute(args, want, None)
        return {k: vals[k] for k in want if k in vals}

    def _execute(self, args: Sequence[Any], keep: set[str],
                 watch: Watch | None) -> dict[str, torch.Tensor]:
        g = self.graph
        if len(args) != len(g.inputs):
            raise CompilerError(f"graph '{g.name}' takes {len(g.inputs)} inputs, got {len(args)}")
        tensors = [_as_tensor(a, v.type.dtype) for a, v in zip(args, g.inputs)]
        env = bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in tensors],
                           list(g.input_names or [v.name for v in g.inputs]))
        vals: dict[str, torch.Tensor] = {v.name: t for v, t in zip(g.inputs, tensors)}
        vals.update(g.weights)
        last_use = self._last_use
        for i, (n, ref, has_sym, pad) in enumerate(self._steps):
            attrs = {k: concretize(a, env) for k, a in n.attrs.items()} if has_sym else n.attrs
            ins = [None if v is None else vals[v.name] for v in n.inputs]
            if watch is not None:
                for v, t in zip(n.inputs, ins):
                    if v is not None and t is not None:
                        watch(v.name, t)
            try:
                out = ref(ins + [None] * pad if pad else ins, attrs)
            except Exception as e:  # name the node: the user sees which op broke
                raise CompilerError(f"reference op '{n.op}' failed at {n.loc} "
                                    f"(output %{n.outputs[0].name}): {e}") from e
            if isinstance(out, torch.Tensor):
                vals[n.outputs[0].name] = out
            else:
                for v, t in zip(n.outputs, out):
                    vals[v.name] = t
            for v in n.inputs:  # drop what no later node reads
                if v is not None and last_use.get(v.name) == i and v.name not in keep \
                        and v.name not in g.weights:
                    vals.pop(v.name, None)
        return vals


def run_graph(g: Graph, *args: Any, watch: Watch | None = None) -> list[torch.Tensor]:
    """The outputs of ``g`` on inputs ``args``, without autograd."""
    with torch.no_grad():
        return Interpreter(g).run(args, watch)


def evaluate_values(g: Graph, inputs: Sequence[Any], names: Iterable[str]) -> dict[str, Any]:
    """The values of ``g`` called ``names`` on ``inputs``, without autograd."""
    with torch.no_grad():
        return Interpreter(g).values(inputs, names)
