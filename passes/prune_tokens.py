"""Token pruning as a graph rewrite: keep the top-k tokens of a block, fuse the rest into one.

Before -> After (block i, blocks found by `find_blocks`)::

    %a = add(%x, attn(%x))              %s = score(...)                       (per method)
    %o = add(%a, mlp(%a))       ->      %p, %size, %map, %rep = token_select(%a, %s, %size) {keep}
                                        %o = add(%p, mlp(%p))

Scores (none needs the attention probabilities materialized, so fused attention stays fused):

- ``attention`` (EViT / ATF): attention each token receives, from the protected CLS query when
  the head reads one, else averaged over all queries (``attention_score`` from q and k); the
  pruned tokens are fused into one token weighted by that attention (EViT).
- ``dart`` (DART): duplication-aware; pivots are the largest-norm tokens and a token that
  duplicates a pivot (cosine) is pruned first.
- ``repshift`` (Representation Shift): ``||mid - input||``, how much the block's attention
  changed each token.

``keep`` <= 1 is the fraction of unprotected tokens kept at each pruning block, > 1 a count.
Pruning happens at the blocks listed in ``layers`` ("3|6|9"; default: every ``every``-th block
from ``start``), so the token count is static (symbolic for symbolic sequence lengths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ember.ir import Graph, Value
from ember.ir.shapes import Dim, floor_div, simplify
from ember.passmanager import PassContext, register_pass

from ._blocks import Block, BlockReport, find_blocks
from ._token_rewrite import Emitter, TokenRewriteError, reduce_tokens

__all__ = ["PruneTokensConfig", "prune_tokens", "prune_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneTokensConfig:
    """Attributes:
    method: "attention" (EViT/ATF), "dart" or "repshift".
    keep: fraction (0 < keep <= 1; 1 keeps all) of unprotected tokens kept at each pruning
        block, or a count (> 1).
    layers: blocks that prune, "|"-separated indices; empty: start, start+every, ...
    start / every: default pruning blocks when ``layers`` is empty.
    fuse: fuse the pruned tokens into one extra token (EViT); keeps output sizes for
        proportional attention.
    pivots: DART pivot tokens.
    """

    method: str = "attention"
    keep: float = 1.0
    layers: str = ""
    start: int = 1
    every: int = 1
    fuse: bool = True
    pivots: int = 4
    proportional: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("attention", "dart", "repshift"):
            raise ValueError(f"method must be attention|dart|repshift, got {self.method!r}")
        if self.keep <= 0:
            raise ValueError("keep must be > 0")


def prune_plan(cfg: PruneTokensConfig, rep: BlockReport) -> dict[int, Dim]:
    """Block index -> tokens kept (beyond the protected ones) at that block."""
    nb = len(rep.blocks)
    if str(cfg.layers).strip():
        idx = sorted({int(x) for x in str(cfg.layers).split("|") if x.strip()} & set(range(nb)))
    else:
        idx = list(range(cfg.start, nb, max(cfg.every, 1)))
    plan: dict[int, Dim] = {}
    n: Dim = rep.tokens if rep.tokens is not None else 0
    p = rep.protect
    pruned = False
    for i in idx:
        blk = rep.blocks[i]
        if not pruned and blk.tokens is not None:
            n = blk.tokens  # the count an earlier pass's reductions left at this block
        rest = simplify(n - p)
        if cfg.keep == 1.0:
            continue  # keep everything
        if cfg.keep > 1:
            k: Dim = int(cfg.keep)
            if isinstance(rest, int):
                k = min(k, rest)
        else:
            f = Fraction(cfg.keep).limit_denominator(1000)
            k = floor_div(simplify(rest * f.numerator), f.denominator)
        if isinstance(k, int) and isinstance(rest, int) and k >= rest:
            continue  # nothing to prune here
        plan[i] = k
        pruned = True
        n = simplify(p + k + int(cfg.fuse))
    return plan


def _score(em: Emitter, blk: Block, x: Value, cfg: PruneTokensConfig, rep: BlockReport) -> Value:
    s = _raw_score(em, blk, x, cfg, rep)
    if s.type.rank == 2 and str(s.type.shape[1]) != str(x.type.shape[1]) \
            and em.stage.rep is not None:
        # the block's attention saw the tokens before an earlier pass reduced them here:
        # each reduced token takes the score of its representative
        s = em.op("token_gather", [s, em.stage.rep], {"dim": 1}, name="score_tok")
    return s


def _raw_score(em: Emitter, blk: Block, x: Value, cfg: PruneTokensConfig,
               rep: BlockReport) -> Value:
    if cfg.method == "dart":
        return em.op("token_score", [x], {"method": "dart", "pivots": cfg.pivots,
                                          "protect": rep.protect}, name="dart_score")
    if cfg.method == "repshift":
        return em.op("token_score", [x, em.value(blk.input)], {"method": "shift"},
                     name="shift_score")
    att = em.node(blk.attention)
    query = 0 if rep.protect > 0 else None
    if att is not None and att.op == "attention":
        q, k = att.inputs[0], att.inputs[1]
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        return em.op("attention_score", [q, k, mask],
                     {"scale": att.attrs.get("scale"), "query": query}, name="attn_score")
    # explicit attention: read the probabilities [B, H, Nq, Nk] the softmax already made
    probs = em.value(blk.attention)
    if query is not None:
        probs = em.op("slice", [probs], {"dim": 2, "start": query, "end": query + 1},
                      name="cls_probs")
    return em.op("mean", [probs], {"dims": (1, 2)}, name="attn_score")


@register_pass(config=PruneTokensConfig, numerics="approx",
               requires=("types", "shapes"))
def prune_tokens(g: Graph, cfg: PruneTokensConfig, ctx: PassContext) -> Graph:
    """Keeps the most informative tokens at chosen blocks (EViT/ATF, DART, repr. shift)."""
    rep = find_blocks(g)
    if not rep.ok:
        ctx.record("prune_tokens", applied=False, reason=rep.explain())
        log.warning("prune_tokens: %s", rep.explain())
        return g
    if rep.causal:
        ctx.record("prune_tokens", applied=False, reason="causal attention: pruning a prefix "
                   "token changes every later position")
        return g
    if rep.parallel:
        ctx.record("prune_tokens", applied=False, reason="parallel attention + MLP blocks: no "
                   "point between attention and MLP to prune tokens at")
        return g
    plan = prune_plan(cfg, rep)
    if not plan:
        ctx.record("prune_tokens", applied=False, reason="keep >= all tokens at every block")
        return g

    def make(keep: Dim) -> Any:
        def reducer(em: Emitter, blk: Block, x: Value, size: Value | None) -> tuple:
            s = _score(em, blk, x, cfg, rep)
            weighting = "score" if cfg.method == "attention" else "size"
            y, sz, mp, rp = em.op("token_select", [x, s, size],
                                  {"keep": keep, "protect": rep.protect, "fuse": cfg.fuse,
                                   "weighting": weighting}, name=f"prune{blk.index}")
            return y, sz, mp, rp, not cfg.fuse
        return reducer

    try:
        out = reduce_tokens(g, rep, {i: make(k) for i, k in plan.items()},
                            proportional=cfg.proportional and cfg.fuse)
    except TokenRewriteError as e:
        ctx.record("prune_tokens", applied=False, reason=str(e))
        log.warning("prune_tokens not applied: %s", e)
        return g
    ctx.record("prune_tokens", applied=True, method=cfg.method,
               keep={str(i): str(k) for i, k in plan.items()}, protect=rep.protect,
               fuse=cfg.fuse, unmerged_outputs=rep.reads_all_tokens)
    return out
