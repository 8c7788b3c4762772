"""ATen -> Ember IR op mappings of the FX frontend (registered into ``_fx_importer._HANDLERS``).

Each handler is ``fn(imp, overload, *args, **kwargs)``: ``imp`` is the `_fx_importer._Importer`,
tensor arguments arrive as IR `Value`s (or constant references, resolved by ``imp.val``),
SymInts as ints or sympy expressions. Handlers raise ``_Unsupported(reason)`` for argument
forms they do not cover; the importer collects those with every other unsupported op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sympy
import torch

from ..ir import Value
from ..ir.opset import BIG
from ..ir.shapes import Dim, simplify
from ._fx_importer import _ConstRef as _CR
from ._fx_importer import _h, _MissingOut, _same_dim, _Unsupported
from ._fx_importer import _Importer as Imp

__all__: list[str] = []


def _dtype_of(imp: Imp) -> str:
    return imp.meta_type().dtype


def _nd(d: int, rank: int) -> int:
    return d % max(rank, 1)


# ----------------------------------------------------------------------------- no-ops
@_h("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh", "alias_copy",
    "detach_copy", "_to_dim_order_copy", "dropout", "native_dropout", "feature_dropout",
    "alpha_dropout", "feature_alpha_dropout", "_conj", "resolve_conj", "resolve_neg",
    "positive", "_to_copy", "to", "type_as", "view_as", "_unsafe_view_as")
def _identity_like(imp: Imp, ov: str, x: Any, *args: Any, **kw: Any) -> Any:
    v = imp.val(x)
    want = imp.meta_type() if imp.node is not None and isinstance(
        imp.node.meta.get("val"), torch.Tensor) else None
    if want is None:
        if isinstance(imp.node.meta.get("val"), tuple):  # native_dropout -> (out, mask)
            return (v, _MissingOut())
        return v
    if want.dtype != v.type.dtype:
        v = imp.cast(v, want.dtype)
    if want.rank != v.type.rank:  # view_as
        v = imp.emit("reshape", [v], {"shape": want.shape})
    if isinstance(imp.node.meta.get("val"), tuple):
        return (v, _MissingOut())
    return v


@_h("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
    "sym_constrain_range_for_size", "_functional_assert_async", "_functional_assert_scalar",
    "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size",
    "_assert_tensor_metadata_", "_print")
def _drop(imp: Imp, ov: str, *args: Any, **kw: Any) -> Any:
    return None


# ----------------------------------------------------------------------------- elementwise
_UNARY_SAME = ["abs", "neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid",
               "relu", "silu", "erf", "reciprocal", "floor", "ceil", "sign", "hardswish",
               "hardsigmoid", "mish", "log1p", "expm1", "atan", "logical_not", "isnan", "tan",
               "trunc", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "exp2",
               "log2", "log10", "isinf", "erfinv"]


def _unary(name: str) -> None:
    def fn(imp: Imp, ov: str, x: Any, *a: Any, **kw: Any) -> Any:
        from ..ir import has_op

        if not has_op(name):
            raise _Unsupported(f"no IR op '{name}'")
        return imp.emit(name, [imp.val(x)])
    _h(name)(fn)


for _n in _UNARY_SAME:
    _unary(_n)


@_h("sgn")
def _sgn(imp: Imp, ov: str, x: Any) -> Any:
    return imp.emit("sign", [imp.val(x)])


@_h("fix")
def _fix(imp: Imp, ov: str, x: Any) -> Any:
    return imp.emit("trunc", [imp.val(x)])


@_h("round")
def _round(imp: Imp, ov: str, x: Any, decimals: int = 0) -> Any:
    v = imp.val(x)
    if not decimals:
        return imp.emit("round", [v])
    s = imp.val(10.0 ** decimals, v)
    return imp.emit("div", [imp.emit("round", [imp.emit("mul", [v, s])]), s])


@_h("square")
def _square(imp: Imp, ov: str, x: Any) -> Any:
    v = imp.val(x)
    return imp.emit("mul", [v, v])


@_h("bitwise_not")
def _bitwise_not(imp: Imp, ov: str, x: Any) -> Any:
    v = imp.val(x)
    return imp.emit("logical_not" if v.type.dtype == "bool" else "bitwise_not", [v])


@_h("gelu")
def _gelu(imp: Imp, ov: str, x: Any, approximate: str = "none") -> Any:
    return imp.emit("gelu", [imp.val(x)], {"approximate": approximate})


@_h("leaky_relu")
def _leaky_relu(imp: Imp, ov: str, x: Any, negative_slope: float = 0.01) -> Any:
    return imp.emit("leaky_relu", [imp.val(x)], {"negative_slope": float(negative_slope)})


@_h("elu", "celu", "selu")
def _elu(imp: Imp, ov: str, x: Any, alpha: float = 1.0, scale: float = 1.0,
         input_scale: float = 1.0) -> Any:
    name = imp.node.target._opname
    v = imp.val(x)
    if name == "selu":
        alpha, scale = 1.6732632423543772, 1.0507009873554805
    if name == "celu":
        input_scale = 1.0 / alpha
    if input_scale != 1.0:
        # elu(x; alpha, scale, input_scale) = scale * (x if x > 0 else alpha*(exp(x*is)-1))
        pos = imp.emit("relu", [v])
        neg = imp.emit("minimum", [imp.emit("sub", [imp.emit("exp", [
            imp.emit("mul", [v, imp.val(float(input_scale), v)])]), imp.val(1.0, v)]),
            imp.val(0.0, v)])
        out = imp.emit("add", [pos, imp.emit("mul", [neg, imp.val(float(alpha), v)])])
    else:
        out = imp.emit("elu", [v], {"alpha": float(alpha)})
    if scale != 1.0:
        out = imp.emit("mul", [out, imp.val(float(scale), v)])
    return out


@_h("softplus")
def _softplus(imp: Imp, ov: str, x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    return imp.emit("softplus", [imp.val(x)], {"beta": float(beta), "threshold": float(threshold)})


@_h("hardtanh")
def _hardtanh(imp: Imp, ov: str, x: Any, min_val: float = -1.0, max_val: float = 1.0) -> Any:
    return imp.emit("clamp", [imp.val(x)], {"min": min_val, "max": max_val})


@_h("relu6")
def _relu6(imp: Imp, ov: str, x: Any) -> Any:
    return imp.emit("clamp", [imp.val(x)], {"min": 0.0, "max": 6.0})


@_h("clamp", "clip", "clamp_min", "clamp_max")
def _clamp(imp: Imp, ov: str, x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002
    name = imp.node.target._opname
    if name == "clamp_max":
        min, max = None, min  # noqa: A001
    v = imp.val(x)
    if isinstance(min, Value | _CR) or isinstance(max, Value | _CR):
        if min is not None:
            v = imp.emit("maximum", [v, imp.val(min, v)])
        if max is not None:
            v = imp.emit("minimum", [v, imp.val(max, v)])
        return v
    for s in (min, max):
        if isinstance(s, sympy.Basic):
            raise _Unsupported("symbolic clamp bound")
    return imp.emit("clamp", [v], {"min": min, "max": max})


@_h("logit")
def _logit(imp: Imp, ov: str, x: Any, eps: float | None = None) -> Any:
    v = imp.val(x)
    if eps is not None:
        v = imp.emit("clamp", [v], {"min": eps, "max": 1.0 - eps})
    return imp.emit("log", [imp.emit("div", [v, imp.emit("sub", [imp.val(1.0, v), v])])])


@_h("nan_to_num")
def _nan_to_num(imp: Imp, ov: str, x: Any, nan: float | None = None, posinf: Any = None,
                neginf: Any = None) -> Any:
    v = imp.val(x)
    info = torch.finfo(torch.float32 if v.type.dtype == "float32" else torch.float64)
    out = imp.emit("where", [imp.emit("isnan", [v]), imp.val(float(nan or 0.0), v), v])
    hi = posinf if posinf is not None else info.max
    lo = neginf if neginf is not None else info.min
    return imp.emit("clamp", [out], {"min": float(lo), "max": float(hi)})


# ----------------------------------------------------------------------------- binary
def _binary_operands(imp: Imp, a: Any, b: Any) -> tuple[Value, Value]:
    like = a if isinstance(a, Value) else (b if isinstance(b, Value) else None)
    if like is None:
        if isinstance(a, _CR):
            like = imp.val(a)
        elif isinstance(b, _CR):
            like = imp.val(b)
    return imp.val(a, like), imp.val(b, like)


def _simple_binary(name: str, ir: str) -> None:
    def fn(imp: Imp, ov: str, a: Any, b: Any, **kw: Any) -> Any:
        x, y = _binary_operands(imp, a, b)
        return imp.emit(ir, [x, y])
    _h(name)(fn)


for _a, _i in {"mul": "mul", "multiply": "mul", "maximum": "maximum", "minimum": "minimum",
               "fmax": "maximum", "fmin": "minimum", "remainder": "remainder", "fmod": "fmod",
               "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
               "greater": "gt", "less": "lt", "greater_equal": "ge", "less_equal": "le",
               "not_equal": "ne", "logical_and": "logical_and", "logical_or": "logical_or",
               "logical_xor": "logical_xor", "atan2": "atan2", "arctan2": "atan2"}.items():
    _simple_binary(_a, _i)


@_h("bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__")
def _bitwise(imp: Imp, ov: str, a: Any, b: Any) -> Any:
    name = imp.node.target._opname.strip("_")
    x, y = _binary_operands(imp, a, b)
    if x.type.dtype == "bool" and y.type.dtype == "bool":
        return imp.emit({"and": "logical_and", "or": "logical_or", "xor": "logical_xor",
                         "bitwise_and": "logical_and", "bitwise_or": "logical_or",
                         "bitwise_xor": "logical_xor"}[name], [x, y])
    ir = {"and": "bitwise_and", "or": "bitwise_or"}.get(name, name)
    if ir in ("xor", "bitwise_xor"):
        from ..ir import has_op

        if not has_op("bitwise_xor"):
            raise _Unsupported("integer xor")
        ir = "bitwise_xor"
    return imp.emit(ir, [x, y])


@_h("add", "sub", "subtract", "rsub")
def _add_sub(imp: Imp, ov: str, a: Any, b: Any, alpha: Any = 1) -> Any:
    name = imp.node.target._opname
    if name == "rsub":
        a, b = b, a
    x, y = _binary_operands(imp, a, b)
    if alpha != 1:
        y = imp.emit("mul", [y, imp.val(alpha, y)])
    return imp.emit("add" if name == "add" else "sub", [x, y])


@_h("div", "divide", "true_divide", "floor_divide")
def _div(imp: Imp, ov: str, a: Any, b: Any, rounding_mode: str | None = None) -> Any:
    if imp.node.target._opname == "floor_divide":
        rounding_mode = "floor"
    x, y = _binary_operands(imp, a, b)
    return imp.emit("div", [x, y], {"rounding_mode": rounding_mode})


@_h("pow", "float_power")
def _pow(imp: Imp, ov: str, a: Any, b: Any) -> Any:
    if isinstance(b, int | float) and not isinstance(b, bool) and isinstance(a, Value | _CR):
        x = imp.val(a)
        if b == 2:
            return imp.emit("mul", [x, x])
        if b == 1:
            return x
        if b == 0.5:
            return imp.emit("sqrt", [x])
    x, y = _binary_operands(imp, a, b)
    want = _dtype_of(imp)
    return imp.emit("pow", [imp.cast(x, want) if want != x.type.dtype and
                            x.type.rank > 0 else x, y])


@_h("where")
def _where(imp: Imp, ov: str, cond: Any, a: Any = None, b: Any = None) -> Any:
    if a is None:
        raise _Unsupported("where(cond) with one argument is data dependent")
    x, y = _binary_operands(imp, a, b)
    return imp.emit("where", [imp.val(cond), x, y])


@_h("masked_fill")
def _masked_fill(imp: Imp, ov: str, x: Any, mask: Any, value: Any) -> Any:
    v = imp.val(x)
    return imp.emit("where", [imp.val(mask), imp.cast(imp.val(value, v), v.type.dtype), v])


@_h("addcmul", "addcdiv")
def _addc(imp: Imp, ov: str, x: Any, t1: Any, t2: Any, value: Any = 1) -> Any:
    op = "mul" if imp.node.target._opname == "addcmul" else "div"
    v = imp.val(x)
    p = imp.emit(op, [imp.val(t1, v), imp.val(t2, v)])
    if value != 1:
        p = imp.emit("mul", [p, imp.val(value, p)])
    return imp.emit("add", [v, p])


@_h("lerp")
def _lerp(imp: Imp, ov: str, a: Any, b: Any, w: Any) -> Any:
    x, y = _binary_operands(imp, a, b)
    return imp.emit("add", [x, imp.emit("mul", [imp.val(w, x), imp.emit("sub", [y, x])])])


# ----------------------------------------------------------------------------- reductions
def _dims(dim: Any) -> tuple[int, ...] | None:
    if dim is None:
        return None
    if isinstance(dim, int):
        return (dim,)
    return tuple(dim) or None


@_h("sum", "mean", "amax", "amin", "nansum")
def _reduce(imp: Imp, ov: str, x: Any, dim: Any = None, keepdim: bool = False,
            dtype: Any = None) -> Any:
    name = imp.node.target._opname
    if name == "nansum":
        raise _Unsupported("nansum")
    v = imp.val(x)
    if dtype is not None:
        v = imp.cast(v, _dtype_of(imp))
    if v.type.rank == 0:
        return v if name != "mean" else imp.cast(v, _dtype_of(imp))
    return imp.emit(name, [v], {"dims": _dims(dim), "keepdim": bool(keepdim)})


@_h("prod")
def _prod(imp: Imp, ov: str, x: Any, dim: Any = None, keepdim: bool = False,
          dtype: Any = None) -> Any:
    v = imp.val(x)
    if dtype is not None:
        v = imp.cast(v, _dtype_of(imp))
    return imp.emit("prod", [v], {"dims": _dims(dim), "keepdim": bool(keepdim)})


@_h("any", "all")
def _any_all(imp: Imp, ov: str, x: Any, dim: Any = None, keepdim: bool = False) -> Any:
    v = imp.val(x)
    if v.type.dtype != "bool":
        v = imp.emit("ne", [v, imp.val(0, v)])
    if imp.node.target._opname == "all":
        inv = imp.emit("any", [imp.emit("logical_not", [v])], {"dims": _dims(dim),
                                                               "keepdim": bool(keepdim)})
        return imp.emit("logical_not", [inv])
    return imp.emit("any", [v], {"dims": _dims(dim), "keepdim": bool(keepdim)})


@_h("max", "min")
def _max_min(imp: Imp, ov: str, x: Any, dim: Any = None, keepdim: bool = False) -> Any:
    name = imp.node.target._opname
    if isinstance(dim, Value | _CR) or ov == "other":
        x2, y2 = _binary_operands(imp, x, dim)
        return imp.emit("maximum" if name == "max" else "minimum", [x2, y2])
    v = imp.val(x)
    red = "amax" if name == "max" else "amin"
    if dim is None:
        return imp.emit(red, [v], {"dims": None, "keepdim": False})
    vals = imp.emit(red, [v], {"dims": (dim,), "keepdim": bool(keepdim)})
    idx = imp.emit("argmax" if name == "max" else "argmin", [v],
                   {"dim": dim, "keepdim": bool(keepdim)})
    return (vals, idx)


@_h("argmax", "argmin")
def _argmax(imp: Imp, ov: str, x: Any, dim: Any = None, keepdim: bool = False) -> Any:
    v = imp.val(x)
    if dim is None:
        v = imp.emit("reshape", [v], {"shape": (-1,)})
        dim, keepdim = 0, False
        out = imp.emit(imp.node.target._opname, [v], {"dim": 0, "keepdim": False})
        want = imp.meta_type()
        return imp.emit("reshape", [out], {"shape": want.shape}) if want.rank else out
    return imp.emit(imp.node.target._opname, [v], {"dim": dim, "keepdim": bool(keepdim)})


@_h("var", "std", "var_mean", "std_mean")
def _var(imp: Imp, ov: str, x: Any, dim: Any = None, unbiased: Any = None, keepdim: bool = False,
         *, correction: Any = None) -> Any:
    name = imp.node.target._opname
    if isinstance(unbiased, bool) or unbiased is None:
        corr = correction if correction is not None else (1 if unbiased in (None, True) else 0)
    else:  # var.correction(x, dim, *, correction, keepdim) passed positionally
        corr = 1
    v = imp.val(x)
    var = imp.emit("var", [v], {"dims": _dims(dim), "keepdim": bool(keepdim),
                                "correction": corr})
    out = imp.emit("sqrt", [var]) if name.startswith("std") else var
    if name.endswith("_mean"):
        return (out, imp.emit("mean", [v], {"dims": _dims(dim), "keepdim": bool(keepdim)}))
    return out


@_h("logsumexp")
def _logsumexp(imp: Imp, ov: str, x: Any, dim: Any, keepdim: bool = False) -> Any:
    v = imp.val(x)
    dims = _dims(dim)
    m = imp.emit("amax", [v], {"dims": dims, "keepdim": True})
    m = imp.emit("where", [imp.emit("isinf", [m]), imp.val(0.0, m), m])
    s = imp.emit("sum", [imp.emit("exp", [imp.emit("sub", [v, m])])],
                 {"dims": dims, "keepdim": bool(keepdim)})
    if not keepdim:
        m = imp.emit("reshape", [m], {"shape": s.type.shape})
    return imp.emit("add", [imp.emit("log", [s]), m])


@_h("linalg_vector_norm", "norm", "frobenius_norm")
def _norm(imp: Imp, ov: str, x: Any, ord: Any = 2, dim: Any = None,  # noqa: A002
          keepdim: bool = False, dtype: Any = None) -> Any:
    v = imp.val(x)
    if isinstance(ord, list | tuple):  # norm.ScalarOpt_dim(x, p, dim, keepdim)
        raise _Unsupported("norm argument form")
    attrs = {"dims": _dims(dim), "keepdim": bool(keepdim)}
    a = imp.emit("abs", [v])
    if ord in (2, 2.0, None):
        return imp.emit("sqrt", [imp.emit("sum", [imp.emit("mul", [v, v])], attrs)])
    if ord in (1, 1.0):
        return imp.emit("sum", [a], attrs)
    if ord in (math.inf, float("inf")):
        return imp.emit("amax", [a], attrs)
    if ord in (-math.inf,):
        return imp.emit("amin", [a], attrs)
    p = imp.val(float(ord), v)
    s = imp.emit("sum", [imp.emit("pow", [a, p])], attrs)
    return imp.emit("pow", [s, imp.val(1.0 / float(ord), v)])


@_h("cumsum")
def _cumsum(imp: Imp, ov: str, x: Any, dim: int, dtype: Any = None) -> Any:
    v = imp.val(x)
    if dtype is not None:
        v = imp.cast(v, _dtype_of(imp))
    return imp.emit("cumsum", [v], {"dim": dim})


@_h("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(imp: Imp, ov: str, x: Any, dim: int, half_to_float: Any = None) -> Any:
    name = imp.node.target._opname.lstrip("_")
    v = imp.val(x)
    if isinstance(half_to_float, bool) and half_to_float:
        v = imp.cast(v, "float32")
    elif half_to_float is not None and not isinstance(half_to_float, bool):
        v = imp.cast(v, _dtype_of(imp))  # softmax.int(x, dim, dtype)
    if name == "safe_softmax":
        # rows that are entirely -inf give 0 instead of nan
        out = imp.emit("softmax", [v], {"dim": dim})
        allinf = imp.emit("logical_not", [imp.emit("any", [imp.emit(
            "logical_not", [imp.emit("isinf", [v])])], {"dims": (dim,), "keepdim": True})])
        return imp.emit("where", [allinf, imp.val(0.0, out), out])
    return imp.emit("softmax" if name == "softmax" else "log_softmax", [v], {"dim": dim})


@_h("topk")
def _topk(imp: Imp, ov: str, x: Any, k: Any, dim: int = -1, largest: bool = True,
          sorted: bool = True) -> Any:  # noqa: A002
    if isinstance(k, sympy.Basic):
        raise _Unsupported("symbolic k")
    return imp.emit("topk", [imp.val(x)], {"k": k, "dim": dim, "largest": largest,
                                          "sorted": sorted})


# ----------------------------------------------------------------------------- linear algebra
@_h("linear")
def _linear(imp: Imp, ov: str, x: Any, w: Any, b: Any = None) -> Any:
    return imp.emit("linear", [imp.val(x), imp.val(w), None if b is None else imp.val(b)])


@_h("matmul", "mm", "bmm", "mv", "dot", "inner", "vdot")
def _matmul(imp: Imp, ov: str, a: Any, b: Any) -> Any:
    return imp.emit("matmul", [imp.val(a), imp.val(b)])


@_h("addmm", "addmv", "baddbmm")
def _addmm(imp: Imp, ov: str, bias: Any, a: Any, b: Any, beta: Any = 1, alpha: Any = 1) -> Any:
    x = imp.val(a)
    wt = imp.const_tensor(b)
    bv = imp.val(bias)
    if (imp.node.target._opname == "addmm" and wt is not None and alpha == 1 and beta == 1
            and bv.type.rank == 1):
        # GPT-2's Conv1D: x @ W + b with a constant W [in, out] is linear(x, W.T, b)
        key = f"{b.name}.T"
        w = imp.const_vals.get(key)
        if w is None:
            w = imp.b.add_param(imp.consts[b.name][0] + ".T", wt.t().contiguous())
            imp.const_vals[key] = w
        return imp.emit("linear", [x, w, bv])
    y = imp.emit("matmul", [x, imp.val(b)])
    if alpha != 1:
        y = imp.emit("mul", [y, imp.val(alpha, y)])
    if beta == 0:
        return y
    if beta != 1:
        bv = imp.emit("mul", [bv, imp.val(beta, bv)])
    return imp.emit("add", [y, bv])


@_h("t", "numpy_T", "adjoint", "mT", "mH")
def _t(imp: Imp, ov: str, x: Any) -> Any:
    v = imp.val(x)
    if v.type.rank < 2:
        return v
    perm = list(range(v.type.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return imp.emit("permute", [v], {"perm": tuple(perm)})


@_h("scaled_dot_product_attention")
def _sdpa(imp: Imp, ov: str, q: Any, k: Any, v: Any, attn_mask: Any = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
          enable_gqa: bool = False) -> Any:
    ins = [imp.val(q), imp.val(k), imp.val(v)]
    if attn_mask is not None:
        ins.append(imp.val(attn_mask))
    if isinstance(scale, sympy.Basic):
        raise _Unsupported("symbolic attention scale")
    return imp.emit("attention", ins, {"scale": None if scale is None else float(scale),
                                       "is_causal": bool(is_causal),
                                       "enable_gqa": bool(enable_gqa)})


@_h("embedding")
def _embedding(imp: Imp, ov: str, w: Any, idx: Any, *a: Any, **kw: Any) -> Any:
    return imp.emit("embedding", [imp.val(w), imp.val(idx)])


# ----------------------------------------------------------------------------- conv / pool
def _static(vals: Any, what: str) -> Any:
    if isinstance(vals, list | tuple):
        if any(isinstance(v, sympy.Basic) for v in vals):
            raise _Unsupported(f"symbolic {what}")
        return tuple(int(v) for v in vals)
    if isinstance(vals, sympy.Basic):
        raise _Unsupported(f"symbolic {what}")
    return vals


@_h("conv1d", "conv2d", "conv3d")
def _conv(imp: Imp, ov: str, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, groups: int = 1) -> Any:
    xv, wv = imp.val(x), imp.val(w)
    nsp = wv.type.rank - 2
    st = _tup(stride, nsp)
    dl = _tup(dilation, nsp)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            pads, sym_pad = [], []
            for i in range(nsp):
                total = dl[i] * (wv.type.shape[2 + i] - 1)
                pads.append((total // 2, total - total // 2))
                sym_pad.append(total // 2)
            if all(lo == hi for lo, hi in pads):
                padding = tuple(sym_pad)
            else:
                flat: list[int] = []
                for lo, hi in reversed(pads):
                    flat += [lo, hi]
                xv = imp.emit("pad", [xv], {"pads": tuple(flat), "mode": "constant",
                                            "value": 0.0})
                padding = 0
        else:
            raise _Unsupported(f"padding '{padding}'")
    bv = None if b is None else imp.val(b)
    return imp.emit("conv", [xv, wv, bv], {"stride": st, "padding": _tup(padding, nsp),
                                           "dilation": dl, "groups": int(groups)})


def _tup(v: Any, n: int) -> tuple[int, ...]:
    v = _static(v, "conv/pool parameter")
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


@_h("convolution", "_convolution")
def _convolution(imp: Imp, ov: str, x: Any, w: Any, b: Any, stride: Any, padding: Any,
                 dilation: Any, transposed: bool, output_padding: Any, groups: int,
                 *rest: Any) -> Any:
    if not transposed:
        return _conv(imp, ov, x, w, b, stride, padding, dilation, groups)
    return _conv_t(imp, ov, x, w, b, stride, padding, output_padding, groups, dilation)


@_h("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_t(imp: Imp, ov: str, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0,
            output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> Any:
    wv = imp.val(w)
    nsp = wv.type.rank - 2
    return imp.emit("conv_transpose", [imp.val(x), wv, None if b is None else imp.val(b)],
                    {"stride": _tup(stride, nsp), "padding": _tup(padding, nsp),
                     "dilation": _tup(dilation, nsp), "output_padding": _tup(output_padding, nsp),
                     "groups": int(groups)})


@_h("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "max_pool1d_with_indices", "max_pool3d_with_indices")
def _max_pool(imp: Imp, ov: str, x: Any, kernel: Any, stride: Any = None, padding: Any = 0,
              dilation: Any = 1, ceil_mode: bool = False) -> Any:
    v = imp.val(x)
    nsp = int(imp.node.target._opname.split("max_pool")[1][0])
    if v.type.rank == nsp + 1:
        raise _Unsupported("unbatched pooling input")
    out = imp.emit("max_pool", [v], {
        "kernel": _tup(kernel, nsp), "stride": _tup(stride, nsp) if stride else None,
        "padding": _tup(padding, nsp), "dilation": _tup(dilation, nsp),
        "ceil_mode": bool(ceil_mode)})
    if "with_indices" in imp.node.target._opname:
        return (out, _MissingOut())
    return out


@_h("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(imp: Imp, ov: str, x: Any, kernel: Any, stride: Any = None, padding: Any = 0,
              ceil_mode: bool = False, count_include_pad: bool = True,
              divisor_override: Any = None) -> Any:
    if divisor_override is not None:
        raise _Unsupported("divisor_override")
    v = imp.val(x)
    nsp = int(imp.node.target._opname.split("avg_pool")[1][0])
    if v.type.rank == nsp + 1:
        raise _Unsupported("unbatched pooling input")
    return imp.emit("avg_pool", [v], {
        "kernel": _tup(kernel, nsp), "stride": _tup(stride, nsp) if stride else None,
        "padding": _tup(padding, nsp), "ceil_mode": bool(ceil_mode),
        "count_include_pad": bool(count_include_pad)})


@_h("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d")
def _adaptive_avg(imp: Imp, ov: str, x: Any, output_size: Any) -> Any:
    v = imp.val(x)
    nsp = int(imp.node.target._opname.lstrip("_").split("pool")[1][0])
    if v.type.rank == nsp + 1:
        raise _Unsupported("unbatched pooling input")
    size = _tup(output_size, nsp)
    if all(s == 1 for s in size):  # global average pooling is a mean
        dims = tuple(range(2, 2 + nsp))
        return imp.emit("mean", [v], {"dims": dims, "keepdim": True})
    return imp.emit("adaptive_avg_pool", [v], {"output_size": size})


@_h("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
    "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact1d")
def _upsample(imp: Imp, ov: str, x: Any, output_size: Any = None, *args: Any) -> Any:
    from ..ir import has_op

    if not has_op("interpolate"):
        raise _Unsupported("no IR op 'interpolate'")
    name = imp.node.target._opname.lstrip("_")
    mode = {"nearest": "nearest", "nearest_exact": "nearest-exact", "bilinear": "bilinear",
            "linear": "linear", "bicubic": "bicubic", "trilinear": "trilinear"}[
        name.split("_", 1)[1][:-2]]
    align = False
    if mode not in ("nearest", "nearest-exact") and args and isinstance(args[0], bool):
        align = args[0]
    want = imp.meta_type()
    size = _static(tuple(want.shape[2:]), "upsample size")
    return imp.emit("interpolate", [imp.val(x)], {"size": size, "mode": mode,
                                                  "align_corners": align})


# ----------------------------------------------------------------------------- norms
@_h("layer_norm", "native_layer_norm")
def _layer_norm(imp: Imp, ov: str, x: Any, shape: Any, w: Any = None, b: Any = None,
                eps: float = 1e-5, *rest: Any) -> Any:
    ins = [imp.val(x), None if w is None else imp.val(w), None if b is None else imp.val(b)]
    while ins and ins[-1] is None:
        ins.pop()
    out = imp.emit("layer_norm", ins, {"axes": len(shape), "eps": float(eps)})
    if imp.node.target._opname == "native_layer_norm":
        return (out, _MissingOut(), _MissingOut())
    return out


@_h("rms_norm", "_fused_rms_norm")
def _rms_norm(imp: Imp, ov: str, x: Any, shape: Any, w: Any = None, eps: Any = None) -> Any:
    ins = [imp.val(x)] + ([imp.val(w)] if w is not None else [])
    out = imp.emit("rms_norm", ins, {"axes": len(shape),
                                     "eps": None if eps is None else float(eps)})
    if imp.node.target._opname == "_fused_rms_norm":
        return (out, _MissingOut())
    return out


@_h("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
    "_native_batch_norm_legit", "cudnn_batch_norm", "_batch_norm_impl_index")
def _batch_norm(imp: Imp, ov: str, x: Any, w: Any, b: Any, mean: Any, var: Any,
                *rest: Any, **kw: Any) -> Any:
    name = imp.node.target._opname
    if name == "_native_batch_norm_legit_no_training":
        eps = rest[1]  # (momentum, eps)
    else:
        training, eps = rest[0], rest[2]  # (training, momentum, eps)
        if training:
            raise _Unsupported("batch_norm in training mode")
    if mean is None or var is None:
        raise _Unsupported("batch_norm without running statistics")
    ins = [imp.val(x), imp.val(mean), imp.val(var), None if w is None else imp.val(w),
           None if b is None else imp.val(b)]
    while ins[-1] is None:
        ins.pop()
    out = imp.emit("batch_norm", ins, {"eps": float(eps)})
    if name == "batch_norm":
        return out
    return (out, _MissingOut(), _MissingOut())


@_h("group_norm", "native_group_norm")
def _group_norm(imp: Imp, ov: str, x: Any, *args: Any) -> Any:
    if imp.node.target._opname == "group_norm":
        groups, w, b, eps = (list(args) + [None, None, 1e-5])[:4]
        if len(args) >= 4:
            eps = args[3]
    else:  # native_group_norm(x, w, b, N, C, HxW, group, eps)
        w, b, groups, eps = args[0], args[1], args[5], args[6]
    ins = [imp.val(x), None if w is None else imp.val(w), None if b is None else imp.val(b)]
    while ins[-1] is None:
        ins.pop()
    out = imp.emit("group_norm", ins, {"groups": int(groups), "eps": float(eps or 1e-5)})
    if imp.node.target._opname == "native_group_norm":
        return (out, _MissingOut(), _MissingOut())
    return out


# ----------------------------------------------------------------------------- shapes
@_h("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "flatten", "unflatten",
    "squeeze", "unsqueeze", "squeeze_copy", "unsqueeze_copy", "expand_dims", "ravel",
    "atleast_1d", "atleast_2d", "atleast_3d", "_reshape_copy")
def _reshape(imp: Imp, ov: str, x: Any, *args: Any, **kw: Any) -> Any:
    v = imp.val(x)
    want = imp.meta_type()
    if _shape_eq(v.type.shape, want.shape):
        return v
    return imp.emit("reshape", [v], {"shape": want.shape})


def _shape_eq(a: Sequence[Dim], b: Sequence[Dim]) -> bool:
    return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


@_h("permute", "permute_copy")
def _permute(imp: Imp, ov: str, x: Any, perm: Any) -> Any:
    v = imp.val(x)
    perm = tuple(_nd(p, v.type.rank) for p in perm)
    if perm == tuple(range(v.type.rank)):
        return v
    return imp.emit("permute", [v], {"perm": perm})


@_h("transpose", "swapaxes", "swapdims", "transpose_copy")
def _transpose(imp: Imp, ov: str, x: Any, d0: int, d1: int) -> Any:
    v = imp.val(x)
    r = v.type.rank
    perm = list(range(r))
    a, b = _nd(d0, r), _nd(d1, r)
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(imp, ov, v, perm)


@_h("movedim", "moveaxis")
def _movedim(imp: Imp, ov: str, x: Any, src: Any, dst: Any) -> Any:
    v = imp.val(x)
    r = v.type.rank
    src = [_nd(s, r) for s in ([src] if isinstance(src, int) else src)]
    dst = [_nd(d, r) for d in ([dst] if isinstance(dst, int) else dst)]
    perm = [-1] * r
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(i for i in range(r) if i not in src)
    perm = [p if p >= 0 else next(rest) for p in perm]
    return _permute(imp, ov, v, perm)


@_h("expand", "expand_copy", "broadcast_to", "expand_as")
def _expand(imp: Imp, ov: str, x: Any, *args: Any, **kw: Any) -> Any:
    v = imp.val(x)
    want = imp.meta_type()
    if _shape_eq(v.type.shape, want.shape):
        return v
    return imp.emit("expand", [v], {"shape": want.shape})


@_h("repeat", "tile")
def _repeat(imp: Imp, ov: str, x: Any, reps: Any) -> Any:
    v = imp.val(x)
    reps = tuple(reps)
    if imp.node.target._opname == "tile" and len(reps) < v.type.rank:
        reps = (1,) * (v.type.rank - len(reps)) + reps
    return imp.emit("tile", [v], {"repeats": reps})


@_h("repeat_interleave")
def _repeat_interleave(imp: Imp, ov: str, x: Any, repeats: Any = None, dim: Any = None,
                       *, output_size: Any = None) -> Any:
    v = imp.val(x)
    if not isinstance(repeats, int) or dim is None:
        raise _Unsupported("repeat_interleave with tensor repeats or no dim")
    d = _nd(dim, v.type.rank)
    shape = list(v.type.shape)
    u = imp.emit("reshape", [v], {"shape": (*shape[:d + 1], 1, *shape[d + 1:])})
    e = imp.emit("expand", [u], {"shape": (*shape[:d + 1], repeats, *shape[d + 1:])})
    return imp.emit("reshape", [e], {"shape": imp.meta_type().shape})


@_h("slice", "slice_copy")
def _slice(imp: Imp, ov: str, x: Any, dim: int = 0, start: Any = None, end: Any = None,
           step: int = 1) -> Any:
    v = imp.val(x)
    d = _nd(dim, v.type.rank)
    size = v.type.shape[d]
    start = 0 if start is None else start
    end = BIG if end is None else end
    if isinstance(end, int) and end >= BIG:
        end = BIG
    if isinstance(start, int) and start == 0 and isinstance(end, int) and end == BIG and step == 1:
        return v
    if isinstance(size, int) and isinstance(end, int) and end >= size and end != BIG:
        end = BIG
    if not isinstance(end, int):
        end = _clip_sym_end(end, size)
    return imp.emit("slice", [v], {"dim": d, "start": start, "end": end, "step": int(step)})


def _clip_sym_end(end: Any, size: Dim) -> Any:
    # torch clamps the end to the size; when the end provably equals the size, say "to the end"
    try:
        if simplify(end - size) == 0:
            return BIG
    except TypeError:
        pass
    return end


@_h("narrow", "narrow_copy")
def _narrow(imp: Imp, ov: str, x: Any, dim: int, start: Any, length: Any) -> Any:
    if isinstance(start, Value):
        raise _Unsupported("tensor start")
    return _slice(imp, ov, x, dim, start, simplify(start + length), 1)


@_h("select", "select_copy")
def _select(imp: Imp, ov: str, x: Any, dim: int, index: Any) -> Any:
    v = imp.val(x)
    d = _nd(dim, v.type.rank)
    if isinstance(index, sympy.Basic):
        s = imp.emit("slice", [v], {"dim": d, "start": index, "end": simplify(index + 1),
                                    "step": 1})
        return imp.emit("reshape", [s], {"shape": imp.meta_type().shape})
    return imp.emit("select", [v], {"dim": d, "index": int(index)})


@_h("cat", "concat", "concatenate")
def _cat(imp: Imp, ov: str, xs: Any, dim: int = 0) -> Any:
    vals = [imp.val(x) for x in xs]
    # torch.cat skips 1-d empty tensors (legacy behaviour)
    vals = [v for v in vals if not (v.type.rank == 1 and v.type.shape[0] == 0)] or vals
    if len(vals) == 1:
        return vals[0]
    return imp.emit("concat", vals, {"dim": _nd(dim, vals[0].type.rank)})


@_h("stack", "hstack", "vstack")
def _stack(imp: Imp, ov: str, xs: Any, dim: int = 0) -> Any:
    name = imp.node.target._opname
    vals = [imp.val(x) for x in xs]
    if name != "stack":
        raise _Unsupported(name)
    d = dim % (vals[0].type.rank + 1)
    us = []
    for v in vals:
        shape = list(v.type.shape)
        us.append(imp.emit("reshape", [v], {"shape": (*shape[:d], 1, *shape[d:])}))
    return us[0] if len(us) == 1 else imp.emit("concat", us, {"dim": d})


@_h("split", "split_with_sizes", "split_copy", "split_with_sizes_copy", "chunk",
    "tensor_split", "unsafe_split", "unsafe_chunk", "unsafe_split_with_sizes")
def _split(imp: Imp, ov: str, x: Any, sizes: Any, dim: int = 0) -> Any:
    v = imp.val(x)
    d = _nd(dim, v.type.rank)
    outs = imp.node.meta.get("val")
    start: Any = 0
    res = []
    for o in outs:
        n = imp.syms.dim(o.shape[d])
        end = simplify(start + n)
        res.append(_slice(imp, ov, v, d, start, end, 1))
        start = end
    return tuple(res)


@_h("unbind", "unbind_copy")
def _unbind(imp: Imp, ov: str, x: Any, dim: int = 0) -> Any:
    v = imp.val(x)
    d = _nd(dim, v.type.rank)
    n = v.type.shape[d]
    if not isinstance(n, int):
        raise _Unsupported("unbind along a symbolic dim")
    return tuple(imp.emit("select", [v], {"dim": d, "index": i}) for i in range(n))


@_h("flip")
def _flip(imp: Imp, ov: str, x: Any, dims: Any) -> Any:
    v = imp.val(x)
    return imp.emit("flip", [v], {"dims": tuple(_nd(d, v.type.rank) for d in dims)})


@_h("roll")
def _roll(imp: Imp, ov: str, x: Any, shifts: Any, dims: Any = ()) -> Any:
    v = imp.val(x)
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims:
        flat = imp.emit("reshape", [v], {"shape": (-1,)})
        r = imp.emit("roll", [flat], {"shifts": shifts, "dims": (0,)})
        return imp.emit("reshape", [r], {"shape": v.type.shape})
    return imp.emit("roll", [v], {"shifts": shifts, "dims": dims})


@_h("tril", "triu")
def _tril(imp: Imp, ov: str, x: Any, diagonal: int = 0) -> Any:
    return imp.emit(imp.node.target._opname, [imp.val(x)], {"diagonal": int(diagonal)})


@_h("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
    "replication_pad1d", "replication_pad2d", "replication_pad3d", "circular_pad1d",
    "circular_pad2d", "_pad_circular")
def _pad(imp: Imp, ov: str, x: Any, pads: Any, mode: Any = "constant", value: Any = None) -> Any:
    name = imp.node.target._opname
    if name == "constant_pad_nd":
        mode, value = "constant", mode if not isinstance(mode, str) else 0.0
    elif name.startswith("reflection"):
        mode = "reflect"
    elif name.startswith("replication"):
        mode = "replicate"
    elif "circular" in name:
        mode = "circular"
    pads = _static(pads, "padding")
    return imp.emit("pad", [imp.val(x)], {"pads": pads, "mode": mode,
                                          "value": float(value or 0.0)})


def _normalize_index(imp: Imp, idx: Value, size: Dim) -> Value:
    """Wraps negative indices (torch allows -size <= i < size)."""
    return imp.emit("remainder", [idx, imp.val(size if isinstance(size, sympy.Basic)
                                               else int(size), idx)])


@_h("index", "_unsafe_index")
def _index(imp: Imp, ov: str, x: Any, indices: Any) -> Any:
    """Advanced indexing ``x[i0, i1, ...]`` with integer index tensors (None = full dim)."""
    v = imp.val(x)
    idx = list(indices) + [None] * (v.type.rank - len(indices))
    pos = [i for i, t in enumerate(idx) if t is not None]
    tens = [imp.val(idx[i]) for i in pos]
    if any(t.type.dtype in ("bool", "uint8") for t in tens):
        raise _Unsupported("boolean mask indexing is data dependent")
    if len(pos) == 1:
        d = pos[0]
        i = _normalize_index(imp, tens[0], v.type.shape[d])
        return imp.emit("index_select", [v, i], {"dim": d})
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    if not adjacent:  # torch puts the broadcast index dims first
        rest = [i for i in range(v.type.rank) if i not in pos]
        v = imp.emit("permute", [v], {"perm": tuple(pos + rest)})
        pos = list(range(len(pos)))
    shape = list(v.type.shape)
    lin = None
    stride: Dim = 1
    for d, t in reversed(list(zip(pos, tens))):
        t = _normalize_index(imp, imp.cast(t, "int64"), shape[d])
        term = t if stride == 1 else imp.emit("mul", [t, imp.val(stride, t)])
        lin = term if lin is None else imp.emit("add", [term, lin])
        stride = simplify(stride * shape[d])
    merged = (*shape[:pos[0]], stride, *shape[pos[-1] + 1:])
    flat = imp.emit("reshape", [v], {"shape": merged})
    return imp.emit("index_select", [flat, lin], {"dim": pos[0]})


@_h("index_select")
def _index_select(imp: Imp, ov: str, x: Any, dim: int, idx: Any) -> Any:
    v = imp.val(x)
    d = _nd(dim, v.type.rank)
    return imp.emit("index_select", [v, _normalize_index(imp, imp.val(idx), v.type.shape[d])],
                    {"dim": d})


@_h("gather", "take_along_dim")
def _gather(imp: Imp, ov: str, x: Any, dim: Any, idx: Any = None, *a: Any, **kw: Any) -> Any:
    if imp.node.target._opname == "take_along_dim":
        x, idx, dim = x, dim, idx
        if dim is None:
            raise _Unsupported("take_along_dim without dim")
    v = imp.val(x)
    return imp.emit("gather", [v, imp.val(idx)], {"dim": _nd(dim, v.type.rank)})


@_h("slice_scatter")
def _slice_scatter(imp: Imp, ov: str, x: Any, src: Any, dim: int = 0, start: Any = None,
                   end: Any = None, step: int = 1) -> Any:
    v, s = imp.val(x), imp.val(src)
    if step != 1:
        raise _Unsupported("slice_scatter with step")
    d = _nd(dim, v.type.rank)
    start = 0 if start is None else start
    end_ = simplify(start + s.type.shape[d])
    parts = []
    if not (isinstance(start, int) and start == 0):
        parts.append(imp.emit("slice", [v], {"dim": d, "start": 0, "end": start, "step": 1}))
    parts.append(imp.cast(s, v.type.dtype))
    size = v.type.shape[d]
    if not _shape_eq((end_,), (size,)):
        parts.append(imp.emit("slice", [v], {"dim": d, "start": end_, "end": BIG, "step": 1}))
    return parts[0] if len(parts) == 1 else imp.emit("concat", parts, {"dim": d})


@_h("copy")
def _copy(imp: Imp, ov: str, x: Any, src: Any, non_blocking: bool = False) -> Any:
    """Functional ``x.copy_(src)`` (in-place writes such as ``t[1:, 1:] = u``): ``src``
    broadcast to ``x``'s shape, cast to ``x``'s dtype; ``x``'s values are not read."""
    v, s = imp.val(x), imp.val(src)
    s = imp.cast(s, v.type.dtype)
    if s.type.rank < v.type.rank:
        s = imp.emit("reshape", [s], {"shape": (*([1] * (v.type.rank - s.type.rank)),
                                                 *s.type.shape)})
    if not _shape_eq(s.type.shape, v.type.shape):
        s = imp.emit("expand", [s], {"shape": v.type.shape})
    return s


