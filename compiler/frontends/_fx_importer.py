"""The FX importer: walks a decomposed ``torch.export`` graph and builds the Ember IR.

`_Importer` maps each ATen node through the handler registered for it in ``_HANDLERS`` (the
handlers live in `_fx_ops`, registered with ``@_h``; `fx` imports both, so the table is full
before any import runs). This module also holds what the importer and the handlers share: the
constant placeholder `_ConstRef`, the `_MissingOut` marker, the `_Unsupported` exception and
the dim comparison `_same_dim`. The public entry points are in `fx`.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sympy
import torch

from ..errors import FrontendError, UnsupportedOp, UnsupportedOpError
from ..ir import Graph, GraphBuilder, SourceLoc, TensorType, Value, from_torch_dtype, sym
from ..ir.shapes import Dim, dims_equal, evaluate, simplify

__all__ = ["Handler", "_HANDLERS", "_h", "_Importer", "_ConstRef", "_MissingOut",
           "_Unsupported", "_same_dim", "_first_line"]

log = logging.getLogger(__name__)


# ============================================================================ op handlers
# A handler gets the importer, the overload name and the node's arguments (tensors as IR
# values, constants as _ConstRef, scalars as ints/floats/sympy) and returns IR values.
Handler = Callable[..., Any]
_HANDLERS: dict[str, Handler] = {}


def _h(*names: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for n in names:
            _HANDLERS[n] = fn
        return fn
    return deco


class _MissingOut:
    """An output of a multi-output op that Ember does not compute (dropout mask, BN stats)."""


class _Unsupported(Exception):
    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class _ConstRef:
    """A parameter/buffer/constant placeholder; becomes a graph param on first use."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _same_dim(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        if dims_equal(a, b):
            return True
    except (TypeError, ValueError):
        pass
    # sympy cannot always prove equality of floor/ceiling forms: compare at sample points
    syms = sorted({s.name for d in (a, b) if isinstance(d, sympy.Basic) for s in d.free_symbols})
    rng = random.Random(0)
    for _ in range(8):
        env = {s: rng.randint(2, 300) for s in syms}
        try:
            if evaluate(a, env) != evaluate(b, env):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ============================================================================ symbols
def _to_sympy(x: Any) -> Any:
    """Converts torch's sympy functions (FloorDiv, Mod, ...) into plain sympy."""
    from torch.utils._sympy import functions as tf

    if not isinstance(x, sympy.Basic) or x.is_Atom:
        return x
    args = [_to_sympy(a) for a in x.args]
    f = type(x)
    if f is tf.FloorDiv:
        return sympy.floor(args[0] / args[1])
    if f is tf.CeilDiv if hasattr(tf, "CeilDiv") else False:
        return sympy.ceiling(args[0] / args[1])
    if f is tf.CleanDiv if hasattr(tf, "CleanDiv") else False:
        return args[0] / args[1]
    if f in (tf.ModularIndexing,):
        return sympy.Mod(sympy.floor(args[0] / args[1]), args[2])
    if f.__name__ in ("PythonMod", "Mod"):
        return sympy.Mod(args[0], args[1])
    if f.__name__ in ("IntTrueDiv", "FloatTrueDiv"):
        return args[0] / args[1]
    if f.__name__ in ("PowByNatural", "FloatPow"):
        return args[0] ** args[1]
    if f.__name__ in ("Max",):
        return sympy.Max(*args)
    if f.__name__ in ("Min",):
        return sympy.Min(*args)
    if f.__name__ in ("TruncToInt", "FloorToInt"):
        return sympy.floor(args[0])
    if f.__name__ == "CeilToInt":
        return sympy.ceiling(args[0])
    if f.__name__ == "ToFloat":
        return args[0]
    if f.__module__.startswith("torch"):
        raise FrontendError(f"symbolic expression {x} uses {f.__name__}, which Ember cannot "
                            "represent")
    return x.func(*args)


class _Symbols:
    """Maps torch's shape symbols to Ember's named symbols."""

    def __init__(self) -> None:
        self.map: dict[sympy.Symbol, sympy.Symbol] = {}

    def bind(self, torch_dim: Any, name: str) -> None:
        e = getattr(getattr(torch_dim, "node", None), "expr", None)
        if isinstance(e, sympy.Symbol):
            prev = self.map.get(e)
            if prev is not None and prev.name != name:
                log.warning("torch unified dims '%s' and '%s'; keeping '%s'", prev.name, name,
                            prev.name)
                return
            self.map[e] = sym(name)

    def dim(self, d: Any) -> Dim:
        if isinstance(d, bool):
            return int(d)
        if isinstance(d, int):
            return d
        if isinstance(d, float):
            return d  # type: ignore[return-value]
        e = getattr(getattr(d, "node", None), "expr", d)
        if isinstance(e, sympy.Basic):
            e = _to_sympy(e)
            unknown = [s for s in e.free_symbols if s not in self.map]
            for s in unknown:  # a dim the user did not name: keep torch's name for it
                log.info("symbol %s was not named by dynamic_dims; keeping its name", s)
                self.map[s] = sym(str(s))
            e = e.xreplace(self.map)
            return simplify(e) if e.is_integer or e.is_Integer else e
        raise FrontendError(f"cannot read dimension {d!r}")

    def shape(self, shape: Sequence[Any]) -> tuple[Dim, ...]:
        return tuple(self.dim(d) for d in shape)


