"""Calibration for approximate passes: run the graph on ``ctx.calib``, collect activation stats.

`collect_stats` runs the graph on the IR's evaluator (`ember.ir.run_graph`) and accumulates, for each watched value (a linear's input), per-channel absolute maxima, the
global min/max, and a reservoir of samples for percentiles. From those:

- ``minmax``:      range = [min, max] over all calibration batches;
- ``percentile``:  range = [q(1 - p), q(p)] of the sampled values (clips rare tails);
- outlier channels: channels whose abs-max exceeds ``ratio`` x the median channel abs-max
  (the "massive activations" of LLM/BERT residual streams), kept in fp32 by the quantizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.ir import Graph, run_graph

__all__ = ["ActStats", "collect_stats", "activation_range", "outlier_channels",
           "output_fidelity", "as_input_tuples"]

log = logging.getLogger(__name__)

_SAMPLES_PER_BATCH = 65536


@dataclass
class ActStats:
    """Running statistics of one activation (last dim = channels)."""

    absmax: torch.Tensor | None = None  # [C]
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, t: torch.Tensor, gen: torch.Generator) -> None:
        t = t.detach().float()
        flat = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
        am = flat.abs().amax(0)
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        v = flat.reshape(-1)
        if v.numel() > _SAMPLES_PER_BATCH:
            v = v[torch.randint(v.numel(), (_SAMPLES_PER_BATCH,), generator=gen)]
        self.samples.append(v)


def as_input_tuples(calib: Iterable[Any]) -> list[tuple[Any, ...]]:
    return [tuple(c) if isinstance(c, list | tuple) else (c,) for c in calib]


def collect_stats(g: Graph, calib: Sequence[tuple[Any, ...]], names: Iterable[str],
                  seed: int = 0) -> dict[str, ActStats]:
    """Statistics of the values ``names`` over every calibration input tuple."""
    want = set(names)
    stats: dict[str, ActStats] = {n: ActStats() for n in want}
    gen = torch.Generator().manual_seed(seed)
    seen: set[str] = set()

    def watch(name: str, t: torch.Tensor) -> None:
        if name in want and name not in seen and t.is_floating_point():
            seen.add(name)  # a value feeding several nodes is counted once per batch
            stats[name].update(t, gen)

    for args in calib:
        seen.clear()
        run_graph(g, *args, watch=watch)
    return stats


def activation_range(s: ActStats, method: str = "minmax",
                     percentile: float = 99.99) -> tuple[float, float]:
    """The calibrated [lo, hi] of an activation (always containing 0)."""
    if method == "minmax" or not s.samples:
        return min(s.lo, 0.0), max(s.hi, 0.0)
    if method != "percentile":
        raise ValueError(f"unknown calibration method '{method}' (minmax, percentile)")
    v = torch.cat(s.samples)
    if v.numel() > 8_000_000:
        v = v[:: v.numel() // 8_000_000 + 1]
    q = torch.quantile(v, torch.tensor([1 - percentile / 100, percentile / 100]))
    return min(float(q[0]), 0.0), max(float(q[1]), 0.0)


def outlier_channels(s: ActStats, ratio: float = 8.0, max_frac: float = 0.02) -> list[int]:
    """Channels whose abs-max is >= ``ratio`` x the median channel abs-max (at most 2%)."""
    if s.absmax is None or s.absmax.numel() < 8:
        return []
    am = s.absmax
    med = float(am.median().clamp_min(1e-12))
    cand = torch.nonzero(am >= ratio * med).reshape(-1)
    if cand.numel() == 0:
        return []
    limit = max(1, int(max_frac * am.numel()))
    order = torch.argsort(am[cand], descending=True)[:limit]
    return sorted(int(i) for i in cand[order])


def output_fidelity(ref: Sequence[Sequence[torch.Tensor]],
                    got: Sequence[Sequence[torch.Tensor]]) -> float:
    """Mean cosine similarity between reference and candidate outputs (rows of the last dim)."""
    sims = []
    for r_outs, g_outs in zip(ref, got):
        for r, q in zip(r_outs, g_outs):
            if not r.is_floating_point():
                continue
            r2 = r.detach().float().reshape(-1, r.shape[-1]) if r.dim() else r.reshape(1, 1)
            q2 = q.detach().float().reshape(r2.shape)
            sims.append(torch.nn.functional.cosine_similarity(r2, q2, dim=-1, eps=1e-12).mean())
    return float(torch.stack(sims).mean()) if sims else 1.0