@_h("select_scatter")
def _select_scatter(imp: Imp, ov: str, x: Any, src: Any, dim: int, index: int) -> Any:
    v, s = imp.val(x), imp.val(src)
    d = _nd(dim, v.type.rank)
    shape = list(s.type.shape)
    s = imp.emit("reshape", [s], {"shape": (*shape[:d], 1, *shape[d:])})
    size = v.type.shape[d]
    if isinstance(index, int) and index < 0:
        index = simplify(size + index)
    return _slice_scatter(imp, ov, v, s, d, index, simplify(index + 1), 1)


# ----------------------------------------------------------------------------- creation
def _fill_value(x: Any) -> Any:
    if isinstance(x, bool):
        return x
    if isinstance(x, int | float | sympy.Basic):
        return x
    raise _Unsupported(f"fill value {x!r}")


@_h("full", "new_full")
def _full(imp: Imp, ov: str, *args: Any, **kw: Any) -> Any:
    value = args[-1] if imp.node.target._opname == "full" else args[2]
    if isinstance(value, Value):
        raise _Unsupported("tensor fill value")
    want = imp.meta_type()
    return imp.emit("full", [], {"shape": want.shape, "value": _fill_value(value),
                                 "dtype": want.dtype})


@_h("zeros", "ones", "empty", "new_zeros", "new_ones", "new_empty", "zeros_like", "ones_like",
    "empty_like", "empty_strided", "new_empty_strided", "full_like", "fill", "empty_permuted",
    "scalar_tensor", "rand_like", "randn_like")
