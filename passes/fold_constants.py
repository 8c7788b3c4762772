"""Constant folding and exact algebraic simplification.

Before -> After (folding: every input is a param, no symbolic attribute)::

    %wt = permute(%w) {perm=[1, 0]}          (param %wt = w.permute(1, 0))
    %y = matmul(%x, %wt)             ->      %y = matmul(%x, %wt)

Before -> After (simplification, only when the result has the same type as ``%x``)::

    mul(%x, ones) / div(%x, ones) / add(%x, zeros) / sub(%x, zeros)  -> %x
    reshape(%x) to its own shape, permute(%x) by the identity,
    cast(%x) to its own dtype, expand(%x) to its own shape,
    slice(%x) {step=1} keeping the whole dim                           -> %x
    reshape(reshape(%x, s1), s2)                                       -> reshape(%x, s2)
    permute(permute(%x, p1), p2)                                       -> permute(%x, p1∘p2)

Folding is capped: a result with more than ``max_numel`` elements is only materialized when it
is no bigger than its inputs together (so ``expand``/``full`` of a huge shape stays an op).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.ir import Graph, Node, Value, get_op, to_torch_dtype
from ember.ir.opset import check_types_equal
from ember.passmanager import PassContext, register_pass

from ._rewrite import (
    EmitFn,
    Emitter,
    Fail,
    GraphIndex,
    Rule,
    apply_rules,
    eliminate_dead,
    has_symbolic,
    rebuild,
    same_type,
)

__all__ = ["FoldConstantsConfig", "fold_constants", "simplify_rules"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldConstantsConfig:
    """Attributes:
    max_numel: fold a node only if each output has at most this many elements, or is no
        bigger than all its inputs together.
    simplify: also apply the exact algebraic simplifications.
    """

    max_numel: int = 16 * 1024 * 1024
    simplify: bool = True


# ----------------------------------------------------------------------------- folding
def _fold(g: Graph, cfg: FoldConstantsConfig) -> tuple[Graph, int]:
    consts: dict[str, torch.Tensor] = dict(g.weights)
    plan: dict[Node, EmitFn] = {}
    for n in g.nodes:
        ins = [v for v in n.inputs if v is not None]
        if not all(v.name in consts for v in ins) or has_symbolic(n.attrs):
            continue
        if not all(v.type.is_static for v in n.outputs):
            continue
        in_numel = sum(consts[v.name].numel() for v in ins)
        out_numel = [int(torch.Size(v.type.shape).numel()) for v in n.outputs]
        if any(k > cfg.max_numel and k > in_numel for k in out_numel):
            log.debug("fold_constants: %s at %s too big to fold (%s)", n.op, n.loc, out_numel)
            continue
        try:
            res = get_op(n.op).reference([None if v is None else consts[v.name]
                                          for v in n.inputs], n.attrs)
        except Exception as e:  # an op that fails on constants is left for run time to report
            log.debug("fold_constants: %s at %s not folded: %s", n.op, n.loc, e)
            continue
        outs = [res] if isinstance(res, torch.Tensor) else list(res)
        ok = len(outs) == len(n.outputs) and all(
            t.dtype == to_torch_dtype(v.type.dtype) and tuple(t.shape) == tuple(v.type.shape)
            for t, v in zip(outs, n.outputs))
        if not ok:
            log.debug("fold_constants: %s at %s: reference result does not match its type",
                      n.op, n.loc)
            continue
        for v, t in zip(n.outputs, outs):
            consts[v.name] = t.detach()
        plan[n] = _emit_params(n, outs)
    if not plan:
        return g, 0
    return eliminate_dead(rebuild(g, plan)), len(plan)


def _emit_params(n: Node, tensors: list[torch.Tensor]) -> EmitFn:
    def emit(e: Emitter) -> list[Value]:
        return [e.param(f"c_{v.name}", t.clone()) for v, t in zip(n.outputs, tensors)]
    return emit


# ----------------------------------------------------------------------------- simplification
def _identity(x: Value) -> EmitFn:
    return lambda e: [e.v(x)]


def _const_all(idx: GraphIndex, v: Value, value: float) -> bool:
    t = idx.const(v)
    return t is not None and t.numel() > 0 and bool(torch.all(t == value))


def _match_neutral(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    """x*1, 1*x, x/1, x+0, 0+x, x-0 -> x when the type is unchanged."""
    a, b = n.inputs
    neutral = {"mul": 1.0, "div": 1.0, "add": 0.0, "sub": 0.0}[n.op]
    cands = [(a, b)] + ([(b, a)] if n.op in ("mul", "add") else [])
    for x, c in cands:
        if _const_all(idx, c, neutral) and same_type(x, n.output):
            return _identity(x)
    return Fail("no neutral constant operand of a type-preserving shape")


def _match_noop_shape(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    """reshape/expand to the same shape, cast to the same dtype, whole-dim slice -> x."""
    x = n.inputs[0]
    if not same_type(x, n.output):  # type: ignore[arg-type]
        return Fail("changes the type")
    if n.op == "slice" and n.attrs["step"] != 1:
        return Fail("strided slice")
    return _identity(x)  # type: ignore[arg-type]


def _match_permute(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    x = n.inputs[0]
    rank = x.type.rank  # type: ignore[union-attr]
    perm = [p % rank for p in n.attrs["perm"]]
    if perm == list(range(rank)):
        return _identity(x)  # type: ignore[arg-type]
    inner = idx.producer(x, "permute")
    if inner is None:
        return Fail("not an identity nor a permute of a permute")
    p1 = [p % rank for p in inner.attrs["perm"]]
    composed = [p1[p] for p in perm]
    src = inner.inputs[0]
    if composed == list(range(rank)):
        return _identity(src)  # type: ignore[arg-type]
    return lambda e: [e.op("permute", [src], {"perm": tuple(composed)})]


def _match_reshape(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    x = n.inputs[0]
    if same_type(x, n.output):  # type: ignore[arg-type]
        return _identity(x)  # type: ignore[arg-type]
    inner = idx.producer(x, "reshape")
    if inner is None:
        return Fail("not a no-op nor a reshape of a reshape")
    src = inner.inputs[0]
    if same_type(src, n.output):  # type: ignore[arg-type]
        return _identity(src)  # type: ignore[arg-type]
    return lambda e: [e.op("reshape", [src], n.attrs)]


def _match_noop_mask(n: Node, idx: GraphIndex) -> EmitFn | Fail:
    """attention(q, k, v, mask) with a constant mask that masks nothing (all True, or an
    additive mask of zeros) -> attention(q, k, v): HF ViT hands SDPA an all-True mask, which
    cost a Where per layer in every backend."""
    if len(n.inputs) < 4 or n.inputs[3] is None:
        return Fail("no mask")
    m = n.inputs[3]
    keep = True if m.type.dtype == "bool" else 0.0
    # an expand of such a constant to a symbolic batch is no constant, and masks nothing either
    # (HF ViT at a dynamic batch: the token passes then carried it through every merge)
    src = idx.producer(m, "expand")
    if not (_const_all(idx, m, keep) or src is not None and src.inputs[0] is not None
            and _const_all(idx, src.inputs[0], keep)):
        return Fail("mask is not a constant that keeps every score")
    ins = list(n.inputs[:3])
    if not check_types_equal(get_op("attention").infer([v.type for v in ins], n.attrs)[0],  # type: ignore[union-attr]
                             n.output.type):
        return Fail("the mask broadcasts the output to a bigger shape")
    return lambda e: [e.op("attention", ins, n.attrs)]


def simplify_rules() -> list[Rule]:
    return [
        Rule("neutral_operand", ("mul", "div", "add", "sub"), _match_neutral,
             "x*1, x/1, x+0, x-0 -> x"),
        Rule("noop_shape", ("expand", "cast", "slice"), _match_noop_shape,
             "expand/cast/slice that keeps the type -> x"),
        Rule("permute", ("permute",), _match_permute,
             "identity permute -> x; permute of permute -> one permute"),
        Rule("reshape", ("reshape",), _match_reshape,
             "reshape to the same shape -> x; reshape of reshape -> one reshape"),
        Rule("noop_mask", ("attention",), _match_noop_mask,
             "attention mask that keeps every score -> no mask"),
    ]


@register_pass(config=FoldConstantsConfig, numerics="exact",
               requires=("types", "shapes"))
def fold_constants(g: Graph, cfg: FoldConstantsConfig, ctx: PassContext) -> Graph:
    """Evaluates nodes on constants into params and applies exact simplifications."""
    out, folded = _fold(g, cfg)
    if cfg.simplify:
        out = apply_rules(out, simplify_rules(), ctx, "fold_constants")
        # simplification can expose new constant subgraphs (e.g. a reshape of a param)
        out, more = _fold(out, cfg)
        folded += more
    ctx.record("fold_constants", folded=folded)
    return out
