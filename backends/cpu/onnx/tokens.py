"""ONNX emitters for the token-reduction and layer-skipping ops (`ember.ir.opset_tokens`).

Registered into `ember.backends.cpu.onnx.registry` with `register_emitter`; each writes standard ONNX (or
ONNX Runtime ``com.microsoft``) nodes so that Ember's CPU backend can run the rewritten graph in
ONNX Runtime. Ops without an emitter here still export to the ``ai.ember`` custom domain.

Every emitter is vectorized (no per-token nodes) and follows its op's reference step by step,
so the discrete choices agree with it: ONNX ``TopK`` and ``ArgMax`` put the lower index first
on ties, as the references' stable sorts and ``max`` do. Symbolic token counts (``seq - r``)
are computed from the inputs' shapes at run time.

    token_merge   ToMe matching: ReduceL2/Div, MatMul, ReduceMax/ArgMax, TopK, CumSum,
                  GatherElements; pooling as one-hot MatMuls (ScatterElements(reduction=add)
                  past `POOL_MATMUL_MAX_TOKENS`)
    token_select  TopK (twice: pick, then restore token order), GatherND(batch_dims=1),
                  fused token as masked ReduceSum
    token_unmerge GatherND(batch_dims=1) + Where
    token_gather  GatherND(batch_dims=1) / Gather for rows; otherwise Expand + GatherElements
    attention_score / token_score / halt_update / early_exit: MatMul, Softmax, reductions
"""

from __future__ import annotations

from typing import Any

from onnx import TensorProto, helper

from ember.ir import Node
from ember.ir.shapes import Dim, simplify

from .registry import NoMapping, register_emitter

__all__: list[str] = []

_EPS = 1e-12
_BIG = 2**63 - 1
X = Any  # the exporter (`ember.backends.cpu.onnx.emit._Exporter`)


# ----------------------------------------------------------------------------- helpers
def _axes_reduce(x: X, op: str, i: str, axes: list[int], keep: bool) -> str:
    """Reduce* with axes as attribute (opset < 18) or input (ReduceSum, opset >= 18)."""
    if op == "ReduceSum" or x.opset >= 18:
        return x.one(op, [i, x.const(axes)], keepdims=int(keep))
    return x.one(op, [i], axes=axes, keepdims=int(keep))


def _dim(x: X, d: Dim) -> str:
    """``x.dim(d)``, also for ``floor(p/q)`` of a rational expression (a ``ratio`` count)."""
    import sympy

    e = sympy.sympify(d)
    if not any(not f.args[0].is_Mul for f in e.atoms(sympy.floor)):
        return x.dim(d)
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return x.one("Div", [_dim(x, num), _dim(x, den)])  # p >= 0, q > 0: truncation = floor
    if e.is_Add or e.is_Mul:
        parts = [_dim(x, a) for a in e.args]
        acc = parts[0]
        for a in parts[1:]:
            acc = x.one("Add" if e.is_Add else "Mul", [acc, a])
        return acc
    return x.dim(d)


def _shape(x: X, dims: list[Dim] | tuple) -> str:
    if all(isinstance(d, int) for d in dims):
        return x.const(list(dims))
    return x.one("Concat", [_dim(x, d) for d in dims], axis=0)


def _scalar(x: X, d: Dim) -> str:
    """A 0-d int64 tensor holding dim ``d``."""
    return x.one("Reshape", [_dim(x, d), x.const([], "int64")])


def _arange(x: X, d: Dim) -> str:
    return x.one("Range", [x.const(0), _scalar(x, d), x.const(1)])


def _slice(x: X, i: str, start: Dim, axis: int, step: int = 1) -> str:
    return x.one("Slice", [i, _dim(x, start), x.const([_BIG]), x.const([axis]),
                           x.const([step])])


def _unsq(x: X, i: str, axis: int) -> str:
    return x.one("Unsqueeze", [i, x.const([axis])])


