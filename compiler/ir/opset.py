"""Core op set: elementwise, reductions, linear algebra, convolution, norms, attention, shapes.

Semantics follow PyTorch (the references call torch), so the FX frontend maps ATen ops nearly
one to one and the ONNX frontend composes them. Every shape rule is symbolic (sympy dims).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from .ops import REQUIRED, OpDef, OpTypeError, register_op
from .shapes import Dim, dims_equal, floor_div, numel, simplify
from .types import TensorType, from_torch_dtype, is_float, to_torch_dtype

__all__ = ["broadcast_shapes", "promote", "check_types_equal", "BIG"]

BIG = 2**62  # slice ends at or above this mean "to the end"

Types = Sequence[TensorType | None]
Attrs = Mapping[str, Any]


# ----------------------------------------------------------------------------- helpers
def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        cur: Dim = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(cur, int) and cur == 1:
                cur = d
            elif not dims_equal(cur, d):
                if isinstance(cur, int) and isinstance(d, int):
                    raise OpTypeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                # symbolic vs other: assume equal at run time (checked by the runtime op)
                if isinstance(cur, int):
                    cur = d
        out.append(cur)
    return tuple(out)


def _meta(t: TensorType) -> torch.Tensor:
    return torch.empty((1,) * t.rank, dtype=to_torch_dtype(t.dtype), device="meta")


def promote(*types: TensorType) -> str:
    """Result dtype of torch's type promotion (0-d tensors count as scalars)."""
    metas = [_meta(t) for t in types]
    dt = metas[0].dtype
    if len(metas) > 1:
        dt = torch.result_type(metas[0], metas[1])
        for m in metas[2:]:
            dt = torch.promote_types(dt, m.dtype) if m.dim() else dt
    return from_torch_dtype(dt)


def _norm_dim(d: int, rank: int, op: str) -> int:
    r = max(rank, 1)
    if not -r <= d < r:
        raise OpTypeError(f"op '{op}': dim {d} out of range for rank {rank}")
    return d % r


def _t(types: Types, i: int, op: str) -> TensorType:
    t = types[i]
    if t is None:
        raise OpTypeError(f"op '{op}': input {i} is required")
    return t


def _opt(x: Sequence[Any], i: int) -> Any:
    """Optional trailing operand ``i`` (absent or None)."""
    return x[i] if len(x) > i else None


def _reg(name: str, infer: Any, ref: Any, attrs: dict | None = None, n: int | tuple = 1,
         traits: tuple[str, ...] = (), doc: str = "") -> None:
    lo, hi = (n, n) if isinstance(n, int) else n
    register_op(OpDef(name, infer, ref, attrs or {}, lo, hi, frozenset(traits), doc))


# ----------------------------------------------------------------------------- elementwise
def _same(types: Types, attrs: Attrs) -> list[TensorType]:
    return [_t(types, 0, "unary")]


def _float_same(types: Types, attrs: Attrs) -> list[TensorType]:
    t = _t(types, 0, "unary")
    return [t if is_float(t.dtype) else t.with_dtype("float32")]


_UNARY = {
    "neg": (torch.neg, False), "abs": (torch.abs, False), "exp": (torch.exp, True),
    "log": (torch.log, True), "sqrt": (torch.sqrt, True), "rsqrt": (torch.rsqrt, True),
    "sin": (torch.sin, True), "cos": (torch.cos, True), "tanh": (torch.tanh, True),
    "sigmoid": (torch.sigmoid, True), "relu": (torch.relu, False), "silu": (F.silu, True),
    "erf": (torch.erf, True), "reciprocal": (torch.reciprocal, True),
    "floor": (torch.floor, False), "ceil": (torch.ceil, False), "round": (torch.round, False),
    "sign": (torch.sign, False), "hardswish": (F.hardswish, True),
    "hardsigmoid": (F.hardsigmoid, True), "mish": (F.mish, True),
    "log1p": (torch.log1p, True), "expm1": (torch.expm1, True), "atan": (torch.atan, True),
    "trunc": (torch.trunc, False), "exp2": (torch.exp2, True), "log2": (torch.log2, True),
    "log10": (torch.log10, True), "erfinv": (torch.erfinv, True),
}
for _name, (_fn, _flt) in _UNARY.items():
    _reg(_name, _float_same if _flt else _same, lambda x, a, _fn=_fn: _fn(x[0]),
         traits=("elementwise",), doc=f"elementwise {_name}")

