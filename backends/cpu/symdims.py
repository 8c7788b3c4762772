"""Symbolic dims (sympy expressions over named symbols) as arithmetic on input sizes.

`eval_dim` walks a dim expression and computes it with an `Arith`: `PyArith` works on ints and
`torch.SymInt`s (so ``torch.export`` keeps the result symbolic); `FxArith` emits the same
arithmetic as ``torch.fx`` nodes, so the generated program computes its shapes from the sizes
of its inputs at run time. Supported: Integer, Rational coefficients, Symbol, Add, Mul, Pow with
an integer exponent, floor, ceiling, Mod, Max, Min (and torch's FloorDiv / CeilDiv).

Rationals are carried as ``(numerator, int denominator)`` so ``floor(n/2 - 1/2)`` becomes
``(n - 1) // 2`` with no float arithmetic. Sympy objects are recognised by their ``is_*`` flags
and class names; this module does not import sympy (``ember.ir.shapes`` owns it).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Arith", "PyArith", "FxArith", "eval_dim", "eval_attr", "is_symbolic", "DimEvalError",
           "fx_attr_name", "free_symbol_names"]


class DimEvalError(ValueError):
    """A dim expression uses a construct the evaluator does not handle."""


def is_symbolic(v: Any) -> bool:
    """True for a sympy expression (a symbolic dim) anywhere inside an attribute value."""
    if isinstance(v, tuple | list):
        return any(is_symbolic(x) for x in v)
    if isinstance(v, Mapping):
        return any(is_symbolic(x) for x in v.values())
    return type(v).__module__.split(".", 1)[0] == "sympy"


class Arith:
    """Integer arithmetic on opaque values; ints are folded by the caller-facing helpers."""

    def add(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def mul(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def floordiv(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def mod(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def max(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def min(self, a: Any, b: Any) -> Any:
        raise NotImplementedError


class PyArith(Arith):
    """Python ints and `torch.SymInt` (operators trace into SymInt expressions)."""

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def mul(self, a: Any, b: Any) -> Any:
        return a * b

    def floordiv(self, a: Any, b: Any) -> Any:
        return a // b

    def mod(self, a: Any, b: Any) -> Any:
        return a % b

    def max(self, a: Any, b: Any) -> Any:
        return torch.sym_max(a, b)

    def min(self, a: Any, b: Any) -> Any:
        return torch.sym_min(a, b)


class FxArith(Arith):
    """Emits ``operator.*`` / ``torch.sym_max`` nodes into a ``torch.fx.Graph``."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph

    def _emit(self, fn: Callable[..., Any], a: Any, b: Any) -> Any:
        return self.graph.call_function(fn, (a, b))

    def add(self, a: Any, b: Any) -> Any:
        return self._emit(operator.add, a, b)

    def mul(self, a: Any, b: Any) -> Any:
        return self._emit(operator.mul, a, b)

    def floordiv(self, a: Any, b: Any) -> Any:
        return self._emit(operator.floordiv, a, b)

    def mod(self, a: Any, b: Any) -> Any:
        return self._emit(operator.mod, a, b)

    def max(self, a: Any, b: Any) -> Any:
        return self._emit(torch.sym_max, a, b)

    def min(self, a: Any, b: Any) -> Any:
        return self._emit(torch.sym_min, a, b)


_Frac = tuple[Any, int]  # (numerator value, positive int denominator)


