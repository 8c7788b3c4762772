"""Token merging (ToMe, Bolya et al. 2023) with proportional attention, as a graph rewrite.

Before -> After (block i of any traced transformer; blocks found by `find_blocks`)::

    %a = add(%x, attn(%x))                    %a = add(%x, attn(%x, mask + log(%size)))
    %o = add(%a, mlp(%a))             ->      %m, %size', %map, %rep = token_merge(%a, mean_h(%k), %size) {r}
                                              %o = add(%m, mlp(%m))

Merging happens between a block's attention and its MLP, with the attention keys (averaged
over heads) as the similarity metric, exactly where ToMe puts it; every later attention adds
``log(size)`` to its logits. The token count stays static (``N - r`` per block, symbolic when
``N`` is). Positions read by the head (a CLS ``select``) are protected. When a graph output
keeps every token (an encoder's last hidden state), it is unmerged back to ``N`` tokens.

``r`` merges that many tokens per block; ``ratio`` merges that fraction of the unprotected
tokens (at most half) per block, which stays valid for any sequence length.
``schedule=decreasing`` goes linearly from ``2r`` in the first block to 0 in the last;
``per_layer="8|8|4|0"`` gives r block by block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sympy

from ember.ir import Graph, Value, evaluate_values
from ember.ir.shapes import Dim, floor_div, simplify
from ember.passmanager import PassContext, PassManager, register_pass

from ._blocks import Block, BlockReport, find_blocks
from ._token_rewrite import Emitter, TokenRewriteError, reduce_tokens

__all__ = ["MergeTokensConfig", "merge_tokens", "merge_schedule", "search_merge_schedule"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeTokensConfig:
    """Attributes:
    r: tokens merged per block (constant schedule) or the mean (decreasing).
    ratio: alternatively, the fraction of unprotected tokens merged per block (0..1).
    schedule: "constant" or "decreasing".
    per_layer: explicit r per block, "|"-separated (overrides r/schedule).
    metric: "keys" (attention keys, ToMe) or "hidden" (the stream itself).
    proportional: add log(size) to later attention logits.
    """

    r: int = 0
    ratio: float = 0.0
    schedule: str = "constant"
    per_layer: str = ""
    metric: str = "keys"
    proportional: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "decreasing"):
            raise ValueError(f"schedule must be constant|decreasing, got {self.schedule!r}")
        if self.metric not in ("keys", "hidden"):
            raise ValueError(f"metric must be keys|hidden, got {self.metric!r}")
        if self.r < 0 or not 0.0 <= self.ratio <= 1.0:
            raise ValueError("r must be >= 0 and ratio in [0, 1]")


def merge_schedule(cfg: MergeTokensConfig, rep: BlockReport) -> list[Dim]:
    """r per block (ints, or sympy expressions for ``ratio`` on a symbolic token count)."""
    nb = len(rep.blocks)
    if str(cfg.per_layer).strip():
        rs: list[Any] = [int(x) for x in str(cfg.per_layer).split("|") if x.strip()]
        rs = (rs + [0] * nb)[:nb]
    elif cfg.schedule == "decreasing":
        rs = [round(2 * cfg.r * (nb - 1 - i) / max(nb - 1, 1)) for i in range(nb)]
    else:
        rs = [cfg.r] * nb
    out: list[Dim] = []
    half = Fraction(cfg.ratio).limit_denominator(1000) / 2
    delta: Dim = 0  # tokens merged by this schedule since the last reduction already there
    since = 0  # blocks of this schedule since then
    asked = 0  # tokens the schedule asked to merge since then
    for blk, asks in zip(rep.blocks, rs):
        r = asks
        n0 = blk.tokens if blk.tokens is not None else rep.tokens
        if blk.reduced:
            delta, since, asked = 0, 0, 0
        n: Dim = simplify(n0 - delta) if n0 is not None else 0
        if cfg.ratio > 0 and not str(cfg.per_layer).strip() and n0 is not None:
            # ratio/2 of the unrounded unprotected count, (n0 - p) * (1 - ratio/2)^since,
            # as one floor of the count at the last reduction: a symbolic count stays a sum
            # of floors of one linear expression (nesting floors doubles it block by block)
            q = (half * (1 - half) ** since).limit_denominator(100000)
            r = floor_div(simplify((n0 - rep.protect) * q.numerator), q.denominator)
        elif isinstance(n, int):
            r = max(0, min(r, (n - rep.protect) // 2))
        elif r:  # n is symbolic, so n0 is known
            # symbolic length: never more than half the tokens, whatever the length. At least
            # max(rest0 - (the r's asked before), rest0 / 2^since) unprotected tokens reach
            # this block (exact while no earlier block was clamped): a bound in terms of the
            # count at the last reduction keeps the counts sums of terms in it (bounding by
            # the previous count nests it, doubling the expression block by block)
            rest0 = simplify(n0 - rep.protect)
            r = simplify(sympy.Min(r, sympy.Max(floor_div(simplify(rest0 - asked), 2),
                                                floor_div(rest0, 2 ** (since + 1)))))
        asked += r if isinstance(r, int) else asks
        out.append(r)
        delta = simplify(delta + r)
        since += 1
    return out


def _metric(em: Emitter, blk: Block, x: Value, cfg: MergeTokensConfig) -> Value:
    if cfg.metric == "keys" and blk.k is not None:
        k = em.value(blk.k)
        if k.type.rank == 4 and k.type.shape[2] == x.type.shape[1]:
            return em.op("mean", [k], {"dims": (1,)}, name="tome_metric")
        if k.type.rank == 4 and em.stage.rep is not None and \
                str(em.stage.rep.type.shape[1]) == str(x.type.shape[1]):
            # an earlier pass reduced the tokens after this attention: representatives' keys
            m = em.op("mean", [k], {"dims": (1,)}, name="tome_metric")
            return em.op("token_gather", [m, em.stage.rep], {"dim": 1}, name="tome_metric")
    return x


@register_pass(config=MergeTokensConfig, numerics="approx",
               requires=("types", "shapes"))
def merge_tokens(g: Graph, cfg: MergeTokensConfig, ctx: PassContext) -> Graph:
    """Merges similar tokens between attention and MLP of every transformer block (ToMe)."""
    rep = find_blocks(g)
    if not rep.ok:
        ctx.record("merge_tokens", applied=False, reason=rep.explain())
        log.warning("merge_tokens: %s", rep.explain())
        return g
    if rep.causal:
        ctx.record("merge_tokens", applied=False, reason="causal attention: merging would mix "
                   "future tokens into past ones")
        return g
    if rep.parallel:
        ctx.record("merge_tokens", applied=False, reason="parallel attention + MLP blocks: no "
                   "point between attention and MLP to merge tokens at")
        return g
    rs = merge_schedule(cfg, rep)
    plan = {i: r for i, r in enumerate(rs) if not (isinstance(r, int) and r == 0)}
    if not plan:
        ctx.record("merge_tokens", applied=False, reason="r = 0 in every block")
        return g

    def make(r: Dim) -> Any:
        def reducer(em: Emitter, blk: Block, x: Value, size: Value | None) -> tuple:
            metric = _metric(em, blk, x, cfg)
            y, s, mp, rp = em.op("token_merge", [x, metric, size],
                                 {"r": r, "protect": rep.protect}, name=f"tome{blk.index}")
            return y, s, mp, rp, False
        return reducer

    try:
        out = reduce_tokens(g, rep, {i: make(r) for i, r in plan.items()},
                            proportional=cfg.proportional)
    except TokenRewriteError as e:
        ctx.record("merge_tokens", applied=False, reason=str(e))
        log.warning("merge_tokens not applied: %s", e)
        return g
    ctx.record("merge_tokens", applied=True, blocks=len(rep.blocks),
               schedule=[str(r) for r in rs], tokens_in=str(rep.tokens), protect=rep.protect,
               unmerged_outputs=rep.reads_all_tokens, proportional=cfg.proportional)
    log.info("merge_tokens: r per block %s on %s", rs, rep.explain())
    return out


# ----------------------------------------------------------------------------- schedule search
def search_merge_schedule(g: Graph, calib: Sequence[Sequence[Any]],
                          fidelity: Callable[[list[Any]], float], min_fidelity: float,
                          env: Mapping[str, int], step: int = 2, max_rounds: int = 64,
                          prefix: str = "") -> tuple[str, list[dict[str, Any]]]:
    """Per-block merge schedule chosen on calibration data, greedily.

    Starting from no merging, each round tries ``r + step`` in every block and keeps the
    candidate that loses the least fidelity per FLOP saved, while ``fidelity`` (of the
    graph outputs on ``calib``, higher is better: accuracy, top-1 agreement, cosine) stays
    >= ``min_fidelity``. Blocks come from `find_blocks` (graph patterns only), so the same
    search serves any transformer.

    Args:
        g: the graph to reduce (``merge_tokens`` is applied to it with ``per_layer``).
        calib: calibration input batches (one tuple of tensors per batch).
        fidelity: score of the concatenated first outputs over ``calib`` batches.
        min_fidelity: the floor for the chosen schedule.
        env: symbol values for counting FLOPs (e.g. ``{"batch": 64}``).
        step: r increment per round.
        prefix: passes run before merging (e.g. a pruning pass), "" for none.

    Returns:
        The ``per_layer`` string ("8|6|4|0...") and every candidate measured (a trace).
    """
    from ._blocks import graph_flops

    base = PassManager(prefix).run(g, PassContext()) if prefix else g
    rep = find_blocks(base)
    if not rep.ok:
        return "", []
    out_name = g.outputs[0].name

    def measure(rs: list[int]) -> tuple[float, int]:
        per = "|".join(str(r) for r in rs)
        g2 = PassManager(f"merge_tokens{{per_layer={per}}}").run(base, PassContext())
        outs = [evaluate_values(g2, list(b), [out_name])[out_name] for b in calib]
        return fidelity(outs), graph_flops(g2, env)

    nb = len(rep.blocks)
    cur = [0] * nb
    cur_fid, cur_fl = measure(cur)
    trace: list[dict[str, Any]] = [{"per_layer": "|".join(map(str, cur)), "fidelity": cur_fid,
                                    "gflop": cur_fl / 1e9, "chosen": True}]
    for _ in range(max_rounds):
        best: tuple[float, list[int], float, int] | None = None
        for i in range(nb):
            cand = list(cur)
            cand[i] += step
            if merge_schedule(MergeTokensConfig(per_layer="|".join(map(str, cand))),
                              rep)[i] != cand[i]:
                continue  # block i has no tokens left to merge
            fid, fl = measure(cand)
            trace.append({"per_layer": "|".join(map(str, cand)), "fidelity": fid,
                          "gflop": fl / 1e9, "chosen": False})
            if fid < min_fidelity or fl >= cur_fl:
                continue
            cost = (cur_fid - fid) / (cur_fl - fl)
            if best is None or cost < best[0]:
                best = (cost, cand, fid, fl)
        if best is None:
            break
        _, cur, cur_fid, cur_fl = best
        trace.append({"per_layer": "|".join(map(str, cur)), "fidelity": cur_fid,
                      "gflop": cur_fl / 1e9, "chosen": True})
        log.info("merge schedule search: %s fidelity %.4f", cur, cur_fid)
    return "|".join(map(str, cur)), trace