_reg("logical_not", lambda t, a: [_t(t, 0, "logical_not").with_dtype("bool")],
     lambda x, a: torch.logical_not(x[0]), traits=("elementwise",))
_reg("isnan", lambda t, a: [_t(t, 0, "isnan").with_dtype("bool")],
     lambda x, a: torch.isnan(x[0]), traits=("elementwise",))
_reg("gelu", _float_same, lambda x, a: F.gelu(x[0], approximate=a["approximate"]),
     {"approximate": "none"},
     traits=("elementwise",), doc="GELU, exact (erf) or tanh approximation")
_reg("leaky_relu", _same, lambda x, a: F.leaky_relu(x[0], a["negative_slope"]),
     {"negative_slope": 0.01}, traits=("elementwise",))
_reg("elu", _float_same, lambda x, a: F.elu(x[0], a["alpha"]), {"alpha": 1.0},
     traits=("elementwise",))
_reg("softplus", _float_same, lambda x, a: F.softplus(x[0], a["beta"], a["threshold"]),
     {"beta": 1.0, "threshold": 20.0}, traits=("elementwise",))
_reg("clamp", _same, lambda x, a: torch.clamp(x[0], a["min"], a["max"]),
     {"min": None, "max": None},
     traits=("elementwise",), doc="clamp to [min, max]; None = unbounded")
_reg("cast", lambda t, a: [_t(t, 0, "cast").with_dtype(a["dtype"])],
     lambda x, a: x[0].to(to_torch_dtype(a["dtype"])), {"dtype": REQUIRED}, traits=("elementwise",))


def _binary_infer(out_bool: bool = False, true_div: bool = False) -> Any:
    def infer(types: Types, attrs: Attrs) -> list[TensorType]:
        a, b = _t(types, 0, "binary"), _t(types, 1, "binary")
        shape = broadcast_shapes(a.shape, b.shape)
        if out_bool:
            return [TensorType("bool", shape)]
        dt = promote(a, b)
        if true_div and not is_float(dt) and attrs.get("rounding_mode") is None:
            dt = "float32"
        return [TensorType(dt, shape)]
    return infer


_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "remainder": torch.remainder,
    "fmod": torch.fmod, "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or,
    "atan2": torch.atan2,
}
for _name, _fn in _BINARY.items():
    _reg(_name, _binary_infer(), lambda x, a, _fn=_fn: _fn(x[0], x[1]), n=2,
         traits=("elementwise",))
_reg("div", _binary_infer(true_div=True),
     lambda x, a: torch.div(x[0], x[1], rounding_mode=a["rounding_mode"]),
     {"rounding_mode": None}, n=2,
     traits=("elementwise",), doc="division; rounding_mode trunc|floor")
for _name, _fn in {"eq": torch.eq, "ne": torch.ne, "logical_and": torch.logical_and,
                   "logical_or": torch.logical_or, "logical_xor": torch.logical_xor}.items():
    _reg(_name, _binary_infer(out_bool=True), lambda x, a, _fn=_fn: _fn(x[0], x[1]), n=2,
         traits=("elementwise",))
for _name, _fn in {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}.items():
    _reg(_name, _binary_infer(out_bool=True), lambda x, a, _fn=_fn: _fn(x[0], x[1]), n=2,
         traits=("elementwise", "order_compare"))


def _where_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    c, x, y = (_t(types, i, "where") for i in range(3))
    return [TensorType(promote(x, y), broadcast_shapes(c.shape, x.shape, y.shape))]


_reg("where", _where_infer, lambda x, a: torch.where(x[0].bool(), x[1], x[2]), n=3,
     traits=("elementwise",), doc="select x where cond else y")


# ----------------------------------------------------------------------------- reductions
def _reduce_shape(t: TensorType, dims: Sequence[int] | None, keepdim: bool, op: str) -> tuple:
    if dims is None or len(dims) == 0:
        dims = list(range(t.rank))
    nd = {_norm_dim(d, t.rank, op) for d in dims}
    if keepdim:
        return tuple(1 if i in nd else d for i, d in enumerate(t.shape))
    return tuple(d for i, d in enumerate(t.shape) if i not in nd)


