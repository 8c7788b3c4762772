"""PyTorch frontend: ``torch.export`` (ATen FX graph) -> Ember IR.

The model is exported with ``torch.export.export(strict=False)`` in eval mode under
``no_grad``, then decomposed with torch's default table minus every op Ember maps directly
(linear, layer_norm, scaled_dot_product_attention, conv, batch_norm, ...), so high-level ops
survive for the fusion passes. Each ATen node is then mapped to IR ops with `GraphBuilder`,
which infers every type; the inferred shape is checked against torch's own (``meta['val']``).

Symbolic dims: torch names its symbols ``s0, s1, ...``; they are renamed after the user's
``dynamic_dims`` (``{"input_ids": {0: "batch", 1: "seq"}}``) by looking at where each symbol
first appears in an input's shape. Scalar-valued nodes (``sym_size``, SymInt arithmetic) are
read from their ``meta['val']``, so every shape argument becomes an int or a sympy expression.

Ops without a mapping are collected (all of them, with their source locations) and raised as
one `UnsupportedOpError`.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import nn

from ..errors import FrontendError, UnsupportedOp, UnsupportedOpError
from ..ir import Graph, GraphBuilder, SourceLoc, TensorType, Value, from_torch_dtype, sym
from ..ir.shapes import Dim, dims_equal, evaluate, simplify

__all__ = ["import_module", "import_exported_program", "export_module", "supported_aten_ops",
           "load_pt2"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
DynamicDims = Mapping[str, Mapping[int, str]] | Sequence[Mapping[int, str] | None] | None


# ============================================================================ public entry points
def export_module(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    dynamic_dims: DynamicDims = None,
    input_names: Sequence[str] | None = None,
) -> tuple[torch.export.ExportedProgram, list[str], dict[str, dict[int, str]]]:
    """Exports ``model`` with torch.export and Ember's decomposition table.

    Returns:
        (decomposed ExportedProgram, input names, dynamic dims keyed by input name).
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names = list(input_names) if input_names is not None else _forward_arg_names(
        model, len(example_inputs))
    if len(names) != len(example_inputs):
        raise FrontendError(f"{len(names)} input names for {len(example_inputs)} example inputs")
    dyn = _normalize_dynamic_dims(dynamic_dims, names)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = _export(model, example_inputs, names, dyn)
            ep = ep.run_decompositions(_decomp_table())
    except (UnsupportedOpError, FrontendError):
        raise
    except Exception as e:
        raise FrontendError(f"torch.export failed for {type(model).__name__}: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
    finally:
        model.train(was_training)
    return ep, names, dyn


def import_module(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    dynamic_dims: DynamicDims = None,
    input_names: Sequence[str] | None = None,
) -> Graph:
    """Imports a PyTorch module into an Ember graph.

    Args:
        model: the module; exported in eval mode without gradients (its mode is restored).
        example_inputs: positional example inputs (tensors).
        dynamic_dims: per input (by forward-argument name or by position) a map
            ``{dim index: symbol name}``; dims sharing a name are the same symbol.
        input_names: names of the graph inputs (default: the forward argument names).

    Returns:
        The IR graph, with parameters and buffers as params and named outputs.

    Raises:
        UnsupportedOpError: listing every ATen op without a mapping, with its location.
        FrontendError: the model could not be exported, or a mapping produced a wrong shape.
    """
    ep, names, dyn = export_module(model, example_inputs, dynamic_dims, input_names)
    g = _Importer(ep, names, dyn, type(model).__name__).run()
    log.info("imported %s: %d nodes, %d params", type(model).__name__, len(g.nodes),
             len(g.params))
    return g


def import_exported_program(
    ep: torch.export.ExportedProgram,
    input_names: Sequence[str] | None = None,
    dynamic_dims: DynamicDims = None,
) -> Graph:
    """Imports an ExportedProgram (decomposing it with Ember's table first).

    Symbols are named after ``dynamic_dims`` when given; otherwise they keep torch's names.
    """
    ep = ep.run_decompositions(_decomp_table())
    n_user = sum(1 for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    names = list(input_names) if input_names is not None else [
        s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(names) != n_user:
        raise FrontendError(f"{len(names)} input names for {n_user} user inputs")
    return _Importer(ep, names, _normalize_dynamic_dims(dynamic_dims, names)).run()


def supported_aten_ops() -> list[str]:
    """The ATen op packets (``aten.add``, ...) this frontend maps, sorted."""
    return sorted(f"aten.{n}" for n in _HANDLERS)


# ============================================================================ export
def _forward_arg_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _normalize_dynamic_dims(dyn: DynamicDims, names: Sequence[str]) -> dict[str, dict[int, str]]:
    if dyn is None:
        return {}
    out: dict[str, dict[int, str]] = {}
    if isinstance(dyn, Mapping):
        for k, dims in dyn.items():
            name = names[k] if isinstance(k, int) else k
            if name not in names:
                raise FrontendError(f"dynamic_dims names '{k}', not an input "
                                    f"(inputs: {', '.join(names)})")
            out[name] = {int(d): str(s) for d, s in dict(dims).items()}
    else:
        if len(dyn) > len(names):
            raise FrontendError(f"dynamic_dims has {len(dyn)} entries for {len(names)} inputs")
        for name, dims in zip(names, dyn):
            if dims:
                out[name] = {int(d): str(s) for d, s in dict(dims).items()}
    return out


def _export(model: nn.Module, args: tuple, names: Sequence[str],
            dyn: Mapping[str, Mapping[int, str]]) -> torch.export.ExportedProgram:
    from torch.export import Dim, export

    if not dyn:
        return export(model, args, strict=False)

    def spec(make: Callable[[str], Any]) -> tuple:
        out = []
        for name, a in zip(names, args):
            dims = dyn.get(name)
            if not dims or not isinstance(a, torch.Tensor):
                out.append(None)
                continue
            out.append({d % a.dim(): make(s) for d, s in dims.items()})
        return _nest_var_positional(model, tuple(out))

    named: dict[str, Any] = {}
    try:
        return export(model, args, strict=False,
                      dynamic_shapes=spec(lambda s: named.setdefault(s, Dim(s))))
    except Exception as e:  # named Dims reject models with guards such as seq <= 512
        log.info("export with named dims failed (%s); retrying with Dim.AUTO", _first_line(e))
    # Dim.AUTO accepts the ranges the model needs; symbols are renamed from the input shapes
    return export(model, args, strict=False, dynamic_shapes=spec(lambda s: Dim.AUTO))


def _nest_var_positional(model: nn.Module, spec: tuple) -> tuple:
    """torch.export matches ``dynamic_shapes`` to the forward's signature: the inputs a
    ``*args`` parameter takes are one nested tuple there."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return spec
    n_pos = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return (*spec[:n_pos], tuple(spec[n_pos:]))
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        n_pos += 1
    return spec


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _decomp_table() -> Any:
    """torch's default decompositions minus every op that has a direct Ember mapping."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        name = op.name().split("::")[-1].split(".")[0]
        if name in _HANDLERS or name in _KEEP_EXTRA:
            try:
                del table[op]
            except KeyError:
                pass
    return table


# Ops with a handler that is reached after their own decomposition: none right now; the set
# exists so an op can be kept without a handler of the same name (e.g. aliases).
_KEEP_EXTRA: set[str] = set()


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


class _MissingOut:
    """An output of a multi-output op that Ember does not compute (dropout mask, BN stats)."""


class _Unsupported(Exception):
    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


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


class _ConstRef:
    """A parameter/buffer/constant placeholder; becomes a graph param on first use."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _raise_unsupported(reason: str) -> Any:
    raise _Unsupported(reason)


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


from . import _fx_ops  # noqa: E402,F401  (registers the handlers)

# ----------------------------------------------------------------------------- .pt2 files
_PT2_MAX_MEMBERS = 100_000


def _pt2_configs(z: Any, path: Path) -> None:
    """Refuses a .pt2 whose payload configs declare pickled tensors or opaque objects."""
    import json

    for name in z.namelist():
        if not name.endswith(("weights_config.json", "constants_config.json")):
            continue
        try:
            cfg = json.loads(z.read(name)).get("config", {})
        except (ValueError, AttributeError) as e:
            raise FrontendError(f"{path}: {name} is not valid JSON ({e})") from None
        for fqn, meta in (cfg.items() if isinstance(cfg, dict) else ()):
            pname = str((meta or {}).get("path_name", "")) if isinstance(meta, dict) else ""
            if not isinstance(meta, dict) or meta.get("use_pickle") or not pname.startswith(
                    ("weight_", "tensor_")):
                raise FrontendError(
                    f"{path}: {name} declares '{fqn}' as a pickled or opaque object "
                    f"({pname or 'no path'}); Ember loads .pt2 archives of plain tensors only "
                    f"(re-export without custom objects, or compile the nn.Module / an ONNX file)")


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """Loads a ``torch.export`` archive without running code from it.

    ``.pt2`` is a trusted-only format: torch can unpickle parts of it. Ember refuses archives
    that declare pickled weights or constants, opaque or custom objects, or compiled
    (AOTInductor) models, and loads the rest with every ``torch.load`` forced to
    ``weights_only=True`` (torch's restricted unpickler) so the sample inputs cannot run code.

    Raises:
        FrontendError: one line naming the file and what was refused.
    """
    import logging as _logging
    import os
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FrontendError(f"{path}: not a torch.export .pt2 archive ({e})") from None
    with z:
        names = z.namelist()
        if len(names) > _PT2_MAX_MEMBERS:
            raise FrontendError(f"{path}: {len(names)} members (at most {_PT2_MAX_MEMBERS})")
        native = [n for n in names if n.endswith((".so", ".dll", ".dylib", ".cpp", ".cubin"))
                  or "/data/aotinductor/" in n]
        if native:
            raise FrontendError(f"{path}: holds compiled code ({native[0]}); Ember compiles "
                                f"torch.export programs, not AOTInductor packages")
        _pt2_configs(z, path)
    export_log = _logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(_logging.CRITICAL)  # torch logs its own traceback before raising
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        return torch.export.load(str(path))
    except Exception as e:  # a corrupt or refused .pt2 must not surface as a deep traceback
        raise FrontendError(f"{path}: cannot load torch.export program: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") \
            from None
    finally:
        export_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