class _Evaluator:
    def __init__(self, env: Mapping[str, Any], ar: Arith) -> None:
        self.env = env
        self.ar = ar

    # folding helpers: plain ints are computed here, everything else goes through `ar`
    def add(self, a: Any, b: Any) -> Any:
        if isinstance(a, int) and isinstance(b, int):
            return a + b
        if isinstance(a, int) and a == 0:
            return b
        if isinstance(b, int) and b == 0:
            return a
        return self.ar.add(a, b)

    def mul(self, a: Any, b: Any) -> Any:
        if isinstance(a, int) and isinstance(b, int):
            return a * b
        if isinstance(a, int) and a == 1:
            return b
        if isinstance(b, int) and b == 1:
            return a
        if (isinstance(a, int) and a == 0) or (isinstance(b, int) and b == 0):
            return 0
        return self.ar.mul(a, b)

    def floordiv(self, a: Any, b: int) -> Any:
        if b == 1:
            return a
        if isinstance(a, int):
            return a // b
        return self.ar.floordiv(a, b)

    def to_int(self, e: Any) -> Any:
        n, d = self.frac(e)
        return self.floordiv(n, d)  # integer-valued expressions divide exactly

    def frac(self, e: Any) -> _Frac:
        if isinstance(e, bool):
            raise DimEvalError(f"a dimension cannot be a bool: {e!r}")
        if isinstance(e, int):
            return e, 1
        if getattr(e, "is_Integer", False):
            return int(e), 1
        if getattr(e, "is_Rational", False):
            return int(e.p), int(e.q)
        if getattr(e, "is_Symbol", False):
            if e.name not in self.env:
                raise DimEvalError(f"symbol '{e.name}' is not bound to an input size")
            return self.env[e.name], 1
        if getattr(e, "is_Add", False):
            acc: _Frac = (0, 1)
            for arg in e.args:
                n, d = self.frac(arg)
                den = acc[1] * d // math.gcd(acc[1], d)
                acc = (self.add(self.mul(acc[0], den // acc[1]), self.mul(n, den // d)), den)
            return acc
        if getattr(e, "is_Mul", False):
            num: Any = 1
            den = 1
            for arg in e.args:
                n, d = self.frac(arg)
                num, den = self.mul(num, n), den * d
            if isinstance(num, int):
                g = math.gcd(num, den)
                num, den = num // g, den // g
            return num, den
        if getattr(e, "is_Pow", False):
            base, exp = e.args
            if not getattr(exp, "is_Integer", False):
                raise DimEvalError(f"non-integer power in dim {e}")
            k = int(exp)
            n, d = self.frac(base)
            if k < 0:
                if not isinstance(n, int):
                    raise DimEvalError(f"division by a symbolic size in dim {e}")
                n, d, k = d, n, -k
            num, den = 1, 1
            for _ in range(k):
                num, den = self.mul(num, n), den * d
            return num, den
        name = type(e).__name__
        args = getattr(e, "args", ())
        if name == "floor":
            n, d = self.frac(args[0])
            return self.floordiv(n, d), 1
        if name == "ceiling":
            n, d = self.frac(args[0])
            if d == 1:
                return n, 1
            return self.mul(self.floordiv(self.mul(n, -1), d), -1), 1
        if name in ("FloorDiv", "CeilDiv"):
            a, b = self.to_int(args[0]), self.to_int(args[1])
            if not isinstance(b, int):
                raise DimEvalError(f"division by a symbolic size in dim {e}")
            if name == "FloorDiv":
                return self.floordiv(a, b), 1
            return self.mul(self.floordiv(self.mul(a, -1), b), -1), 1
        if name in ("Mod", "PythonMod"):
            a, b = self.to_int(args[0]), self.to_int(args[1])
            if isinstance(a, int) and isinstance(b, int):
                return a % b, 1
            return self.ar.mod(a, b), 1
        if name in ("Max", "Min"):
            vals = [self.to_int(a) for a in args]
            acc2 = vals[0]
            for v in vals[1:]:
                if isinstance(acc2, int) and isinstance(v, int):
                    acc2 = max(acc2, v) if name == "Max" else min(acc2, v)
                else:
                    acc2 = self.ar.max(acc2, v) if name == "Max" else self.ar.min(acc2, v)
            return acc2, 1
        raise DimEvalError(f"cannot evaluate dim expression {e} ({name})")


def eval_dim(e: Any, env: Mapping[str, Any], ar: Arith | None = None) -> Any:
    """Evaluates dim ``e`` with symbol values ``env`` (ints, SymInts or fx nodes)."""
    return _Evaluator(env, ar or PyArith()).to_int(e)


def eval_attr(v: Any, env: Mapping[str, Any], ar: Arith | None = None) -> Any:
    """Evaluates every symbolic dim inside an attribute value (tuples, lists, dicts)."""
    if isinstance(v, tuple | list):
        return type(v)(eval_attr(x, env, ar) for x in v)
    if isinstance(v, Mapping):
        return {k: eval_attr(x, env, ar) for k, x in v.items()}
    if is_symbolic(v):
        return eval_dim(v, env, ar)
    return v


# shared by the CPU and CUDA fx lowerings
def fx_attr_name(prefix: str, name: str, taken: set[str]) -> str:
    """A fresh attribute/placeholder name (``prefix`` + sanitized ``name``) not in ``taken``."""
    base = prefix + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    cand, i = base, 0
    while cand in taken:
        i += 1
        cand = f"{base}_{i}"
    taken.add(cand)
    return cand


def free_symbol_names(v: Any) -> set[str]:
    """Names of the symbols in an attribute value (nested lists, tuples, mappings)."""
    if isinstance(v, tuple | list):
        return set().union(*(free_symbol_names(x) for x in v)) if v else set()
    if isinstance(v, Mapping):
        return free_symbol_names(list(v.values()))
    if is_symbolic(v):
        return {s.name for s in v.free_symbols}
    return set()