def _reduce_infer(op: str, dtype: str | None = None, floaty: bool = False) -> Any:
    def infer(types: Types, attrs: Attrs) -> list[TensorType]:
        t = _t(types, 0, op)
        dims = attrs.get("dims", attrs.get("dim"))
        if isinstance(dims, int):
            dims = [dims]
        shape = _reduce_shape(t, dims, attrs["keepdim"], op)
        dt = dtype or t.dtype
        if floaty and not is_float(dt):
            dt = "float32"
        if op in ("sum", "prod") and dt in ("bool", "int8", "uint8", "int16", "int32"):
            dt = "int64"
        return [TensorType(dt, shape)]
    return infer


def _dims_arg(a: Attrs, rank: int) -> list[int]:
    return list(a["dims"]) if a["dims"] else list(range(rank))


_reg("sum", _reduce_infer("sum"), lambda x, a: torch.sum(x[0], _dims_arg(a, x[0].dim()), a["keepdim"]),
     {"dims": None, "keepdim": False}, traits=("reduction",))
_reg("mean", _reduce_infer("mean", floaty=True),
     lambda x, a: torch.mean(x[0], _dims_arg(a, x[0].dim()), a["keepdim"]),
     {"dims": None, "keepdim": False}, traits=("reduction",))
_reg("amax", _reduce_infer("amax"), lambda x, a: torch.amax(x[0], _dims_arg(a, x[0].dim()), a["keepdim"]),
     {"dims": None, "keepdim": False}, traits=("reduction",))
_reg("amin", _reduce_infer("amin"), lambda x, a: torch.amin(x[0], _dims_arg(a, x[0].dim()), a["keepdim"]),
     {"dims": None, "keepdim": False}, traits=("reduction",))


def _prod_ref(x: Any, a: Attrs) -> torch.Tensor:
    y = x[0]
    for d in sorted(_dims_arg(a, y.dim()), reverse=True):
        y = torch.prod(y, d, keepdim=a["keepdim"])
    return y


_reg("prod", _reduce_infer("prod"), _prod_ref, {"dims": None, "keepdim": False},
     traits=("reduction",))
_reg("var", _reduce_infer("var", floaty=True),
     lambda x, a: torch.var(x[0], _dims_arg(a, x[0].dim()), correction=a["correction"],
                            keepdim=a["keepdim"]),
     {"dims": None, "keepdim": False, "correction": 1}, traits=("reduction",))
_reg("argmax", _reduce_infer("argmax", dtype="int64"),
     lambda x, a: torch.argmax(x[0], a["dim"], a["keepdim"]), {"dim": REQUIRED, "keepdim": False},
     traits=("reduction",))
_reg("argmin", _reduce_infer("argmin", dtype="int64"),
     lambda x, a: torch.argmin(x[0], a["dim"], a["keepdim"]), {"dim": REQUIRED, "keepdim": False},
     traits=("reduction",))
_reg("any", lambda t, a: [TensorType("bool", _reduce_shape(_t(t, 0, "any"), a["dims"], a["keepdim"], "any"))],
     lambda x, a: torch.any(x[0], dim=tuple(_dims_arg(a, x[0].dim())), keepdim=a["keepdim"]),
     {"dims": None, "keepdim": False}, traits=("reduction",))
_reg("cumsum", lambda t, a: [_t(t, 0, "cumsum") if _t(t, 0, "cumsum").dtype not in ("bool", "int32", "int8", "uint8") else _t(t, 0, "cumsum").with_dtype("int64")],
     lambda x, a: torch.cumsum(x[0], a["dim"]), {"dim": REQUIRED}, traits=("reduction",))
_reg("softmax", _float_same, lambda x, a: torch.softmax(x[0], a["dim"]), {"dim": -1},
     traits=("reduction",))
_reg("log_softmax", _float_same, lambda x, a: torch.log_softmax(x[0], a["dim"]), {"dim": -1},
     traits=("reduction",))


