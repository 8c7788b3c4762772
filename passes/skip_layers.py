"""Layer skipping as graph rewrites: static block removal, early exit, per-token halting.

Blocks are found by `find_blocks` (graph patterns only).

- ``static`` (Before -> After)::

      %y = block_i(%x)        ->      (uses of %y read %x; block i is dead code)

  The removed blocks are those that change their input least on the calibration inputs
  (``ctx.calib``): highest mean per-token cosine(block input, block output).
- ``static`` with ``bridge=token|mean`` (calibrated linear bridge, in the spirit of
  ReplaceMe, Shopkhoev et al. 2025: training-free, fit on calibration data)::

      %y = block_j(...block_i(%x))   ->   %y = linear(%x, W, b)

  A run of consecutive blocks is replaced by one linear map fit by least squares on the
  calibration inputs, its target the original model's own states (no labels). ``token`` fits
  every token's state; ``mean`` fits the per-sequence means over the token axis (what a
  mean-pooled encoder's output reads; a linear map commutes with the mean), pulled towards
  the per-token fit by ``ridge``. Padding tokens (keys masked for every query) are left out
  of both fits. With ``num_layers=k`` the run of ``k`` blocks whose bridged graph keeps the
  calibration output closest (cosine, over token means in ``mean`` mode) is chosen. Choices
  are made out of sample: alternate calibration batches form two folds, each scored with
  maps fit on the other (runs are scored on the first ``SCORED_BATCHES`` batches); the
  shipped maps are fit on all of them.
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

  A small change in one block does not mean the token has converged: in decoder LMs the
  attention-sink token (position 0) sits still for several early blocks and then takes the
  massive activation the other tokens' attention relies on; freezing it there doubles the
  perplexity. So ``start=-1`` (the default) picks the first block a token may halt after on
  the calibration inputs: the first block from which at most ``guard`` of the halts are
  premature, i.e. the unmodified model changes that token's state by more than ``threshold``
  in a later block. ``keep_last`` blocks at the end run for every token (halted ones resume);
  ``keep_last=-1`` picks it with the start, for the most token-blocks skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ember.ir import (
    Graph,
    GraphBuilder,
    Node,
    Value,
    bind_symbols,
    evaluate_values,
    rewrite,
    to_torch_dtype,
)
from ember.passmanager import PassContext, register_pass

from ._blocks import BlockReport, find_blocks, graph_flops
from ._rewrite import eliminate_dead

__all__ = ["SkipLayersConfig", "skip_layers", "block_cosines", "remove_blocks", "bridge_blocks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipLayersConfig:
    """Attributes:
    method: "static", "early_exit" or "halting".
    num_layers: static: how many blocks to remove (chosen on calibration data).
    layers: static: explicit blocks to remove / early_exit: exit blocks, "|"-separated.
    threshold: early_exit: softmax confidence to exit; halting: relative change to halt.
    start: halting: first block after which tokens may halt; -1 picks it on the calibration
        data (at most ``guard`` of the halts premature).
    guard: halting, start=-1: largest share of premature halts accepted.
    keep_last: halting: the last blocks every token runs (halted tokens resume there); -1
        picks it on the calibration data with ``start``: the pair that skips the most
        token-blocks with at most ``guard`` of the halts premature.
    bridge: static: "none" (a removed block's output reads its input), "token" or "mean"
        (each run of removed blocks becomes a linear map fit on the calibration inputs).
    ridge: bridge=mean: strength of the pull towards the per-token fit, relative to the
        mean of the fit's Gram diagonal (the sequence means are few: 1 per calibration row);
        0 chooses it from ``RIDGES`` by the held-out error of a two-fold split.
    """

    method: str = "static"
    num_layers: int = 0
    layers: str = ""
    threshold: float = 0.9
    start: int = -1
    guard: float = 0.01
    keep_last: int = -1
    bridge: str = "none"
    ridge: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("static", "early_exit", "halting"):
            raise ValueError(f"method must be static|early_exit|halting, got {self.method!r}")
        if self.bridge not in ("none", "token", "mean"):
            raise ValueError(f"bridge must be none|token|mean, got {self.bridge!r}")
        if self.bridge != "none" and self.method != "static":
            raise ValueError("bridge= applies to method=static only")
        if self.start < -1 or self.keep_last < -1 or not 0 <= self.guard <= 1:
            raise ValueError("start and keep_last must be >= -1 and guard in [0, 1]")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


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
    b_ = GraphBuilder.seeded_from(g)

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
    if cfg.bridge != "none":
        return _static_bridged(g, rep, cfg, ctx)
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


# ----------------------------------------------------------------------------- linear bridges
def _runs(drop: list[int]) -> list[tuple[int, int]]:
    """Consecutive block indices grouped into (first, last) runs."""
    out: list[tuple[int, int]] = []
    for i in sorted(drop):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _valid_tokens(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """[B, N] weights, 0 at padding: keys the attention mask hides from every query (a bool
    mask's False, an additive mask's large negative); all ones without a usable mask."""
    b, n = x.shape[0], x.shape[1]
    ones = torch.ones(b, n, dtype=torch.float64)
    if mask is None or mask.dim() < 2 or mask.shape[-1] != n:
        return ones
    seen = mask if mask.dtype == torch.bool else mask > -1e4
    if seen.dim() > 2:
        seen = seen.flatten(1, -2).any(1)
    if seen.shape[0] not in (1, b):
        return ones
    return seen.expand(b, n).to(torch.float64)


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


class _BridgeStats:
    """Least-squares statistics of one run (input -> output states) over calibration batches:
    per token (valid tokens only) and per sequence mean over the token axis. Sums of
    ``x^T x``, ``x^T y`` and ``y^T y`` (inputs with a column of ones for the bias)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        x1, y = _with_one(x.double()), y.double()
        xt, yt, wt = x1.flatten(0, -2), y.flatten(0, -2), w.reshape(-1, 1)
        den = w.sum(1).clamp_min(1)[:, None]
        xm, ym = (x1 * w[..., None]).sum(1) / den, (y * w[..., None]).sum(1) / den
        new = {"token": [xt.T @ (xt * wt), xt.T @ (yt * wt), float((yt * yt * wt).sum())],
               "mean": [xm.T @ xm, xm.T @ ym, float((ym * ym).sum())]}
        for k, v in new.items():
            old = self.parts.get(k)
            self.parts[k] = v if old is None else [a + b for a, b in zip(old, v)]

    def __add__(self, other: _BridgeStats) -> _BridgeStats:
        out = _BridgeStats()
        out.parts = {k: [a + b for a, b in zip(v, other.parts[k])] for k, v in self.parts.items()}
        return out

    def solve(self, mode: str, ridge: float) -> torch.Tensor:
        """The [D+1, D] map (last row: bias). ``mean``: the sequence-mean fit pulled towards
        the per-token fit by ``ridge`` x the mean Gram diagonal."""
        xx, xy, _ = self.parts["token"]
        eye = torch.eye(xx.shape[0], dtype=torch.float64)
        jitter = 1e-6 * float(xx.diagonal().mean()) + 1e-12
        w_tok = torch.linalg.solve(xx + jitter * eye, xy)
        if mode == "token":
            return w_tok
        xx, xy, _ = self.parts["mean"]
        s = ridge * float(xx.diagonal().mean()) + jitter
        return torch.linalg.solve(xx + s * eye, xy + s * w_tok)

    def residual(self, mode: str, w: torch.Tensor) -> float:
        """Relative squared error of map ``w`` on these statistics (in its mode)."""
        xx, xy, yy = self.parts[mode]
        err = yy - 2 * float((w * xy).sum()) + float((w * (xx @ w)).sum())
        return max(err, 0.0) / max(yy, 1e-30)


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
SCORED_BATCHES = 16  # calibration batches that score the candidate runs (fits use all)


def bridge_blocks(g: Graph, rep: BlockReport, runs: list[tuple[int, int]],
                  maps: list[torch.Tensor]) -> Graph:
    """``g`` with each run (first, last) of blocks replaced by ``linear(run input)`` with the
    [D+1, D] map (last row the bias) of the same position in ``maps``."""
    at = {rep.blocks[b].output: (rep.blocks[a].input, m) for (a, b), m in zip(runs, maps)}
    vals = g.values()

    def fn(n: Node, b: GraphBuilder) -> list[Value | None] | None:
        hit = at.get(n.outputs[0].name)
        if hit is None:
            return None
        src, m = hit
        out = n.outputs[0]
        dt = to_torch_dtype(out.type.dtype)
        w = b.add_param("bridge_w", m[:-1].T.contiguous().to(dt))
        bias = b.add_param("bridge_b", m[-1].contiguous().to(dt))
        y = b.op("linear", [vals[src], w, bias], name="bridge")
        b.nodes.append(n)  # its other outputs (if any) keep their producer; DCE drops it
        return [y, *([None] * (len(n.outputs) - 1))]

    return eliminate_dead(rewrite(g, fn))


def _output_fidelity(out: torch.Tensor, ref: torch.Tensor, w: torch.Tensor | None,
                     mode: str) -> float:
    """Mean per-sample cosine of output 0 against the original (over token means in mean
    mode when the output keeps the token axis)."""
    o, r = out.double(), ref.double()
    if mode == "mean" and w is not None and o.dim() >= 3 and o.shape[:2] == w.shape:
        ww = w.view(*w.shape, *([1] * (o.dim() - 2)))
        o, r = (o * ww).sum(1), (r * ww).sum(1)
    return float(torch.nn.functional.cosine_similarity(o.flatten(1), r.flatten(1), dim=-1)
                 .mean())


def _static_bridged(g: Graph, rep: BlockReport, cfg: SkipLayersConfig,
                    ctx: PassContext) -> Graph:
    n = len(rep.blocks)
    explicit = bool(str(cfg.layers).strip())
    if not explicit and cfg.num_layers <= 0:
        ctx.record("skip_layers", applied=False, reason="num_layers = 0")
        return g
    if not ctx.calib:
        raise ValueError(f"skip_layers{{bridge={cfg.bridge}}} fits its linear maps on "
                         "calibration inputs (ctx.calib)")
    if any(b.reduced or b.tokens != rep.tokens for b in rep.blocks):
        ctx.record("skip_layers", applied=False, reason="a token reduction sits between "
                   "blocks: a bridge needs the run's input and output on the same tokens")
        return g
    if explicit:
        cands = [_runs(_indices(cfg.layers, n))]
    else:
        k = min(cfg.num_layers, n)
        cands = [[(i, i + k - 1)] for i in range(n - k + 1)]
    all_runs = sorted({r for c in cands for r in c})
    names = {rep.blocks[a].input for a, _ in all_runs} | \
        {rep.blocks[b].output for _, b in all_runs}
    mask_name = rep.blocks[0].mask
    out0 = g.outputs[0].name
    # two folds (alternate calibration batches): ridge and run are chosen out of sample
    nf = 2 if len(ctx.calib) >= 2 else 1
    stats = {r: [_BridgeStats() for _ in range(nf)] for r in all_runs}
    refs: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    for j, inputs in enumerate(ctx.calib):
        want = names | {out0} | ({mask_name} if mask_name else set())
        v = evaluate_values(g, inputs, want)
        w = _valid_tokens(v.get(mask_name) if mask_name else None,
                          v[rep.blocks[all_runs[0][0]].input])
        for a, b in all_runs:
            stats[(a, b)][j % nf].add(v[rep.blocks[a].input], v[rep.blocks[b].output], w)
        if j < SCORED_BATCHES:
            refs.append(v[out0])
            weights.append(w)

    def fit(r: tuple[int, int], ridge: float, fold: int | None) -> torch.Tensor:
        parts = [s_ for f, s_ in enumerate(stats[r]) if f != fold or nf == 1]
        return sum(parts[1:], parts[0]).solve(cfg.bridge, ridge)

    ridge: dict[tuple[int, int], float] = {}  # read by bridge=mean only
    for r in all_runs:
        if cfg.ridge > 0 or cfg.bridge == "token" or nf == 1:
            ridge[r] = cfg.ridge or 0.1
            continue
        held = {lam: sum(stats[r][f].residual("mean", fit(r, lam, f)) for f in range(nf))
                for lam in RIDGES}
        ridge[r] = min(held, key=lambda lam: held[lam])
    tried: list[dict[str, Any]] = []
    best: tuple[float, list[tuple[int, int]]] | None = None
    scored = range(min(len(ctx.calib), SCORED_BATCHES))  # the fits use every batch
    for runs in cands if len(cands) > 1 else []:
        fid = 0.0
        for f in range(nf):  # bridges fit without fold f, scored on fold f
            g2 = bridge_blocks(g, rep, runs, [fit(r, ridge[r], f if nf > 1 else None)
                                              for r in runs])
            o2 = g2.outputs[0].name
            for j in scored:
                if j % nf == f:
                    fid += _output_fidelity(evaluate_values(g2, ctx.calib[j], [o2])[o2],
                                            refs[j], weights[j], cfg.bridge) / len(scored)
        tried.append({"blocks": [i for a, b in runs for i in range(a, b + 1)],
                      "fidelity": round(fid, 5)})
        if best is None or fid > best[0]:
            best = (fid, runs)
    runs = best[1] if best is not None else cands[0]
    maps = [fit(r, ridge[r], None) for r in runs]
    out = bridge_blocks(g, rep, runs, maps)
    drop = [i for a, b in runs for i in range(a, b + 1)]
    info: dict[str, Any] = {"applied": True, "method": "static", "bridge": cfg.bridge,
                            "removed": drop,
                            "fit_residual": [round(sum(st.residual(cfg.bridge, m)
                                                       for st in stats[r]) / nf, 5)
                                             for r, m in zip(runs, maps)]}
    if cfg.bridge == "mean":
        info["ridge"] = [ridge[r] for r in runs]
    if tried:
        info["candidates"] = tried
    env = _calib_env(g, ctx.calib)
    if env:
        info["flops_before"], info["flops_after"] = graph_flops(g, env), graph_flops(out, env)
    ctx.record("skip_layers", **info)
    log.info("skip_layers: blocks %s replaced by linear bridges (%s)", drop, cfg.bridge)
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
    b = GraphBuilder.seeded_from(g)
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


def block_changes(g: Graph, rep: BlockReport, calib: list[tuple[Any, ...]]) -> torch.Tensor:
    """[tokens, blocks]: each calibration token's relative change ||y - x|| / ||x|| in every
    block of the unmodified graph (tokens of all calibration inputs stacked)."""
    names = [rep.blocks[0].input] + [b.output for b in rep.blocks]
    rows = []
    for inputs in calib:
        v = evaluate_values(g, inputs, names)
        hs = [v[nm].float() for nm in names]
        rel = [(y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
               for x, y in zip(hs[:-1], hs[1:])]
        rows.append(torch.stack(rel, -1).flatten(0, -2))
    return torch.cat(rows)


def _first_halts(rel: torch.Tensor, threshold: float, start: int, end: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    below = rel[:, start:end] < threshold
    return below.any(1), below.int().argmax(1) + start


def skippable_share(rel: torch.Tensor, threshold: float, start: int, end: int) -> float:
    """Share of the token-blocks the halting would skip on the unmodified model's changes:
    a token first halting after block f < end skips blocks f+1 .. end-1."""
    has, first = _first_halts(rel, threshold, start, end)
    return float(((end - 1 - first) * has).sum()) / rel.numel()


def premature_share(rel: torch.Tensor, threshold: float, start: int, end: int) -> float:
    """Of the tokens that would halt after a block in [start, end) (their first change below
    ``threshold`` there), the share whose state the unmodified model still changes by more
    than ``threshold`` in a later block before ``end``."""
    has, first = _first_halts(rel, threshold, start, end)
    if not bool(has.any()):
        return 0.0
    later = torch.cat([rel[:, :end], torch.zeros(rel.shape[0], 1)], 1)
    # suffix max over blocks after j: flip, running max, flip back, shifted by one
    suf = later.flip(1).cummax(1).values.flip(1)[:, 1:]
    prem = suf.gather(1, first[:, None])[:, 0] > threshold
    return float((prem & has).sum()) / float(has.sum())


def _halting(g: Graph, rep: BlockReport, cfg: SkipLayersConfig, ctx: PassContext) -> Graph:
    first = rep.blocks[0].input
    vals = g.values()
    st = vals[first].type
    n_blk = len(rep.blocks)
    start, prem = cfg.start, None
    end = n_blk - min(cfg.keep_last, n_blk)
    if start == -1 or cfg.keep_last == -1:
        if not ctx.calib:
            raise ValueError("skip_layers{method=halting}: start=-1 / keep_last=-1 are picked "
                             "on calibration data: pass calib, or give start= and keep_last=")
        rel = block_changes(g, rep, ctx.calib)
        best: tuple[float, int, int, float | None] = (-1.0, start, end, None)
        for e in range(n_blk, 0, -1) if cfg.keep_last == -1 else [end]:
            for s in range(e) if start == -1 else [start]:
                p = premature_share(rel, cfg.threshold, s, e)
                if p <= cfg.guard or start != -1:
                    sk = skippable_share(rel, cfg.threshold, s, e)
                    if sk > best[0]:
                        best = (sk, s, e, p)
                    break  # later starts skip less
        _, start, end, prem = best
    if start >= end - 1:  # a token halted after the last halting block skips nothing
        why = (f"no token may halt early at threshold {cfg.threshold}: from every block "
               f"before {end - 1}, over {100 * cfg.guard:g}% of the calibration halts are "
               "premature (the unmodified model changes the token by more than the "
               "threshold in a later block)" if prem is not None and end > 1 else
               f"start={start} leaves no block to skip before block {end}")
        ctx.record("skip_layers", applied=False, reason=why, premature_share=prem)
        log.warning("skip_layers: %s", why)
        return g
    halt_at = {b.output: b for b in rep.blocks[start:end]}
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
                            "start": start, "end": end}
    if prem is not None:
        info["premature_share"] = round(prem, 4)
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


@register_pass(config=SkipLayersConfig, numerics="approx",
               requires=("types", "shapes"))
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