# ============================================================================ importer
class _Missing:
    """Stands for the result of an unsupported node; consumers are skipped silently."""


_MISSING = _Missing()


def _loc(node: torch.fx.Node) -> SourceLoc:
    file, line = "", 0
    trace = node.meta.get("stack_trace") or ""
    frames: list[tuple[str, int]] = []
    for ln in trace.splitlines():
        ln = ln.strip()
        if ln.startswith('File "'):
            try:
                f = ln.split('"')[1]
                n = int(ln.split(", line ")[1].split(",")[0])
            except (IndexError, ValueError):
                continue
            frames.append((f, n))
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f[0].startswith(torch_dir)]
    if user or frames:
        file, line = (user or frames)[-1]
    op = _op_name(node)
    return SourceLoc(file, line, node.name, op)


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t._opname}.{t._overloadname}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


class _Importer:
    def __init__(self, ep: torch.export.ExportedProgram, names: Sequence[str],
                 dyn: Mapping[str, Mapping[int, str]], model_name: str = "") -> None:
        self.ep = ep
        self.names = list(names)
        self.dyn = dyn
        self.b = GraphBuilder(_clean_name(model_name) or "main")
        self.syms = _Symbols()
        self.env: dict[str, Any] = {}
        self.consts: dict[str, tuple[str, torch.Tensor]] = {}
        self.const_vals: dict[str, Value] = {}
        self.scalar_cache: dict[tuple[str, Any], Value] = {}
        self.unsupported: list[UnsupportedOp] = []
        self.node: torch.fx.Node | None = None
        self.loc = SourceLoc()

    # ----------------------------------------------------------------- driving
    def run(self) -> Graph:
        ep = self.ep
        sig = ep.graph_signature
        gm = ep.graph_module
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        specs = list(sig.input_specs)
        if len(specs) != len(placeholders):
            raise FrontendError("exported program signature does not match its placeholders")
        user = [(n, s) for n, s in zip(placeholders, specs) if s.kind.name == "USER_INPUT"]
        if len(user) != len(self.names):
            raise FrontendError(f"model has {len(user)} tensor inputs, {len(self.names)} names")
        # name symbols from the user inputs first, so every later dim is expressed in them
        for (n, _), name in zip(user, self.names):
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                for d, s in self.dyn.get(name, {}).items():
                    self.syms.bind(val.shape[d % val.dim()], s)
        for (n, _), name in zip(user, self.names):
            val = n.meta.get("val")
            for d, s in self.dyn.get(name, {}).items():
                if isinstance(val, torch.Tensor) and isinstance(val.shape[d % val.dim()], int):
                    log.warning("input '%s' dim %d ('%s') was specialized to %d by torch.export "
                                "(an example size of 0 or 1, or a model guard); it is static",
                                name, d, s, val.shape[d % val.dim()])
        for n, spec in zip(placeholders, specs):
            kind = spec.kind.name
            if kind == "USER_INPUT":
                name = self.names[[u[0] for u in user].index(n)]
                val = n.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    raise FrontendError(f"input '{name}' is not a tensor ({type(val).__name__})")
                self.env[n.name] = self.b.add_input(
                    name, TensorType(from_torch_dtype(val.dtype), self.syms.shape(val.shape)))
            elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                t = (ep.constants.get(spec.target) if spec.target in ep.constants
                     else ep.state_dict.get(spec.target))
                if t is None:
                    raise FrontendError(f"no tensor for {kind.lower()} '{spec.target}'")
                self.consts[n.name] = (spec.target, t.detach())
                self.env[n.name] = _ConstRef(n.name)
            else:
                raise FrontendError(f"unsupported exported input kind {kind} ('{n.name}')")
        self.b.meta["frontend"] = "fx"
        self.b.meta["dynamic_dims"] = {k: {str(d): s for d, s in v.items()}
                                       for k, v in self.dyn.items()}
        self.b.meta["dim_ranges"] = self._dim_ranges()
        outputs_node = None
        for n in gm.graph.nodes:
            if n.op == "call_function":
                self._visit(n)
            elif n.op == "output":
                outputs_node = n
            elif n.op == "get_attr":
                self._unsupported(n, "get_attr (submodule/control flow)")
        if self.unsupported:
            raise UnsupportedOpError(self.unsupported, frontend="fx")
        assert outputs_node is not None
        self._set_outputs(outputs_node)
        return self.b.build()

    def _dim_ranges(self) -> dict[str, list[int | None]]:
        """symbol -> [min, max] (max None when unbounded), from torch's range constraints."""
        out: dict[str, list[int | None]] = {}
        for s, vr in self.ep.range_constraints.items():
            named = self.syms.map.get(s)
            if named is None:
                continue
            lo, hi = vr.lower, vr.upper
            out[named.name] = [int(lo) if isinstance(lo, sympy.Integer) else None,
                               int(hi) if isinstance(hi, sympy.Integer) else None]
        return out

    def _set_outputs(self, out_node: torch.fx.Node) -> None:
        flat = list(out_node.args[0])
        specs = list(self.ep.graph_signature.output_specs)
        vals, names = [], []
        user_names = self._output_names(sum(1 for s in specs if s.kind.name == "USER_OUTPUT"))
        k = 0
        for a, s in zip(flat, specs):
            if s.kind.name != "USER_OUTPUT":
                log.warning("dropping exported output %s (%s): Ember graphs are pure",
                            s.arg, s.kind.name)
                continue
            v = self._arg(a)
            if isinstance(v, _MissingOut | _Missing):
                raise UnsupportedOpError([UnsupportedOp(
                    "output", f"model output {user_names[k]}",
                    "an output Ember does not compute (indices, mask or statistics)")], "fx")
            if isinstance(v, _ConstRef):
                v = self._const(v.name)
            if not isinstance(v, Value):
                v = self._scalar_tensor(v, None)
            vals.append(v)
            names.append(user_names[k])
            k += 1
        self.b.set_outputs(vals, names)

    def _output_names(self, n: int) -> list[str]:
        from torch.utils import _pytree as pytree

        spec = self.ep.call_spec.out_spec
        try:
            tree = pytree.tree_unflatten(list(range(n)), spec)
            leaves, _ = pytree.tree_flatten_with_path(tree)
            names = [_path_name(p) for p, _ in leaves]
            if len(names) == n and len(set(names)) == n:
                self.b.meta["output_structure"] = str(spec).replace("\n", "")
                return names
        except Exception as e:  # an output type without pytree support: fall back to indices
            log.debug("cannot name outputs from %s: %s", spec, e)
        return [f"output_{i}" for i in range(n)]

    def _unsupported(self, node: torch.fx.Node, reason: str = "") -> None:
        loc = _loc(node)
        where = f"{loc.file}:{loc.line}" if loc.file else "<unknown>"
        self.unsupported.append(UnsupportedOp(_op_name(node), f"{where} (fx node '{node.name}')",
                                              reason))
        self.env[node.name] = _MISSING

    def _visit(self, node: torch.fx.Node) -> None:
        self.node = node
        self.loc = _loc(node)
        # a node computing a scalar (sym_size, SymInt arithmetic) is read from torch's value
        val = node.meta.get("val")
        if isinstance(val, int | float | bool | torch.SymInt | torch.SymFloat | torch.SymBool):
            self.env[node.name] = self._scalar_meta(val)
            return
        ins = [self.env.get(a.name) for a in node.all_input_nodes]
        if any(isinstance(v, _Missing) for v in ins):
            self.env[node.name] = _MISSING
            return
        if any(isinstance(v, _MissingOut) for v in ins):
            self._unsupported(node, "uses an output Ember does not compute (indices, mask or "
                              "statistics of a multi-output op)")
            return
        t = node.target
        if t is operator.getitem:
            seq, i = node.args
            self.env[node.name] = self.env[seq.name][i]
            return
        if not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
            self._unsupported(node)
            return
        h = _HANDLERS.get(t._opname)
        if h is None:
            self._unsupported(node)
            return
        args = [self._arg(a) for a in node.args]
        kwargs = {k: self._arg(a) for k, a in node.kwargs.items()}
        try:
            out = h(self, t._overloadname, *args, **kwargs)
        except _Unsupported as e:
            self._unsupported(node, e.reason)
            return
        except (TypeError, ValueError, KeyError, IndexError) as e:
            # an argument form this handler does not cover (the IR rejected it)
            self._unsupported(node, f"{type(e).__name__}: {_first_line(e)}")
            return
        self.env[node.name] = self._check(node, out)

    # ----------------------------------------------------------------- values
    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, list | tuple):
            return type(a)(self._arg(x) for x in a)
        return a

    def _const(self, name: str) -> Value:
        v = self.const_vals.get(name)
        if v is None:
            target, t = self.consts[name]
            v = self.b.add_param(target, t)
            self.const_vals[name] = v
        return v

    def _scalar_meta(self, val: Any) -> Any:
        if isinstance(val, torch.SymBool):
            e = val.node.expr
            return bool(e) if e in (sympy.true, sympy.false) else _raise_unsupported(
                "symbolic bool")
        if isinstance(val, torch.SymFloat):
            e = _to_sympy(val.node.expr)
            return float(e) if e.is_number else self.syms.dim(val)
        return self.syms.dim(val) if isinstance(val, torch.SymInt) else val

    def _scalar_tensor(self, x: Any, like: Value | None) -> Value:
        """A 0-d value for a Python scalar operand, typed like torch's promotion would."""
        if isinstance(x, Value):
            return x
        if isinstance(x, _ConstRef):
            return self._const(x.name)
        if isinstance(x, bool):
            dt = "bool"
        elif isinstance(x, int):
            dt = like.type.dtype if like is not None and like.type.dtype != "bool" else "int64"
        elif isinstance(x, float):
            dt = like.type.dtype if like is not None and _is_float(like.type.dtype) else "float32"
        elif isinstance(x, sympy.Basic):
            dt = "int64" if x.is_integer is not False else "float32"
            return self.emit("full", [], {"shape": (), "value": x, "dtype": dt})
        else:
            raise _Unsupported(f"operand {x!r} of type {type(x).__name__}")
        key = (dt, x if not (isinstance(x, float) and math.isnan(x)) else "nan")
        v = self.scalar_cache.get(key)
        if v is None:
            t = torch.tensor(x, dtype=_torch_dtype(dt))
            v = self.b.add_param(f"scalar_{dt}", t)
            self.scalar_cache[key] = v
        return v

    def val(self, x: Any, like: Value | None = None) -> Value:
        """The IR value for an operand (tensor, constant reference or scalar)."""
        if isinstance(x, Value):
            return x
        if isinstance(x, _ConstRef):
            return self._const(x.name)
        if x is None:
            raise _Unsupported("missing operand")
        return self._scalar_tensor(x, like)

    def emit(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None
             ) -> Any:
        hint = self.node.name if self.node is not None else op
        return self.b.op(op, list(inputs), attrs or {}, self.loc, name=hint)

    def const_tensor(self, x: Any) -> torch.Tensor | None:
        """The tensor behind an operand that is a parameter/buffer/constant, else None."""
        if isinstance(x, _ConstRef):
            return self.consts[x.name][1]
        return None

    def meta_type(self) -> TensorType:
        val = self.node.meta.get("val") if self.node is not None else None
        if not isinstance(val, torch.Tensor):
            raise _Unsupported("no tensor metadata")
        return TensorType(from_torch_dtype(val.dtype), self.syms.shape(val.shape))

    def cast(self, v: Value, dtype: str) -> Value:
        return v if v.type.dtype == dtype else self.emit("cast", [v], {"dtype": dtype})

    # ----------------------------------------------------------------- checking
    def _check(self, node: torch.fx.Node, out: Any) -> Any:
        val = node.meta.get("val")
        if isinstance(out, Value) and isinstance(val, torch.Tensor):
            return self._check_one(node, out, val)
        if isinstance(out, list | tuple) and isinstance(val, list | tuple):
            return type(out)(self._check_one(node, o, v) if isinstance(o, Value)
                             and isinstance(v, torch.Tensor) else o for o, v in zip(out, val))
        return out

    def _check_one(self, node: torch.fx.Node, out: Value, val: torch.Tensor) -> Value:
        want = TensorType(from_torch_dtype(val.dtype), self.syms.shape(val.shape))
        if len(want.shape) != len(out.type.shape) or not all(
                _same_dim(a, b) for a, b in zip(want.shape, out.type.shape)):
            raise FrontendError(
                f"fx node '{node.name}' ({_op_name(node)}) at {_loc(node)}: Ember inferred "
                f"{out.type} but torch says {want}")
        if want.dtype != out.type.dtype:
            log.debug("%s: casting %s to torch's dtype %s", node.name, out.type.dtype,
                      want.dtype)
            out = self.emit("cast", [out], {"dtype": want.dtype})
        return out


def _raise_unsupported(reason: str) -> Any:
    raise _Unsupported(reason)


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    name = ".".join(parts)
    if not name:
        return "output"
    return name if not name[0].isdigit() else f"output_{name}"


def _clean_name(s: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in s)


def _is_float(dt: str) -> bool:
    return dt in ("float32", "float16", "bfloat16", "float64")


def _torch_dtype(dt: str) -> torch.dtype:
    from ..ir import to_torch_dtype

    return to_torch_dtype(dt)

