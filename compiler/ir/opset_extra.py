"""Ops beyond the core set, needed by frontends (ONNX and others).

``resize`` (every ONNX Resize mode: nearest/linear/cubic, all coordinate transformations,
antialias, tf_crop_and_resize), ``einsum``, ``gather_nd``, ``scatter_elements``, ``scatter_nd``,
``one_hot`` and a few elementwise ops (``tan``, ``asin``, ... ``bitwise_xor``, ``isinf``).
An op is registered here only when the core set (``opset.py``) does not already define it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .ops import REQUIRED, OpDef, OpTypeError, has_op, register_op
from .opset import broadcast_shapes, promote
from .shapes import Dim, simplify
from .types import TensorType, is_float

__all__ = ["resize_reference"]

Types = Sequence[TensorType | None]
Attrs = Mapping[str, Any]


def _reg(name: str, infer: Any, ref: Any, attrs: dict | None = None, n: int | tuple = 1,
         traits: tuple[str, ...] = (), doc: str = "") -> None:
    if has_op(name):  # the core set gained it: the core definition wins
        return
    lo, hi = (n, n) if isinstance(n, int) else n
    register_op(OpDef(name, infer, ref, attrs or {}, lo, hi, frozenset(traits), doc))


def _t(types: Types, i: int, op: str) -> TensorType:
    t = types[i]
    if t is None:
        raise OpTypeError(f"op '{op}': input {i} is required")
    return t


def _float_same(types: Types, attrs: Attrs) -> list[TensorType]:
    t = _t(types, 0, "unary")
    return [t if is_float(t.dtype) else t.with_dtype("float32")]


# ----------------------------------------------------------------------------- elementwise
_UNARY = {"tan": torch.tan, "asin": torch.asin, "acos": torch.acos, "sinh": torch.sinh,
          "cosh": torch.cosh, "asinh": torch.asinh, "acosh": torch.acosh, "atanh": torch.atanh}
for _name, _fn in _UNARY.items():
    _reg(_name, _float_same, lambda x, a, _fn=_fn: _fn(x[0]), traits=("elementwise",),
         doc=f"elementwise {_name}")
_reg("bitwise_not", lambda t, a: [_t(t, 0, "bitwise_not")],
     lambda x, a: torch.bitwise_not(x[0]), traits=("elementwise",))


def _binary_same(types: Types, attrs: Attrs) -> list[TensorType]:
    a, b = _t(types, 0, "binary"), _t(types, 1, "binary")
    return [TensorType(promote(a, b), broadcast_shapes(a.shape, b.shape))]


_reg("bitwise_xor", _binary_same, lambda x, a: torch.bitwise_xor(x[0], x[1]), n=2,
     traits=("elementwise",))


def _isinf_ref(x: Any, a: Attrs) -> torch.Tensor:
    t = x[0]
    pos, neg = torch.isposinf(t), torch.isneginf(t)
    if a["detect_positive"] and a["detect_negative"]:
        return pos | neg
    if a["detect_positive"]:
        return pos
    if a["detect_negative"]:
        return neg
    return torch.zeros_like(pos)


_reg("isinf", lambda t, a: [_t(t, 0, "isinf").with_dtype("bool")], _isinf_ref,
     {"detect_positive": True, "detect_negative": True}, traits=("elementwise",))


# ----------------------------------------------------------------------------- resize
_MODES = ("nearest", "linear", "cubic")
_CTMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
         "asymmetric", "tf_crop_and_resize")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _t(types, 0, "resize")
    sizes = tuple(attrs["sizes"])
    if len(sizes) != x.rank:
        raise OpTypeError(f"resize: sizes {sizes} do not match rank of {x}")
    if attrs["mode"] not in _MODES:
        raise OpTypeError(f"resize: unknown mode '{attrs['mode']}'")
    if attrs["coordinate_transformation_mode"] not in _CTMS:
        raise OpTypeError(f"resize: unknown coordinate transformation "
                          f"'{attrs['coordinate_transformation_mode']}'")
    if attrs["nearest_mode"] not in _NEAREST:
        raise OpTypeError(f"resize: unknown nearest_mode '{attrs['nearest_mode']}'")
    scales = attrs["scales"]
    if scales is not None and len(scales) != x.rank:
        raise OpTypeError(f"resize: scales {scales} do not match rank of {x}")
    return [x.with_shape(sizes)]


def _axis_coeffs(mode: str, ratio: torch.Tensor, scale: float, a: Attrs) -> torch.Tensor:
    """[out, n] interpolation coefficients for the fractional offsets ``ratio`` in (0, 1]."""
    r = ratio[:, None]
    if mode == "nearest":
        nm = a["nearest_mode"]
        integer = (ratio == 1.0)[:, None]
        if nm == "round_prefer_floor":
            right = r > 0.5
        elif nm == "round_prefer_ceil":
            right = r >= 0.5
        elif nm == "floor":
            right = torch.zeros_like(r, dtype=torch.bool)
        else:
            right = torch.ones_like(r, dtype=torch.bool)
        right = right | integer
        return torch.cat([(~right).double(), right.double()], dim=1)
    big_a = a["cubic_coeff_a"]
    if a["antialias"] and scale < 1.0:
        if mode == "linear":
            start = int(math.floor(-1 / scale) + 1)
            off = torch.arange(start, 2 - start, dtype=torch.float64)[None, :]
            c = torch.clamp(1 - torch.abs((off - r) * scale), 0, 1)
        else:
            start = int(math.floor(-2 / scale) + 1)
            off = torch.arange(start, 2 - start, dtype=torch.float64)[None, :]
            x = torch.abs(scale * (off - r))
            c = torch.where(x <= 1, (big_a + 2) * x**3 - (big_a + 3) * x**2 + 1,
                            torch.where(x < 2, big_a * x**3 - 5 * big_a * x**2 + 8 * big_a * x
                                        - 4 * big_a, torch.zeros_like(x)))
        return c / c.sum(dim=1, keepdim=True)
    if mode == "linear":
        return torch.cat([1 - r, r], dim=1)
    s = 1 - r
    return torch.cat([
        ((big_a * (r + 1) - 5 * big_a) * (r + 1) + 8 * big_a) * (r + 1) - 4 * big_a,
        ((big_a + 2) * r - (big_a + 3)) * r * r + 1,
        ((big_a + 2) * s - (big_a + 3)) * s * s + 1,
        ((big_a * (s + 1) - 5 * big_a) * (s + 1) + 8 * big_a) * (s + 1) - 4 * big_a,
    ], dim=1)


def _source_coords(ctm: str, n_out: int, n_in: int, scale: float,
                   roi: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    y = torch.arange(n_out, dtype=torch.float64)
    width = scale * n_in
    extrap = None
    if ctm == "align_corners":
        x = torch.zeros_like(y) if width == 1 else y * (n_in - 1) / (width - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        if width == 1:
            x = torch.full_like(y, (hi - lo) * (n_in - 1) / 2)
        else:
            x = y * (hi - lo) * (n_in - 1) / (width - 1)
        x = x + lo * (n_in - 1)
        extrap = (x < 0) | (x > n_in - 1)
    elif ctm == "pytorch_half_pixel":
        x = torch.full_like(y, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    else:  # half_pixel_symmetric
        offset = (n_in / 2) * (1 - n_out / width)
        x = offset + (y + 0.5) / scale - 0.5
    return x, extrap


def _resize_axis(x: torch.Tensor, axis: int, n_out: int, scale: float,
                 roi: tuple[float, float] | None, a: Attrs) -> torch.Tensor:
    n_in = x.shape[axis]
    if n_out == 0:
        shape = list(x.shape)
        shape[axis] = 0
        return x.new_empty(shape)
    src, extrap = _source_coords(a["coordinate_transformation_mode"], n_out, n_in, scale, roi)
    base = torch.floor(src)
    ratio = torch.where(src == base, torch.ones_like(src), src - base)
    coeffs = _axis_coeffs(a["mode"], ratio, scale, a)
    n = coeffs.shape[1]
    pad = (n + 1) // 2
    xp = src + pad
    p = torch.floor(xp)
    frac = xp - p
    start = p.long() + torch.where(frac == 0, -(n // 2), -(n // 2) + 1)
    idx = start[:, None] + torch.arange(n)[None, :] - pad
    if a["exclude_outside"]:
        coeffs = torch.where((idx < 0) | (idx >= n_in), torch.zeros_like(coeffs), coeffs)
        tot = coeffs.sum(dim=1, keepdim=True)
        coeffs = coeffs / torch.where(tot == 0, torch.ones_like(tot), tot)
    idx = idx.clamp(0, n_in - 1)
    if a["mode"] == "nearest":  # exact for every dtype: pick one source element
        pick = idx.gather(1, coeffs.argmax(dim=1, keepdim=True))[:, 0]
        out = torch.index_select(x, axis, pick)
    else:
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        w.scatter_add_(1, idx, coeffs)
        xd = x.double().movedim(axis, -1)
        out = torch.matmul(xd, w.T).movedim(-1, axis)
    if extrap is not None and bool(extrap.any()):
        shape = [1] * x.dim()
        shape[axis] = n_out
        fill = torch.tensor(a["extrapolation_value"], dtype=out.dtype)
        out = torch.where(extrap.reshape(shape), fill, out)
    return out


def resize_reference(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    """ONNX Resize semantics, separable: one 1-d interpolation per resized axis."""
    t = x[0]
    assert t is not None
    sizes = [int(s) for s in a["sizes"]]
    rank = t.dim()
    scales = a["scales"]
    roi = a["roi"]
    out = t
    for ax in range(rank):
        n_in = t.shape[ax]
        scale = float(scales[ax]) if scales is not None else (
            sizes[ax] / n_in if n_in else 1.0)
        ax_roi = None if roi is None else (float(roi[ax]), float(roi[rank + ax]))
        crop = a["coordinate_transformation_mode"] == "tf_crop_and_resize"
        if (sizes[ax] == n_in and math.isclose(scale, 1.0)
                and (not crop or ax_roi is None or ax_roi == (0.0, 1.0))):
            continue
        out = _resize_axis(out, ax, sizes[ax], scale, ax_roi, a)
    if a["mode"] != "nearest" and out.dtype != t.dtype:
        if not t.dtype.is_floating_point:
            out = torch.round(out)
            info = torch.iinfo(t.dtype)
            out = out.clamp(info.min, info.max)
        out = out.to(t.dtype)
    return out


_reg("resize", _resize_infer, resize_reference,
     {"sizes": REQUIRED, "scales": None, "roi": None, "mode": "nearest",
      "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor",
      "cubic_coeff_a": -0.75, "exclude_outside": False, "antialias": False,
      "extrapolation_value": 0.0},
     doc="ONNX Resize: sizes per axis (symbolic ok); scales per axis when given", traits=("data",))


# ----------------------------------------------------------------------------- einsum
def _einsum_parse(eq: str, ranks: Sequence[int]) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise OpTypeError(f"einsum '{eq}': {len(terms)} terms for {len(ranks)} operands")
    ell_rank = 0
    for term, r in zip(terms, ranks):
        if "..." in term:
            ell_rank = max(ell_rank, r - (len(term) - 3))
    if "->" not in eq:
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if ell_rank or "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, rhs


def _einsum_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    ts = [_t(types, i, "einsum") for i in range(len(types))]
    terms, rhs = _einsum_parse(attrs["equation"], [t.rank for t in ts])
    sizes: dict[str, Dim] = {}
    ells: list[tuple[Dim, ...]] = []
    for term, t in zip(terms, ts):
        dims = list(t.shape)
        if "..." in term:
            pre, post = term.split("...")
            n_ell = t.rank - len(pre) - len(post)
            ells.append(tuple(dims[len(pre):len(pre) + n_ell]))
            dims = dims[:len(pre)] + dims[len(pre) + n_ell:]
            term = pre + post
        if len(term) != len(dims):
            raise OpTypeError(f"einsum: term '{term}' does not match {t}")
        for c, d in zip(term, dims):
            if c not in sizes or sizes[c] == 1:
                sizes[c] = d
    ell = broadcast_shapes(*ells) if ells else ()
    out: list[Dim] = []
    for part in rhs.split("...") if "..." in rhs else [rhs]:
        out.extend(sizes[c] for c in part)
    if "..." in rhs:
        pre = rhs.split("...")[0]
        out = out[:len(pre)] + list(ell) + out[len(pre):]
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = promote(TensorType(dt, ()), t) if t.dtype != dt else dt
    return [TensorType(dt, tuple(simplify(d) for d in out))]


_reg("einsum", _einsum_infer, lambda x, a: torch.einsum(a["equation"], *x),
     {"equation": REQUIRED}, n=(1, 16), doc="torch.einsum", traits=("gemm",))


# ----------------------------------------------------------------------------- gather/scatter
def _gather_nd_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, idx = _t(types, 0, "gather_nd"), _t(types, 1, "gather_nd")
    b = attrs["batch_dims"]
    k = idx.shape[-1]
    if not isinstance(k, int):
        raise OpTypeError("gather_nd: the last index dim must be static")
    return [x.with_shape((*idx.shape[:-1], *x.shape[b + k:]))]


def _gather_nd_ref(x: Any, a: Attrs) -> torch.Tensor:
    data, idx = x[0], x[1].long()
    b = a["batch_dims"]
    k = idx.shape[-1]
    bshape = data.shape[:b]
    nb = math.prod(bshape)
    d = data.reshape(nb, *data.shape[b:])
    i = idx.reshape(nb, -1, k)
    i = torch.where(i < 0, i + torch.tensor(d.shape[1:1 + k]), i)
    rows = [d[j][tuple(i[j].T)] for j in range(nb)]
    out = torch.stack(rows) if rows else d.new_empty((0,))
    return out.reshape(*idx.shape[:-1], *data.shape[b + k:])


_reg("gather_nd", _gather_nd_infer, _gather_nd_ref, {"batch_dims": 0}, n=2,
     doc="ONNX GatherND", traits=("gather", "lookup"))

_REDUCTIONS = {"none": None, "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements_ref(x: Any, a: Attrs) -> torch.Tensor:
    data, idx, upd = x[0], x[1].long(), x[2]
    d = a["dim"] % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[d], idx)
    red = _REDUCTIONS[a["reduction"]]
    if red is None:
        return torch.scatter(data, d, idx, upd)
    return torch.scatter_reduce(data, d, idx, upd, red, include_self=True)


def _same0(types: Types, attrs: Attrs) -> list[TensorType]:
    return [_t(types, 0, "scatter")]


_reg("scatter_elements", _same0, _scatter_elements_ref, {"dim": 0, "reduction": "none"}, n=3,
     doc="ONNX ScatterElements; reduction none|add|mul|max|min", traits=("gather",))


def _scatter_nd_ref(x: Any, a: Attrs) -> torch.Tensor:
    data, idx, upd = x[0].clone(), x[1].long(), x[2]
    k = idx.shape[-1]
    flat_idx = idx.reshape(-1, k)
    flat_upd = upd.reshape(flat_idx.shape[0], *data.shape[k:])
    red = a["reduction"]
    for i in range(flat_idx.shape[0]):
        key = tuple(int(v) for v in flat_idx[i])
        if red == "none":
            data[key] = flat_upd[i]
        elif red == "add":
            data[key] = data[key] + flat_upd[i]
        elif red == "mul":
            data[key] = data[key] * flat_upd[i]
        elif red == "max":
            data[key] = torch.maximum(data[key], flat_upd[i])
        else:
            data[key] = torch.minimum(data[key], flat_upd[i])
    return data


_reg("scatter_nd", _same0, _scatter_nd_ref, {"reduction": "none"}, n=3, doc="ONNX ScatterND",
     traits=("gather",))


def _one_hot_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    idx = _t(types, 0, "one_hot")
    shape = list(idx.shape)
    d = attrs["dim"] % (len(shape) + 1)
    shape.insert(d, attrs["depth"])
    return [TensorType(attrs["dtype"], tuple(shape))]


def _one_hot_ref(x: Any, a: Attrs) -> torch.Tensor:
    from .types import to_torch_dtype

    depth = int(a["depth"])
    idx = x[0].long()
    idx = torch.where(idx < 0, idx + depth, idx)
    valid = (idx >= 0) & (idx < depth)
    oh = torch.nn.functional.one_hot(torch.where(valid, idx, 0), depth) * valid[..., None]
    d = a["dim"] % (x[0].dim() + 1)
    oh = oh.movedim(-1, d)
    dt = to_torch_dtype(a["dtype"])
    return torch.where(oh.bool(), torch.tensor(a["on"], dtype=dt), torch.tensor(a["off"], dtype=dt))


_reg("one_hot", _one_hot_infer, _one_hot_ref,
     {"depth": REQUIRED, "dim": -1, "on": 1, "off": 0, "dtype": "float32"},
     doc="one-hot along dim; out-of-range indices give an all-off row", traits=("gather",))



# ----------------------------------------------------------------------------- sort / pools
def _sort_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    t = _t(types, 0, "sort")
    return [t, t.with_dtype("int64")]


_reg("sort", _sort_infer,
     lambda x, a: tuple(torch.sort(x[0], dim=a["dim"], descending=a["descending"], stable=True)),
     {"dim": -1, "descending": False}, doc="stable sort: values, indices (ties keep order)")


def _max_pool_idx_ref(x: Any, a: Attrs) -> tuple[torch.Tensor, torch.Tensor]:
    t = x[0]
    nsp = t.dim() - 2
    fn = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d,
          3: torch.nn.functional.max_pool3d}[nsp]
    y, idx = fn(t, a["kernel"], a["stride"] or a["kernel"], a["padding"], a["dilation"],
                a["ceil_mode"], return_indices=True)
    sp = t.shape[2:]
    if a["storage_order"] == 1:  # column-major within each plane
        coords = []
        rem = idx
        for d in reversed(sp):
            coords.append(rem % d)
            rem = rem // d
        coords = coords[::-1]
        idx = torch.zeros_like(idx)
        stride = 1
        for c, d in zip(coords, sp):
            idx = idx + c * stride
            stride *= d
    plane = math.prod(sp)
    n, c = t.shape[:2]
    off = (torch.arange(n * c).reshape(n, c, *([1] * nsp))) * plane
    return y, idx + off


def _max_pool_idx_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    from .ops import get_op

    a = {k: v for k, v in attrs.items() if k != "storage_order"}
    (y,) = get_op("max_pool").infer(types, get_op("max_pool").normalize_attrs(a))
    return [y, y.with_dtype("int64")]


_reg("max_pool_with_indices", _max_pool_idx_infer, _max_pool_idx_ref,
     {"kernel": REQUIRED, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
      "storage_order": 0},
     doc="max pool and ONNX-style flat indices over the whole tensor", traits=("pool",))
