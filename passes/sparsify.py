"""Weight pruning of linear layers, with storage and compute chosen by measured speed.

Before -> After (pattern 2:4, storage compressed)::

    %y = linear(%x, %w, %b)        %y = sparse_linear(%x, %w_vals, %w_idx, %b)
                                        {format=nm, n=2, m=4, compute=dense}

Patterns (``sparsify{pattern=...,ratio=...,method=magnitude|wanda}``):

- ``unstructured`` (CSR storage), ``N:M`` such as ``2:4`` (ratio 1 - N/M is implied),
  ``blockHxW`` such as ``block4x4`` / ``block1x16`` (whole blocks pruned);
- ``channel``: structured pruning of the hidden neurons between two linears
  (``linear -> [elementwise activation] -> linear``, e.g. a transformer FFN): rows of the first
  weight and columns of the second are removed, so both GEMMs shrink and run faster dense.

Scores: ``magnitude`` = |W|; ``wanda`` = |W_ij| * ||X_j||_2 with input-channel norms from the
calibration inputs (Sun et al., 2023), compared within each output row (unstructured), within
each group of M (N:M) or per layer (blocks). For ``channel``: ||W1[j]|| * ||W2[:, j]|| or
||W2[:, j]|| * rms(h_j).

Compute gating: for CSR and square blocks, a sparse x dense product (MKL through
``ember::spmm_linear``) is timed against the dense GEMM on the pruned weight at the layer's
(M, K, N); it is used only where measured faster (on the 2-core AVX2 test machine it needs
>= ~90% sparsity). Otherwise ``storage=dense`` (default) keeps an ordinary linear holding the
pruned weight (same speed, accuracy as pruned) and ``storage=compressed`` stores the weight
compressed and decodes it per call (smaller artifact, measured slower: recorded).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ember.errors import CompilerError
from ember.ir import Graph, GraphBuilder, Node, Value, get_op, rewrite, run_graph
from ember.ir.opset_quant import EPILOGUE_ATTRS, encode_sparse
from ember.passmanager import PassContext, register_pass
from ember.timing import time_interleaved

from . import _calib
from ._qkernels import gate
from ._rewrite import eliminate_dead
from .quantize import _rows, example_env, linear_candidates

__all__ = ["SparsifyConfig", "sparsify", "prune_mask", "parse_pattern"]

log = logging.getLogger(__name__)

_ELEMENTWISE_ACTS = ("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "mish",
                     "leaky_relu", "elu", "clamp")


@dataclass(frozen=True)
class SparsifyConfig:
    """Knobs of the sparsify pass (see the module docstring)."""

    pattern: str = "unstructured"
    ratio: float = 0.5
    method: str = "magnitude"  # magnitude | wanda
    storage: str = "dense"  # dense | compressed
    gate: str = "measure"  # measure | always (use sparse compute wherever it can run)
    min_speedup: float = 1.05
    skip: str = ""
    min_features: int = 32

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"method must be magnitude or wanda, got '{self.method}'")
        if self.storage not in ("dense", "compressed"):
            raise ValueError(f"storage must be dense or compressed, got '{self.storage}'")
        if self.gate not in ("measure", "always"):
            raise ValueError(f"gate must be measure or always, got '{self.gate}'")


def parse_pattern(p: str) -> tuple[str, tuple[int, int]]:
    """("unstructured", ()), ("nm", (n, m)), ("block", (h, w)) or ("channel", ())."""
    if p in ("unstructured", "channel"):
        return p, (0, 0)
    m = re.fullmatch(r"(\d+):(\d+)", p)
    if m and 0 < int(m.group(1)) < int(m.group(2)) <= 16:
        return "nm", (int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"block(\d+)x(\d+)", p)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return "block", (int(m.group(1)), int(m.group(2)))
    raise ValueError(f"unknown sparsity pattern '{p}': unstructured, N:M (2:4), blockHxW "
                     f"(block4x4, block1x16) or channel")


def prune_mask(w: torch.Tensor, pattern: str, ratio: float,
               act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask of ``w`` [out, in] (``act_norm`` [in] turns magnitude into Wanda)."""
    kind, (a, b) = parse_pattern(pattern)
    score = w.detach().abs().float()
    if act_norm is not None:
        score = score * act_norm.float()[None, :]
    out_f, in_f = w.shape
    if kind == "unstructured":
        k = int(round(ratio * in_f))  # pruned per output row (Wanda's comparison group)
        keep = torch.ones_like(score, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(score, k, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        return keep
    if kind == "nm":
        n, m = a, b
        if in_f % m:
            raise ValueError(f"in-features {in_f} not divisible by M={m}")
        g = score.reshape(out_f, in_f // m, m)
        idx = torch.topk(g, n, dim=2).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
        return keep.reshape(out_f, in_f)
    if kind == "block":
        bh, bw = a, b
        if out_f % bh or in_f % bw:
            raise ValueError(f"block {bh}x{bw} does not tile [{out_f}, {in_f}]")
        bs = score.reshape(out_f // bh, bh, in_f // bw, bw).sum((1, 3))
        k = int(round(ratio * bs.numel()))
        keep_b = torch.ones_like(bs, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(bs.reshape(-1), k, largest=False).indices
            keep_b.view(-1)[idx] = False
        return keep_b.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    raise ValueError(f"prune_mask does not handle pattern '{pattern}'")


def _storage(pattern: str) -> tuple[str, dict[str, Any]]:
    kind, (a, b) = parse_pattern(pattern)
    if kind == "nm":
        return "nm", {"n": a, "m": b}
    if kind == "block":
        return "block", {"block": (a, b)}
    return "csr", {}


def _emit_sparse(n: Node, b: GraphBuilder, w: torch.Tensor, fmt: str, extra: dict[str, Any],
                 compute: str) -> Value:
    x, wv = n.inputs[0], n.inputs[1]
    assert x is not None and wv is not None
    vals, idx = encode_sparse(w, fmt, **extra)
    bias = n.inputs[2] if len(n.inputs) > 2 else None
    res = n.inputs[3] if len(n.inputs) > 3 else None
    ins: list[Value | None] = [x, b.add_param(f"{wv.name}_vals", vals),
                               b.add_param(f"{wv.name}_idx", idx), bias, res]
    while ins[-1] is None:
        ins.pop()
    epi = {k: n.attrs[k] for k in EPILOGUE_ATTRS if k in n.attrs}
    attrs = {"shape": tuple(w.shape), "format": fmt, "compute": compute, **extra, **epi}
    out = b.op("sparse_linear", ins, attrs, loc=n.loc, name=n.output.name)
    assert isinstance(out, Value)
    return out


def _emit_dense(n: Node, b: GraphBuilder, w: torch.Tensor) -> Value:
    wv = n.inputs[1]
    assert wv is not None
    ins = list(n.inputs)
    ins[1] = b.add_param(f"{wv.name}_pruned", w)
    out = b.op(n.op, ins, n.attrs, loc=n.loc, name=n.output.name)
    assert isinstance(out, Value)
    return out


def _sparse_kernel(w: torch.Tensor, fmt: str, extra: dict[str, Any]) -> Any:
    vals, idx = encode_sparse(w, fmt, **extra)
    opdef = get_op("sparse_linear")
    attrs = opdef.normalize_attrs({"shape": tuple(w.shape), "format": fmt, "compute": "sparse",
                                   **extra})
    bias = torch.zeros(w.shape[0])
    return lambda x: (lambda: opdef.reference([x, vals, idx, bias], attrs))


def _act_norms(g: Graph, ctx: PassContext, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input channel over the calibration inputs (Wanda)."""
    if not ctx.calib:
        raise CompilerError("sparsify{method=wanda} needs calibration inputs "
                            "(ember.compile(..., calib=[...]))")
    want = set(names)
    sq: dict[str, torch.Tensor] = {}

    def watch(name: str, t: torch.Tensor) -> None:
        if name in want and t.is_floating_point():
            s = t.detach().float().reshape(-1, t.shape[-1]).pow(2).sum(0)
            sq[name] = s if name not in sq else sq[name] + s

    for args in _calib.as_input_tuples(ctx.calib):
        run_graph(g, *args, watch=watch)
    return {k: v.sqrt() for k, v in sq.items()}


# ----------------------------------------------------------------------------- channel pruning
def _ffn_pairs(g: Graph, skip: str, min_features: int) -> list[tuple[Node, list[Node], Node]]:
    """(first linear, elementwise chain, second linear) with single-use links."""
    users = g.users()
    cands = {n.output.name: n for n, _ in linear_candidates(g, skip, min_features)}
    out = []
    for n in cands.values():
        if n.op == "fused_linear" and n.attrs.get("residual", "none") != "none":
            continue
        chain: list[Node] = []
        v = n.output
        while True:
            us = users.get(v.name, [])
            if len(us) != 1 or v in g.outputs:
                break
            u = us[0]
            if u.op in _ELEMENTWISE_ACTS and len(u.inputs) == 1:
                chain.append(u)
                v = u.output
                continue
            if u.output.name in cands and u.inputs[0] is v and u.inputs[1] is not v:
                out.append((n, chain, u))
            break
    return out


def _channel_prune(g: Graph, cfg: SparsifyConfig, ctx: PassContext) -> Graph:
    pairs = _ffn_pairs(g, cfg.skip, cfg.min_features)
    env = example_env(g, ctx)
    norms = {}
    if cfg.method == "wanda":
        norms = _act_norms(g, ctx, [p[2].inputs[0].name for p in pairs])  # type: ignore
    plan: dict[str, tuple[torch.Tensor, int]] = {}  # node name -> (kept idx, axis)
    chain_nodes: set[str] = set()
    layers = []
    for n1, chain, n2 in pairs:
        w1 = g.weights[n1.inputs[1].name]  # type: ignore[union-attr]
        w2 = g.weights[n2.inputs[1].name]  # type: ignore[union-attr]
        hidden = w1.shape[0]
        h = n2.inputs[0]
        assert h is not None
        if cfg.method == "wanda":
            score = w2.abs().pow(2).sum(0).sqrt() * norms[h.name]
        else:
            score = w1.norm(dim=1) * w2.norm(dim=0)
        keep_n = max(16, int(round((1 - cfg.ratio) * hidden / 16)) * 16)
        keep_n = min(keep_n, hidden)
        kept = torch.topk(score, keep_n).indices.sort().values
        m = _rows(n1.inputs[0], env)  # type: ignore[arg-type]
        k = w1.shape[1]
        x = torch.randn(m, k)
        hd = torch.randn(m, hidden)
        hs = hd[:, :keep_n].contiguous()
        w1s, w2s = w1[kept].contiguous(), w2[:, kept].contiguous()
        t = time_interleaved({
            "dense": lambda x=x, w1=w1, hd=hd, w2=w2: (F.linear(x, w1), F.linear(hd, w2)),
            "pruned": lambda x=x, w1s=w1s, hs=hs, w2s=w2s: (F.linear(x, w1s), F.linear(hs, w2s))},
                             rounds=5, budget_s=0.5)
        t_d = float(torch.tensor(t["dense"]).median())
        t_p = float(torch.tensor(t["pruned"]).median())
        rec = {"first": n1.output.name, "second": n2.output.name, "hidden": hidden,
               "kept": keep_n, "M": m, "dense_ms": round(t_d, 4), "pruned_ms": round(t_p, 4),
               "speedup": round(t_d / t_p, 3)}
        if cfg.gate == "measure" and t_d / t_p < cfg.min_speedup:
            rec["decision"] = "dense (not measured faster)"
        else:
            rec["decision"] = "pruned"
            plan[n1.output.name] = (kept, 0)
            plan[n2.output.name] = (kept, 1)
            chain_nodes.update(c.output.name for c in chain)
        layers.append(rec)

    def fn(n: Node, b: GraphBuilder) -> list[Value] | None:
        name = n.outputs[0].name
        if name in chain_nodes:
            out = b.op(n.op, list(n.inputs), n.attrs, loc=n.loc, name=name)
            assert isinstance(out, Value)
            return [out]
        if name not in plan:
            return None
        kept, axis = plan[name]
        wv = n.inputs[1]
        assert wv is not None
        w = g.weights[wv.name]
        ins = list(n.inputs)
        if axis == 0:
            ins[1] = b.add_param(f"{wv.name}_ch", w[kept].contiguous())
            bias = n.inputs[2] if len(n.inputs) > 2 else None
            if bias is not None:
                ins[2] = b.add_param(f"{bias.name}_ch", g.weights[bias.name][kept].contiguous())
        else:
            ins[1] = b.add_param(f"{wv.name}_ch", w[:, kept].contiguous())
        out = b.op(n.op, ins, n.attrs, loc=n.loc, name=name)
        assert isinstance(out, Value)
        return [out]

    out = eliminate_dead(rewrite(g, fn)) if plan else g
    ctx.record("sparsify", pattern="channel", ratio=cfg.ratio, method=cfg.method,
               pairs=len(pairs), pruned=len(plan) // 2, layers=layers,
               param_bytes_before=g.param_bytes(), param_bytes_after=out.param_bytes())
    return out


# ----------------------------------------------------------------------------- the pass
@register_pass(config=SparsifyConfig, numerics="approx",
               requires=("types", "shapes"))
def sparsify(g: Graph, cfg: SparsifyConfig, ctx: PassContext) -> Graph:
    """Prunes linear weights (pattern/ratio/method); sparse compute only where measured faster."""
    kind, _ = parse_pattern(cfg.pattern)
    if kind == "channel":
        return _channel_prune(g, cfg, ctx)
    cands = linear_candidates(g, cfg.skip, cfg.min_features)
    env = example_env(g, ctx)
    norms = _act_norms(g, ctx, [n.inputs[0].name for n, _ in cands]) \
        if cfg.method == "wanda" else {}  # type: ignore[union-attr]
    fmt, extra = _storage(cfg.pattern)
    sparse_ok = fmt == "csr" or (fmt == "block" and extra["block"][0] == extra["block"][1])
    plan: dict[str, tuple[torch.Tensor, str]] = {}
    layers = []
    for n, w in cands:
        x = n.inputs[0]
        assert x is not None
        rec: dict[str, Any] = {"node": n.output.name, "N": w.shape[0], "K": w.shape[1]}
        try:
            keep = prune_mask(w, cfg.pattern, cfg.ratio, norms.get(x.name))
        except ValueError as e:
            rec.update(decision="dense (not pruned)", reason=str(e))
            layers.append(rec)
            continue
        wp = w * keep
        rec["sparsity"] = round(1.0 - float(keep.float().mean()), 4)
        m = _rows(x, env)
        rec["M"] = m
        compute = "none"
        if sparse_ok:
            gr = gate(m, w.shape[1], w.shape[0], f"sparse-{cfg.pattern}",
                      _sparse_kernel(wp, fmt, extra), mode="measure_all"
                      if cfg.gate == "measure" else "always", min_speedup=cfg.min_speedup,
                      cache_tag=f"{rec['sparsity']:.3f}", weight=wp)
            rec["gate"] = gr.to_json()
            if gr.apply:
                compute = "sparse"
        if compute == "sparse":
            decision = "sparse_linear (sparse compute)"
        elif cfg.storage == "compressed":
            compute = "dense"
            decision = "sparse_linear (compressed storage, dense compute)"
        else:
            decision = "linear (pruned weight, dense)"
        rec["decision"] = decision
        plan[n.output.name] = (wp, compute)
        layers.append(rec)

    def fn(n: Node, b: GraphBuilder) -> list[Value] | None:
        p = plan.get(n.outputs[0].name)
        if p is None:
            return None
        wp, compute = p
        if compute == "none":
            return [_emit_dense(n, b, wp)]
        return [_emit_sparse(n, b, wp, fmt, extra, compute)]

    out = eliminate_dead(rewrite(g, fn)) if plan else g
    ctx.record("sparsify", pattern=cfg.pattern, ratio=cfg.ratio, method=cfg.method,
               storage=cfg.storage, candidates=len(cands), pruned=len(plan), layers=layers,
               param_bytes_before=g.param_bytes(), param_bytes_after=out.param_bytes())
    log.info("sparsify %s@%.2f: %d/%d linears pruned", cfg.pattern, cfg.ratio, len(plan),
             len(cands))
    return out
