"""Fuse bias, activation and residual epilogues into linear and conv.

Before -> After (one rule per step; the engine runs them to a fixed point, so chains fuse)::

    add(linear(%x, %w), %b)          -> linear(%x, %w, %b)             (%b a [out] constant)
    add(matmul(%x, %W), %b)          -> linear(%x, %W^T, %b)           (%W a 2-d param)
    matmul(%x, %W)                   -> linear(%x, %W^T)               (%W read only here)
    add(conv(%x, %w), %b)            -> conv(%x, %w, %b)               (%b one per channel)
    act(linear(%x, %w, %b?))         -> fused_linear(%x, %w, %b?) {activation=act}
    act(conv(%x, %w, %b?))           -> fused_conv(%x, %w, %b?) {activation=act}
    add(linear|conv(...), %r)        -> fused_*(..., %r) {residual=before_act}
    act(fused_*(..., %r) {residual=before_act, activation=none})
                                     -> fused_*(..., %r) {residual=before_act, activation=act}
    add(fused_*(...) {activation=act}, %r) -> fused_*(..., %r) {residual=after_act}
    mul(mul(%x, 0.5), add(tanh(...) | erf(...), 1))  -> gelu(%x)      (decomposed GELU; also
    mul(mul(%x, add(erf(...), 1)), 0.5), torch.onnx's association)

An activation or residual reached through a reshape of a linear output that keeps the last
dim (``[b*s, n] -> [b, s, n]``, as GPT-2's Conv1D produces) is fused too: the reshape moves
after the fused op and the residual is reshaped to the linear's shape.

``act`` is relu, gelu (either approximation), silu, sigmoid, tanh, hardswish, hardsigmoid,
mish, leaky_relu, elu or clamp (relu6). The linear/conv result must have no other user; a
residual must have exactly the output type (no broadcasting).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ember.ir import Graph, Node, Value, ops_with
from ember.ir.opset_fused import ACTIVATIONS
from ember.passmanager import PassContext, register_pass

from ._rewrite import EmitFn, Emitter, Fail, GraphIndex, Rule, apply_rules, same_type

__all__ = ["FuseLinearActConfig", "fuse_linear_act"]

log = logging.getLogger(__name__)

_FUSED = {"linear": "fused_linear", "conv": "fused_conv"}
_BASE = (*_FUSED, *_FUSED.values())  # ops an epilogue fuses into
_LINEARS = tuple(sorted(ops_with("linear") - ops_with("quantized")))  # float linears
_FLOATS = ("float32", "float16", "bfloat16", "float64")
_ACT_OF_OP = {op: name for name, (op, _) in ACTIVATIONS.items() if op}
_EPILOGUE_DEFAULTS: dict[str, Any] = {"activation": "none", "approximate": "none",
                                      "alpha": None, "min": None, "max": None,
                                      "residual": "none"}


@dataclass(frozen=True)
class FuseLinearActConfig:
    """Attributes:
    linear: fuse epilogues into linear.
    conv: fuse epilogues into conv.
    residual: fuse residual adds.
    matmul_to_linear: turn ``matmul(x, W) + b`` with a 2-d param ``W`` into a linear.
    """

    linear: bool = True
    conv: bool = True
    residual: bool = True
    matmul_to_linear: bool = True


def _enabled(op: str, cfg: FuseLinearActConfig) -> bool:
    return cfg.linear if op in _LINEARS else cfg.conv


def _fused_attrs(base: Node) -> tuple[str, dict[str, Any]]:
    """(fused op, attrs) of ``base`` seen as a fused op with its current epilogue."""
    if base.op in _FUSED:
        return _FUSED[base.op], {**dict(base.attrs), **_EPILOGUE_DEFAULTS}
    return base.op, dict(base.attrs)


def _base_operands(base: Node) -> list[Value | None]:
    ins = list(base.inputs[:3])
    return ins + [None] * (3 - len(ins))


# ----------------------------------------------------------------------------- bias
def _bias_for(idx: GraphIndex, b: Value, y: Value, channel_dim: int) -> torch.Tensor | None:
    """``b`` as a 1-d [C] tensor when adding it to ``y`` is a per-``channel_dim`` bias."""
    t = idx.const(b)
    if t is None or str(t.dtype).removeprefix("torch.") != y.type.dtype:
        return None
    c = y.type.shape[channel_dim]
    if not isinstance(c, int) or t.numel() != c or t.dim() > y.type.rank:
        return None
    # the single non-1 dim of b must line up with channel_dim (right-aligned broadcasting)
    shape = [1] * (y.type.rank - t.dim()) + list(t.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != channel_dim % y.type.rank) and c != 1:
        return None
    return t.reshape(c)


def _match_bias(n: Node, idx: GraphIndex, cfg: FuseLinearActConfig) -> EmitFn | Fail:
    for y, b in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
        base = idx.producer(y, ("linear", "conv", "matmul"))
        if base is None or not idx.single_use(y) or not same_type(y, n.output):  # type: ignore[arg-type]
            continue
        if base.op != "matmul" and (len(base.inputs) > 2 and base.inputs[2] is not None):
            continue
        if not _enabled(base.op if base.op != "matmul" else "linear", cfg):
            continue
        channel = 1 if base.op == "conv" else -1
        bt = _bias_for(idx, b, y, channel)  # type: ignore[arg-type]
        if bt is None:
            continue
        if base.op == "matmul":
            w = idx.const(base.inputs[1])
            if not cfg.matmul_to_linear or w is None or w.dim() != 2 or y.type.rank < 2:  # type: ignore[union-attr]
                continue
            wt = w.t().contiguous()
            if str(wt.dtype).removeprefix("torch.") != y.type.dtype:  # type: ignore[union-attr]
                continue
            x = base.inputs[0]
            return lambda e, x=x, wt=wt, bt=bt: [
                e.op("linear", [x, e.param("linear_weight", wt), e.param("linear_bias", bt)])]
        x, w = base.inputs[0], base.inputs[1]
        return lambda e, base=base, x=x, w=w, bt=bt: [
            e.op(base.op, [x, w, e.param(f"{base.op}_bias", bt)], base.attrs)]
    return Fail("no linear/conv/matmul-by-param output plus a per-channel constant")


def _match_matmul_param(n: Node, idx: GraphIndex, cfg: FuseLinearActConfig) -> EmitFn | Fail:
    """matmul(x, W) with a 2-d constant W read by nothing else -> linear(x, W^T).

    ONNX exporters write bias-free projections as a bare MatMul by an initializer; as linears
    they join QKV fusion and residual/activation epilogues like the FX graph's."""
    if not cfg.matmul_to_linear or not cfg.linear:
        return Fail("matmul_to_linear disabled")
    x, wv = n.inputs
    w = idx.const(wv)
    if w is None or w.dim() != 2 or x is None or x.type.rank < 2:  # type: ignore[union-attr]
        return Fail("right operand is not a 2-d constant")
    if not idx.single_use(wv):  # type: ignore[arg-type]
        return Fail("the weight has other readers (a transposed copy would duplicate it)")
    wt = w.t().contiguous()
    if str(wt.dtype).removeprefix("torch.") != n.output.type.dtype:
        return Fail("weight dtype differs from the output's")
    return lambda e: [e.op("linear", [x, e.param("linear_weight", wt)])]