def _topk_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    t = _t(types, 0, "topk")
    d = _norm_dim(attrs["dim"], t.rank, "topk")
    shape = tuple(attrs["k"] if i == d else s for i, s in enumerate(t.shape))
    return [t.with_shape(shape), TensorType("int64", shape)]


_reg("topk", _topk_infer,
     lambda x, a: tuple(torch.topk(x[0], a["k"], a["dim"], a["largest"], a["sorted"])),
     {"k": REQUIRED, "dim": -1, "largest": True, "sorted": True}, doc="values, indices",
     traits=("reduction",))


# ----------------------------------------------------------------------------- linear algebra
def _matmul_shape(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    if len(a) == 0 or len(b) == 0:
        raise OpTypeError("matmul: operands must be at least 1-d")
    a2 = list(a) if len(a) > 1 else [1, a[0]]
    b2 = list(b) if len(b) > 1 else [b[0], 1]
    if not dims_equal(a2[-1], b2[-2]) and isinstance(a2[-1], int) and isinstance(b2[-2], int):
        raise OpTypeError(f"matmul: inner dims differ: {tuple(a)} @ {tuple(b)}")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = list(batch) + [a2[-2], b2[-1]]
    if len(a) == 1:
        out.pop(-2)
    if len(b) == 1:
        out.pop(-1)
    return tuple(out)


def _matmul_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    a, b = _t(types, 0, "matmul"), _t(types, 1, "matmul")
    return [TensorType(promote(a, b), _matmul_shape(a.shape, b.shape))]


_reg("matmul", _matmul_infer, lambda x, a: torch.matmul(x[0], x[1]), n=2,
     doc="torch.matmul semantics (batched, broadcasting)", traits=("gemm",))


def _linear_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, w = _t(types, 0, "linear"), _t(types, 1, "linear")
    if w.rank != 2:
        raise OpTypeError(f"linear: weight must be 2-d [out, in], got {w}")
    if isinstance(x.shape[-1], int) and isinstance(w.shape[1], int) and x.shape[-1] != w.shape[1]:
        raise OpTypeError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    return [TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))]


_reg("linear", _linear_infer, lambda x, a: F.linear(x[0], x[1], _opt(x, 2)), n=(2, 3),
     doc="y = x @ w.T + b, w is [out, in]", traits=("gemm", "linear"))


def _conv_out(n: Dim, k: int, s: int, p: int, d: int) -> Dim:
    return simplify(floor_div(n + 2 * p - d * (k - 1) - 1, s) + 1)


def _conv_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, w = _t(types, 0, "conv"), _t(types, 1, "conv")
    nsp = w.rank - 2
    if x.rank != nsp + 2:
        raise OpTypeError(f"conv: input {x} and weight {w} ranks do not match")
    st, pd, dl = (_tuple(attrs[k], nsp) for k in ("stride", "padding", "dilation"))
    sp = [_conv_out(x.shape[2 + i], w.shape[2 + i], st[i], pd[i], dl[i]) for i in range(nsp)]
    return [TensorType(x.dtype, (x.shape[0], w.shape[0], *sp))]


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def _conv_ref(x: Any, a: Attrs) -> torch.Tensor:
    nsp = x[1].dim() - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp]
    return fn(x[0], x[1], _opt(x, 2), _tuple(a["stride"], nsp), _tuple(a["padding"], nsp),
              _tuple(a["dilation"], nsp), a["groups"])


_reg("conv", _conv_infer, _conv_ref,
     {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}, n=(2, 3),
     doc="N-d convolution (1d/2d/3d), weight [out, in/groups, *k]", traits=("conv",))


def _conv_t_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, w = _t(types, 0, "conv_transpose"), _t(types, 1, "conv_transpose")
    nsp = w.rank - 2
    st, pd, dl, op = (_tuple(attrs[k], nsp) for k in ("stride", "padding", "dilation", "output_padding"))
    sp = [simplify((x.shape[2 + i] - 1) * st[i] - 2 * pd[i] + dl[i] * (w.shape[2 + i] - 1) + op[i] + 1)
          for i in range(nsp)]
    return [TensorType(x.dtype, (x.shape[0], w.shape[1] * attrs["groups"], *sp))]


