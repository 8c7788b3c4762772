"""Symbolic dimensions: the only module of Ember that imports sympy.

A dimension (`Dim`) is either a Python ``int`` or a sympy expression over named, positive
integer symbols (``batch``, ``seq``). One compiled graph then serves every binding of those
symbols. Expressions are kept simplified so structural comparison is meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sympy

__all__ = [
    "Dim",
    "sym",
    "is_static",
    "simplify",
    "evaluate",
    "dims_equal",
    "dim_to_json",
    "dim_from_json",
    "dim_str",
    "numel",
    "free_symbols",
    "bind_symbols",
    "ShapeError",
    "ceil_div",
    "floor_div",
]

Dim = int | sympy.Expr

_SYMBOLS: dict[str, sympy.Symbol] = {}
_SIMPLIFIED: dict[Any, Any] = {}  # expression -> its simplified form
_SIMPLIFIED_MAX = 20000
_SIMPLIFY_MAX_OPS = 80


class ShapeError(ValueError):
    """A shape relation that cannot hold, or cannot be decided."""


def sym(name: str) -> sympy.Symbol:
    """Returns the positive-integer symbol ``name`` (one object per name)."""
    s = _SYMBOLS.get(name)
    if s is None:
        s = sympy.Symbol(name, integer=True, positive=True)
        _SYMBOLS[name] = s
    return s


def simplify(d: Any) -> Dim:
    """Normalises a dim: ints stay ints, integer-valued expressions collapse to int."""
    if isinstance(d, bool):
        raise ShapeError(f"a dimension cannot be a bool: {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, float) and d.is_integer():
        return int(d)
    if isinstance(d, sympy.Basic):
        if d.is_Atom:
            return int(d) if d.is_Integer else d
        e = _SIMPLIFIED.get(d)
        if e is None:
            # the same dims are simplified again for every value typed with them; and
            # sympy.simplify's cost grows steeply with size, so large dims keep their form
            e = sympy.simplify(d) if sympy.count_ops(d) <= _SIMPLIFY_MAX_OPS else d
            if len(_SIMPLIFIED) >= _SIMPLIFIED_MAX:
                _SIMPLIFIED.clear()
            _SIMPLIFIED[d] = e
        return int(e) if e.is_Integer else e
    # torch.SymInt and friends expose their sympy expression on .node.expr
    node = getattr(d, "node", None)
    if node is not None and hasattr(node, "expr"):
        return simplify(node.expr)
    raise ShapeError(f"not a dimension: {d!r} ({type(d).__name__})")


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def free_symbols(dims: Iterable[Dim]) -> set[str]:
    out: set[str] = set()
    for d in dims:
        if isinstance(d, sympy.Basic):
            out |= {s.name for s in d.free_symbols}
    return out


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    """Evaluates a dim at concrete symbol values."""
    if isinstance(d, int):
        return d
    if d.is_Symbol and d.name in env:  # most dims: no substitution needed
        return int(env[d.name])
    subs = {sym(s.name): env[s.name] for s in d.free_symbols if s.name in env}
    v = d.subs(subs)
    if not v.is_number:
        missing = sorted(s.name for s in v.free_symbols)
        raise ShapeError(f"dimension {d} needs a value for {', '.join(missing)}")
    return int(v)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def numel(shape: Sequence[Dim]) -> Dim:
    n: Any = 1
    for d in shape:
        n = n * d
    return simplify(n)


def dim_str(d: Dim) -> str:
    return str(d)


def dim_to_json(d: Dim) -> int | str:
    if isinstance(d, int):
        return d
    return str(d)


def dim_from_json(v: int | str) -> Dim:
    if isinstance(v, int):
        return v
    names = {n: sym(n) for n in _identifiers(v)}
    names.update({"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max,
                  "Min": sympy.Min, "Mod": sympy.Mod, "FloorDiv": _floordiv})
    return simplify(sympy.sympify(v, locals=names))


def _floordiv(a: Any, b: Any) -> Any:
    return sympy.floor(a / b)


def _identifiers(text: str) -> list[str]:
    import re

    reserved = {"floor", "ceiling", "Max", "Min", "Mod", "FloorDiv"}
    return [t for t in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text) if t not in reserved]


def bind_symbols(
    declared: Sequence[Sequence[Dim]], actual: Sequence[Sequence[int]], names: Sequence[str]
) -> dict[str, int]:
    """Binds symbols from concrete input shapes and checks every declared dim.

    Args:
        declared: the declared shape of each input (ints and sympy expressions).
        actual: the concrete shape of each input.
        names: input names, for error messages.

    Returns:
        symbol name -> value.

    Raises:
        ShapeError: rank or size mismatch, naming the input and the dimension.
    """
    env: dict[str, int] = {}
    for name, dshape, ashape in zip(names, declared, actual):
        if len(dshape) != len(ashape):
            raise ShapeError(
                f"input '{name}': expected rank {len(dshape)} {_fmt(dshape)}, got shape {tuple(ashape)}"
            )
        for d, a in zip(dshape, ashape):
            if isinstance(d, sympy.Symbol):
                prev = env.setdefault(d.name, int(a))
                if prev != a:
                    raise ShapeError(
                        f"input '{name}': symbol '{d.name}' is {prev} elsewhere but {a} here"
                    )
    for name, dshape, ashape in zip(names, declared, actual):
        for i, (d, a) in enumerate(zip(dshape, ashape)):
            try:
                want = evaluate(d, env)
            except ShapeError:
                continue
            if want != a:
                raise ShapeError(
                    f"input '{name}' dim {i}: expected {d}"
                    + (f" (= {want})" if not isinstance(d, int) else "")
                    + f", got {a} (shape {tuple(ashape)})"
                )
    return env


def _fmt(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def ceil_div(a: Dim, b: int) -> Dim:
    if isinstance(a, int):
        return -(-a // b)
    return simplify(sympy.ceiling(a / b))


def floor_div(a: Dim, b: int) -> Dim:
    if isinstance(a, int):
        return a // b
    return simplify(sympy.floor(a / b))


def prod_static(shape: Sequence[int]) -> int:
    return math.prod(shape)
