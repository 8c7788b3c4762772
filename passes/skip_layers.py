"""Layer skipping as graph rewrites: static block removal, early exit, per-token halting.

Blocks are found by `find_blocks` (graph patterns only).

- ``static`` (Before -> After)::

      %y = block_i(%x)        ->      (uses of %y read %x; block i is dead code)

  The removed blocks are those that change their input least on the calibration inputs
  (``ctx.calib``): highest mean per-token cosine(block input, block output).
- ``early_exit`` (classifiers)::

      %logits = head(%y_last)   ->   %e_i = head(%y_i) for each exit block i (head cloned)
                                     %logits, %which = early_exit(%e_i..., %logits) {threshold}

  Each sample takes the first exit whose top softmax probability reaches ``threshold``. In one
  static graph every exit is still computed; the pass records, on the calibration inputs, the
  share of samples leaving at each exit and the block FLOPs a runtime that stops at the exit
  (one graph per segment) would save.
- ``halting`` (decoders, QuickSilver-style)::

      %y = block_i(%x)        ->      %y', %halted' = halt_update(%x, %y, %halted) {threshold}

  A token whose representation changes by less than ``threshold`` (relative) stops taking
  residual updates in the following blocks; its hidden state is frozen. The rewrite keeps
  shapes static (masked updates); the pass records the share of token-blocks halted on the
  calibration inputs, i.e. the FLOPs a token-compacting kernel would skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ember.ir import Graph, GraphBuilder, Node, Value, bind_symbols
from ember.passmanager import PassContext, register_pass

from ._blocks import BlockReport, evaluate_values, find_blocks, graph_flops
from ._rewrite import eliminate_dead

__all__ = ["SkipLayersConfig", "skip_layers", "block_cosines", "remove_blocks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipLayersConfig:
    """Attributes:
    method: "static", "early_exit" or "halting".
    num_layers: static: how many blocks to remove (chosen on calibration data).
    layers: static: explicit blocks to remove / early_exit: exit blocks, "|"-separated.
    threshold: early_exit: softmax confidence to exit; halting: relative change to halt.
    start: halting: first block after which tokens may halt.
    """

    method: str = "static"
    num_layers: int = 0
    layers: str = ""
    threshold: float = 0.9
    start: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("static", "early_exit", "halting"):
            raise ValueError(f"method must be static|early_exit|halting, got {self.method!r}")


def _indices(text: str, n: int) -> list[int]:
    return sorted({int(x) for x in str(text).split("|") if x.strip()} & set(range(n)))


def block_cosines(g: Graph, rep: BlockReport, calib: list[tuple[Any, ...]]) -> list[float]:
    """Mean per-token cosine(block input, block output) of every block over ``calib``."""
    names = [n for b in rep.blocks for n in (b.input, b.output)]
    sums = [0.0] * len(rep.blocks)
    for inputs in calib:
        vals = evaluate_values(g, inputs, names)
        for i, b in enumerate(rep.blocks):
            x, y = vals[b.input].float(), vals[b.output].float()
            sums[i] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    return [s / max(len(calib), 1) for s in sums]


def remove_blocks(g: Graph, rep: BlockReport, drop: list[int]) -> Graph:
    """``g`` with the blocks in ``drop`` bypassed (their output reads their input)."""
    alias: dict[str, str] = {}
    for i in sorted(drop):
        b = rep.blocks[i]
        alias[b.output] = alias.get(b.input, b.input)
    vals = g.values()
    b_ = GraphBuilder(g.name)
    b_.meta = dict(g.meta)
    for v, nm in zip(g.inputs, g.input_names or [v.name for v in g.inputs]):
        b_.reserve(v.name)
        b_.inputs.append(v)
        b_.input_names.append(nm)
    for v in g.params:
        b_.add_existing_param(v, g.weights[v.name])

    def m(v: Value | None) -> Value | None:
        return None if v is None else vals[alias[v.name]] if v.name in alias else v

    for n in g.nodes:
        b_.append(Node(n.op, tuple(m(v) for v in n.inputs), n.outputs, n.attrs, n.loc))
    b_.outputs = [m(v) for v in g.outputs]  # type: ignore[misc]
    b_.output_names = list(g.output_names)
    return eliminate_dead(b_.build())


def _calib_env(g: Graph, calib: list[tuple[Any, ...]] | None) -> dict[str, int]:
    if not calib:
        return {}
    ts = [torch.as_tensor(a) for a in calib[0]]
    return bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in ts],
                        list(g.input_names or [v.name for v in g.inputs]))


def _static(g: Graph, rep: BlockReport, cfg: SkipLayersConfig, ctx: PassContext) -> Graph:
    n = len(rep.blocks)
    if str(cfg.layers).strip():
        drop, cos = _indices(cfg.layers, n), None
    else:
        if cfg.num_layers <= 0:
            ctx.record("skip_layers", applied=False, reason="num_layers = 0")
            return g
        if not ctx.calib:
            raise ValueError("skip_layers{method=static} needs calibration inputs (ctx.calib) "
                             "or explicit layers=")
        cos = block_cosines(g, rep, ctx.calib)
        drop = sorted(sorted(range(n), key=lambda i: -cos[i])[: min(cfg.num_layers, n)])
    out = remove_blocks(g, rep, drop)
    env = _calib_env(g, ctx.calib)
    info: dict[str, Any] = {"applied": True, "method": "static", "removed": drop,
                            "cosines": None if cos is None else [round(c, 4) for c in cos]}
    if env:
        f0, f1 = graph_flops(g, env), graph_flops(out, env)
        info["flops_before"], info["flops_after"] = f0, f1
    ctx.record("skip_layers", **info)
    log.info("skip_layers: removed blocks %s", drop)
    return out


def _clone_head(g: Graph, last: str) -> list[Node]:
    """Nodes that compute graph output 0 from the last block output (the classifier head)."""
    users: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if v is not None:
                users.setdefault(v.name, []).append(i)
    seen: set[int] = set()
    stack = list(users.get(last, []))
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for v in g.nodes[i].outputs:
            stack.extend(users.get(v.name, []))
    return [g.nodes[i] for i in sorted(seen)]


def _early_exit(g: Graph, rep: BlockReport, cfg: SkipLayersConfig, ctx: PassContext) -> Graph:
    out0 = g.outputs[0]
    if out0.type.rank != 2:
        ctx.record("skip_layers", applied=False, reason=f"early exit needs classifier logits "
                   f"[B, C] as output 0, got {out0.type}")
        return g
    last = rep.blocks[-1].output
    head = _clone_head(g, last)
    if not any(v.name == out0.name for n in head for v in n.outputs):
        ctx.record("skip_layers", applied=False, reason="output 0 does not depend on the "
                   "last block")
        return g
    n = len(rep.blocks)
    exits = _indices(cfg.layers, n) if str(cfg.layers).strip() else list(range(n // 2, n - 1))
    exits = [i for i in exits if i < n - 1]
    if not exits:
        ctx.record("skip_layers", applied=False, reason="no exit block before the last")
        return g
    b = GraphBuilder(g.name)
    b.meta = dict(g.meta)
    for v, nm in zip(g.inputs, g.input_names or [v.name for v in g.inputs]):
        b.reserve(v.name)
        b.inputs.append(v)
        b.input_names.append(nm)
    for v in g.params:
        b.add_existing_param(v, g.weights[v.name])
    for nd in g.nodes:
        for v in nd.outputs:
            b.reserve(v.name)
    vals = g.values()
    exit_at = {rep.blocks[i].output: i for i in exits}
    exit_logits: list[Value] = []
    for nd in g.nodes:
        b.nodes.append(nd)
        if nd.outputs[0].name in exit_at:
            env = {last: vals[nd.outputs[0].name]}
            for h in head:
                ins = [None if v is None else env.get(v.name, v) for v in h.inputs]
                res = b.op(h.op, ins, h.attrs, h.loc, name=f"exit{exit_at[nd.outputs[0].name]}")
                res = (res,) if isinstance(res, Value) else res
                for old, new in zip(h.outputs, res):
                    env[old.name] = new
            exit_logits.append(env[out0.name])
    final, which = b.op("early_exit", [*exit_logits, out0], {"threshold": cfg.threshold},
                        name="early_exit")
    b.outputs = [final, *g.outputs[1:]]
    b.output_names = list(g.output_names)
    out = b.build()
    info: dict[str, Any] = {"applied": True, "method": "early_exit", "exits": exits,
                            "threshold": cfg.threshold}
    if ctx.calib:
        counts = [0] * (len(exits) + 1)
        for inputs in ctx.calib:
            w = evaluate_values(out, inputs, [which.name])[which.name]
            for k in w.tolist():
                counts[k] += 1
        total = max(sum(counts), 1)
        env = _calib_env(g, ctx.calib)
        per_block = (graph_flops(g, env) - graph_flops(remove_blocks(g, rep, [0]), env)) \
            if env else 0
        depth = [e + 1 for e in exits] + [n]
        mean_depth = sum(c * d for c, d in zip(counts, depth)) / total
        info.update(exit_share=[c / total for c in counts], mean_blocks=mean_depth,
                    block_flops_saved=(n - mean_depth) * per_block)
    ctx.record("skip_layers", **info)
    return out


def _halting(g: Graph, rep: BlockReport, cfg: SkipLayersConfig, ctx: PassContext) -> Graph:
    from ember.ir import rewrite

    first = rep.blocks[0].input
    vals = g.values()
    st = vals[first].type
    halt_at = {b.output: b for b in rep.blocks[cfg.start:]}
    state: dict[str, Value] = {}
    halted_names: list[str] = []

    def fn(n: Node, b: GraphBuilder) -> list[Value] | None:
        if n.outputs[0].name == first and "h" not in state:
            b.nodes.append(n)
            state["h"] = b.op("full", [], {"shape": st.shape[:2], "value": False,
                                           "dtype": "bool"}, name="halted")
            return list(n.outputs)
        blk = halt_at.get(n.outputs[0].name)
        if blk is None:
            return None
        b.nodes.append(n)
        x = state.get("in:" + blk.input) or vals[blk.input]
        y, h = b.op("halt_update", [x, n.outputs[0], state["h"]],
                    {"threshold": cfg.threshold}, name=f"halt{blk.index}")
        state["h"] = h
        state["in:" + n.outputs[0].name] = y
        halted_names.append(h.name)
        return [y]

    out = rewrite(g, fn)
    if "h" not in state:
        ctx.record("skip_layers", applied=False, reason="stream input not found")
        return g
    info: dict[str, Any] = {"applied": True, "method": "halting", "threshold": cfg.threshold,
                            "start": cfg.start}
    if ctx.calib:
        fr = [0.0] * len(halted_names)
        for inputs in ctx.calib:
            v = evaluate_values(out, inputs, halted_names)
            for i, nm in enumerate(halted_names):
                fr[i] += float(v[nm].float().mean()) / len(ctx.calib)
        # tokens halted after block i skip blocks i+1..: share of token-blocks skippable
        n = len(rep.blocks)
        skipped = sum(fr[i] for i in range(len(fr) - 1))  # halted after block start+i
        info.update(halted_share=[round(f, 4) for f in fr],
                    token_block_share_skippable=skipped / n)
    ctx.record("skip_layers", **info)
    return out


@register_pass(config=SkipLayersConfig, numerics="approx")
def skip_layers(g: Graph, cfg: SkipLayersConfig, ctx: PassContext) -> Graph:
    """Skips transformer blocks: static removal, early exit, or per-token halting."""
    rep = find_blocks(g)
    if not rep.ok:
        ctx.record("skip_layers", applied=False, reason=rep.explain())
        log.warning("skip_layers: %s", rep.explain())
        return g
    if cfg.method == "static":
        return _static(g, rep, cfg, ctx)
    if cfg.method == "early_exit":
        return _early_exit(g, rep, cfg, ctx)
    return _halting(g, rep, cfg, ctx)