def _batch(x: X, i: str) -> str:
    """[B] of tensor ``i`` as a 1-element int64 tensor (from its run-time shape)."""
    return x.one("Slice", [x.one("Shape", [i]), x.const([0]), x.const([1])])


def _full(x: X, shape: str, value: float | int, dtype: int) -> str:
    return x.one("ConstantOfShape", [shape], value=helper.make_tensor("v", dtype, [1], [value]))


def _rows(x: X, idx: str, like: str) -> str:
    """``[B, K]`` index expanded to ``[B, K]`` batch rows of ``like`` (a [K] index)."""
    return x.one("Expand", [idx, x.one("Concat", [_batch(x, like), x.one("Shape", [idx])],
                                       axis=0)])


def _gather_rows(x: X, data: str, idx: str) -> str:
    """``data[b, idx[b, k]]`` for data [B, N, ...] and idx [B, K] (GatherND, batch_dims=1)."""
    return x.one("GatherND", [data, _unsq(x, idx, -1)], batch_dims=1)


def _float(x: X, i: str, n: Node, k: int) -> str:
    v = n.inputs[k]
    return i if v is not None and v.type.dtype == "float32" else x.one(
        "Cast", [i], to=TensorProto.FLOAT)


def _ones_sizes(x: X, xin: str) -> str:
    """[B, N, 1] of ones (the default token sizes) shaped like stream ``xin``."""
    shp = x.one("Concat", [x.one("Slice", [x.one("Shape", [xin]), x.const([0]), x.const([2])]),
                           x.const([1])], axis=0)
    return x.one("CastLike", [_full(x, shp, 1.0, TensorProto.FLOAT), xin])


def _rep_from_map(x: X, mp: str, n_out: Dim) -> str:
    """Smallest input position mapped to each output position: first hit of a one-hot."""
    hit = x.one("Equal", [_unsq(x, mp, 1),
                          x.one("Reshape", [_arange(x, n_out), x.const([1, -1, 1])])])
    return x.one("ArgMax", [x.one("Cast", [hit], to=TensorProto.INT32)], axis=2, keepdims=0)


def _head(x: X, like: str, p: int) -> str:
    """[B, p] rows of arange(p) (the protected positions)."""
    return _rows(x, x.const(list(range(p))), like)


# ----------------------------------------------------------------------------- token_merge
def _bipartite_map(x: X, metric: str, r: Dim, p: int, rest: Dim) -> str:
    m = _slice(x, metric, p, 1) if p else metric
    m = x.one("Div", [m, x.one("Max", [_axes_reduce(x, "ReduceL2", m, [-1], True),
                                        x.const(_EPS, "float32")])])
    a, b = _slice(x, m, 0, 1, 2), _slice(x, m, 1, 1, 2)
    sim = x.one("MatMul", [a, x.one("Transpose", [b], perm=[0, 2, 1])])
    node_max = _axes_reduce(x, "ReduceMax", sim, [-1], False)  # [B, na]
    node_idx = x.one("ArgMax", [sim], axis=-1, keepdims=0)
    src = x.node("TopK", [node_max, _dim(x, r)], 2, axis=-1, largest=1, sorted=1)[1]  # [B, r]
    zeros = x.one("Mul", [node_idx, x.const(0)])
    merged = x.one("ScatterElements", [zeros, src, x.one("Add", [x.one("Mul", [src, x.const(0)]),
                                                                 x.const(1)])], axis=1)
    j = _arange(x, rest)
    jh = _rows(x, x.one("Div", [j, x.const(2)]), node_idx)  # [B, rest]: A index of token j
    even = x.one("Sub", [x.const(1), x.one("Mod", [j, x.const(2)])])
    removed = x.one("Mul", [x.one("GatherElements", [merged, jh], axis=1), even])
    pos = x.one("Sub", [x.one("CumSum", [x.one("Sub", [x.const(1), removed]), x.const(1)]),
                        x.const(1)])
    dst = x.one("Add", [x.one("Mul", [x.one("GatherElements", [node_idx, jh], axis=1),
                                      x.const(2)]), x.const(1)])
    rest_map = x.one("Where", [x.one("Cast", [removed], to=TensorProto.BOOL),
                               x.one("GatherElements", [pos, dst], axis=1), pos])
    if not p:
        return rest_map
    return x.one("Concat", [_head(x, rest_map, p), x.one("Add", [rest_map, x.const(p)])], axis=1)


