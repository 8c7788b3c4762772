"""Merge linears that read the same input into one wider linear plus slices.

Before -> After (Q/K/V projections, or the gate/up projections of a LLaMA MLP)::

    %q = linear(%x, %wq, %bq)                %qkv = linear(%x, %w_cat, %b_cat)
    %k = linear(%x, %wk, %bk)        ->      %q = slice(%qkv) {dim=-1, start=0, end=Nq}
    %v = linear(%x, %wv)                     %k = slice(%qkv) {dim=-1, start=Nq, end=Nq+Nk}
                                             %v = slice(%qkv) {dim=-1, start=Nq+Nk, end=...}

Weights must be params of one dtype with the same in-features; ``w_cat`` is their
concatenation along out-features (a new param). If any linear has a bias, the fused bias is
the concatenation with zeros standing in for the missing ones. One GEMM over the input
replaces several, which is what backends want for small per-projection widths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.ir import Graph, Node, Value
from ember.passmanager import PassContext, register_pass

from ._rewrite import EmitFn, Emitter, GraphIndex, eliminate_dead, rebuild

__all__ = ["FuseQkvConfig", "fuse_qkv"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseQkvConfig:
    """Attributes:
    min_group: fuse only groups of at least this many linears.
    max_out_features: skip a group whose fused out-features would exceed this.
    """

    min_group: int = 2
    max_out_features: int = 1 << 16


def _groups(g: Graph, idx: GraphIndex, cfg: FuseQkvConfig) -> list[list[Node]]:
    by_key: dict[tuple, list[Node]] = {}
    for n in g.nodes:
        if n.op != "linear" or n.inputs[0] is None:
            continue
        w = idx.const(n.inputs[1])
        b = n.inputs[2] if len(n.inputs) > 2 else None
        if w is None or w.dim() != 2 or (b is not None and idx.const(b) is None):
            continue
        key = (n.inputs[0].name, w.dtype, w.shape[1])
        by_key.setdefault(key, []).append(n)
    out = []
    for group in by_key.values():
        total = sum(idx.const(n.inputs[1]).shape[0] for n in group)  # type: ignore[union-attr]
        if len(group) >= cfg.min_group and total <= cfg.max_out_features:
            out.append(group)
    return out


def _plan_group(group: Sequence[Node], idx: GraphIndex) -> dict[Node, EmitFn]:
    weights = [idx.const(n.inputs[1]) for n in group]
    biases = [idx.const(n.inputs[2]) if len(n.inputs) > 2 else None for n in group]
    w_cat = torch.cat(weights, 0)  # type: ignore[arg-type]
    b_cat = None
    if any(b is not None for b in biases):
        b_cat = torch.cat([b.reshape(-1) if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                           for w, b in zip(weights, biases)])  # type: ignore[union-attr]
    bounds, start = [], 0
    for w in weights:
        bounds.append((start, start + w.shape[0]))  # type: ignore[union-attr]
        start += w.shape[0]  # type: ignore[union-attr]
    x = group[0].inputs[0]
    done: dict[str, Value] = {}

    def emit_first(e: Emitter) -> list[Value]:
        wv = e.param("qkv_weight", w_cat)
        bv = None if b_cat is None else e.param("qkv_bias", b_cat)
        y = e.op("linear", [x, wv, bv], name="fused_linear_out")
        dim = y.type.rank - 1
        for n, (lo, hi) in zip(group, bounds):
            done[n.output.name] = e.op("slice", [y], {"dim": dim, "start": lo, "end": hi})
        return [done[group[0].output.name]]

    plan: dict[Node, EmitFn] = {group[0]: emit_first}
    for n in group[1:]:
        plan[n] = lambda e, n=n: [done[n.output.name]]
    return plan


@register_pass(config=FuseQkvConfig, numerics="exact",
               requires=("types", "shapes"))
def fuse_qkv(g: Graph, cfg: FuseQkvConfig, ctx: PassContext) -> Graph:
    """Merges linears on the same input (Q/K/V, gate/up) into one linear plus slices."""
    idx = GraphIndex(g)
    groups = _groups(g, idx, cfg)
    plan: dict[Node, EmitFn] = {}
    for group in groups:
        plan.update(_plan_group(group, idx))
    # O2 runs this pass twice (before and after epilogue fusion): the record accumulates
    prev = ctx.records.get("fuse_qkv", {})
    hits = dict(prev.get("hits", {}))
    if groups:
        hits["qkv"] = hits.get("qkv", 0) + len(groups)
    ctx.record("fuse_qkv", hits=hits,
               group_sizes=list(prev.get("group_sizes", [])) + [len(gr) for gr in groups])
    if not plan:
        return g
    log.debug("fuse_qkv: %d groups", len(groups))
    return eliminate_dead(rebuild(g, plan))