def _const_fill(imp: Imp, ov: str, *args: Any, **kw: Any) -> Any:
    name = imp.node.target._opname
    if name in ("rand_like", "randn_like"):
        raise _Unsupported("random numbers")
    want = imp.meta_type()
    if name in ("ones", "new_ones", "ones_like"):
        value: Any = 1
    elif name in ("full_like", "fill"):
        if isinstance(args[1], Value):  # fill.Tensor: a 0-d tensor value, broadcast
            v = imp.cast(imp.val(args[1]), want.dtype)
            if v.type.rank != len(want.shape):
                v = imp.emit("reshape", [v], {"shape": (1,) * len(want.shape)})
            return imp.emit("expand", [v], {"shape": want.shape})
        value = _fill_value(args[1])
    elif name == "scalar_tensor":
        value = _fill_value(args[0])
    else:  # zeros and uninitialised tensors (zeros are a valid value for "empty")
        value = 0
    if want.dtype == "bool":
        value = bool(value)
    elif want.dtype.startswith("float") or want.dtype == "bfloat16":
        value = float(value) if not isinstance(value, sympy.Basic) else value
    return imp.emit("full", [], {"shape": want.shape, "value": value, "dtype": want.dtype})


@_h("arange")
def _arange(imp: Imp, ov: str, *args: Any, **kw: Any) -> Any:
    nums = [a for a in args if isinstance(a, int | float | sympy.Basic)]
    if ov == "default" or len(nums) == 1:
        start, end, step = 0, nums[0], 1
    elif len(nums) == 2:
        start, end, step = nums[0], nums[1], 1
    else:
        start, end, step = nums[0], nums[1], nums[2]
    want = imp.meta_type()
    if isinstance(step, sympy.Basic):
        raise _Unsupported("symbolic arange step")
    return imp.emit("arange", [], {"start": start, "end": end, "step": step,
                                   "dtype": want.dtype})


@_h("linspace")
def _linspace(imp: Imp, ov: str, start: Any, end: Any, steps: Any, **kw: Any) -> Any:
    if not all(isinstance(a, int | float) for a in (start, end, steps)):
        raise _Unsupported("linspace with tensor or symbolic arguments")
    want = imp.meta_type()
    if steps == 1:
        return imp.emit("full", [], {"shape": (1,), "value": float(start), "dtype": want.dtype})
    r = imp.emit("arange", [], {"start": 0, "end": steps, "step": 1, "dtype": want.dtype})
    delta = (end - start) / (steps - 1)
    return imp.emit("add", [imp.emit("mul", [r, imp.val(float(delta), r)]),
                            imp.val(float(start), r)])


@_h("one_hot")
def _one_hot(imp: Imp, ov: str, x: Any, num_classes: int = -1) -> Any:
    if num_classes < 0:
        raise _Unsupported("one_hot without num_classes is data dependent")
    v = imp.val(x)
    r = imp.emit("arange", [], {"start": 0, "end": num_classes, "step": 1, "dtype": "int64"})
    u = imp.emit("reshape", [v], {"shape": (*v.type.shape, 1)})
    return imp.cast(imp.emit("eq", [u, r]), "int64")