# up to this many tokens the pooling is a batched one-hot MatMul ([B, N_out, N] x [B, N, d],
# MLAS GEMM) instead of ScatterElements: on the Fashion-MNIST ViT (50 tokens) the scatters
# took 4.1 ms of a 14.7 ms model; the MatMul's N_out * N * d multiply-adds stay a few percent of
# a block's GEMMs while N is well below the width times the MLP ratio
POOL_MATMUL_MAX_TOKENS = 1024


def _pool(x: X, xin: str, w: str, size: str, mp: str, n_out: Dim, dims: tuple) -> tuple[str, str]:
    """Size-weighted averages of the tokens mapping to each output (every token valid)."""
    b, n_in, d = dims
    if isinstance(n_in, int) and n_in <= POOL_MATMUL_MAX_TOKENS or not isinstance(n_in, int):
        return _pool_matmul(x, xin, w, size, mp, n_out)
    idx3 = _unsq(x, mp, -1)
    num = x.one("ScatterElements", [
        x.one("CastLike", [_full(x, _shape(x, [b, n_out, d]), 0.0, TensorProto.FLOAT), xin]),
        x.one("Expand", [idx3, x.one("Shape", [xin])]), x.one("Mul", [xin, w])],
        axis=1, reduction="add")
    zeros1 = x.one("CastLike", [_full(x, _shape(x, [b, n_out, 1]), 0.0, TensorProto.FLOAT), w])
    den = x.one("ScatterElements", [zeros1, idx3, w], axis=1, reduction="add")
    s = den if w == size else x.one("ScatterElements", [zeros1, idx3, size], axis=1,
                                    reduction="add")
    return x.one("Div", [num, x.one("Max", [den, x.one("CastLike", [
        x.const(_EPS, "float32"), den])])]), s


def _pool_matmul(x: X, xin: str, w: str, size: str, mp: str, n_out: Dim) -> tuple[str, str]:
    """`_pool` as one-hot [B, N_out, N] MatMuls: output o sums the tokens i with map[i] = o."""
    hit = x.one("Equal", [_unsq(x, mp, 1),
                          x.one("Reshape", [_arange(x, n_out), x.const([1, -1, 1])])])
    onehot = x.one("CastLike", [hit, xin])
    num = x.one("MatMul", [onehot, x.one("Mul", [xin, w])])
    den = x.one("MatMul", [onehot, w])
    s = den if w == size else x.one("MatMul", [onehot, size])
    return x.one("Div", [num, x.one("Max", [den, x.one("CastLike", [
        x.const(_EPS, "float32"), den])])]), s


@register_emitter("token_merge")
def _token_merge(x: X, n: Node, ins: list[str]) -> list[str]:
    if x.opset < 16:
        raise NoMapping  # ScatterElements(reduction=add)
    xt = n.inputs[0].type
    r, p = n.attrs["r"], n.attrs["protect"]
    dims = xt.shape
    n_tok = dims[1]
    size = ins[2] if len(ins) > 2 and ins[2] else _ones_sizes(x, ins[0])
    if isinstance(r, int) and r == 0:
        mp = _rows(x, _arange(x, n_tok), ins[0])
        return [x.one("Identity", [ins[0]]), size, mp, mp]
    rest = simplify(n_tok - p)
    mp = _bipartite_map(x, _float(x, ins[1], n, 1), r, p, rest)
    n_out = simplify(n_tok - r)
    y, s = _pool(x, ins[0], size, size, mp, n_out, dims)
    return [y, s, mp, _rep_from_map(x, mp, n_out)]


