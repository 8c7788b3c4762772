"""The exporter's fusion stage: IR node groups written as one ONNX / ONNX Runtime kernel.

Before emission the exporter (`ember.backends.cpu.onnx.emit`) runs every rule of `FUSIONS` over
the graph's nodes: a rule names the producers a node absorbs (its *sources*); those are not
emitted where they are defined, the absorbing node's emitter writes them fused into itself::

    hard_sigmoid     clamp(mul(x, alpha) + beta, 0, 1) -> HardSigmoid  (ORT fuses it into the
                     convolution before it)
    skip_layer_norm  layer_norm(add(a, b)) / layer_norm(fused_linear(.., residual))
                     -> com.microsoft SkipLayerNormalization (``contrib_ops`` and
                     ``skip_layernorm`` only; `ember.backends.cpu.ort_tuning` measures it)

The other ONNX Runtime kernels are chosen per op by their emitters: MultiHeadAttention
(`attention`), Gelu/FastGelu and SimplifiedLayerNormalization (`emit`), the int8/int4 matmuls
(`quant`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import helper

from ember.ir import Node, Value

from .registry import EMITTERS, MS_DOMAIN

__all__ = ["Fusion", "FUSIONS", "fusion_sources", "hard_sigmoid", "skip_layer_norm"]

X = Any  # the exporter (`ember.backends.cpu.onnx.emit._Exporter`)


@dataclass(frozen=True)
class Fusion:
    """One rule of the fusion stage: ``sources(exporter, node)`` -> the producers ``node``
    absorbs (empty: no match); ``enabled(exporter)`` -> whether the export options allow it."""

    name: str
    sources: Callable[[X, Node], list[Node]]
    enabled: Callable[[X], bool]


def fusion_sources(x: X, n: Node) -> list[Node]:
    """The producers ``n`` absorbs under the enabled rules of `FUSIONS`, in rule order."""
    return [src for f in FUSIONS if f.enabled(x) for src in f.sources(x, n)]


def _scalar_param(x: X, v: Value | None) -> float | None:
    t = x.g.weights.get(v.name) if v is not None else None
    return float(t.reshape(())) if t is not None and t.numel() == 1 and \
        t.dtype == torch.float32 else None


def _affine_operands(x: X, n: Node | None, op: str) -> tuple[Value, float] | None:
    """(x, c) of ``op(x, c)`` / ``op(c, x)`` with c a scalar param and x of the output's type."""
    if n is None or n.op != op or len(n.inputs) != 2:
        return None
    for i in (0, 1):
        c, v = _scalar_param(x, n.inputs[i]), n.inputs[1 - i]
        if c is not None and v is not None and v.type == n.outputs[0].type:
            return v, c
    return None


def _hard_sigmoid_sources(x: X, n: Node) -> list[Node] | None:
    """The mul and add of ``clamp(x * alpha + beta, 0, 1)`` (ONNX HardSigmoid as the ONNX
    frontend spells it), each used only there: exported back as one HardSigmoid, which ONNX
    Runtime fuses into the convolution before it."""
    if n.op != "clamp" or n.attrs.get("min") != 0.0 or n.attrs.get("max") != 1.0 or \
            n.inputs[0].type.dtype != "float32":
        return None
    add = x.producer.get(n.inputs[0].name)
    ab = _affine_operands(x, add, "add")
    if ab is None or len(x.users.get(n.inputs[0].name, [])) != 1:
        return None
    mul = x.producer.get(ab[0].name)
    if _affine_operands(x, mul, "mul") is None or len(x.users.get(ab[0].name, [])) != 1:
        return None
    return [add, mul]


def hard_sigmoid(x: X, n: Node) -> str:
    add = x.deferred[n.inputs[0].name]
    y, beta = _affine_operands(x, add, "add")
    v, alpha = _affine_operands(x, x.deferred[y.name], "mul")
    return x.one("HardSigmoid", [v.name], alpha=alpha, beta=beta)


