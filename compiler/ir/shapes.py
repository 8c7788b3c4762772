"""Symbolic dimensions: the only module of Ember that imports sympy.

A dimension (`Dim`) is either a Python ``int`` or a sympy expression over named, positive
integer symbols (``batch``, ``seq``). One compiled graph then serves every binding of those
symbols. Expressions are kept simplified so structural comparison is meaningful.
"""

from __future__ import annotations

import math
import re
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
    "parse_dim",
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
    return sympy.simplify(sympy.Integer(a) - b if isinstance(a, int) else a - b) == 0


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


def dim_from_json(v: Any, where: str = "dimension") -> Dim:
    """A dim from its JSON form: an int, or the text ``str(expr)`` wrote.

    The text is parsed by `parse_dim`'s strict grammar, never evaluated: an artifact or model
    file is data, and a dim string such as ``Max.__new__.__globals__[...]`` is refused.

    Raises:
        ShapeError: naming ``where`` (e.g. ``ir.json: node 12 output 0``) and the problem.
    """
    if isinstance(v, bool):
        raise ShapeError(f"{where}: a dimension cannot be a bool")
    if isinstance(v, int):
        if abs(v) > _MAX_INT:
            raise ShapeError(f"{where}: dimension {v} is out of range")
        return v
    if not isinstance(v, str):
        raise ShapeError(f"{where}: a dimension must be an int or a string, "
                         f"not {type(v).__name__}")
    return parse_dim(v, where)


# ----------------------------------------------------------------------------- dim grammar
# expr   := term (('+' | '-') term)*
# term   := unary (('*' | '/' | '//' | '%') unary)*
# unary  := ('-' | '+') unary | power
# power  := atom ('**' INT)?
# atom   := INT | NAME | FUNC '(' expr (',' expr)* ')' | '(' expr ')'
# The functions are those Ember's own dims print as; NAME is a dim name (no double underscore).
_MAX_DIM_TEXT = 512
_MAX_DEPTH = 24
_MAX_INT = 10**15
_MAX_POW = 8
_FUNCS: dict[str, tuple[int, Any]] = {
    "floor": (1, lambda a: sympy.floor(a)),
    "ceiling": (1, lambda a: sympy.ceiling(a)),
    "Max": (-1, lambda *a: sympy.Max(*a)),
    "Min": (-1, lambda *a: sympy.Min(*a)),
    "Mod": (2, lambda a, b: sympy.Mod(a, b)),
    "FloorDiv": (2, lambda a, b: sympy.floor(a / b)),
}
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*/%(),]))")


def _tokens(text: str, where: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ShapeError(f"{where}: dimension {text[:60]!r} has an unexpected character "
                             f"at column {pos} (allowed: integers, dim names, + - * / // % "
                             f"** ( ) and {', '.join(_FUNCS)})")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


class _DimParser:
    def __init__(self, text: str, where: str) -> None:
        self.text, self.where = text, where
        self.toks = _tokens(text, where)
        self.i = 0
        self.depth = 0

    def fail(self, why: str) -> ShapeError:
        return ShapeError(f"{self.where}: dimension {self.text[:60]!r} is not a valid dim "
                          f"expression ({why})")

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        t = self.peek()
        if t is None or (want is not None and t != want):
            raise self.fail(f"expected {want or 'more'} at token {self.i}")
        self.i += 1
        return t

    def parse(self) -> Any:
        if not self.toks:
            raise self.fail("empty")
        e = self.expr()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()!r}")
        return e

    def expr(self) -> Any:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail("nested too deeply")
        e = self.term()
        while self.peek() in ("+", "-"):
            e = e + self.term() if self.take() == "+" else e - self.term()
        self.depth -= 1
        return e

    def term(self) -> Any:
        e = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()
            r = self.unary()
            if op in ("/", "//", "%") and r == 0:
                raise self.fail("division by zero")
            e = (e * r if op == "*" else e / r if op == "/" else
                 sympy.floor(e / r) if op == "//" else sympy.Mod(e, r))
        return e

    def unary(self) -> Any:
        if self.peek() in ("-", "+"):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.fail("nested too deeply")
            e = -self.unary() if self.take() == "-" else self.unary()
            self.depth -= 1
            return e
        return self.power()

    def power(self) -> Any:
        e = self.atom()
        if self.peek() == "**":
            self.take()
            t = self.take()
            if not t.isdigit() or int(t) > _MAX_POW:
                raise self.fail(f"exponent must be an integer 0..{_MAX_POW}")
            e = e ** int(t)
        return e

    def atom(self) -> Any:
        t = self.take()
        if t.isdigit():
            if len(t) > 16 or int(t) > _MAX_INT:
                raise self.fail("integer out of range")
            return sympy.Integer(int(t))
        if t == "(":
            e = self.expr()
            self.take(")")
            return e
        if t[0].isalpha() or t[0] == "_":
            if self.peek() == "(":
                if t not in _FUNCS:
                    raise self.fail(f"unknown function {t!r}")
                arity, fn = _FUNCS[t]
                self.take("(")
                args = [self.expr()]
                while self.peek() == ",":
                    self.take()
                    args.append(self.expr())
                self.take(")")
                if arity >= 0 and len(args) != arity:
                    raise self.fail(f"{t} takes {arity} argument(s)")
                return fn(*args)
            if "__" in t or len(t) > 64:
                raise self.fail(f"{t[:64]!r} is not a dim name")
            return sym(t)
        raise self.fail(f"unexpected {t!r}")


def parse_dim(text: str, where: str = "dimension") -> Dim:
    """Parses a dim printed by Ember (``seq``, ``2*seq + 1``, ``floor(seq/2)``, ...).

    A strict grammar over integers, dim names, ``+ - * / // % **`` and the helper functions
    Ember writes (floor, ceiling, Max, Min, Mod, FloorDiv): nothing is evaluated as Python.
    """
    if len(text) > _MAX_DIM_TEXT:
        raise ShapeError(f"{where}: dimension text is {len(text)} characters "
                         f"(at most {_MAX_DIM_TEXT})")
    return simplify(_DimParser(text, where).parse())


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