def _conv_t_ref(x: Any, a: Attrs) -> torch.Tensor:
    nsp = x[1].dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nsp]
    return fn(x[0], x[1], _opt(x, 2), _tuple(a["stride"], nsp), _tuple(a["padding"], nsp),
              _tuple(a["output_padding"], nsp), a["groups"], _tuple(a["dilation"], nsp))


_reg("conv_transpose", _conv_t_infer, _conv_t_ref,
     {"stride": 1, "padding": 0, "dilation": 1, "output_padding": 0, "groups": 1}, n=(2, 3),
     traits=("conv",))


def _pool_infer(op: str) -> Any:
    def infer(types: Types, attrs: Attrs) -> list[TensorType]:
        x = _t(types, 0, op)
        nsp = x.rank - 2
        k = _tuple(attrs["kernel"], nsp)
        st = _tuple(attrs["stride"] or attrs["kernel"], nsp)
        pd = _tuple(attrs["padding"], nsp)
        dl = _tuple(attrs.get("dilation", 1), nsp)
        sp = []
        for i in range(nsp):
            n = x.shape[2 + i] + 2 * pd[i] - dl[i] * (k[i] - 1) - 1
            if attrs["ceil_mode"]:
                o = simplify(sympy.ceiling(sympy.Integer(n) / st[i]) if isinstance(n, int)
                             else sympy.ceiling(n / st[i])) + 1
                if isinstance(o, int) and isinstance(x.shape[2 + i], int) and \
                        (o - 1) * st[i] >= x.shape[2 + i] + pd[i]:
                    o -= 1
            else:
                o = floor_div(n, st[i]) + 1
            sp.append(simplify(o))
        return [x.with_shape((*x.shape[:2], *sp))]
    return infer


def _maxpool_ref(x: Any, a: Attrs) -> torch.Tensor:
    nsp = x[0].dim() - 2
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nsp]
    return fn(x[0], a["kernel"], a["stride"] or a["kernel"], a["padding"], a["dilation"],
              a["ceil_mode"])


def _avgpool_ref(x: Any, a: Attrs) -> torch.Tensor:
    nsp = x[0].dim() - 2
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nsp]
    return fn(x[0], a["kernel"], a["stride"] or a["kernel"], a["padding"], a["ceil_mode"],
              a["count_include_pad"])


_reg("max_pool", _pool_infer("max_pool"), _maxpool_ref,
     {"kernel": REQUIRED, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
     traits=("reduction", "pool"))
_reg("avg_pool", _pool_infer("avg_pool"), _avgpool_ref,
     {"kernel": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False,
      "count_include_pad": True}, traits=("reduction", "pool"))


def _adaptive_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "adaptive_avg_pool")
    nsp = x.rank - 2
    return [x.with_shape((*x.shape[:2], *_tuple(attrs["output_size"], nsp)))]


def _adaptive_ref(x: Any, a: Attrs) -> torch.Tensor:
    nsp = x[0].dim() - 2
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nsp]
    return fn(x[0], a["output_size"])


_reg("adaptive_avg_pool", _adaptive_infer, _adaptive_ref, {"output_size": REQUIRED},
     traits=("reduction", "pool"))


def _interpolate_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "interpolate")
    size = tuple(attrs["size"])
    if len(size) != x.rank - 2:
        raise OpTypeError(f"interpolate: size {size} does not match the spatial rank of {x}")
    if attrs["mode"] not in ("nearest", "nearest-exact", "linear", "bilinear", "bicubic",
                             "trilinear"):
        raise OpTypeError(f"interpolate: unknown mode '{attrs['mode']}'")
    return [x.with_shape((*x.shape[:2], *size))]


def _interpolate_ref(x: Any, a: Attrs) -> torch.Tensor:
    nearest = a["mode"] in ("nearest", "nearest-exact")
    return F.interpolate(x[0], size=tuple(a["size"]), mode=a["mode"],
                         align_corners=None if nearest else a["align_corners"])


_reg("interpolate", _interpolate_infer, _interpolate_ref,
     {"size": REQUIRED, "mode": "nearest", "align_corners": False},
     doc="resize the spatial dims to `size` (torch F.interpolate semantics)")


