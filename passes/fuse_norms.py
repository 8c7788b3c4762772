"""Recognize decomposed LayerNorm and RMSNorm and replace them with `layer_norm` / `rms_norm`.

Before -> After (LayerNorm; ``pow(%d, 2)`` may be ``mul(%d, %d)``, ``mul(%d, rsqrt(%t))`` may be
``div(%d, sqrt(%t))``; the affine tail ``mul %g`` / ``add %b`` is optional)::

    %u = mean(%x) {dims=[-1], keepdim=True}
    %d = sub(%x, %u)
    %v = mean(pow(%d, 2)) {dims=[-1], keepdim=True}
    %t = add(%v, eps)
    %n = mul(%d, rsqrt(%t))
    %y = add(mul(%n, %g), %b)              ->   %y = layer_norm(%x, %g, %b) {axes=1, eps}

Before -> After (RMSNorm as Hugging Face LLaMA writes it; the casts around it stay)::

    %v = mean(pow(%h, 2)) {dims=[-1], keepdim=True}
    %n = mul(%h, rsqrt(add(%v, eps)))
    %y = mul(%w, %n)                       ->   %y = rms_norm(%h, %w) {axes=1, eps}

The normalized dims must be the last ``axes`` dims of ``%x``; weight and bias must be
constants with exactly those dims (leading 1s are dropped); nothing may change the dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.ir import Graph, Node, Value
from ember.passmanager import PassContext, register_pass

from ._rewrite import EmitFn, Emitter, Fail, GraphIndex, Rule, apply_rules, same_type

__all__ = ["FuseNormsConfig", "fuse_norms"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseNormsConfig:
    """Attributes:
    layer_norm: recognize LayerNorm.
    rms_norm: recognize RMSNorm.
    """

    layer_norm: bool = True
    rms_norm: bool = True


@dataclass(frozen=True)
class _Core:
    kind: str  # "layer_norm" | "rms_norm"
    x: Value
    eps: float
    axes: int


def _mean_axes(n: Node | None, x: Value) -> int | None:
    """k when ``n`` is mean(x) over the last k dims with keepdim, else None."""
    if n is None or n.op != "mean" or n.inputs[0] is None or n.inputs[0].name != x.name:
        return None
    if not n.attrs["keepdim"] or not n.attrs["dims"]:
        return None
    rank = x.type.rank
    dims = sorted({d % rank for d in n.attrs["dims"]})
    k = len(dims)
    return k if dims == list(range(rank - k, rank)) else None


def _operands(n: Node, idx: GraphIndex, op: str) -> list[tuple[Node, Value]]:
    """(producer, other operand) pairs where one operand of binary ``n`` is made by ``op``."""
    out = []
    a, b = n.inputs
    for p, q in ((a, b), (b, a)):
        pn = idx.producer(p, op)
        if pn is not None and q is not None:
            out.append((pn, q))
    return out


def _square_of(v: Value, idx: GraphIndex) -> Value | None:
    """x when v = pow(x, 2) or mul(x, x)."""
    n = idx.producer(v)
    if n is None:
        return None
    if n.op == "pow" and idx.scalar(n.inputs[1]) == 2.0:
        return n.inputs[0]
    if n.op == "mul" and n.inputs[0] is not None and n.inputs[1] is not None \
            and n.inputs[0].name == n.inputs[1].name:
        return n.inputs[0]
    return None


def _match_core(n: Node | None, idx: GraphIndex, cfg: FuseNormsConfig) -> _Core | Fail:
    """Matches d * rsqrt(mean(d^2) + eps) or d / sqrt(mean(d^2) + eps) rooted at ``n``."""
    if n is None:
        return Fail("no producer")
    cands: list[tuple[Value, Value]] = []  # (d, t) with t = mean(d^2) + eps
    if n.op == "mul":
        cands = [(d, r.inputs[0]) for r, d in _operands(n, idx, "rsqrt")]  # type: ignore[misc]
    elif n.op == "div":
        s = idx.producer(n.inputs[1], "sqrt")
        if s is not None and n.inputs[0] is not None:
            cands = [(n.inputs[0], s.inputs[0])]  # type: ignore[list-item]
    if not cands:
        return Fail("not d * rsqrt(t) nor d / sqrt(t)")
    for d, t in cands:
        tn = idx.producer(t, "add")
        if tn is None:
            continue
        for vn, e in _operands(tn, idx, "mean"):
            eps = idx.scalar(e)
            sq = vn.inputs[0]
            if eps is None or sq is None or _square_of(sq, idx) is None:
                continue
            if _square_of(sq, idx).name != d.name:  # type: ignore[union-attr]
                continue
            axes = _mean_axes(vn, sq)
            if axes is None or not same_type(d, n.output):
                continue
            sub = idx.producer(d, "sub")
            if sub is not None and cfg.layer_norm:
                x, u = sub.inputs
                if x is not None and _mean_axes(idx.producer(u, "mean"), x) == axes \
                        and same_type(x, d):
                    return _Core("layer_norm", x, eps, axes)
            if cfg.rms_norm and d.type.dtype in ("float32", "float64", "float16", "bfloat16"):
                return _Core("rms_norm", d, eps, axes)
    return Fail("no mean(d^2) + eps under the rsqrt/sqrt")


def _match(n: Node, idx: GraphIndex, cfg: FuseNormsConfig) -> EmitFn | Fail:
    """Largest form first: add(mul(core, g), b), add(core, b), mul(core, g), core."""
    weight = bias = None
    core_node: Node | None = n
    if n.op == "add":
        for p, b in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
            bt = idx.const(b)
            pn = idx.producer(p)
            if bt is None or pn is None or not same_type(p, n.output):  # type: ignore[arg-type]
                continue
            inner = _match_core(pn, idx, cfg)
            if inner and inner.kind == "layer_norm":
                core_node, bias = pn, bt
                break
            if pn.op == "mul":
                for gv, cv in ((pn.inputs[1], pn.inputs[0]), (pn.inputs[0], pn.inputs[1])):
                    inner = _match_core(idx.producer(cv), idx, cfg)
                    if idx.const(gv) is not None and inner and inner.kind == "layer_norm" \
                            and same_type(cv, p):  # type: ignore[arg-type]
                        core_node, bias, weight = idx.producer(cv), bt, idx.const(gv)
                        break
            if bias is not None:
                break
        if bias is None:
            return Fail("add is not a norm's bias")
    elif n.op == "mul":
        for gv, cv in ((n.inputs[1], n.inputs[0]), (n.inputs[0], n.inputs[1])):
            inner = _match_core(idx.producer(cv), idx, cfg)
            if idx.const(gv) is not None and inner and same_type(cv, n.output):  # type: ignore[arg-type]
                core_node, weight = idx.producer(cv), idx.const(gv)
                break
    core = _match_core(core_node, idx, cfg)
    if not core:
        return core
    kind, x = core.kind, core.x
    w = None if weight is None else _affine_param_t(weight, core)
    b = None if bias is None else _affine_param_t(bias, core)
    if (weight is not None and w is None) or (bias is not None and b is None):
        return Fail("norm weight/bias do not match the normalized dims or dtype")
    if kind == "layer_norm" and w is None and b is not None:
        w = torch.ones_like(b)
    attrs = {"axes": core.axes, "eps": core.eps}

    def emit(e: Emitter) -> list[Value]:
        wv = None if w is None else e.param(f"{kind}_weight", w)
        if kind == "rms_norm":
            return [e.op("rms_norm", [x, wv], attrs)]
        bv = None if b is None else e.param(f"{kind}_bias", b)
        return [e.op("layer_norm", [x, wv, bv], attrs)]

    return emit


def _affine_param_t(t: torch.Tensor, core: _Core) -> torch.Tensor | None:
    norm_shape = core.x.type.shape[core.x.type.rank - core.axes:]
    if not all(isinstance(s, int) for s in norm_shape):
        return None
    shape = list(t.shape)
    while len(shape) > core.axes and shape[0] == 1:
        shape.pop(0)
    if tuple(shape) != tuple(norm_shape) or str(t.dtype).removeprefix("torch.") != \
            core.x.type.dtype:
        return None
    return t.reshape(tuple(norm_shape))


@register_pass(config=FuseNormsConfig, numerics="exact",
               requires=("types", "shapes"))
def fuse_norms(g: Graph, cfg: FuseNormsConfig, ctx: PassContext) -> Graph:
    """Replaces decomposed LayerNorm / RMSNorm subgraphs with `layer_norm` / `rms_norm`."""
    rule = Rule("norm", ("add", "mul", "div"), lambda n, idx: _match(n, idx, cfg),
                "decomposed LayerNorm/RMSNorm -> layer_norm/rms_norm")
    return apply_rules(g, [rule], ctx, "fuse_norms")
