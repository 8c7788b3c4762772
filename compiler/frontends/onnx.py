"""ONNX frontend: an ``onnx.ModelProto`` (or a .onnx file) becomes an Ember `Graph`.

The model is checked (``onnx.checker``) and shape-inferred first. Every ONNX value is then
tracked as one of three things while the nodes are converted in order:

* a runtime IR `Value` (depends on a graph input),
* a known ``torch.Tensor`` (initializers, Constant nodes and anything computed only from them:
  constant subgraphs fold here, through the IR ops' own references),
* a known `SymArray`: a small integer tensor whose entries are ints or sympy dims, as produced
  by ``Shape`` of a value with symbolic dims. Exporter shape arithmetic
  (Shape -> Gather -> Concat -> Reshape, ...) is evaluated on these, so a Reshape whose target
  comes from the input's shape becomes a plain ``reshape`` with a symbolic ``shape`` attribute.

ONNX ops map onto compositions of IR ops (PyTorch semantics; see ``ember.ir.opset``). Ops with
no mapping are collected, and one `UnsupportedOpError` lists every one with its node name.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.errors import CompilerError, FrontendError, UnsupportedOp, UnsupportedOpError
from ember.ir import (
    Graph,
    GraphBuilder,
    OpTypeError,
    ShapeError,
    SourceLoc,
    TensorType,
    Value,
    get_op,
    sym,
)
from ember.ir.opset import BIG, broadcast_shapes
from ember.ir.types import to_torch_dtype

__all__ = ["import_onnx", "SymArray", "ONNX_DTYPES", "supported_onnx_ops", "MIN_OPSET"]

log = logging.getLogger(__name__)

MIN_OPSET = 1  # 13..21 is the tested range; older opsets import where semantics agree
ONNX_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
    TensorProto.BOOL: "bool",
}
# An import-time fold (Range, Tile, Expand of a value known while importing) makes at most this
# many elements: a few hundred bytes of ONNX must not make the importer allocate gigabytes.
FOLD_MAX_ELEMENTS = 1 << 24
FULL_MAX_ELEMENTS = 1 << 28  # a ConstantOfShape of static shape (materialized when run)
_FULL_FOLD_LIMIT = 1 << 16  # ConstantOfShape results up to this many elements fold to constants


def _check_fold(node: onnx.NodeProto, n: int) -> None:
    if n > FOLD_MAX_ELEMENTS:
        raise FrontendError(f"ONNX node '{node.name or '?'}' ({node.op_type}): folding it at "
                            f"import would make {n} elements (at most {FOLD_MAX_ELEMENTS})")


@dataclass(frozen=True)
class SymArray:
    """An integer (or float) tensor known at import time whose entries may be sympy dims."""

    arr: np.ndarray  # dtype=object: Python ints / floats / sympy expressions
    dtype: str = "int64"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.arr.shape)


Known = torch.Tensor | SymArray
Item = Value | torch.Tensor | SymArray


class _Unsupported(Exception):
    """This node (or this use of its attributes) has no Ember mapping."""


class _Undecidable(Exception):
    """A symbolic comparison cannot be decided at import time."""


_POISON = object()  # the value of an output of an unsupported node


# ----------------------------------------------------------------------------- public API
def import_onnx(
    model: str | Path | onnx.ModelProto | bytes,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
) -> Graph:
    """Imports an ONNX model into an Ember graph.

    Args:
        model: a path to a .onnx file (external-data files beside it are loaded), the
            serialized bytes, or a ``ModelProto``.
        input_shapes: optional shape per input name; ints fix a dim, strings name a symbol.

    Returns:
        The graph; initializers become params, symbolic dims are sympy symbols.

    Raises:
        FrontendError: the model cannot be read, is malformed, or uses an unknown opset.
        UnsupportedOpError: listing every ONNX node that has no Ember mapping.
    """
    try:
        proto, path = _load(model)
        proto = _check_and_infer(proto, path)
        return _Importer(proto, path, input_shapes or {}).run()
    except CompilerError:
        raise
    except (RecursionError, MemoryError) as e:
        raise FrontendError(f"ONNX model too large or deeply nested to import: {e}") from None
    except Exception as e:  # a malformed model that slipped past the checker: still one line
        log.debug("ONNX import failed", exc_info=True)
        raise FrontendError(f"cannot import ONNX model: {type(e).__name__}: {_one_line(e)}") \
            from e


def supported_onnx_ops() -> list[str]:
    """ONNX op types (default domain) the frontend maps."""
    return sorted(_HANDLERS)


# ----------------------------------------------------------------------------- loading
def _load(model: str | Path | onnx.ModelProto | bytes) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, ""
    if isinstance(model, bytes | bytearray):
        try:
            m = onnx.ModelProto()
            m.ParseFromString(bytes(model))
            return m, ""
        except Exception as e:
            raise FrontendError(f"cannot parse ONNX bytes: {_one_line(e)}") from None
    p = Path(model)
    if not p.is_file():
        raise FrontendError(f"ONNX file not found: {p}")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise FrontendError(f"cannot parse ONNX file {p} (truncated or not ONNX?): "
                            f"{_one_line(e)}") from None
    try:
        onnx.external_data_helper.load_external_data_for_model(m, str(p.parent))
    except Exception as e:
        raise FrontendError(f"cannot load external data of {p}: {_one_line(e)}") from None
    return m, str(p)


def _dtype_str(et: int) -> str:
    try:
        return helper.tensor_dtype_to_string(et).replace("TensorProto.", "")
    except (KeyError, ValueError):
        return f"elem_type {et}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def _check_and_infer(m: onnx.ModelProto, path: str) -> onnx.ModelProto:
    where = path or "model"
    if not m.HasField("graph"):
        raise FrontendError(f"{where}: not an ONNX model (no graph)")
    max_opset = onnx.defs.onnx_opset_version()
    seen_default = False
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            seen_default = True
            if not MIN_OPSET <= o.version <= max_opset:
                raise FrontendError(f"{where}: unsupported ONNX opset {o.version} "
                                    f"(supported {MIN_OPSET}..{max_opset})")
    if not seen_default and any(n.domain in ("", "ai.onnx") for n in m.graph.node):
        raise FrontendError(f"{where}: no opset_import for the default ONNX domain")
    for t in m.graph.initializer:
        if (t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")):
            raise FrontendError(f"{where}: initializer '{t.name}' has external data that was "
                                "not loaded (pass the file path, not a ModelProto)")
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise FrontendError(f"{where}: invalid ONNX model: {_one_line(e)}") from None
    if m.functions:
        try:
            m = onnx.inliner.inline_local_functions(m)
        except Exception as e:
            raise FrontendError(f"{where}: cannot inline local functions: {_one_line(e)}") \
                from None
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False,
                                                 data_prop=True)
    except Exception as e:
        raise FrontendError(f"{where}: ONNX shape inference failed: {_one_line(e)}") from None


_SYM_RE = re.compile(r"[^A-Za-z0-9_]")


def _sym_name(text: str) -> str:
    name = _SYM_RE.sub("_", text).strip("_") or "dim"
    return name if not name[0].isdigit() else "d" + name


# ----------------------------------------------------------------------------- importer
Handler = Callable[["_Importer", onnx.NodeProto, list, dict], list]
_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for o in ops:
            _HANDLERS[o] = fn
        return fn
    return deco


class _Importer:
    def __init__(self, m: onnx.ModelProto, path: str,
                 input_shapes: Mapping[str, Sequence[int | str]]) -> None:
        self.m = m
        self.path = path
        self.input_shapes = dict(input_shapes)
        self.opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.b = GraphBuilder(_sym_name(m.graph.name or "main"))
        self.env: dict[str, Any] = {}
        self.unsupported: list[UnsupportedOp] = []
        self.loc = SourceLoc()
        self.node: onnx.NodeProto | None = None
        self._params: dict[int, Value] = {}
        self._declared: dict[str, int] = {}
        for vi in (*m.graph.value_info, *m.graph.output, *m.graph.input):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._declared[vi.name] = vi.type.tensor_type.elem_type

    # ----- driver ----------------------------------------------------------------
    def run(self) -> Graph:
        g = self.m.graph
        inits = {t.name: t for t in g.initializer}
        unknown = set(self.input_shapes) - {i.name for i in g.input}
        if unknown:
            raise FrontendError(f"input_shapes names unknown input(s) {sorted(unknown)}; "
                                f"inputs are {[i.name for i in g.input if i.name not in inits]}")
        for name, t in inits.items():
            self.env[name] = self._initializer(t)
        for i in g.input:
            if i.name in inits:
                continue
            self.env[i.name] = self._graph_input(i)
        self._convert(g.node)
        outs, names = [], []
        for o in g.output:
            v = self.env.get(o.name)
            if v is _POISON:
                continue
            if v is None:
                raise FrontendError(f"graph output '{o.name}' is never produced")
            outs.append(self.value(v, o.name))
            names.append(o.name)
        if self.unsupported:
            raise UnsupportedOpError(self.unsupported, frontend="ONNX")
        self.b.set_outputs(outs, names)
        self.b.meta.update({"source": "onnx", "opset": self.opset,
                            "producer": f"{self.m.producer_name} {self.m.producer_version}".strip()})
        return self.b.build()

    def _convert(self, nodes: Sequence[onnx.NodeProto]) -> None:
        for idx, node in enumerate(nodes):
            name = node.name or f"{node.op_type}_{idx}"
            self.loc = SourceLoc(file=self.path, frontend_node=name, frontend_op=node.op_type)
            self.node = node
            ins: list[Any] = []
            poisoned = False
            for i in node.input:
                if i == "":
                    ins.append(None)
                    continue
                if i not in self.env:
                    raise FrontendError(f"node '{name}' ({node.op_type}): input '{i}' is not "
                                        "defined (missing initializer or graph input?)")
                v = self.env[i]
                poisoned |= v is _POISON
                ins.append(v)
            op_key = node.op_type if node.domain in ("", "ai.onnx") else \
                f"{node.domain}::{node.op_type}"
            handler = _HANDLERS.get(op_key)
            if handler is None:  # listed even when its inputs are already unsupported
                self.unsupported.append(UnsupportedOp(op_key, f"node '{name}'"))
                outs: list[Any] = [_POISON] * len(node.output)
            elif poisoned:
                outs = [_POISON] * len(node.output)
            else:
                try:
                    attrs = {a.name: _attr_value(a) for a in node.attribute}
                    outs = list(handler(self, node, ins, attrs))
                except _Unsupported as e:
                    self.unsupported.append(UnsupportedOp(op_key, f"node '{name}'", str(e)))
                    outs = [_POISON] * len(node.output)
                except CompilerError:
                    raise
                except (OpTypeError, ShapeError, ValueError, TypeError, IndexError, KeyError,
                        RuntimeError, ZeroDivisionError, OverflowError, _Undecidable) as e:
                    raise FrontendError(f"node '{name}' ({node.op_type}) cannot be imported: "
                                        f"{_one_line(e)}") from None
            outs = outs + [None] * (len(node.output) - len(outs))
            for oname, val in zip(node.output, outs):
                if oname == "":
                    continue
                if val is None:
                    raise FrontendError(f"node '{name}' ({node.op_type}): output '{oname}' "
                                        "is not supported by Ember")
                if val is not _POISON:
                    val = self._match_declared(oname, val)
                self.env[oname] = val

    # ----- inputs and constants ----------------------------------------------------
    def _initializer(self, t: onnx.TensorProto) -> Any:
        if t.data_type not in ONNX_DTYPES:
            self.unsupported.append(UnsupportedOp(
                f"initializer dtype {_dtype_str(t.data_type)}",
                f"initializer '{t.name}'"))
            return _POISON
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            raise FrontendError(f"initializer '{t.name}' cannot be read: {_one_line(e)}") \
                from None
        return _np_to_torch(arr, ONNX_DTYPES[t.data_type])

    def _graph_input(self, i: onnx.ValueInfoProto) -> Any:
        if not i.type.HasField("tensor_type"):
            self.unsupported.append(UnsupportedOp("non-tensor input", f"input '{i.name}'"))
            return _POISON
        tt = i.type.tensor_type
        if tt.elem_type not in ONNX_DTYPES:
            self.unsupported.append(UnsupportedOp(
                f"input dtype {_dtype_str(tt.elem_type)}",
                f"input '{i.name}'"))
            return _POISON
        override = self.input_shapes.get(i.name)
        if override is not None:
            shape = [sym(_sym_name(d)) if isinstance(d, str) else int(d) for d in override]
        elif not tt.HasField("shape"):
            raise FrontendError(f"input '{i.name}' has no rank; pass input_shapes")
        else:
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value >= 0:
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    shape.append(sym(_sym_name(d.dim_param)))
                else:
                    shape.append(sym(_sym_name(f"{i.name}_dim{k}")))
        return self.b.add_input(i.name, TensorType(ONNX_DTYPES[tt.elem_type], tuple(shape)))

    def _match_declared(self, name: str, val: Any) -> Any:
        """Casts a converted value to the dtype ONNX declares for it (torch promotes more)."""
        et = self._declared.get(name)
        want = ONNX_DTYPES.get(et) if et else None
        if want is None or self.dtype(val) == want:
            return val
        if isinstance(val, SymArray):
            return SymArray(val.arr, want)
        return self.op("cast", [val], dtype=want)

    # ----- item helpers -------------------------------------------------------------
    def dtype(self, x: Item) -> str:
        if isinstance(x, Value):
            return x.type.dtype
        if isinstance(x, SymArray):
            return x.dtype
        return _dtype_name(x.dtype)

    def shape(self, x: Item) -> tuple:
        if isinstance(x, Value):
            return tuple(x.type.shape)
        return tuple(x.shape)

    def rank(self, x: Item) -> int:
        return len(self.shape(x))

    def value(self, x: Item, hint: str = "const") -> Value:
        """The IR value of ``x``; known tensors become params, SymArrays runtime ops."""
        if isinstance(x, Value):
            return x
        if isinstance(x, torch.Tensor):
            v = self._params.get(id(x))
            if v is None:
                v = self.b.add_param(hint, x.contiguous())
                self._params[id(x)] = v
                self._keep = getattr(self, "_keep", [])
                self._keep.append(x)  # keep id() stable
            return v
        flat = [self.b.op("full", [], {"shape": (1,), "value": _py(e), "dtype": x.dtype},
                          loc=self.loc) for e in x.arr.reshape(-1)]
        if not flat:
            return self.value(torch.zeros(x.shape, dtype=to_torch_dtype(x.dtype)), hint)
        cat = flat[0] if len(flat) == 1 else self.b.op("concat", flat, {"dim": 0}, loc=self.loc)
        return self.b.op("reshape", [cat], {"shape": x.shape}, loc=self.loc)  # type: ignore

    def op(self, name: str, inputs: Sequence[Item | None], **attrs: Any) -> Item:
        """Emits one IR op, or folds it when every input is a known tensor."""
        fold = all(i is None or isinstance(i, torch.Tensor) for i in inputs) and not any(
            isinstance(v, sympy.Basic) or isinstance(v, tuple | list) and any(
                isinstance(e, sympy.Basic) for e in v) for v in attrs.values())
        if name == "full":
            fold = not any(isinstance(d, sympy.Basic) for d in attrs["shape"]) and \
                math.prod(attrs["shape"]) <= _FULL_FOLD_LIMIT
        elif name == "arange":
            fold = not any(isinstance(attrs.get(k), sympy.Basic) for k in ("start", "end", "step"))
        if fold:
            opdef = get_op(name)
            a = opdef.normalize_attrs(dict(attrs))
            opdef.check_arity(len(inputs))
            # the result's size is known from the types before anything is computed
            outs = opdef.infer([None if i is None else TensorType(
                _dtype_name(i.dtype), tuple(i.shape)) for i in inputs], a)
            n = sum(math.prod(t.shape) for t in outs
                    if all(isinstance(d, int) for d in t.shape))
            if n > FOLD_MAX_ELEMENTS:
                raise FrontendError(f"ONNX node at {self.loc}: folding '{name}' at import would "
                                    f"make {n} elements (at most {FOLD_MAX_ELEMENTS})")
            with torch.no_grad():
                out = opdef.reference(list(inputs), a)
            if isinstance(out, torch.Tensor):
                return out
            return tuple(out)  # type: ignore[return-value]
        vals = [None if i is None else self.value(i) for i in inputs]
        return self.b.op(name, vals, attrs, loc=self.loc, name=name)  # type: ignore[return-value]

    def op_n(self, name: str, inputs: Sequence[Item | None], **attrs: Any) -> tuple:
        out = self.op(name, inputs, **attrs)
        return out if isinstance(out, tuple) else (out,)

    def known(self, x: Item | None) -> np.ndarray | None:
        """An object ndarray of the value when known at import time, else None."""
        if isinstance(x, SymArray):
            return x.arr
        if isinstance(x, torch.Tensor):
            arr = x.detach().cpu()
            if arr.dtype == torch.bfloat16:
                arr = arr.float()
            return np.array(arr.numpy().tolist(), dtype=object).reshape(tuple(x.shape))
        return None

    def ints(self, x: Item | None, what: str) -> list[int]:
        arr = self.known(x)
        if arr is None:
            raise _Unsupported(f"{what} must be known at import time (it is computed at run time)")
        out = []
        for e in arr.reshape(-1):
            e = _py(e)
            if not isinstance(e, int | bool):
                raise _Unsupported(f"{what} is symbolic ({e}) where a constant is needed")
            out.append(int(e))
        return out

    def dims(self, x: Item | None, what: str) -> list:
        arr = self.known(x)
        if arr is None:
            raise _Unsupported(f"{what} must be known at import time (it is computed at run time)")
        return [_py(e) for e in arr.reshape(-1)]

    def floats(self, x: Item | None, what: str) -> list[float]:
        arr = self.known(x)
        if arr is None:
            raise _Unsupported(f"{what} must be known at import time")
        return [float(e) for e in arr.reshape(-1)]

    def scalar(self, v: float | int, dtype: str) -> torch.Tensor:
        return torch.tensor(v, dtype=to_torch_dtype(dtype))

    def from_known(self, arr: np.ndarray, dtype: str) -> Known:
        flat = [_py(e) for e in arr.reshape(-1)]
        if all(isinstance(e, int | float | bool) for e in flat):
            t = torch.tensor(flat, dtype=to_torch_dtype(dtype)) if flat else \
                torch.zeros((0,), dtype=to_torch_dtype(dtype))
            return t.reshape(arr.shape)
        return SymArray(np.array(flat, dtype=object).reshape(arr.shape), dtype)

    def reshape(self, x: Item, shape: Sequence) -> Item:
        if tuple(shape) == self.shape(x) and all(isinstance(d, int) for d in shape):
            return x
        if isinstance(x, SymArray):
            return SymArray(x.arr.reshape(tuple(int(d) for d in shape)), x.dtype)
        return self.op("reshape", [x], shape=tuple(shape))

    def norm_axis(self, axis: int, rank: int) -> int:
        if not -max(rank, 1) <= axis < max(rank, 1):
            raise ValueError(f"axis {axis} out of range for rank {rank}")
        return axis % max(rank, 1)

    def opt_input(self, ins: list, i: int) -> Any:
        return ins[i] if len(ins) > i else None


def _py(e: Any) -> Any:
    if isinstance(e, np.generic):
        e = e.item()
    if isinstance(e, sympy.Basic):
        e = sympy.simplify(e) if not e.is_Atom else e
        if e.is_Integer:
            return int(e)
        if e.is_Float or e.is_Rational:
            return float(e)
        if e == sympy.true:
            return True
        if e == sympy.false:
            return False
    return e


def _dtype_name(dt: torch.dtype) -> str:
    from ember.ir import from_torch_dtype

    return from_torch_dtype(dt)


def _np_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.tensor(arr.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True)).to(to_torch_dtype(dtype))  # keeps 0-d


def _attr_value(a: onnx.AttributeProto) -> Any:
    if a.ref_attr_name:
        raise _Unsupported(f"attribute '{a.name}' refers to a function attribute")
    if a.type == onnx.AttributeProto.TENSOR:
        return a.t
    if a.type == onnx.AttributeProto.GRAPH:
        return a.g
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode("utf-8", errors="replace") for x in v]
    return v


def _tensor_attr(cx: _Importer, t: onnx.TensorProto) -> torch.Tensor:
    if t.data_type not in ONNX_DTYPES:
        raise _Unsupported(f"tensor of dtype {_dtype_str(t.data_type)}")
    return _np_to_torch(numpy_helper.to_array(t), ONNX_DTYPES[t.data_type])


# ----------------------------------------------------------------------------- symbolic eval
def _sym_cmp(a: Any, b: Any, op: str) -> bool:
    a, b = _py(a), _py(b)
    if not isinstance(a, sympy.Basic) and not isinstance(b, sympy.Basic):
        return {"eq": a == b, "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]
    rel = {"eq": sympy.Eq, "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge}[op]
    r = rel(sympy.sympify(a), sympy.sympify(b))
    if r in (sympy.true, sympy.false):
        return bool(r)
    raise _Undecidable(f"cannot decide {a} {op} {b} at import time")


def _sym_binary(op: str, a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    is_int = not dtype.startswith("float") and dtype != "bfloat16"

    def f(x: Any, y: Any) -> Any:
        x, y = _py(x), _py(y)
        if op == "Add":
            return x + y
        if op == "Sub":
            return x - y
        if op == "Mul":
            return x * y
        if op == "Div":
            if is_int:
                if isinstance(x, int) and isinstance(y, int):
                    return int(x / y) if y else 0
                return sympy.floor(sympy.sympify(x) / y)
            return sympy.sympify(x) / y
        if op == "Mod":
            return sympy.Mod(x, y) if isinstance(x, sympy.Basic) or \
                isinstance(y, sympy.Basic) else x % y
        if op in ("Max", "Min"):
            return (sympy.Max if op == "Max" else sympy.Min)(x, y)
        return _sym_cmp(x, y, {"Equal": "eq", "Less": "lt", "LessOrEqual": "le",
                                "Greater": "gt", "GreaterOrEqual": "ge"}[op])
    return _map_objects(f, a, b)


def _map_objects(fn: Any, *arrs: np.ndarray) -> np.ndarray:
    """``fn`` elementwise over (broadcast) object arrays, always an object ndarray: numpy's
    ufuncs return a bare Python/sympy scalar for 0-d inputs (a shape scalar such as
    ``Cast(Gather(Shape(x), 1))``)."""
    res = np.frompyfunc(fn, len(arrs), 1)(*arrs)
    out = np.empty(np.broadcast_shapes(*(np.shape(a) for a in arrs)), dtype=object)
    out[...] = res
    return out


# ----------------------------------------------------------------------------- elementwise
_UNARY = {
    "Abs": "abs", "Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Sin": "sin", "Cos": "cos", "Tan": "tan", "Tanh": "tanh",
    "Sigmoid": "sigmoid", "Relu": "relu", "Erf": "erf", "Floor": "floor", "Ceil": "ceil",
    "Sign": "sign", "Atan": "atan", "Asin": "asin", "Acos": "acos", "Sinh": "sinh",
    "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh",
    "HardSwish": "hardswish", "Mish": "mish", "Not": "logical_not", "IsNaN": "isnan",
    "Round": "round", "BitwiseNot": "bitwise_not", "Softplus": "softplus",
}


@_handles(*_UNARY)
def _unary(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    if isinstance(x, SymArray) and node.op_type in ("Neg", "Abs", "Floor", "Ceil", "Sqrt"):
        fn = {"Neg": lambda e: -e, "Abs": abs, "Floor": sympy.floor, "Ceil": sympy.ceiling,
              "Sqrt": sympy.sqrt}[node.op_type]
        return [cx.from_known(_map_objects(lambda e: fn(_py(e)), x.arr), x.dtype)]
    if node.op_type == "Not" and isinstance(x, SymArray):
        return [cx.from_known(_map_objects(lambda e: not e, x.arr), "bool")]
    return [cx.op(_UNARY[node.op_type], [x])]


@_handles("Identity", "Dropout")
def _identity(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    if node.op_type == "Dropout":
        if len(ins) > 2 and ins[2] is not None and any(cx.ints(ins[2], "training_mode")):
            ratio = cx.floats(ins[1], "ratio")[0] if len(ins) > 1 and ins[1] is not None \
                else 0.5
            if ratio != 0.0:
                raise _Unsupported("random Dropout in training mode")
        if len(node.output) > 1 and node.output[1]:
            mask = cx.op("full", [], shape=cx.shape(ins[0]), value=True, dtype="bool")
            return [ins[0], mask]
    return [ins[0]]


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "eq",
           "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge",
           "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
           "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor"}


def _binary_known(cx: _Importer, op: str, a: Item, b: Item) -> Known | None:
    if not (isinstance(a, SymArray) or isinstance(b, SymArray)):
        return None
    ka, kb = cx.known(a), cx.known(b)
    if ka is None or kb is None:
        return None
    dt = cx.dtype(a)
    out_dt = "bool" if op in ("Equal", "Less", "LessOrEqual", "Greater",
                              "GreaterOrEqual") else dt
    try:
        return cx.from_known(_sym_binary(op, ka, kb, dt), out_dt)
    except _Undecidable:
        return None


@_handles(*_BINARY, "Mod", "Pow")
def _binary(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    a, b = ins[0], ins[1]
    op = node.op_type
    k = _binary_known(cx, op, a, b) if op in ("Add", "Sub", "Mul", "Div", "Mod", "Equal",
                                              "Less", "LessOrEqual", "Greater",
                                              "GreaterOrEqual") else None
    if k is not None:
        return [k]
    dt = cx.dtype(a)
    is_int = dt not in ("float32", "float64", "float16", "bfloat16")
    if op == "Div" and is_int and dt != "bool":
        return [cx.op("div", [a, b], rounding_mode="trunc")]
    if op == "Mod":
        fmod = at.get("fmod", 0)
        return [cx.op("fmod" if fmod else "remainder", [a, b])]
    if op == "Pow":
        y = cx.op("pow", [a, b])
        return [y if cx.dtype(y) == dt else cx.op("cast", [y], dtype=dt)]
    return [cx.op(_BINARY[op], [a, b])]


@_handles("Max", "Min", "Sum", "Mean")
def _variadic(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    op = node.op_type
    ir = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}[op]
    acc = ins[0]
    for x in ins[1:]:
        k = _binary_known(cx, op, acc, x) if op in ("Max", "Min") else None
        if op == "Sum" and k is None:
            k = _binary_known(cx, "Add", acc, x)
        acc = k if k is not None else cx.op(ir, [acc, x])
    if op == "Mean" and len(ins) > 1:
        acc = cx.op("div", [acc, cx.scalar(len(ins), cx.dtype(acc))])
    elif len(ins) == 1:
        acc = cx.op("add", [acc, cx.scalar(0, cx.dtype(acc))]) if op == "Mean" else acc
    return [acc]


@_handles("Where")
def _where(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    c, x, y = ins
    if any(isinstance(v, SymArray) for v in ins):
        kc, kx, ky = cx.known(c), cx.known(x), cx.known(y)
        if kc is not None and kx is not None and ky is not None:
            return [cx.from_known(np.where(kc.astype(bool), kx, ky).astype(object), cx.dtype(x))]
    return [cx.op("where", [c, x, y])]


@_handles("Cast", "CastLike")
def _cast(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    to = at.get("to") if node.op_type == "Cast" else None
    dt = ONNX_DTYPES.get(to) if to is not None else cx.dtype(ins[1])
    if dt is None:
        raise _Unsupported(f"cast to {_dtype_str(to)}")
    x = ins[0]
    if isinstance(x, SymArray):
        if dt in ("float32", "float64", "float16", "bfloat16") or dt.startswith("int"):
            fn = (lambda e: e) if dt.startswith("float") or dt == "bfloat16" else (
                lambda e: sympy.floor(e) if isinstance(e, sympy.Basic) and not e.is_integer
                else e)
            return [SymArray(_map_objects(fn, x.arr), dt)]
    if cx.dtype(x) == dt:
        return [x]
    return [cx.op("cast", [x], dtype=dt)]


@_handles("Clip")
def _clip(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    if cx.opset < 11:
        lo, hi = at.get("min"), at.get("max")
        return [cx.op("clamp", [x], min=lo, max=hi)]
    lo_i, hi_i = cx.opt_input(ins, 1), cx.opt_input(ins, 2)
    is_int = cx.dtype(x) not in ("float32", "float64", "float16", "bfloat16")
    conv = int if is_int else float
    lo = hi = None
    y = x
    if lo_i is not None:
        if cx.known(lo_i) is not None:
            lo = conv(cx.known(lo_i).reshape(-1)[0])
        else:
            y = cx.op("maximum", [y, lo_i])
    if hi_i is not None:
        if cx.known(hi_i) is not None:
            hi = conv(cx.known(hi_i).reshape(-1)[0])
        else:
            y = cx.op("minimum", [y, hi_i])
    if lo is not None and hi is not None and lo > hi:
        return [cx.op("clamp", [y], min=hi, max=hi)]
    if lo is None and hi is None:
        return [y]
    return [cx.op("clamp", [y], min=lo, max=hi)]


@_handles("LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "HardSigmoid", "PRelu",
          "Softsign", "Gelu", "Shrink")
def _activation(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    op = node.op_type
    dt = cx.dtype(x)
    if op == "LeakyRelu":
        return [cx.op("leaky_relu", [x], negative_slope=at.get("alpha", 0.01))]
    if op == "Elu":
        return [cx.op("elu", [x], alpha=at.get("alpha", 1.0))]
    if op == "Selu":
        y = cx.op("elu", [x], alpha=at.get("alpha", 1.67326319217681884765625))
        return [cx.op("mul", [y, cx.scalar(at.get("gamma", 1.05070102214813232421875), dt)])]
    if op == "Celu":
        alpha = at.get("alpha", 1.0)
        y = cx.op("elu", [cx.op("div", [x, cx.scalar(alpha, dt)])], alpha=1.0)
        return [cx.op("mul", [y, cx.scalar(alpha, dt)])]
    if op == "ThresholdedRelu":
        m = cx.op("gt", [x, cx.scalar(at.get("alpha", 1.0), dt)])
        return [cx.op("where", [m, x, cx.scalar(0, dt)])]
    if op == "HardSigmoid":
        y = cx.op("add", [cx.op("mul", [x, cx.scalar(at.get("alpha", 0.2), dt)]),
                          cx.scalar(at.get("beta", 0.5), dt)])
        return [cx.op("clamp", [y], min=0.0, max=1.0)]
    if op == "PRelu":
        neg = cx.op("lt", [x, cx.scalar(0, dt)])
        return [cx.op("where", [neg, cx.op("mul", [x, ins[1]]), x])]
    if op == "Softsign":
        return [cx.op("div", [x, cx.op("add", [cx.op("abs", [x]), cx.scalar(1, dt)])])]
    if op == "Shrink":
        lambd, bias = at.get("lambd", 0.5), at.get("bias", 0.0)
        lo = cx.op("lt", [x, cx.scalar(-lambd, "float32")])
        hi = cx.op("gt", [x, cx.scalar(lambd, "float32")])
        xf = cx.op("cast", [x], dtype="float64")
        y = cx.op("where", [lo, cx.op("add", [xf, cx.scalar(bias, "float64")]),
                            cx.op("where", [hi, cx.op("sub", [xf, cx.scalar(bias, "float64")]),
                                            cx.scalar(0, "float64")])])
        return [cx.op("cast", [y], dtype=dt)]
    return [cx.op("gelu", [x], approximate=at.get("approximate", "none"))]


@_handles("IsInf")
def _isinf(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    return [cx.op("isinf", [ins[0]], detect_positive=bool(at.get("detect_positive", 1)),
                  detect_negative=bool(at.get("detect_negative", 1)))]


# ----------------------------------------------------------------------------- softmax
@_handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    axis = cx.norm_axis(at.get("axis", -1 if cx.opset >= 13 else 1), r)
    shape = cx.shape(x)
    if cx.opset < 13 and axis != r - 1:
        x = cx.reshape(x, (_prod(shape[:axis]), _prod(shape[axis:])))
        axis = 1
    if node.op_type == "Hardmax":
        depth = cx.shape(x)[axis]
        if not isinstance(depth, int):
            raise _Unsupported("Hardmax over a symbolic axis")
        idx = cx.op("argmax", [x], dim=axis, keepdim=False)
        y = cx.op("one_hot", [idx], depth=depth, dim=axis, dtype=cx.dtype(x))
    else:
        y = cx.op("softmax" if node.op_type == "Softmax" else "log_softmax", [x], dim=axis)
    return [cx.reshape(y, shape)]


def _prod(dims: Sequence) -> Any:
    p: Any = 1
    for d in dims:
        p = p * d
    return _py(p)


# ----------------------------------------------------------------------------- reductions
_REDUCE = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "amax", "ReduceMin": "amin",
           "ReduceProd": "prod", "ReduceL1": "l1", "ReduceL2": "l2", "ReduceLogSum": "logsum",
           "ReduceLogSumExp": "logsumexp", "ReduceSumSquare": "sumsquare"}


@_handles(*_REDUCE)
def _reduce(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    keep = bool(at.get("keepdims", 1))
    axes_from_input = cx.opset >= 18 or (node.op_type == "ReduceSum" and cx.opset >= 13)
    if axes_from_input:
        ax_in = cx.opt_input(ins, 1)
        axes = cx.ints(ax_in, "axes") if ax_in is not None else []
    else:
        axes = list(at.get("axes", []))
    if not axes:
        if at.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(r))
    axes = sorted({cx.norm_axis(a, r) for a in axes})
    kind = _REDUCE[node.op_type]
    if any(cx.shape(x)[a] == 0 for a in axes):
        return [_empty_reduce(cx, x, kind, axes, keep)]
    if isinstance(x, SymArray) and kind in ("sum", "prod", "amax", "amin"):
        fn = {"sum": np.sum, "prod": np.prod}.get(kind)
        arr = x.arr
        if fn is not None:
            red = fn(arr, axis=tuple(axes), keepdims=keep)
            return [cx.from_known(np.asarray(red, dtype=object), x.dtype)]
    dt = cx.dtype(x)
    if kind in ("sum", "mean", "amax", "amin", "prod"):
        y = cx.op(kind, [x], dims=tuple(axes), keepdim=keep)
    elif kind == "l1":
        y = cx.op("sum", [cx.op("abs", [x])], dims=tuple(axes), keepdim=keep)
    elif kind in ("l2", "sumsquare"):
        y = cx.op("sum", [cx.op("mul", [x, x])], dims=tuple(axes), keepdim=keep)
        if kind == "l2":
            y = cx.op("sqrt", [y])
    elif kind == "logsum":
        y = cx.op("log", [cx.op("sum", [x], dims=tuple(axes), keepdim=keep)])
    else:
        m = cx.op("amax", [x], dims=tuple(axes), keepdim=True)
        m = cx.op("where", [cx.op("isinf", [m]), cx.scalar(0, dt), m])
        s = cx.op("sum", [cx.op("exp", [cx.op("sub", [x, m])])], dims=tuple(axes), keepdim=keep)
        m2 = m if keep else cx.reshape(m, [d for i, d in enumerate(cx.shape(m)) if i not in axes])
        y = cx.op("add", [cx.op("log", [s]), m2])
    if cx.dtype(y) != dt:
        y = cx.op("cast", [y], dtype=dt)
    return [y]


def _empty_reduce(cx: _Importer, x: Item, kind: str, axes: Sequence[int], keep: bool) -> Item:
    dt = cx.dtype(x)
    flt = dt.startswith("float") or dt == "bfloat16"
    if dt == "bool":
        lo, hi = False, True
    elif flt:
        lo, hi = float("-inf"), float("inf")
    else:
        info = torch.iinfo(to_torch_dtype(dt))
        lo, hi = info.min, info.max
    value = {"sum": 0, "l1": 0, "l2": 0, "sumsquare": 0, "prod": 1, "amax": lo, "amin": hi,
             "mean": float("nan"), "logsum": float("-inf"), "logsumexp": float("-inf")}[kind]
    shape = [(1 if keep else None) if i in axes else d for i, d in enumerate(cx.shape(x))]
    return cx.op("full", [], shape=tuple(d for d in shape if d is not None), value=value,
                 dtype=dt)


@_handles("ArgMax", "ArgMin")
def _argmax(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    axis = cx.norm_axis(at.get("axis", 0), r)
    keep = bool(at.get("keepdims", 1))
    op = "argmax" if node.op_type == "ArgMax" else "argmin"
    if at.get("select_last_index", 0):
        n = cx.shape(x)[axis]
        if not isinstance(n, int):
            raise _Unsupported("select_last_index over a symbolic axis")
        i = cx.op(op, [cx.op("flip", [x], dims=(axis,))], dim=axis, keepdim=keep)
        return [cx.op("sub", [cx.scalar(n - 1, "int64"), i])]
    return [cx.op(op, [x], dim=axis, keepdim=keep)]


@_handles("CumSum")
def _cumsum(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    axis = cx.norm_axis(cx.ints(ins[1], "axis")[0], cx.rank(x))
    if at.get("reverse", 0):
        x = cx.op("flip", [x], dims=(axis,))
    y = cx.op("cumsum", [x], dim=axis)
    if at.get("exclusive", 0):
        y = cx.op("sub", [y, x])
    if cx.dtype(y) != cx.dtype(ins[0]):
        y = cx.op("cast", [y], dtype=cx.dtype(ins[0]))
    if at.get("reverse", 0):
        y = cx.op("flip", [y], dims=(axis,))
    return [y]


@_handles("TopK")
def _topk(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    k = at["k"] if cx.opset < 10 else cx.ints(ins[1], "k")[0]
    axis = cx.norm_axis(at.get("axis", -1), cx.rank(x))
    # a stable sort then the first k: ties keep the lower index first, as ONNX requires
    v, i = cx.op_n("sort", [x], dim=axis, descending=bool(at.get("largest", 1)))
    return [cx.op("slice", [v], dim=axis, start=0, end=k),
            cx.op("slice", [i], dim=axis, start=0, end=k)]


# ----------------------------------------------------------------------------- linear algebra
@_handles("MatMul")
def _matmul(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    return [cx.op("matmul", ins[:2])]


@_handles("Gemm")
def _gemm(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    a, b = ins[0], ins[1]
    c = cx.opt_input(ins, 2)
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transA", 0):
        a = cx.op("permute", [a], perm=(1, 0))
    n = cx.shape(b)[0 if at.get("transB", 0) else 1]
    dt = cx.dtype(a)
    if at.get("transB", 0) and alpha == 1.0 and (c is None or (
            beta == 1.0 and cx.rank(c) == 1 and cx.shape(c)[0] == n)) and dt == cx.dtype(b):
        return [cx.op("linear", [a, b] + ([c] if c is not None else []))]
    if at.get("transB", 0):
        b = cx.op("permute", [b], perm=(1, 0))
    y = cx.op("matmul", [a, b])
    if alpha != 1.0:
        y = cx.op("mul", [y, cx.scalar(alpha, dt)])
    if c is not None:
        if beta != 1.0:
            c = cx.op("mul", [c, cx.scalar(beta, dt)])
        y = cx.op("add", [y, c])
    return [y]


@_handles("Einsum")
def _einsum(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    return [cx.op("einsum", ins, equation=at["equation"])]


# ----------------------------------------------------------------------------- conv / pool
def _spatial_pads(cx: _Importer, at: dict, in_sp: Sequence, k: Sequence[int],
                  st: Sequence[int], dl: Sequence[int]) -> tuple[list, list]:
    nsp = len(k)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(at.get("pads", [0] * (2 * nsp)))
        return pads[:nsp], pads[nsp:]
    if auto == "VALID":
        return [0] * nsp, [0] * nsp
    begins, ends = [], []
    for i in range(nsp):
        eff = (k[i] - 1) * dl[i] + 1
        if st[i] == 1:
            total = eff - 1
        elif isinstance(in_sp[i], int):
            total = max((-(-in_sp[i] // st[i]) - 1) * st[i] + eff - in_sp[i], 0)
        else:
            raise _Unsupported(f"auto_pad={auto} with stride {st[i]} on a symbolic dim")
        small = total // 2
        if auto == "SAME_UPPER":
            begins.append(small)
            ends.append(total - small)
        else:
            begins.append(total - small)
            ends.append(small)
    return begins, ends


def _pad_torch_order(begins: Sequence[int], ends: Sequence[int]) -> tuple[int, ...]:
    """ONNX begin/end pads for all dims -> torch F.pad order (last dim first), trimmed."""
    pads: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        pads += [b, e]
    while len(pads) > 2 and pads[-1] == 0 and pads[-2] == 0:
        pads = pads[:-2]
    return tuple(pads)


def _explicit_pad(cx: _Importer, x: Item, begins: Sequence[int], ends: Sequence[int],
                  value: float) -> Item:
    full_b = [0, 0] + list(begins)
    full_e = [0, 0] + list(ends)
    return cx.op("pad", [x], pads=_pad_torch_order(full_b, full_e), mode="constant",
                 value=value)


@_handles("Conv")
def _conv(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, w = ins[0], ins[1]
    bias = cx.opt_input(ins, 2)
    nsp = cx.rank(w) - 2
    k = [int(d) for d in cx.shape(w)[2:]]
    st = list(at.get("strides", [1] * nsp))
    dl = list(at.get("dilations", [1] * nsp))
    b, e = _spatial_pads(cx, at, cx.shape(x)[2:], k, st, dl)
    if b != e:
        x = _explicit_pad(cx, x, b, e, 0.0)
        b = [0] * nsp
    return [cx.op("conv", [x, w, bias], stride=tuple(st),
                  padding=tuple(b), dilation=tuple(dl), groups=at.get("group", 1))]


@_handles("ConvTranspose")
def _conv_transpose(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, w = ins[0], ins[1]
    bias = cx.opt_input(ins, 2)
    nsp = cx.rank(w) - 2
    k = [int(d) for d in cx.shape(w)[2:]]
    st = list(at.get("strides", [1] * nsp))
    dl = list(at.get("dilations", [1] * nsp))
    opad = list(at.get("output_padding", [0] * nsp))
    groups = at.get("group", 1)
    in_sp = cx.shape(x)[2:]
    full = [(in_sp[i] - 1) * st[i] + (k[i] - 1) * dl[i] + 1 for i in range(nsp)]
    auto = at.get("auto_pad", "NOTSET")
    if "output_shape" in at:
        out_shape = list(at["output_shape"])[-nsp:]
        total = [full[i] + opad[i] - out_shape[i] for i in range(nsp)]
        upper = auto != "SAME_LOWER"
        b = [t // 2 if upper else t - t // 2 for t in total]
        e = [t - bb for t, bb in zip(total, b)]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [full[i] + opad[i] - in_sp[i] * st[i] for i in range(nsp)]
        b = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        e = [t - bb for t, bb in zip(total, b)]
    elif auto == "VALID":
        b, e = [0] * nsp, [0] * nsp
    else:
        pads = list(at.get("pads", [0] * (2 * nsp)))
        b, e = pads[:nsp], pads[nsp:]
    simple = b == e and all(o < max(s, d) for o, s, d in zip(opad, st, dl)) and \
        all(p >= 0 for p in b)
    if simple:
        return [cx.op("conv_transpose", [x, w, bias],
                      stride=tuple(st), padding=tuple(b), dilation=tuple(dl),
                      output_padding=tuple(opad), groups=groups)]
    y = cx.op("conv_transpose", [x, w, None], stride=tuple(st), padding=0, dilation=tuple(dl),
              output_padding=0, groups=groups)
    for i in range(nsp):
        target = full[i] - b[i] - e[i] + opad[i]
        if b[i] > 0:
            y = cx.op("slice", [y], dim=2 + i, start=b[i])
            avail = full[i] - b[i]
        else:
            avail = full[i]
        if target <= avail:
            y = cx.op("slice", [y], dim=2 + i, start=0, end=target)
        else:
            pb = [0] * nsp
            pe = [0] * nsp
            pe[i] = target - avail
            y = _explicit_pad(cx, y, pb, pe, 0.0)
    if bias is not None:
        y = cx.op("add", [y, cx.reshape(bias, (cx.shape(bias)[0],) + (1,) * nsp)])
    return [y]


@_handles("MaxPool", "AveragePool", "LpPool")
def _pool(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    if node.op_type == "LpPool":
        raise _Unsupported("LpPool")
    want_idx = len(node.output) > 1 and bool(node.output[1])
    x = ins[0]
    k = list(at["kernel_shape"])
    nsp = len(k)
    st = list(at.get("strides", [1] * nsp))
    dl = list(at.get("dilations", [1] * nsp))
    ceil = bool(at.get("ceil_mode", 0))
    b, e = _spatial_pads(cx, at, cx.shape(x)[2:], k, st, dl)
    is_max = node.op_type == "MaxPool"
    fits = b == e and all(p <= ((kk - 1) * d + 1) // 2 for p, kk, d in zip(b, k, dl))
    if want_idx:
        if not fits:
            raise _Unsupported("MaxPool indices with asymmetric or large padding")
        return list(cx.op_n("max_pool_with_indices", [x], kernel=tuple(k), stride=tuple(st),
                            padding=tuple(b), dilation=tuple(dl), ceil_mode=ceil,
                            storage_order=at.get("storage_order", 0)))
    if is_max:
        if not fits:
            dt = cx.dtype(x)
            lowest = float("-inf") if dt.startswith("float") or dt == "bfloat16" else \
                float(torch.iinfo(to_torch_dtype(dt)).min)
            x = _explicit_pad(cx, x, b, e, lowest)
            b = [0] * nsp
        return [cx.op("max_pool", [x], kernel=tuple(k), stride=tuple(st), padding=tuple(b),
                      dilation=tuple(dl), ceil_mode=ceil)]
    include = bool(at.get("count_include_pad", 0))
    if any(d != 1 for d in dl):
        return [_avg_pool_conv(cx, x, k, st, dl, b, e, ceil, include)]
    if fits:
        return [cx.op("avg_pool", [x], kernel=tuple(k), stride=tuple(st), padding=tuple(b),
                      ceil_mode=ceil, count_include_pad=include)]
    xp = _explicit_pad(cx, x, b, e, 0.0)
    y = cx.op("avg_pool", [xp], kernel=tuple(k), stride=tuple(st), padding=0, ceil_mode=ceil,
              count_include_pad=True)
    if include:
        return [y]
    ones = cx.op("full", [], shape=cx.shape(x), value=1.0, dtype=cx.dtype(x))
    frac = cx.op("avg_pool", [_explicit_pad(cx, ones, b, e, 0.0)], kernel=tuple(k),
                 stride=tuple(st), padding=0, ceil_mode=ceil, count_include_pad=True)
    return [cx.op("div", [y, frac])]


def _avg_pool_conv(cx: _Importer, x: Item, k: list, st: list, dl: list, b: list, e: list,
                   ceil: bool, include: bool) -> Item:
    """Average pooling as a depthwise conv with a ones kernel (dilations, ceil mode)."""
    shape = cx.shape(x)
    c, sp = shape[1], shape[2:]
    if not isinstance(c, int) or not all(isinstance(d, int) for d in sp):
        raise _Unsupported("dilated AveragePool on symbolic dims")
    extra = []
    for i, n_in in enumerate(sp):
        n = n_in + b[i] + e[i]
        eff = (k[i] - 1) * dl[i] + 1
        out = (n - eff) // st[i] + 1
        if ceil:
            out = -(-(n - eff) // st[i]) + 1
            if (out - 1) * st[i] >= n_in + b[i]:
                out -= 1
        extra.append(max((out - 1) * st[i] + eff - n, 0))
    ends = [ee + ex for ee, ex in zip(e, extra)]
    dt = cx.dtype(x)
    w = torch.ones((c, 1, *k), dtype=to_torch_dtype(dt))
    conv = dict(stride=tuple(st), padding=0, dilation=tuple(dl), groups=c)
    total = cx.op("conv", [_explicit_pad(cx, x, b, ends, 0.0), w, None], **conv)
    if include:
        ones = torch.ones((1, c, *[n + bb + ee for n, bb, ee in zip(sp, b, e)]),
                          dtype=to_torch_dtype(dt))
        mask = _explicit_pad(cx, ones, [0] * len(sp), extra, 0.0)
    else:
        mask = _explicit_pad(cx, torch.ones((1, c, *sp), dtype=to_torch_dtype(dt)), b, ends, 0.0)
    count = cx.op("conv", [mask, w, None], **conv)
    return cx.op("div", [total, count])


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    dims = tuple(range(2, cx.rank(x)))
    op = "mean" if node.op_type == "GlobalAveragePool" else "amax"
    return [cx.op(op, [x], dims=dims, keepdim=True)]


# ----------------------------------------------------------------------------- norms
@_handles("BatchNormalization")
def _batch_norm(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, scale, bias, mean, var = ins[:5]
    if at.get("training_mode", 0):
        dims = tuple(i for i in range(cx.rank(x)) if i != 1)
        momentum = at.get("momentum", 0.9)
        dt = cx.dtype(mean)
        bm = cx.op("mean", [x], dims=dims, keepdim=False)
        bv = cx.op("var", [x], dims=dims, keepdim=False, correction=0)
        y = cx.op("batch_norm", [x, bm, bv, scale, bias], eps=at.get("epsilon", 1e-5))
        rm = cx.op("add", [cx.op("mul", [mean, cx.scalar(momentum, dt)]),
                           cx.op("mul", [bm, cx.scalar(1 - momentum, dt)])])
        rv = cx.op("add", [cx.op("mul", [var, cx.scalar(momentum, dt)]),
                           cx.op("mul", [bv, cx.scalar(1 - momentum, dt)])])
        return [y, rm, rv]
    if len(node.output) > 1 and any(node.output[1:]):
        raise _Unsupported("BatchNormalization statistics outputs outside training mode")
    return [cx.op("batch_norm", [x, mean, var, scale, bias], eps=at.get("epsilon", 1e-5))]


@_handles("LayerNormalization", "RMSNormalization")
def _layer_norm(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    scale, bias = cx.opt_input(ins, 1), cx.opt_input(ins, 2)
    r = cx.rank(x)
    axis = cx.norm_axis(at.get("axis", -1), r)
    eps = at.get("epsilon", 1e-5)
    norm_shape = cx.shape(x)[axis:]
    n_axes = r - axis
    rms = node.op_type == "RMSNormalization"
    dims = tuple(range(axis, r))
    dt = cx.dtype(x)
    stash = ONNX_DTYPES.get(at.get("stash_type", 1), "float32")
    direct = (scale is None or cx.shape(scale) == norm_shape) and \
        (bias is None or cx.shape(bias) == norm_shape) and \
        (rms or len(node.output) == 1 or not any(node.output[1:])) and \
        (stash == "float32" or dt == stash)
    if direct:
        if rms:
            return [cx.op("rms_norm", [x] + ([scale] if scale is not None else []),
                          axes=n_axes, eps=eps)]
        return [cx.op("layer_norm", [x, scale, bias], axes=n_axes, eps=eps)]
    xs = cx.op("cast", [x], dtype=stash) if dt != stash else x
    if rms:
        ms = cx.op("mean", [cx.op("mul", [xs, xs])], dims=dims, keepdim=True)
        inv = cx.op("rsqrt", [cx.op("add", [ms, cx.scalar(eps, stash)])])
        y = cx.op("mul", [xs, inv])
        mean = None
    else:
        mean = cx.op("mean", [xs], dims=dims, keepdim=True)
        d = cx.op("sub", [xs, mean])
        var = cx.op("mean", [cx.op("mul", [d, d])], dims=dims, keepdim=True)
        inv = cx.op("rsqrt", [cx.op("add", [var, cx.scalar(eps, stash)])])
        y = cx.op("mul", [d, inv])
    if dt != stash:
        y = cx.op("cast", [y], dtype=dt)
    if scale is not None:
        y = cx.op("mul", [y, scale])
    if bias is not None:
        y = cx.op("add", [y, bias])
    return [y, mean, inv]


@_handles("InstanceNormalization", "GroupNormalization")
def _group_norm(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, scale, bias = ins[0], ins[1], ins[2]
    c = cx.shape(x)[1]
    eps = at.get("epsilon", 1e-5)
    if node.op_type == "InstanceNormalization":
        if not isinstance(c, int):
            raise _Unsupported("InstanceNormalization with a symbolic channel count")
        return [cx.op("group_norm", [x, scale, bias], groups=c, eps=eps)]
    groups = at["num_groups"]
    if cx.shape(scale)[0] != c:  # opset 18: per-group scale and bias
        if not isinstance(c, int):
            raise _Unsupported("GroupNormalization with a symbolic channel count")
        idx = torch.arange(c) // (c // groups)
        scale = cx.op("index_select", [scale, idx], dim=0)
        bias = cx.op("index_select", [bias, idx], dim=0)
    return [cx.op("group_norm", [x, scale, bias], groups=groups, eps=eps)]


@_handles("LpNormalization", "MeanVarianceNormalization")
def _lp_norm(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    dt = cx.dtype(x)
    if node.op_type == "MeanVarianceNormalization":
        dims = tuple(cx.norm_axis(a, cx.rank(x)) for a in at.get("axes", [0, 2, 3]))
        mean = cx.op("mean", [x], dims=dims, keepdim=True)
        d = cx.op("sub", [x, mean])
        var = cx.op("mean", [cx.op("mul", [d, d])], dims=dims, keepdim=True)
        return [cx.op("div", [d, cx.op("add", [cx.op("sqrt", [var]), cx.scalar(1e-9, dt)])])]
    axis = cx.norm_axis(at.get("axis", -1), cx.rank(x))
    p = at.get("p", 2)
    if p == 1:
        n = cx.op("sum", [cx.op("abs", [x])], dims=(axis,), keepdim=True)
    else:
        n = cx.op("sqrt", [cx.op("sum", [cx.op("mul", [x, x])], dims=(axis,), keepdim=True)])
    zero = cx.op("eq", [n, cx.scalar(0, dt)])
    return [cx.op("where", [zero, cx.scalar(0, dt),
                            cx.op("div", [x, cx.op("where", [zero, cx.scalar(1, dt), n])])])]


# ----------------------------------------------------------------------------- shapes
@_handles("Shape")
def _shape(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    shape = list(cx.shape(ins[0]))
    r = len(shape)
    start = at.get("start", 0)
    end = at.get("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return [cx.from_known(np.array(shape[start:end], dtype=object).reshape(-1), "int64")]


@_handles("Size")
def _size(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    return [cx.from_known(np.array(_prod(cx.shape(ins[0])), dtype=object), "int64")]


@_handles("Constant")
def _constant(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    if "value" in at:
        return [_tensor_attr(cx, at["value"])]
    for key, dt in (("value_float", "float32"), ("value_int", "int64")):
        if key in at:
            return [torch.tensor(at[key], dtype=to_torch_dtype(dt))]
    for key, dt in (("value_floats", "float32"), ("value_ints", "int64")):
        if key in at:
            return [torch.tensor(list(at[key]), dtype=to_torch_dtype(dt))]
    raise _Unsupported(f"Constant with attribute(s) {sorted(at)}")


@_handles("ConstantOfShape")
def _constant_of_shape(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    shape = cx.dims(ins[0], "shape")
    val = _tensor_attr(cx, at["value"]) if "value" in at else torch.zeros(1)
    v = val.reshape(-1)[0].item()
    if all(isinstance(d, int) for d in shape) and math.prod(shape) > FULL_MAX_ELEMENTS:
        raise FrontendError(f"ONNX node '{node.name or '?'}' (ConstantOfShape): a constant of "
                            f"{math.prod(shape)} elements (at most {FULL_MAX_ELEMENTS})")
    return [cx.op("full", [], shape=tuple(shape), value=v, dtype=_dtype_name(val.dtype))]


@_handles("Range")
def _range(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    dt = cx.dtype(ins[0])
    vals = [cx.known(i) for i in ins]
    if any(v is None for v in vals):
        raise _Unsupported("Range with run-time start/limit/delta")
    s, e, d = (_py(v.reshape(-1)[0]) for v in vals)  # type: ignore[union-attr]
    if all(isinstance(x, int | float) for x in (s, e, d)):
        if d == 0:
            raise _Unsupported("Range with delta 0")
        n = max(int(math.ceil((e - s) / d)), 0)
        _check_fold(node, n)
        t = torch.arange(n, dtype=torch.float64) * d + s
        return [t.to(to_torch_dtype(dt))]
    return [cx.op("arange", [], start=s, end=e, step=d, dtype=dt)]


def _reshape_target(cx: _Importer, x: Item, shape: list, allowzero: bool) -> list:
    in_shape = cx.shape(x)
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d == 0 and not allowzero:
            out.append(in_shape[i])
        else:
            out.append(d)
    if sum(1 for d in out if isinstance(d, int) and d == -1) == 1:
        known = _prod([d for d in out if not (isinstance(d, int) and d == -1)])
        total = _prod(in_shape)
        if isinstance(known, int) and known == 0:
            raise ValueError("reshape: -1 with a zero-sized target")
        rest = _py(sympy.sympify(total) / known)
        out = [rest if isinstance(d, int) and d == -1 else d for d in out]
    return out


@_handles("Reshape")
def _reshape(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    shape = list(at["shape"]) if cx.opset < 5 else cx.dims(ins[1], "Reshape target shape")
    return [cx.reshape(x, _reshape_target(cx, x, shape, bool(at.get("allowzero", 0))))]


@_handles("Flatten")
def _flatten(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    shape = cx.shape(x)
    r = len(shape)
    axis = at.get("axis", 1)
    axis = axis + r if axis < 0 else axis
    return [cx.reshape(x, (_prod(shape[:axis]), _prod(shape[axis:])))]


@_handles("Squeeze", "Unsqueeze")
def _squeeze(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    shape = list(cx.shape(x))
    if cx.opset >= 13:
        axes_in = cx.opt_input(ins, 1)
        axes = cx.ints(axes_in, "axes") if axes_in is not None else None
    else:
        axes = at.get("axes")
    if node.op_type == "Squeeze":
        if axes is None:
            if not all(isinstance(d, int) for d in shape):
                raise _Unsupported("Squeeze without axes on symbolic dims")
            new = [d for d in shape if d != 1]
        else:
            ax = {cx.norm_axis(a, len(shape)) for a in axes}
            new = [d for i, d in enumerate(shape) if i not in ax]
    else:
        out_r = len(shape) + len(axes or [])
        ax = sorted(a % out_r for a in (axes or []))
        new = list(shape)
        for a in ax:
            new.insert(a, 1)
    return [cx.reshape(x, new)]


@_handles("Transpose")
def _transpose(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    perm = list(at.get("perm", reversed(range(cx.rank(x)))))
    if isinstance(x, SymArray):
        return [SymArray(x.arr.transpose(perm), x.dtype)]
    return [cx.op("permute", [x], perm=tuple(perm))]


@_handles("Concat")
def _concat(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    xs = [i for i in ins if i is not None]
    r = cx.rank(xs[0])
    axis = cx.norm_axis(at["axis"], r)
    if any(isinstance(i, SymArray) for i in xs) and all(cx.known(i) is not None for i in xs):
        arr = np.concatenate([cx.known(i) for i in xs], axis=axis)
        return [cx.from_known(arr, cx.dtype(xs[0]))]
    xs = [i for i in xs if cx.shape(i)[axis] != 0] or xs[:1]
    if len(xs) == 1:
        return [xs[0]]
    return [cx.op("concat", xs, dim=axis)]


@_handles("Split")
def _split(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    axis = cx.norm_axis(at.get("axis", 0), r)
    n_out = len(node.output)
    split_in = cx.opt_input(ins, 1) if cx.opset >= 13 else None
    sizes = cx.ints(split_in, "split") if split_in is not None else list(at.get("split", []))
    dim = cx.shape(x)[axis]
    if not sizes:
        if not isinstance(dim, int):
            if "num_outputs" in at or n_out:
                sizes_sym = [_py(sympy.sympify(dim) / n_out)] * n_out
                return _split_by(cx, x, axis, sizes_sym)
        n = at.get("num_outputs", n_out)
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return _split_by(cx, x, axis, sizes)


def _split_by(cx: _Importer, x: Item, axis: int, sizes: Sequence) -> list:
    outs = []
    start: Any = 0
    for s in sizes:
        end = _py(sympy.sympify(start) + s)
        if isinstance(x, SymArray):
            idx = [slice(None)] * x.arr.ndim
            idx[axis] = slice(int(start), int(end))
            outs.append(cx.from_known(x.arr[tuple(idx)], x.dtype))
        else:
            outs.append(cx.op("slice", [x], dim=axis, start=start, end=end))
        start = end
    return outs


def _slice_params(cx: _Importer, n: Any, start: Any, end: Any, step: int) -> tuple:
    if isinstance(n, int) and isinstance(start, int) and isinstance(end, int):
        if step > 0:
            s = min(max(start + n if start < 0 else start, 0), n)
            e = min(max(end + n if end < 0 else end, 0), n)
        else:
            s = min(max(start + n if start < 0 else start, -1), n - 1)
            e = min(max(end + n if end < 0 else end, -1), n - 1)
        return s, e
    if step < 0:
        raise _Unsupported("Slice with a negative step on a symbolic dim or bound")

    def bound(v: Any, is_end: bool) -> Any:
        if isinstance(v, int):
            if is_end and v >= BIG // 2:
                return BIG
            if v >= 0:
                return min(v, n) if isinstance(n, int) else v
            return max(v + n, 0) if isinstance(n, int) else _py(n + v)
        # a symbolic bound (x[:, :seq] on a static table): torch.export-style in-range use
        if v.is_negative:
            return _py(n + v)
        if v.is_nonnegative:
            return v
        raise _Unsupported(f"Slice bound {v} of unknown sign")

    return bound(start, False), bound(end, True)


@_handles("Slice")
def _slice(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    if cx.opset < 10:
        starts, ends = list(at["starts"]), list(at["ends"])
        axes = list(at.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = cx.dims(ins[1], "starts"), cx.dims(ins[2], "ends")
        axes_in, steps_in = cx.opt_input(ins, 3), cx.opt_input(ins, 4)
        axes = cx.ints(axes_in, "axes") if axes_in is not None else list(range(len(starts)))
        steps = cx.ints(steps_in, "steps") if steps_in is not None else [1] * len(starts)
    shape = cx.shape(x)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = cx.norm_axis(ax, r)
        if sp == 0:
            raise ValueError("Slice step 0")
        n = cx.shape(x)[ax] if not isinstance(x, SymArray) else x.arr.shape[ax]
        s, e = _slice_params(cx, n, st, en, sp)
        if isinstance(x, SymArray):
            if not (isinstance(s, int) and isinstance(e, int)):
                raise _Unsupported("Slice of an import-time array at a symbolic bound")
            idx = [slice(None)] * x.arr.ndim
            idx[ax] = slice(s, e if e >= 0 else None, sp)
            x = SymArray(x.arr[tuple(idx)], x.dtype)
            continue
        if sp > 0:
            if s == 0 and (e == BIG or e == shape[ax]) and sp == 1:
                continue
            x = cx.op("slice", [x], dim=ax, start=s, end=e, step=sp)
        else:  # flip, then a forward slice
            x = cx.op("flip", [x], dims=(ax,))
            x = cx.op("slice", [x], dim=ax, start=n - 1 - s, end=n - 1 - e, step=-sp)
    if isinstance(x, SymArray):
        return [cx.from_known(x.arr, x.dtype)]
    return [x]


@_handles("Gather")
def _gather(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, idx = ins[0], ins[1]
    r = cx.rank(x)
    axis = cx.norm_axis(at.get("axis", 0), r)
    kx, ki = cx.known(x), cx.known(idx)
    if isinstance(x, SymArray) and ki is not None:
        taken = np.take(kx, ki.astype(np.int64), axis=axis)
        return [cx.from_known(np.asarray(taken, dtype=object).reshape(np.shape(taken)), x.dtype)]
    n = cx.shape(x)[axis]
    if ki is not None and ki.ndim == 0:
        return [cx.op("select", [x], dim=axis, index=int(ki))]
    if ki is not None and isinstance(n, int):
        idx = torch.tensor(np.where(ki.astype(np.int64) < 0, ki.astype(np.int64) + n,
                                    ki.astype(np.int64)).reshape(ki.shape), dtype=torch.int64)
    elif isinstance(n, int) and ki is None:
        idx = cx.op("where", [cx.op("lt", [idx, cx.scalar(0, cx.dtype(idx))]),
                              cx.op("add", [idx, cx.scalar(n, cx.dtype(idx))]), idx])
    return [cx.op("index_select", [x, idx], dim=axis)]


@_handles("GatherElements")
def _gather_elements(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x, idx = ins[0], ins[1]
    axis = cx.norm_axis(at.get("axis", 0), cx.rank(x))
    n = cx.shape(x)[axis]
    if isinstance(n, int):
        idx = cx.op("where", [cx.op("lt", [idx, cx.scalar(0, cx.dtype(idx))]),
                              cx.op("add", [idx, cx.scalar(n, cx.dtype(idx))]), idx])
    if cx.dtype(idx) != "int64":
        idx = cx.op("cast", [idx], dtype="int64")
    return [cx.op("gather", [x, idx], dim=axis)]


@_handles("GatherND")
def _gather_nd(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    return [cx.op("gather_nd", ins[:2], batch_dims=at.get("batch_dims", 0))]


@_handles("ScatterElements", "Scatter", "ScatterND")
def _scatter(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    red = at.get("reduction", "none")
    if node.op_type == "ScatterND":
        return [cx.op("scatter_nd", ins[:3], reduction=red)]
    axis = cx.norm_axis(at.get("axis", 0), cx.rank(ins[0]))
    return [cx.op("scatter_elements", ins[:3], dim=axis, reduction=red)]


@_handles("OneHot")
def _one_hot(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    depth = cx.floats(ins[1], "depth")[0]
    vals = cx.known(ins[2])
    if vals is None:
        raise _Unsupported("OneHot with run-time values")
    off, on = (_py(v) for v in vals.reshape(-1))
    return [cx.op("one_hot", [ins[0]], depth=int(depth), dim=at.get("axis", -1), on=on,
                  off=off, dtype=cx.dtype(ins[2]))]


@_handles("Expand")
def _expand(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    shape = cx.dims(ins[1], "Expand shape")
    out = broadcast_shapes(cx.shape(x), shape)
    if isinstance(x, SymArray):
        _check_fold(node, math.prod(int(d) for d in out))
        return [cx.from_known(np.broadcast_to(x.arr, tuple(int(d) for d in out)).copy(),
                              x.dtype)]
    if tuple(out) == cx.shape(x):
        return [x]
    return [cx.op("expand", [x], shape=tuple(out))]


@_handles("Tile")
def _tile(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    reps = cx.dims(ins[1], "repeats")  # may be symbolic: x.repeat(batch, 1, 1)
    if isinstance(ins[0], SymArray):
        if not all(isinstance(r, int) for r in reps):
            raise _Unsupported("Tile of an import-time array by symbolic repeats")
        _check_fold(node, ins[0].arr.size * math.prod(max(int(r), 0) for r in reps))
        return [cx.from_known(np.tile(ins[0].arr, reps), ins[0].dtype)]
    return [cx.op("tile", [ins[0]], repeats=tuple(reps))]


@_handles("Pad")
def _pad(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    r = cx.rank(x)
    mode = at.get("mode", "constant")
    if cx.opset < 11:
        pads = list(at["pads"])
        value = at.get("value", 0.0)
        axes = list(range(r))
    else:
        pads = cx.ints(ins[1], "pads")
        cv = cx.opt_input(ins, 2)
        value = _py(cx.known(cv).reshape(-1)[0]) if cv is not None and \
            cx.known(cv) is not None and cx.known(cv).size else 0.0
        if cv is not None and cx.known(cv) is None:
            raise _Unsupported("Pad with a run-time constant_value")
        axes_in = cx.opt_input(ins, 3)
        axes = [cx.norm_axis(a, r) for a in cx.ints(axes_in, "axes")] if axes_in is not None \
            else list(range(r))
    na = len(axes)
    begins, ends = [0] * r, [0] * r
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[na + i]
    if not any(begins) and not any(ends):
        return [x]
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
             "wrap": "circular"}.get(mode)
    if tmode is None:
        raise _Unsupported(f"Pad mode '{mode}'")
    if tmode != "constant":
        first = next(i for i in range(r) if begins[i] or ends[i])
        if r - first > 3 or r - first >= r:
            raise _Unsupported(f"Pad mode '{mode}' on leading dims")
    return [cx.op("pad", [x], pads=_pad_torch_order(begins, ends), mode=tmode,
                  value=float(value) if tmode == "constant" else 0.0)]


@_handles("Trilu")
def _trilu(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    k_in = cx.opt_input(ins, 1)
    k = cx.ints(k_in, "k")[0] if k_in is not None else 0
    return [cx.op("triu" if at.get("upper", 1) else "tril", [ins[0]], diagonal=k)]


@_handles("DepthToSpace", "SpaceToDepth")
def _depth_space(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    bs = at["blocksize"]
    n, c, h, w = cx.shape(x)
    if not isinstance(c, int):
        raise _Unsupported(f"{node.op_type} with a symbolic channel count")
    if node.op_type == "DepthToSpace":
        if at.get("mode", "DCR") == "DCR":
            y = cx.reshape(x, (n, bs, bs, c // (bs * bs), h, w))
            y = cx.op("permute", [y], perm=(0, 3, 4, 1, 5, 2))
        else:
            y = cx.reshape(x, (n, c // (bs * bs), bs, bs, h, w))
            y = cx.op("permute", [y], perm=(0, 1, 4, 2, 5, 3))
        return [cx.reshape(y, (n, c // (bs * bs), _py(h * bs), _py(w * bs)))]
    y = cx.reshape(x, (n, c, _py(sympy.floor(sympy.sympify(h) / bs)), bs,
                       _py(sympy.floor(sympy.sympify(w) / bs)), bs))
    perm = (0, 3, 5, 1, 2, 4) if at.get("mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)
    y = cx.op("permute", [y], perm=perm)
    return [cx.reshape(y, (n, c * bs * bs, _py(sympy.floor(sympy.sympify(h) / bs)),
                           _py(sympy.floor(sympy.sympify(w) / bs))))]


# ----------------------------------------------------------------------------- resize
@_handles("Resize", "Upsample")
def _resize(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    x = ins[0]
    shape = list(cx.shape(x))
    r = len(shape)
    mode = at.get("mode", "nearest")
    legacy = node.op_type == "Upsample" or cx.opset < 11
    if legacy:
        ctm, nearest = "asymmetric", "floor"
        sc = at.get("scales") if "scales" in at else cx.floats(ins[1], "scales")
        roi_in = sizes_in = None
        scales: list[float] | None = [float(s) for s in sc]
        mode = {"bilinear": "linear"}.get(mode, mode)
    else:
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        nearest = at.get("nearest_mode", "round_prefer_floor")
        roi_in, sc_in = cx.opt_input(ins, 1), cx.opt_input(ins, 2)
        sizes_in = cx.opt_input(ins, 3)
        scales = cx.floats(sc_in, "scales") if sc_in is not None else None
        if scales is not None and not scales:
            scales = None
    axes = [cx.norm_axis(a, r) for a in at.get("axes", range(r))]
    # sizes may be symbolic (Concat(Shape(x)[:2], [h, w]) keeps a symbolic batch)
    sizes = cx.dims(sizes_in, "sizes") if sizes_in is not None else None
    if sizes is not None and not sizes:
        sizes = None
    roi = None
    if roi_in is not None and ctm == "tf_crop_and_resize":
        rv = cx.floats(roi_in, "roi")
        if rv:
            full = [0.0] * r + [1.0] * r
            for i, a in enumerate(axes):
                full[a], full[r + a] = rv[i], rv[len(axes) + i]
            roi = tuple(full)
    full_scales: list[float] | None = None
    out: list = list(shape)
    if sizes is not None:
        for i, a in enumerate(axes):
            out[a] = sizes[i]
        policy = at.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            if not all(isinstance(shape[a], int) and isinstance(sizes[i], int)
                       for i, a in enumerate(axes)):
                raise _Unsupported("keep_aspect_ratio_policy on symbolic dims")
            ratios = [sizes[i] / shape[a] for i, a in enumerate(axes)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            full_scales = [s if i in axes else 1.0 for i in range(r)]
            out = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
    elif scales is not None:
        full_scales = [1.0] * r
        for i, a in enumerate(axes):
            full_scales[a] = float(np.float32(scales[i]))
        for i in range(r):
            d = shape[i]
            if isinstance(d, int):
                out[i] = int(full_scales[i] * d)
            else:
                out[i] = _py(sympy.floor(d * sympy.Rational(full_scales[i])))
    else:
        raise ValueError("Resize needs scales or sizes")
    return [cx.op("resize", [x], sizes=tuple(out),
                  scales=tuple(full_scales) if full_scales is not None else None,
                  roi=roi, mode=mode, coordinate_transformation_mode=ctm,
                  nearest_mode=nearest, cubic_coeff_a=at.get("cubic_coeff_a", -0.75),
                  exclude_outside=bool(at.get("exclude_outside", 0)),
                  antialias=bool(at.get("antialias", 0)),
                  extrapolation_value=at.get("extrapolation_value", 0.0))]


# ----------------------------------------------------------------------------- control flow
@_handles("If")
def _if(cx: _Importer, node: onnx.NodeProto, ins: list, at: dict) -> list:
    cond = cx.known(ins[0])
    if cond is None:
        raise _Unsupported("If with a run-time condition")
    branch = at["then_branch"] if bool(_py(cond.reshape(-1)[0])) else at["else_branch"]
    for t in branch.initializer:
        cx.env[t.name] = cx._initializer(t)
    saved = (cx.loc, cx.node)
    cx._convert(branch.node)
    cx.loc, cx.node = saved
    return [cx.env[o.name] for o in branch.output]