def _skip_ln_source(x: X, n: Node) -> Node | None:
    """The node whose sum a LayerNorm normalizes, when the pair is one ONNX Runtime
    ``SkipLayerNormalization``: ``layer_norm(add(a, b))`` or ``layer_norm(fused_linear(...,
    residual))`` without activation, a and b (or the linear and its residual) of the LayerNorm
    input's exact type, rank 3. Other users of the sum (pre-LN residual streams) read the op's
    fourth output, so they must all come after the LayerNorm."""
    if n.op != "layer_norm" or n.attrs["axes"] != 1 or len(n.inputs) < 2 or n.inputs[1] is None:
        return None
    v = n.inputs[0]
    p = x.producer.get(v.name)
    if p is None or v.type.rank != 3 or v.type.dtype != "float32":
        return None
    if any(u <= x.position[id(n)] for u in x.users.get(v.name, []) if u != -1 and
           u != x.position[id(n)]) or x.users[v.name].count(x.position[id(n)]) != 1:
        return None
    if p.op == "add" and all(i is not None and i.type == v.type for i in p.inputs):
        return p
    if (p.op in _SKIP_LINEARS and p.attrs.get("activation", "none") in ("none", None)
            and len(p.inputs) > _SKIP_LINEARS[p.op] and p.inputs[_SKIP_LINEARS[p.op]] is not None
            and p.attrs.get("residual") in ("before_act", "after_act")):
        return p
    return None


# linears whose residual input (at this position) a SkipLayerNormalization can add; a quantized
# one hands it its bias too, so bias, residual and LayerNorm are one pass over the output
_SKIP_LINEARS = {"fused_linear": 3, "qlinear_dynamic": 4, "qlinear_static": 4}


def skip_layer_norm(x: X, n: Node, ins: list[str]) -> list[str]:
    src = x.deferred[n.inputs[0].name]
    names = ["" if v is None else v.name for v in src.inputs]
    lin_bias = ""
    if src.op == "add":
        a, b = names
    elif src.op == "fused_linear":  # the linear (with its bias) as usual, its residual the skip
        fake = Node("linear", src.inputs[:3], src.outputs, {}, src.loc)
        (a,) = EMITTERS["linear"](x, fake, names[:3])
        b = names[3]
    else:  # a quantized linear without bias and residual; SkipLayerNorm adds both
        ins_q = list(src.inputs)
        lin_bias, b = names[3], names[4]
        ins_q[3] = ins_q[4] = None
        attrs = {**src.attrs, "residual": "none"}
        fake = Node(src.op, tuple(ins_q), src.outputs, attrs, src.loc)
        (a,) = EMITTERS[src.op](x, fake, ["" if v is None else v.name for v in ins_q])
    beta = ins[2] if len(ins) > 2 and ins[2] else ""
    if lin_bias and not beta:
        beta = x.const(np.zeros([n.inputs[0].type.shape[-1]]), "float32")
    tail = [beta, lin_bias] if lin_bias else [beta] if beta else []
    out = x.fresh("skiplayernorm")
    v = n.inputs[0]
    extra = ["", "", v.name] if len(x.users[v.name]) > 1 else []  # the sum, for its other users
    x.nodes.append(helper.make_node("SkipLayerNormalization", [a, b, ins[1]] + tail,
                                    [out] + extra, domain=MS_DOMAIN,
                                    epsilon=float(n.attrs["eps"])))
    return [out]


def _skip_ln_sources(x: X, n: Node) -> list[Node]:
    src = _skip_ln_source(x, n)
    return [] if src is None else [src]


FUSIONS: tuple[Fusion, ...] = (
    Fusion("hard_sigmoid", lambda x, n: _hard_sigmoid_sources(x, n) or [], lambda x: True),
    Fusion("skip_layer_norm", _skip_ln_sources, lambda x: x.skip_ln),
)
