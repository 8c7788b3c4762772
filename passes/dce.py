"""Dead-code elimination.

Before -> After::

    %a = relu(%x)                       %b = exp(%x)
    %b = exp(%x)            ->          return %b
    return %b                           (and params nothing reads are dropped)

A node is kept when any of its outputs is used (multi-output nodes stay whole). Graph inputs
are kept even when unused: they are the signature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ember.ir import Graph
from ember.passmanager import PassContext, register_pass

from ._rewrite import eliminate_dead

__all__ = ["DceConfig", "dce"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DceConfig:
    """No knobs: every op in Ember's IR is free of side effects."""


@register_pass(config=DceConfig, numerics="exact",
               requires=("types", "shapes"))
def dce(g: Graph, cfg: DceConfig, ctx: PassContext) -> Graph:
    """Drops nodes and params whose values are unused."""
    out = eliminate_dead(g)
    removed_nodes = len(g.nodes) - len(out.nodes)
    removed_params = len(g.params) - len(out.params)
    ctx.record("dce", removed_nodes=removed_nodes, removed_params=removed_params)
    if removed_nodes or removed_params:
        log.debug("dce: removed %d nodes, %d params", removed_nodes, removed_params)
    return out
