"""Give a causal LM an explicit KV cache: full-sequence attention becomes attention over a cache.

Before -> After, for each attention whose mask is causal in the ``positions`` input::

    %k  = <K heads>[B, Hkv, T, D]                %kc = cache_write(%k_cache_i, %k, %positions)
    %ke = reshape(expand(reshape(%k)))   ->      %vc = cache_write(%v_cache_i, %v, %positions)
    %m  = <bool mask from %positions>            %a  = cached_attention(%q, %kc, %vc, %positions)
    %a  = attention(%q, %ke, %ve, %m)                  {scale, window}

The graph gains inputs ``k_cache_<i>``/``v_cache_<i>`` ``[batch, Hkv, max_len, D]`` and
outputs of the written caches (the same buffers, written in place), so one graph serves the
prefill (T = prompt length) and every decode step (T = 1). The mask is recognized by what it
computes, not by how a model builds it: its subgraph is evaluated at ``positions = 0..N-1`` and
must equal the causal pattern ``j <= i``, or a sliding window ``i - w < j <= i`` (the window is
read off the values). GQA's repeat of K and V (reshape -> expand -> reshape) is walked back to
the KV heads, which the cache stores once. An attention that is not causal in the positions is
an error naming the node: this pass is for decoders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ember.errors import CompilerError
from ember.ir import Graph, GraphBuilder, Node, TensorType, Value, evaluate_values, sym
from ember.passmanager import PassContext, register_pass

from ._rewrite import eliminate_dead

__all__ = ["InsertKvCacheConfig", "insert_kv_cache", "MAX_LEN"]

log = logging.getLogger(__name__)

MAX_LEN = "max_len"
_PROBE = 48  # positions at which each mask is evaluated


@dataclass(frozen=True)
class InsertKvCacheConfig:
    """Attributes:
    positions: the graph input holding each token's position ``[batch, seq]``.
    """

    positions: str = "positions"


def _producers(g: Graph) -> dict[str, Node]:
    return {v.name: n for n in g.nodes for v in n.outputs}


def _kv_heads(v: Value, prod: dict[str, Node]) -> Value:
    """The [B, Hkv, T, D] tensor under a GQA repeat (reshape(expand(reshape(x)))), or ``v``."""
    n = prod.get(v.name)
    if n is None or n.op != "reshape":
        return v
    e = prod.get(n.inputs[0].name) if n.inputs[0] is not None else None
    if e is None or e.op != "expand":
        return v
    u = prod.get(e.inputs[0].name) if e.inputs[0] is not None else None
    if u is None or u.op != "reshape" or u.inputs[0] is None or u.inputs[0].type.rank != 4:
        return v
    return u.inputs[0]


def _mask_kind(m: torch.Tensor, where: str) -> int | None:
    """None for a causal mask, ``w`` for a sliding window of w; else an error."""
    m = m.to(torch.bool).reshape(-1, _PROBE, _PROBE)
    if not bool((m == m[:1]).all()):
        raise CompilerError(f"{where}: the attention mask differs between batch rows or heads "
                            f"(padding masks are not supported; pass positions instead)")
    m = m[0]
    i = torch.arange(_PROBE)[:, None]
    j = torch.arange(_PROBE)[None, :]
    causal = j <= i
    if bool((m == causal).all()):
        return None
    width = int(m.sum(1).max())
    if 0 < width < _PROBE and bool((m == (causal & (j > i - width))).all()):
        return width
    raise CompilerError(f"{where}: the attention mask is not causal in the positions (nor a "
                        f"sliding window); insert_kv_cache is for decoder attention")


@register_pass(config=InsertKvCacheConfig, numerics="exact", requires=("types", "shapes"))
def insert_kv_cache(g: Graph, cfg: InsertKvCacheConfig, ctx: PassContext) -> Graph:
    """Turns causal attention over the sequence into attention over a KV cache input."""
    names = list(g.input_names or [v.name for v in g.inputs])
    if cfg.positions not in names:
        raise CompilerError(f"insert_kv_cache: the graph has no input '{cfg.positions}' "
                            f"(inputs: {', '.join(names)})")
    pos = g.inputs[names.index(cfg.positions)]
    attns = [n for n in g.nodes if n.op == "attention"]
    if not attns:
        raise CompilerError("insert_kv_cache: the graph has no attention op (run the O2 "
                            "pipeline first, which fuses attention)")
    for n in attns:
        if len(n.inputs) < 4 or n.inputs[3] is None:
            raise CompilerError(f"insert_kv_cache: attention at {n.loc} has no mask; a "
                                f"causal LM's mask must come from the positions")
    # every mask at once, evaluated at positions 0..N-1 for one sequence
    probe: list[Any] = []
    for v in g.inputs:
        shape = [1 if i == 0 else _PROBE for i in range(v.type.rank)]
        if v is pos:
            probe.append(torch.arange(_PROBE).reshape(1, _PROBE))
        elif v.type.dtype.startswith("int"):
            probe.append(torch.zeros(shape, dtype=torch.long))
        else:
            probe.append(torch.zeros(shape))
    masks = evaluate_values(g, probe, {n.inputs[3].name for n in attns})  # type: ignore[union-attr]
    prod = _producers(g)
    batch = pos.type.shape[0]
    b = GraphBuilder.seeded_from(g)
    max_len = sym(MAX_LEN)
    plan: dict[int, tuple[Value, Value, Value, Value, int | None]] = {}
    for i, n in enumerate(attns):
        k, v = n.inputs[1], n.inputs[2]
        assert k is not None and v is not None
        window = _mask_kind(masks[n.inputs[3].name], f"attention at {n.loc}")  # type: ignore[union-attr]
        kh, vh = _kv_heads(k, prod), _kv_heads(v, prod)
        hkv, d, dv = kh.type.shape[1], kh.type.shape[3], vh.type.shape[3]
        kin = b.add_input(f"k_cache_{i}", TensorType(kh.type.dtype, (batch, hkv, max_len, d)))
        vin = b.add_input(f"v_cache_{i}", TensorType(vh.type.dtype, (batch, hkv, max_len, dv)))
        plan[id(n)] = (kh, vh, kin, vin, window)
    outs: list[Value] = []
    out_names: list[str] = []
    for n in g.nodes:
        if id(n) not in plan:
            b.append(n)
            continue
        kh, vh, kin, vin, window = plan[id(n)]
        layer = len(outs) // 2
        kc = b.op("cache_write", [kin, kh, pos], loc=n.loc, name=f"k_cache_{layer}_w")
        vc = b.op("cache_write", [vin, vh, pos], loc=n.loc, name=f"v_cache_{layer}_w")
        b.append(Node("cached_attention", (n.inputs[0], kc, vc, pos), n.outputs,  # type: ignore[arg-type]
                      {"scale": n.attrs.get("scale"), "window": window}, n.loc))
        outs += [kc, vc]  # type: ignore[list-item]
        out_names += [f"k_cache_{layer}", f"v_cache_{layer}"]
    b.set_outputs([*g.outputs, *outs],
                  [*(g.output_names or [f"output_{i}" for i in range(len(g.outputs))]),
                   *out_names])
    out = eliminate_dead(b.build())  # the masks and GQA repeats are now dead
    ctx.record("insert_kv_cache", layers=len(attns),
               windows=[plan[id(n)][4] for n in attns])
    log.info("insert_kv_cache: %d attention ops read a KV cache", len(attns))
    return out