# ----------------------------------------------------------------------------- norms
def _layer_norm_ref(x: Any, a: Attrs) -> torch.Tensor:
    shape = x[0].shape[x[0].dim() - a["axes"]:]
    return F.layer_norm(x[0], shape, _opt(x, 1), _opt(x, 2), a["eps"])


def _rms_norm_ref(x: Any, a: Attrs) -> torch.Tensor:
    shape = x[0].shape[x[0].dim() - a["axes"]:]
    return F.rms_norm(x[0], shape, _opt(x, 1), a["eps"])


_reg("layer_norm", lambda t, a: [_t(t, 0, "layer_norm")], _layer_norm_ref,
     {"axes": 1, "eps": 1e-5}, n=(1, 3), doc="LayerNorm over the last `axes` dims",
     traits=("norm",))
_reg("rms_norm", lambda t, a: [_t(t, 0, "rms_norm")], _rms_norm_ref,
     {"axes": 1, "eps": None}, n=(1, 2), doc="RMSNorm over the last `axes` dims", traits=("norm",))
_reg("batch_norm", lambda t, a: [_t(t, 0, "batch_norm")],
     lambda x, a: F.batch_norm(x[0], x[1], x[2], _opt(x, 3), _opt(x, 4), False, 0.0,
                                  a["eps"]),
     {"eps": 1e-5}, n=(3, 5), doc="inference BatchNorm: x, mean, var, weight?, bias?",
     traits=("norm",))
_reg("group_norm", lambda t, a: [_t(t, 0, "group_norm")],
     lambda x, a: F.group_norm(x[0], a["groups"], _opt(x, 1), _opt(x, 2), a["eps"]),
     {"groups": REQUIRED, "eps": 1e-5}, n=(1, 3), traits=("norm",))


# ----------------------------------------------------------------------------- attention
def _attention_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    q, k, v = (_t(types, i, "attention") for i in range(3))
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise OpTypeError(f"attention: q {q}, k {k}, v {v} must share a rank >= 2")
    if attrs.get("enable_gqa") and q.rank >= 3:
        # grouped-query heads: q's head dim (-3) is a multiple of k/v's, which are repeated
        hq, hk = q.shape[-3], k.shape[-3]
        if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
            raise OpTypeError(f"attention: {hq} query heads are not a multiple of {hk} kv heads")
        batch = (*broadcast_shapes(q.shape[:-3], k.shape[:-3]), hq)
    else:
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return [TensorType(q.dtype, (*batch, q.shape[-2], v.shape[-1]))]


def _attention_ref(x: Any, a: Attrs) -> torch.Tensor:
    q, k, v, mask = x[0], x[1], x[2], x[3] if len(x) > 3 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["is_causal"],
                                          scale=a["scale"], enable_gqa=a["enable_gqa"])


_reg("attention", _attention_infer, _attention_ref,
     {"scale": None, "is_causal": False, "enable_gqa": False}, n=(3, 4),
     doc="softmax(q k^T * scale + mask) v; mask bool (keep) or additive float",
     traits=("attention",))


def _embedding_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    w, idx = _t(types, 0, "embedding"), _t(types, 1, "embedding")
    return [TensorType(w.dtype, (*idx.shape, *w.shape[1:]))]


_reg("embedding", _embedding_infer, lambda x, a: F.embedding(x[1], x[0]), n=2,
     doc="rows of weight (input 0) at indices (input 1)", traits=("gather", "lookup"))


# ----------------------------------------------------------------------------- shapes
def _reshape_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "reshape")
    shape = list(attrs["shape"])
    if sum(1 for d in shape if isinstance(d, int) and d == -1) > 1:
        raise OpTypeError("reshape: at most one -1")
    if any(isinstance(d, int) and d == -1 for d in shape):
        known = numel([d for d in shape if not (isinstance(d, int) and d == -1)])
        total = numel(x.shape)
        shape = [simplify(sympy.sympify(total) / known) if isinstance(d, int) and d == -1 else d
                 for d in shape]
    n_in, n_out = numel(x.shape), numel(shape)
    if isinstance(n_in, int) and isinstance(n_out, int) and n_in != n_out:
        raise OpTypeError(f"reshape: cannot view {x} ({n_in} elements) as {tuple(shape)}")
    return [x.with_shape(tuple(shape))]


