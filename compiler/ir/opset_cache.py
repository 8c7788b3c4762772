"""KV-cache ops: a causal LM's cache as explicit state in the IR.

The cache of one layer is a tensor ``[batch, kv_heads, max_len, head_dim]`` that the program
takes as an input and writes in place::

    cache_write(cache, new[B, H, T, D], positions[B, T]) -> cache
        row positions[b, t] of sequence b becomes new[b, :, t]; the output IS the input buffer
    cached_attention(q[B, Hq, T, D], k_cache, v_cache, positions[B, T]) {scale, window}
        query (b, t) attends to the cache rows j <= positions[b, t] (and j > positions[b, t] -
        window with a sliding window); Hq / Hkv query heads share each KV head (GQA) without
        repeating K and V; only rows [0, max(positions) + 1) are read

so a prefill (T = prompt length) and a decode step (T = 1) are the same graph, and a decode
step reads what the context holds, not the whole allocation. Passes see the ops by their
traits: ``cache`` (both), ``stateful`` (``cache_write``: never folded, merged or dropped while
its output is live), ``attention`` (``cached_attention``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .ops import REQUIRED, OpDef, OpTypeError, register_op
from .types import TensorType

__all__ = ["cache_write_reference", "cached_attention_reference"]

Types = Sequence[TensorType | None]
Attrs = Mapping[str, Any]


def _need(types: Types, i: int, rank: int, op: str, what: str) -> TensorType:
    t = types[i]
    if t is None or t.rank != rank:
        raise OpTypeError(f"{op}: {what} must be rank {rank}, got {t}")
    return t


def _write_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    cache = _need(types, 0, 4, "cache_write", "cache")
    new = _need(types, 1, 4, "cache_write", "new rows")
    pos = _need(types, 2, 2, "cache_write", "positions")
    if new.dtype != cache.dtype or pos.dtype != "int64":
        raise OpTypeError(f"cache_write: new rows {new.dtype} into a {cache.dtype} cache at "
                          f"{pos.dtype} positions (int64 expected)")
    return [cache]


def cache_write_reference(cache: torch.Tensor, new: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """Writes ``new[b, :, t]`` to ``cache[b, :, positions[b, t]]`` in place; returns ``cache``."""
    b, t = positions.shape
    rows = torch.arange(b, device=cache.device)[:, None].expand(b, t)
    cache[rows, :, positions] = new.transpose(1, 2).to(cache.dtype)
    return cache


def _attn_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    q = _need(types, 0, 4, "cached_attention", "q")
    k = _need(types, 1, 4, "cached_attention", "k cache")
    v = _need(types, 2, 4, "cached_attention", "v cache")
    _need(types, 3, 2, "cached_attention", "positions")
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        raise OpTypeError(f"cached_attention: {q.shape[1]} query heads over {k.shape[1]} KV "
                          f"heads")
    return [TensorType(q.dtype, (*q.shape[:3], v.shape[3]))]


def cached_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor, scale: float | None,
                               window: int | None = None) -> torch.Tensor:
    """Attention of each query over the cache rows its position may see (module docstring)."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    n = int(positions.max()) + 1
    k, v = k_cache[:, :, :n], v_cache[:, :, :n]
    # GQA: the g query heads of one KV head become g * t rows against that head's K and V
    qg = q.reshape(b, hkv, g * t, d)
    pos = positions.repeat(1, g)  # row (gi, ti) has position positions[b, ti]
    j = torch.arange(n, device=q.device)
    mask = j[None, None, :] <= pos[:, :, None]
    if window is not None:
        mask &= j[None, None, :] > pos[:, :, None] - int(window)
    out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=mask[:, None], scale=scale)
    return out.reshape(b, hq, t, v.shape[-1])


register_op(OpDef(
    "cache_write", _write_infer,
    lambda x, a: cache_write_reference(x[0], x[1], x[2]), {}, 3, 3,
    doc="write rows of K or V into a layer's cache at their positions, in place",
    traits=frozenset({"cache", "stateful"})))

register_op(OpDef(
    "cached_attention", _attn_infer,
    lambda x, a: cached_attention_reference(x[0], x[1], x[2], x[3], a["scale"], a["window"]),
    {"scale": REQUIRED, "window": None}, 4, 4,
    doc="causal attention of queries at their positions over a KV cache (GQA, sliding window)",
    traits=frozenset({"cache", "attention"})))
