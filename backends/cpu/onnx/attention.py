"""The fused ``attention`` op as ONNX Runtime's ``MultiHeadAttention`` kernel (contrib ops).

Before -> After (``export_onnx(..., contrib_ops=True)``)::

    %q = permute(reshape(%q2d, [B, S, H, D]), [0, 2, 1, 3])     (same for %k, %v)
    %o = attention(%q, %k, %v, %mask)  {scale, is_causal}
    %y = reshape(permute(%o, [0, 2, 1, 3]), [B, S, H*D])
  ->
    bias = Where(mask, 0, -inf)       once per mask, shared by every layer; Expand to [.., S, L]
    y    = com.microsoft.MultiHeadAttention(q2d, k2d, v2d, attention_bias=bias)
           {num_heads=H, scale, unidirectional=is_causal}

One kernel instead of MatMul, Mul, Where, Softmax, MatMul and the head transposes. On MiniLM
(batch 8 x 128, 12 heads of 32) the decomposed form spent 10 ms of 49 in the per-layer
``Where`` over the [B, H, S, S] scores alone; one attention alone: 2.12 ms decomposed vs 1.37 ms
fused (2 threads, ORT 1.32). The IR keeps its [B, H, S, D] layout: where the q/k/v inputs are
head-split views of [B, S, H*D] tensors the kernel reads those directly; otherwise (and for the
output) explicit Reshape/Transpose nodes convert, and the exporter cancels a Transpose against
the inverse permute that follows it. Anything the kernel does not cover (grouped-query heads,
symbolic head counts, a causal mask with different query and key lengths, non-fp32) keeps the
decomposed standard-op form.

The kernel needs the mask as a full [B, 1, S, L] bias, which doubles its time on some CPUs
(`ember.backends.cpu.ort_tuning` measures it); with ``masked_mha=False`` masked attention keeps
the standard ops, the bool mask turned into an additive bias once (its own broadcast shape,
shared by every layer) instead of a ``Where`` over every layer's [B, H, S, L] scores.
"""

from __future__ import annotations

from typing import Any

import sympy

from ember.ir import Node, Value

from .emit import _attention
from .registry import register_emitter

__all__: list[str] = []

MS = "com.microsoft"
X = Any  # the exporter (`ember.backends.cpu.onnx.emit._Exporter`)

_HEADS_FIRST = [0, 2, 1, 3]


def _same(a: Any, b: Any) -> bool:
    return a == b or sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _as_bsd(x: X, v: Value, name: str) -> str:
    """``v`` [B, H, S, D] as a [B, S, H*D] tensor: the tensor it was split from, if any."""
    b, h, s, d = v.type.shape
    p = x.producer.get(v.name)
    if p is not None and p.op == "permute" and list(p.attrs["perm"]) == _HEADS_FIRST:
        r = x.producer.get(p.inputs[0].name)
        src = r.inputs[0] if r is not None and r.op == "reshape" else None
        if src is not None and src.type.rank == 3 and all(
                _same(u, w) for u, w in zip(src.type.shape, (b, s, h * d))):
            return src.name
    t = x.one("Transpose", [name], perm=_HEADS_FIRST)
    return x.one("Reshape", [t, x.shape([b, s, h * d])])


def _additive(x: X, mask: Value, name: str) -> str:
    """The float additive form of a mask in its own (broadcast) shape, made once per mask."""
    if mask.type.dtype != "bool":
        return name
    key = ("additive_mask", name)
    if key not in x.shared:
        x.shared[key] = x.one("Where", [name, x.const(0.0, "float32"),
                                        x.const(float("-inf"), "float32")])
    return x.shared[key]


def _bias(x: X, mask: Value, name: str, s: Any, kv: Any) -> str:
    """The additive [B|1, H|1, S, L] bias of a bool (keep) or float mask, made once per mask."""
    key = ("mha_bias", name)
    if key in x.shared:
        return x.shared[key]
    shape = list(mask.type.shape)
    out = name
    if mask.type.dtype == "bool":
        out = x.one("Where", [name, x.const(0.0, "float32"), x.const(float("-inf"), "float32")])
    while len(shape) < 4:
        shape.insert(0, 1)
    if len(mask.type.shape) < 4:
        out = x.one("Reshape", [out, x.shape(shape)])
    if not (_same(shape[2], s) and _same(shape[3], kv)):
        # the kernel broadcasts the batch and head dims of the bias, not the query/key dims
        out = x.one("Expand", [out, x.shape([1, 1, s, kv])])
    x.shared[key] = out
    return out


@register_emitter("attention")
def _mha(x: X, n: Node, ins: list[str]) -> list[str]:
    q, k, v = n.inputs[:3]
    a = n.attrs
    shapes = [t.type.shape for t in (q, k, v)]
    ok = (x.contrib and not a["enable_gqa"] and all(len(sh) == 4 for sh in shapes)
          and all(t.type.dtype == "float32" for t in (q, k, v))
          and isinstance(q.type.shape[1], int) and isinstance(q.type.shape[3], int)
          and all(_same(sh[1], q.type.shape[1]) for sh in shapes[1:])
          and _same(k.type.shape[3], q.type.shape[3]) and _same(v.type.shape[3], q.type.shape[3])
          and _same(k.type.shape[2], v.type.shape[2]) and _same(k.type.shape[0], q.type.shape[0])
          and _same(v.type.shape[0], q.type.shape[0]))
    mask = n.inputs[3] if len(n.inputs) > 3 else None
    if ok and mask is not None:
        ok = mask.type.rank <= 4 and mask.type.dtype in ("bool", "float32") and (
            mask.type.rank < 4 or isinstance(mask.type.shape[1], int)
            and mask.type.shape[1] in (1, q.type.shape[1]))
    if ok and a["is_causal"]:
        ok = _same(q.type.shape[2], k.type.shape[2])
    if ok and mask is not None and not x.masked_mha:
        if q.type.dtype == "float32" and mask.type.dtype in ("bool", "float32"):
            return _attention(x, n, ins, additive_bias=_additive(x, mask, ins[3]))
        return _attention(x, n, ins)
    if not ok:
        return _attention(x, n, ins)
    b, h, s, d = q.type.shape
    kv = k.type.shape[2]
    mha_in = [_as_bsd(x, q, ins[0]), _as_bsd(x, k, ins[1]), _as_bsd(x, v, ins[2]), "", ""]
    if mask is not None:
        mha_in.append(_bias(x, mask, ins[3], s, kv))
    attrs: dict[str, Any] = {"num_heads": int(h)}
    if a["scale"] is not None:
        attrs["scale"] = float(a["scale"])
    if a["is_causal"]:
        attrs["unidirectional"] = 1
    y = x.one("MultiHeadAttention", mha_in, domain=MS, **attrs)
    y4 = x.one("Reshape", [y, x.shape([b, s, h, d])])
    out = x.one("Transpose", [y4], perm=_HEADS_FIRST)
    x.transposed[out] = (y4, _HEADS_FIRST)
    return [out]