_reg("reshape", _reshape_infer, lambda x, a: torch.reshape(x[0], tuple(a["shape"])),
     {"shape": REQUIRED}, doc="reshape to `shape` (dims may be symbolic)", traits=("movement",))


def _permute_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "permute")
    perm = [_norm_dim(p, x.rank, "permute") for p in attrs["perm"]]
    if sorted(perm) != list(range(x.rank)):
        raise OpTypeError(f"permute: {attrs['perm']} is not a permutation of rank {x.rank}")
    return [x.with_shape(tuple(x.shape[p] for p in perm))]


_reg("permute", _permute_infer, lambda x, a: x[0].permute(*a["perm"]), {"perm": REQUIRED},
     traits=("movement",))


def _expand_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "expand")
    shape = list(attrs["shape"])
    off = len(shape) - x.rank
    if off < 0:
        raise OpTypeError(f"expand: target {tuple(shape)} has lower rank than {x}")
    out = [x.shape[i - off] if (isinstance(d, int) and d == -1) else d for i, d in enumerate(shape)]
    return [x.with_shape(tuple(out))]


_reg("expand", _expand_infer, lambda x, a: x[0].expand(*a["shape"]), {"shape": REQUIRED},
     traits=("movement",))


def _slice_len(size: Dim, start: Any, end: Any, step: int) -> tuple[Dim, Dim, Dim]:
    if isinstance(start, int) and start < 0:
        start = simplify(size + start)
    if isinstance(end, int) and end >= BIG:
        end = size
    elif isinstance(end, int) and end < 0:
        end = simplify(size + end)
    if isinstance(size, int) and isinstance(start, int) and isinstance(end, int):
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        return start, end, max(0, -(-(end - start) // step))
    n = simplify(sympy.ceiling((sympy.sympify(end) - start) / step))
    return start, end, n


def _slice_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "slice")
    d = _norm_dim(attrs["dim"], x.rank, "slice")
    if attrs["step"] < 1:
        raise OpTypeError("slice: step must be >= 1")
    _, _, n = _slice_len(x.shape[d], attrs["start"], attrs["end"], attrs["step"])
    return [x.with_shape(tuple(n if i == d else s for i, s in enumerate(x.shape)))]


def _slice_ref(x: Any, a: Attrs) -> torch.Tensor:
    d = a["dim"] % x[0].dim()
    idx = [slice(None)] * x[0].dim()
    end = a["end"] if a["end"] < BIG else None
    idx[d] = slice(a["start"], end, a["step"])
    return x[0][tuple(idx)]


_reg("slice", _slice_infer, _slice_ref,
     {"dim": REQUIRED, "start": 0, "end": BIG, "step": 1}, doc="x[..., start:end:step, ...]",
     traits=("movement",))


def _select_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "select")
    d = _norm_dim(attrs["dim"], x.rank, "select")
    return [x.with_shape(tuple(s for i, s in enumerate(x.shape) if i != d))]


_reg("select", _select_infer, lambda x, a: torch.select(x[0], a["dim"], a["index"]),
     {"dim": REQUIRED, "index": REQUIRED}, doc="x.select(dim, index): drops dim",
     traits=("movement",))


def _concat_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    ts = [t for t in types if t is not None]
    if not ts:
        raise OpTypeError("concat: no inputs")
    d = _norm_dim(attrs["dim"], ts[0].rank, "concat")
    total: Any = 0
    for t in ts:
        if t.rank != ts[0].rank:
            raise OpTypeError(f"concat: ranks differ: {[str(t) for t in ts]}")
        total = total + t.shape[d]
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = from_torch_dtype(torch.promote_types(to_torch_dtype(dt), to_torch_dtype(t.dtype)))
    return [TensorType(dt, tuple(simplify(total) if i == d else s for i, s in enumerate(ts[0].shape)))]


_reg("concat", _concat_infer, lambda x, a: torch.cat(list(x), a["dim"]), {"dim": 0},
     n=(1, 10_000), traits=("data",))


