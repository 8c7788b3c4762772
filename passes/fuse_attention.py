"""Fuse explicit (eager) attention into the core `attention` op.

Before -> After::

    %kt = permute(%k) {perm=[0, 1, 3, 2]}         (last two dims swapped)
    %s  = matmul(%q, %kt)
    %s2 = mul(%s, c)   | div(%s, c)               (optional scale; also on %q, %k or %kt)
    %s3 = add(%s2, %mask)                         (optional additive mask, dtype of %q)
        | where(%keep, %s2, -inf)                 (or a boolean mask)
    %p  = softmax(%s3) {dim=-1}                   (optionally cast to f32 and back around it)
    %o  = matmul(%p, %v)               ->         %o = attention(%q, %k, %v, %mask?) {scale}

The scale is always written explicitly (``scale=1.0`` when the pattern had none), since the op's
default is ``1/sqrt(head_dim)``. q, k and v must have equal batch dims (GQA graphs repeat k/v
before the matmul, so the repeat stays outside the fused op).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ember.ir import Graph, Node, TensorType, Value, get_op
from ember.ir.opset import check_types_equal
from ember.ir.shapes import dims_equal
from ember.passmanager import PassContext, register_pass

from ._rewrite import EmitFn, Emitter, Fail, GraphIndex, Rule, apply_rules

__all__ = ["FuseAttentionConfig", "fuse_attention"]

log = logging.getLogger(__name__)

_FLOATS = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class FuseAttentionConfig:
    """Attributes:
    allow_masks: fuse patterns with an additive or boolean mask.
    """

    allow_masks: bool = True


def _unscale(v: Value, idx: GraphIndex) -> tuple[Value, float]:
    """(x, c) when v = x * c, c * x or x / c for a scalar constant c, else (v, 1.0)."""
    n = idx.producer(v, ("mul", "div"))
    if n is None:
        return v, 1.0
    a, b = n.inputs
    if n.op == "div":
        c = idx.scalar(b)
        if c is not None and c != 0.0 and check_types_equal(a.type, v.type):  # type: ignore[union-attr]
            return a, 1.0 / c  # type: ignore[return-value]
        return v, 1.0
    for x, k in ((a, b), (b, a)):
        c = idx.scalar(k)
        if c is not None and check_types_equal(x.type, v.type):  # type: ignore[union-attr]
            return x, c  # type: ignore[return-value]
    return v, 1.0


def _key_from_transposed(kt: Node) -> tuple[Value, tuple[int, ...]] | None:
    """(src, perm) with k = permute(src, perm) when kt = permute(src, p) moves k's last two
    dims to the end swapped (a plain transpose, or one composed with a head split)."""
    rank = kt.output.type.rank
    p = [x % rank for x in kt.attrs["perm"]]
    if rank < 2:
        return None
    perm = (*p[:-2], p[-1], p[-2])
    return kt.inputs[0], perm  # type: ignore[return-value]


def _scores(v: Value, idx: GraphIndex) -> tuple[Value, Value | tuple, float] | Fail:
    """(q, k, scale) when v = scale * (q @ k^T) with the scale anywhere along the way.

    k is a value, or ``(src, perm)`` when it has to be built as ``permute(src, perm)``.
    """
    s, scale = _unscale(v, idx)
    mm = idx.producer(s, "matmul")
    if mm is None:
        return Fail("scores are not a matmul (times a constant)")
    q, qs = _unscale(mm.inputs[0], idx)  # type: ignore[arg-type]
    # the scale may also sit on the transposed key (torch.onnx splits SDPA's scale into
    # sqrt(scale) * q and sqrt(scale) * k^T)
    kt_v, kts = _unscale(mm.inputs[1], idx)  # type: ignore[arg-type]
    kt = idx.producer(kt_v, "permute")
    if kt is None:
        return Fail("key is not transposed by a permute")
    src, perm = _key_from_transposed(kt)  # type: ignore[misc]
    if perm == tuple(range(len(perm))):
        k, ks = _unscale(src, idx)
        return q, k, scale * qs * ks * kts
    return q, (src, perm), scale * qs * kts

def _match(n: Node, idx: GraphIndex, cfg: FuseAttentionConfig) -> EmitFn | Fail:
    p, v = n.inputs
    pn = idx.producer(p)
    if pn is not None and pn.op == "cast":  # softmax in float32, cast back
        pn = idx.producer(pn.inputs[0])
    if pn is None or pn.op != "softmax":
        return Fail("left operand is not a softmax")
    rank = pn.output.type.rank
    if pn.attrs["dim"] % rank != rank - 1:
        return Fail("softmax is not over the last dim")
    s = pn.inputs[0]
    sn = idx.producer(s, "cast")
    if sn is not None:
        s = sn.inputs[0]
    mask: Value | None = None
    bool_mask = negate = False
    sc = _scores(s, idx)  # type: ignore[arg-type]
    if isinstance(sc, Fail) and cfg.allow_masks:
        mn = idx.producer(s, ("add", "where"))
        if mn is not None and mn.op == "add":
            for a, b in ((mn.inputs[0], mn.inputs[1]), (mn.inputs[1], mn.inputs[0])):
                sc = _scores(a, idx)  # type: ignore[arg-type]
                if not isinstance(sc, Fail):
                    mask = b
                    if not check_types_equal(a.type, s.type):  # type: ignore[union-attr]
                        return Fail("additive mask broadcasts the scores to a bigger shape")
                    break
        elif mn is not None and mn.op == "where":
            c, a, b = mn.inputs
            for x, fill, neg in ((a, b, False), (b, a, True)):
                if idx.scalar(fill) == -math.inf:
                    sc = _scores(x, idx)  # type: ignore[arg-type]
                    if not isinstance(sc, Fail):
                        mask, negate, bool_mask = c, neg, True
                        if not check_types_equal(x.type, s.type):  # type: ignore[union-attr]
                            return Fail("boolean mask broadcasts the scores to a bigger shape")
                        break
    if isinstance(sc, Fail):
        return sc
    q, k_spec, scale = sc
    if isinstance(k_spec, tuple):
        src, perm = k_spec
        k_type = src.type.with_shape(tuple(src.type.shape[i] for i in perm))
    else:
        k_type = k_spec.type
    k = _Typed("k", k_type)
    if not (q.type.dtype == k.type.dtype == v.type.dtype) or q.type.dtype not in _FLOATS:  # type: ignore[union-attr]
        return Fail("q, k, v dtypes differ or are not float")
    if q.type.rank < 2 or not (q.type.rank == k.type.rank == v.type.rank):  # type: ignore[union-attr]
        return Fail("q, k, v ranks differ")
    for a, b in ((q, k), (q, v)):
        if not all(dims_equal(x, y) for x, y in zip(a.type.shape[:-2], b.type.shape[:-2])):  # type: ignore[union-attr]
            return Fail("q, k, v batch dims differ")
    if mask is not None:
        want = "bool" if bool_mask else q.type.dtype
        if mask.type.dtype != want:
            return Fail(f"mask dtype {mask.type.dtype} is not {want}")
        if mask.type.rank > q.type.rank:
            return Fail("mask has a higher rank than q")
    attrs = {"scale": float(scale), "is_causal": False, "enable_gqa": False}
    ins = [q, k, v] + ([mask] if mask is not None else [])
    want_t = get_op("attention").infer([x.type for x in ins], attrs)  # type: ignore[union-attr]
    if not check_types_equal(want_t[0], n.output.type):
        return Fail("attention would not give the type of the matmul")

    def emit(e: Emitter) -> list[Value]:
        kv = k_spec if not isinstance(k_spec, tuple) else e.op("permute", [k_spec[0]],
                                                              {"perm": k_spec[1]})
        m = mask
        if m is not None and negate:
            m = e.op("logical_not", [m])
        return [e.op("attention", [q, kv, v] + ([m] if m is not None else []), attrs)]

    return emit


@dataclass(frozen=True)
class _Typed:
    """A stand-in for a value that the emit function builds (only its type is read)."""

    name: str
    type: TensorType


@register_pass(config=FuseAttentionConfig, numerics="exact",
               requires=("types", "shapes"))
def fuse_attention(g: Graph, cfg: FuseAttentionConfig, ctx: PassContext) -> Graph:
    """Replaces matmul-softmax-matmul attention with the `attention` op."""
    rule = Rule("attention", ("matmul",), lambda n, idx: _match(n, idx, cfg),
                "softmax(q k^T * s + mask) v -> attention")
    return apply_rules(g, [rule], ctx, "fuse_attention")