# ----------------------------------------------------------------------------- token_select
@register_emitter("token_select")
def _token_select(x: X, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    keep, p, fuse = a["keep"], a["protect"], bool(a["fuse"])
    if isinstance(keep, int) and keep == 0:
        raise NoMapping
    xin = ins[0]
    size = ins[2] if len(ins) > 2 and ins[2] else _ones_sizes(x, xin)
    score = _float(x, ins[1], n, 1)
    srest = _slice(x, score, p, 1) if p else score
    k = _dim(x, keep)
    kept = x.node("TopK", [srest, k], 2, axis=-1, largest=1, sorted=1)[1]
    kept = x.node("TopK", [kept, k], 2, axis=-1, largest=0, sorted=1)[0]  # token order
    kept_p = x.one("Add", [kept, x.const(p)]) if p else kept
    idx = x.one("Concat", [_head(x, kept, p), kept_p], axis=1) if p else kept_p
    # rest_map: -1 everywhere, then kept tokens get their output slot 0..keep-1
    minus = x.one("Sub", [x.one("Mul", [x.one("Cast", [srest], to=TensorProto.INT64),
                                        x.const(0)]), x.const(1)])
    slots = _rows(x, _arange(x, keep), kept)
    rest_map = x.one("ScatterElements", [minus, kept, slots], axis=1)
    dropped = x.one("Less", [rest_map, x.const(0)])
    y = _gather_rows(x, xin, idx)
    s = _gather_rows(x, size, idx)
    if not fuse:
        rm = x.one("Where", [dropped, x.const(-1), x.one("Add", [rest_map, x.const(p)])])
        mp = x.one("Concat", [_head(x, rm, p), rm], axis=1) if p else rm
        return [y, s, mp, idx]
    rm = x.one("Add", [x.one("Where", [dropped, _dim(x, keep), rest_map]), x.const(p)])
    mp = x.one("Concat", [_head(x, rm, p), rm], axis=1) if p else rm
    srest_sz = _slice(x, size, p, 1) if p else size
    w = srest_sz
    if a["weighting"] == "score":
        w = x.one("Mul", [srest_sz, x.one("CastLike", [_unsq(x, x.one(
            "Max", [srest, x.const(0.0, "float32")]), -1), srest_sz])])
    d3 = _unsq(x, dropped, -1)
    zero = x.one("CastLike", [x.const(0.0, "float32"), w])
    wd = x.one("Where", [d3, w, zero])
    xrest = _slice(x, xin, p, 1) if p else xin
    num = _axes_reduce(x, "ReduceSum", x.one("Mul", [xrest, wd]), [1], True)
    den = _axes_reduce(x, "ReduceSum", wd, [1], True)
    fused = x.one("Div", [num, x.one("Max", [den, x.one("CastLike", [
        x.const(_EPS, "float32"), den])])])
    counted = d3
    if a["weighting"] == "score":  # the fused token counts the tokens of nonzero weight
        counted = x.one("And", [d3, _unsq(x, x.one("Greater", [srest, x.const(0.0, "float32")]),
                                           -1)])
    sf = _axes_reduce(x, "ReduceSum", x.one("Where", [counted, srest_sz, zero]), [1], True)
    # the fused token's representative: the highest-scoring dropped token (first on ties)
    ninf = x.one("CastLike", [x.const(float("-inf"), "float32"), srest])
    best = x.one("ArgMax", [x.one("Where", [dropped, srest, ninf])], axis=1, keepdims=1)
    rep = x.one("Concat", [idx, x.one("Add", [best, x.const(p)]) if p else best], axis=1)
    return [x.one("Concat", [y, fused], axis=1), x.one("Concat", [s, sf], axis=1), mp, rep]


# ----------------------------------------------------------------------------- unmerge, gather
@register_emitter("token_unmerge")
def _token_unmerge(x: X, n: Node, ins: list[str]) -> list[str]:
    out = _gather_rows(x, ins[0], x.one("Max", [ins[1], x.const(0)]))
    if len(ins) > 2 and ins[2]:
        out = x.one("Where", [_unsq(x, x.one("Less", [ins[1], x.const(0)]), -1), ins[2], out])
    return [out]


@register_emitter("token_gather")
def _token_gather(x: X, n: Node, ins: list[str]) -> list[str]:
    t = n.inputs[0].type
    out_shape = n.outputs[0].type.shape
    d = n.attrs["dim"] % t.rank
    it = n.inputs[1].type
    if d == 1 and t.rank >= 2:
        # rows of [B, N, ...] per batch: GatherND reads them without expanding the index to
        # the full output (the Expand + GatherElements form cost 1.4 + 2.7 ms on a 14.7 ms ViT)
        if t.shape[0] == 1 and it.shape[0] != 1:
            sq = x.one("Squeeze", [ins[0], x.const([0])])
            return [x.one("Gather", [sq, ins[1]], axis=0)]
        if t.shape[0] == it.shape[0]:
            return [_gather_rows(x, ins[0], ins[1])]
    src_shape = list(t.shape)
    src_shape[0] = out_shape[0]
    data = x.one("Expand", [ins[0], _shape(x, src_shape)])
    ishape: list[Dim] = [1] * t.rank
    ishape[0], ishape[d] = it.shape[0], it.shape[1]
    idx = x.one("Reshape", [ins[1], _shape(x, ishape)])
    idx = x.one("Expand", [idx, _shape(x, list(out_shape))])
    return [x.one("GatherElements", [data, idx], axis=d)]


# ----------------------------------------------------------------------------- scores
@register_emitter("attention_score")
def _attention_score(x: X, n: Node, ins: list[str]) -> list[str]:
    qt, kt = n.inputs[0].type, n.inputs[1].type
    if qt.dtype != "float32":
        raise NoMapping
    a = n.attrs
    q, k = ins[0], ins[1]
    mask = ins[2] if len(ins) > 2 and ins[2] else ""
    mt = n.inputs[2].type if mask else None
    if a["query"] is not None:
        i = a["query"]
        q = x.one("Slice", [q, x.const([i]), x.const([i + 1]), x.const([-2])])
        if mt is not None and mt.shape[-2] != 1:
            mask = x.one("Slice", [mask, x.const([i]), x.const([i + 1]), x.const([-2])])
    if kt.shape[-3] != qt.shape[-3]:  # grouped-query attention: repeat each kv head
        if not (isinstance(kt.shape[-3], int) and isinstance(qt.shape[-3], int)):
            raise NoMapping
        rep = qt.shape[-3] // kt.shape[-3]
        b, h, nk, dd = kt.shape
        k = x.one("Unsqueeze", [k, x.const([2])])
        k = x.one("Expand", [k, _shape(x, [b, h, rep, nk, dd])])
        k = x.one("Reshape", [k, _shape(x, [b, h * rep, nk, dd])])
    scale = a["scale"] if a["scale"] is not None else float(qt.shape[-1]) ** -0.5
    logits = x.one("Mul", [x.one("MatMul", [q, x.one("Transpose", [k], perm=[0, 1, 3, 2])]),
                           x.const(scale, "float32")])
    if mask:
        if mt.dtype == "bool":
            logits = x.one("Where", [mask, logits, x.const(float("-inf"), "float32")])
        else:
            logits = x.one("Add", [logits, x.cast(mask, n.inputs[2], "float32")])
    p = x.one("Softmax", [logits], axis=-1)
    return [_axes_reduce(x, "ReduceMean", p, [1, 2], False)]


@register_emitter("token_score")
def _token_score(x: X, n: Node, ins: list[str]) -> list[str]:
    if n.inputs[0].type.dtype != "float32":
        raise NoMapping
    a = n.attrs
    t = ins[0]
    if a["method"] == "shift":
        if len(ins) > 1 and ins[1]:
            t = x.one("Sub", [t, ins[1]])
        return [_axes_reduce(x, "ReduceL2", t, [-1], False)]
    p = a["protect"]
    nb = simplify(n.inputs[0].type.shape[1] - p)
    if not isinstance(nb, int):
        raise NoMapping  # k = min(pivots, N - p) on a symbolic count
    k = min(a["pivots"], nb)
    body = _slice(x, t, p, 1) if p else t
    norms = _axes_reduce(x, "ReduceL2", body, [-1], False)
    piv = x.node("TopK", [norms, x.const([k])], 2, axis=-1, largest=1, sorted=1)[1]
    unit = x.one("Div", [body, x.one("Max", [_unsq(x, norms, -1), x.const(_EPS, "float32")])])
    pv = _gather_rows(x, unit, piv)
    dup = _axes_reduce(x, "ReduceMax", x.one("MatMul", [unit, x.one(
        "Transpose", [pv], perm=[0, 2, 1])]), [-1], False)
    two = x.one("Add", [x.one("Mul", [x.one("Cast", [piv], to=TensorProto.FLOAT),
                                      x.const(0.0, "float32")]), x.const(2.0, "float32")])
    score = x.one("ScatterElements", [x.one("Neg", [dup]), piv, two], axis=1)
    if not p:
        return [score]
    head = _full(x, _shape(x, [n.inputs[0].type.shape[0], p]), 2.0, TensorProto.FLOAT)
    return [x.one("Concat", [head, score], axis=1)]


# ----------------------------------------------------------------------------- layer skipping
@register_emitter("halt_update")
def _halt_update(x: X, n: Node, ins: list[str]) -> list[str]:
    prev, new, halted = ins[0], ins[1], ins[2]
    out = x.one("Where", [_unsq(x, halted, -1), prev, new])
    num = _axes_reduce(x, "ReduceL2", x.one("Sub", [new, prev]), [-1], False)
    den = x.one("Max", [_axes_reduce(x, "ReduceL2", prev, [-1], False),
                        x.const(_EPS, "float32")])
    rel = x.one("Div", [num, den])
    still = x.one("Less", [rel, x.const(float(n.attrs["threshold"]), "float32")])
    return [out, x.one("Or", [halted, still])]


@register_emitter("early_exit")
def _early_exit(x: X, n: Node, ins: list[str]) -> list[str]:
    ls = [i for i in ins if i]
    if n.outputs[0].type.dtype != "float32":
        raise NoMapping
    stacked = x.one("Concat", [_unsq(x, i, 0) for i in ls], axis=0)  # [E, B, C]
    conf = x.one("GreaterOrEqual", [
        _axes_reduce(x, "ReduceMax", x.one("Softmax", [stacked], axis=-1), [-1], False),
        x.const(float(n.attrs["threshold"]), "float32")])  # [E, B]
    last = x.one("Equal", [_arange(x, len(ls)), x.const(len(ls) - 1)])
    conf = x.one("Or", [conf, _unsq(x, last, -1)])
    which = x.one("ArgMax", [x.one("Cast", [conf], to=TensorProto.INT32)], axis=0,
                  keepdims=0)  # [B]
    idx = x.one("Expand", [x.one("Reshape", [which, x.const([1, -1, 1])]),
                           x.one("Concat", [x.const([1]), x.one("Slice", [x.one(
                               "Shape", [stacked]), x.const([1]), x.const([3])])], axis=0)])
    out = x.one("GatherElements", [stacked, idx], axis=0)
    return [x.one("Squeeze", [out, x.const([0])]), which]