def _gather_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, idx = _t(types, 0, "gather"), _t(types, 1, "gather")
    return [x.with_shape(idx.shape)]


_reg("gather", _gather_infer, lambda x, a: torch.gather(x[0], a["dim"], x[1]), {"dim": REQUIRED},
     n=2, doc="torch.gather", traits=("gather", "lookup"))


def _index_select_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, idx = _t(types, 0, "index_select"), _t(types, 1, "index_select")
    d = _norm_dim(attrs["dim"], x.rank, "index_select")
    shape = (*x.shape[:d], *idx.shape, *x.shape[d + 1:])
    return [x.with_shape(shape)]


def _index_select_ref(x: Any, a: Attrs) -> torch.Tensor:
    src, idx = x[0], x[1]
    d = a["dim"] % src.dim()
    out = torch.index_select(src, d, idx.reshape(-1))
    return out.reshape(*src.shape[:d], *idx.shape, *src.shape[d + 1:])


_reg("index_select", _index_select_infer, _index_select_ref, {"dim": REQUIRED}, n=2,
     doc="take along one dim with an index tensor of any rank (numpy.take)",
     traits=("gather", "lookup"))


def _pad_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "pad")
    pads = list(attrs["pads"])
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        d = x.rank - 1 - i
        shape[d] = simplify(shape[d] + pads[2 * i] + pads[2 * i + 1])
    return [x.with_shape(tuple(shape))]


_reg("pad", _pad_infer,
     lambda x, a: F.pad(x[0], list(a["pads"]), a["mode"], a["value"] if a["mode"] == "constant" else None),
     {"pads": REQUIRED, "mode": "constant", "value": 0.0},
     doc="torch F.pad order: (last_lo, last_hi, prev_lo, prev_hi, ...)", traits=("data",))
_reg("flip", _same, lambda x, a: torch.flip(x[0], list(a["dims"])), {"dims": REQUIRED},
     traits=("data",))
_reg("roll", _same, lambda x, a: torch.roll(x[0], list(a["shifts"]), list(a["dims"])),
     {"shifts": REQUIRED, "dims": REQUIRED}, traits=("data",))
_reg("tril", _same, lambda x, a: torch.tril(x[0], a["diagonal"]), {"diagonal": 0}, traits=("data",))
_reg("triu", _same, lambda x, a: torch.triu(x[0], a["diagonal"]), {"diagonal": 0}, traits=("data",))


def _tile_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "tile")
    reps = list(attrs["repeats"])
    shape = [1] * (len(reps) - x.rank) + list(x.shape)
    reps = [1] * (len(shape) - len(reps)) + reps
    return [x.with_shape(tuple(simplify(s * r) for s, r in zip(shape, reps)))]


_reg("tile", _tile_infer, lambda x, a: x[0].repeat(*a["repeats"]) if len(a["repeats"]) >= x[0].dim()
     else torch.tile(x[0], tuple(a["repeats"])), {"repeats": REQUIRED}, doc="torch.Tensor.repeat",
     traits=("data",))


# ----------------------------------------------------------------------------- creation
def _full_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    return [TensorType(attrs["dtype"], tuple(attrs["shape"]))]


_reg("full", _full_infer,
     lambda x, a: torch.full(tuple(a["shape"]), a["value"], dtype=to_torch_dtype(a["dtype"])),
     {"shape": REQUIRED, "value": REQUIRED, "dtype": "float32"}, n=0, traits=("data", "generator"))


def _arange_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    s, e, st = attrs["start"], attrs["end"], attrs["step"]
    if all(isinstance(v, int | float) for v in (s, e, st)):
        n: Dim = max(0, math.ceil((e - s) / st))
    else:
        n = simplify(sympy.ceiling((sympy.sympify(e) - s) / st))
    return [TensorType(attrs["dtype"], (n,))]


_reg("arange", _arange_infer,
     lambda x, a: torch.arange(a["start"], a["end"], a["step"], dtype=to_torch_dtype(a["dtype"])),
     {"start": 0, "end": REQUIRED, "step": 1, "dtype": "int64"}, n=0, traits=("data", "generator"))


def check_types_equal(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and a.rank == b.rank and all(
        dims_equal(x, y) for x, y in zip(a.shape, b.shape))