# ----------------------------------------------------------------------------- decomposed GELU
def _near(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _scaled(v: Value | None, idx: GraphIndex, c: float) -> Value | None:
    """x when v = x * c (either order) or x / (1/c), for a scalar constant."""
    n = idx.producer(v, ("mul", "div"))
    if n is None:
        return None
    a, b = n.inputs
    if n.op == "div":
        d = idx.scalar(b)
        return a if d is not None and d != 0 and _near(1.0 / d, c) else None
    for x, k in ((a, b), (b, a)):
        if _near(idx.scalar(k), c):
            return x
    return None


def _plus(v: Value | None, idx: GraphIndex, c: float) -> Value | None:
    """x when v = x + c (either order)."""
    n = idx.producer(v, "add")
    if n is None:
        return None
    for x, k in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
        if _near(idx.scalar(k), c):
            return x
    return None


def _gelu_inner(f: Value | None, idx: GraphIndex) -> tuple[Value, str] | None:
    """(x, approximate) when f = tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) or erf(x / sqrt(2))."""
    fn = idx.producer(f, ("tanh", "erf"))
    if fn is None:
        return None
    if fn.op == "erf":
        x = _scaled(fn.inputs[0], idx, 1.0 / math.sqrt(2.0))
        return (x, "none") if x is not None else None
    t = _scaled(fn.inputs[0], idx, math.sqrt(2.0 / math.pi))
    tn = idx.producer(t, "add")
    if tn is None:
        return None
    for x, cube in ((tn.inputs[0], tn.inputs[1]), (tn.inputs[1], tn.inputs[0])):
        p = idx.producer(_scaled(cube, idx, 0.044715), "pow")
        if p is not None and x is not None and p.inputs[0] is not None \
                and p.inputs[0].name == x.name and _near(idx.scalar(p.inputs[1]), 3.0):
            return x, "tanh"
    return None


def _gelu_factors(n: Node, idx: GraphIndex) -> list[tuple[Value | None, Value | None]]:
    """(x, 1 + f(x)) candidates of a GELU product rooted at mul ``n``: (x * 0.5) * (1 + f)
    either order, or (x * (1 + f)) * 0.5 (torch.onnx's erf-GELU association)."""
    a, b = n.inputs
    out: list[tuple[Value | None, Value | None]] = []
    for half, one_plus in ((a, b), (b, a)):
        out.append((_scaled(half, idx, 0.5), one_plus))
    for prod, c in ((a, b), (b, a)):
        inner = idx.producer(prod, "mul")
        if inner is not None and _near(idx.scalar(c), 0.5) and idx.single_use(prod):
            u, v = inner.inputs
            out += [(u, v), (v, u)]
    return out


def _match_gelu(n: Node, idx: GraphIndex, cfg: FuseLinearActConfig) -> EmitFn | Fail:
    """(x * 0.5) * (1 + f(x)) (any association) with f the tanh or erf form of GELU ->
    gelu(x)."""
    for x, one_plus in _gelu_factors(n, idx):
        inner = _gelu_inner(_plus(one_plus, idx, 1.0), idx)
        if x is None or inner is None or inner[0].name != x.name:
            continue
        if not same_type(x, n.output) or x.type.dtype not in _FLOATS:
            return Fail("decomposed GELU changes the type")
        approx = inner[1]
        return lambda e: [e.op("gelu", [x], {"approximate": approx})]
    return Fail("not a decomposed GELU")


# ----------------------------------------------------------------------------- activation
def _act_attrs(n: Node) -> dict[str, Any] | None:
    act = _ACT_OF_OP.get(n.op)
    if act is None:
        return None
    a = n.attrs
    if act == "gelu":
        return {"activation": act, "approximate": a["approximate"]}
    if act == "leaky_relu":
        return {"activation": act, "alpha": float(a["negative_slope"])}
    if act == "elu":
        return {"activation": act, "alpha": float(a["alpha"])}
    if act == "clamp":
        return {"activation": act, "min": a["min"], "max": a["max"]}
    return {"activation": act}


def _through_reshape(y: Value, idx: GraphIndex) -> tuple[Value, Node | None]:
    """(base output, reshape) when y = reshape(z) of a single-use linear output z that keeps
    the last dim (elementwise epilogues commute with it), else (y, None)."""
    r = idx.producer(y, "reshape")
    if r is None or r.inputs[0] is None or idx.producer(r.inputs[0], _LINEARS) is None:
        return y, None
    z = r.inputs[0]
    if not idx.single_use(z) or z.type.shape[-1] != y.type.shape[-1] or z.type.rank < 1:
        return y, None
    return z, r


def _match_act(n: Node, idx: GraphIndex, cfg: FuseLinearActConfig) -> EmitFn | Fail:
    y, reshape = _through_reshape(n.inputs[0], idx)  # type: ignore[arg-type]
    base = idx.producer(y, _BASE)
    if base is None:
        return Fail("activation input is not a linear/conv")
    if not _enabled(base.op, cfg):
        return Fail(f"{base.op} fusion disabled")
    if not idx.single_use(y) or y.type.dtype != n.output.type.dtype:  # type: ignore[arg-type]
        return Fail("linear/conv output has other users or the activation changes its type")
    if reshape is not None and not idx.single_use(reshape.output):
        return Fail("the reshape after the linear has other users")
    fop, attrs = _fused_attrs(base)
    if attrs["activation"] != "none" or attrs["residual"] == "after_act":
        return Fail("the epilogue already has an activation")
    act = _act_attrs(n)
    if act is None:
        return Fail(f"{n.op} is not a fusable activation")
    attrs.update(act)
    ins = _base_operands(base) + list(base.inputs[3:4])
    if reshape is None:
        return lambda e: [e.op(fop, ins, attrs)]
    return lambda e: [e.op("reshape", [e.op(fop, ins, attrs)], reshape.attrs)]


# ----------------------------------------------------------------------------- residual
def _match_residual(n: Node, idx: GraphIndex, cfg: FuseLinearActConfig) -> EmitFn | Fail:
    for out, r in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
        y, reshape = _through_reshape(out, idx)  # type: ignore[arg-type]
        base = idx.producer(y, _BASE)
        if base is None or not _enabled(base.op, cfg) or out.name == r.name:  # type: ignore[union-attr]
            continue
        if not idx.single_use(out) or not same_type(out, n.output) or not same_type(r, out):  # type: ignore[arg-type]
            continue
        if reshape is not None and not idx.single_use(y):
            continue
        fop, attrs = _fused_attrs(base)
        if attrs["residual"] != "none":
            continue
        attrs["residual"] = "before_act" if attrs["activation"] == "none" else "after_act"
        if reshape is None:
            ins = _base_operands(base) + [r]
            return lambda e, fop=fop, ins=ins, attrs=attrs: [e.op(fop, ins, attrs)]

        def emit(e: Emitter, base: Node = base, y: Value = y, r: Value = r, fop: str = fop,
                 attrs: dict = attrs, reshape: Node = reshape) -> list[Value]:
            r2 = e.op("reshape", [r], {"shape": y.type.shape})
            fused = e.op(fop, _base_operands(base) + [r2], attrs)
            return [e.op("reshape", [fused], reshape.attrs)]
        return emit
    return Fail("no linear/conv output plus a same-typed residual")


@register_pass(config=FuseLinearActConfig, numerics="exact",
               requires=("types", "shapes"))
def fuse_linear_act(g: Graph, cfg: FuseLinearActConfig, ctx: PassContext) -> Graph:
    """Fuses bias adds, activations and residual adds into linear/conv epilogues."""
    rules = [
        Rule("gelu", ("mul",), lambda n, idx: _match_gelu(n, idx, cfg),
             "decomposed GELU (tanh or erf form) -> gelu"),
        Rule("bias", ("add",), lambda n, idx: _match_bias(n, idx, cfg),
             "linear/conv/matmul + per-channel constant -> bias"),
        Rule("matmul", ("matmul",), lambda n, idx: _match_matmul_param(n, idx, cfg),
             "matmul by a 2-d constant -> linear"),
        Rule("activation", tuple(_ACT_OF_OP), lambda n, idx: _match_act(n, idx, cfg),
             "act(linear/conv) -> fused_linear/fused_conv"),
    ]
    if cfg.residual:
        rules.append(Rule("residual", ("add",), lambda n, idx: _match_residual(n, idx, cfg),
                          "linear/conv + residual -> fused epilogue"))
    return apply_rules(g, rules, ctx, "fuse_linear_act", max_rounds=16)
