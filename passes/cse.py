"""Common-subexpression elimination.

Before -> After::

    %a = permute(%x) {perm=[0, 2, 1]}       %a = permute(%x) {perm=[0, 2, 1]}
    %b = permute(%x) {perm=[0, 2, 1]}  ->   %c = add(%a, %a)
    %c = add(%a, %b)

Two nodes are the same when they have the same op, the same (already deduplicated) inputs and
equal attributes. Params with equal dtype, shape and contents are merged too (up to
``max_param_numel`` elements each, so big weights are not compared byte by byte). Every op in
the IR is deterministic, so merging never changes results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ember.ir import Graph, Node, Value, has_trait
from ember.passmanager import PassContext, register_pass

from ._rewrite import eliminate_dead

__all__ = ["CseConfig", "cse"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CseConfig:
    """Attributes:
    merge_params: also merge params with identical contents.
    max_param_numel: params larger than this are never compared.
    """

    merge_params: bool = True
    max_param_numel: int = 1 << 16


def _key(x: Any) -> Any:
    """A hashable, type-exact key for an attribute value (1 and 1.0 and True differ)."""
    if isinstance(x, tuple | list):
        return ("seq", tuple(_key(y) for y in x))
    if isinstance(x, float) and x != x:  # NaN equals itself as an attribute
        return ("nan",)
    return (type(x).__name__, x)


def _param_key(t: torch.Tensor) -> tuple:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return (str(t.dtype), tuple(t.shape), raw.numpy().tobytes())


@register_pass(config=CseConfig, numerics="exact",
               requires=("types", "shapes"))
def cse(g: Graph, cfg: CseConfig, ctx: PassContext) -> Graph:
    """Merges nodes with the same op, inputs and attributes (and identical small params)."""
    env: dict[str, Value] = {}
    merged_params = 0
    if cfg.merge_params:
        seen_p: dict[tuple, Value] = {}
        for v in g.params:
            t = g.weights[v.name]
            if t.numel() > cfg.max_param_numel:
                continue
            k = _param_key(t)
            if k in seen_p:
                env[v.name] = seen_p[k]
                merged_params += 1
            else:
                seen_p[k] = v

    def m(v: Value | None) -> Value | None:
        return None if v is None else env.get(v.name, v)

    seen: dict[tuple, Node] = {}
    nodes: list[Node] = []
    merged = 0
    for n in g.nodes:
        ins = tuple(m(v) for v in n.inputs)
        key = (n.op, tuple(None if v is None else v.name for v in ins),
               tuple(sorted((k, _key(a)) for k, a in n.attrs.items())))
        # a stateful op (cache_write) is a side effect: two of them are never one
        prev = None if has_trait(n.op, "stateful") else seen.get(key)
        if prev is not None and all(a.type == b.type for a, b in zip(prev.outputs, n.outputs)):
            for old, new in zip(n.outputs, prev.outputs):
                env[old.name] = new
            merged += 1
            continue
        n2 = n if ins == n.inputs else Node(n.op, ins, n.outputs, n.attrs, n.loc)
        seen[key] = n2
        nodes.append(n2)
    if not merged and not merged_params:
        ctx.record("cse", merged_nodes=0, merged_params=0)
        return g
    outputs = tuple(m(v) for v in g.outputs)
    out = Graph(g.inputs, g.params, tuple(nodes), outputs, dict(g.weights), g.name,  # type: ignore[arg-type]
                g.input_names, g.output_names, dict(g.meta))
    ctx.record("cse", merged_nodes=merged, merged_params=merged_params)
    log.debug("cse: merged %d nodes, %d params", merged, merged_params)
    return eliminate_dead(out)
