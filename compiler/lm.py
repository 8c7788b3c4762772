"""Causal LMs compiled for generation: one IR graph with an explicit KV cache, two uses.

`compile_lm` imports a `transformers` causal LM as ``forward(ids, positions) -> logits`` (the
FX frontend, symbolic batch and sequence), optimizes it with the exact O2 pipeline, and runs
`ember.passes.insert_kv_cache`, which turns every causal attention into ``cache_write`` +
``cached_attention`` over per-layer cache inputs ``[batch, kv_heads, max_len, head_dim]``.
The same graph is the prefill (a prompt of T tokens) and each decode step (T = 1); the caches
are written in place, so a step allocates nothing that grows with the context.
`ember.generate` drives it; `ember.lm_artifact` saves and loads it with its tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .compiled import CompiledModel
from .errors import CompilerError, FrontendError
from .ir import Graph, verify

__all__ = ["CacheSpec", "KVCache", "CompiledLM", "compile_lm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSpec:
    """What the runtime allocates: per layer a K and a V cache of ``[B, kv_heads, max_len,
    head_dim]``; ``windows`` is each layer's sliding window (None: the whole context)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    windows: tuple[int | None, ...] = ()


@dataclass
class KVCache:
    """Preallocated caches, allocated once per generation and written in place by each step."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    max_len: int

    @staticmethod
    def allocate(spec: CacheSpec, batch: int, max_len: int) -> KVCache:
        shape = (batch, spec.kv_heads, max_len, spec.head_dim)
        dt = getattr(torch, spec.dtype)
        return KVCache([torch.zeros(shape, dtype=dt) for _ in range(spec.layers)],
                       [torch.zeros(shape, dtype=dt) for _ in range(spec.layers)], max_len)


class CompiledLM:
    """A compiled causal LM: `step` runs the cached graph (prefill or decode)."""

    def __init__(self, compiled: CompiledModel, spec: CacheSpec, vocab_size: int,
                 max_positions: int, config: dict[str, Any]) -> None:
        self.compiled = compiled
        self.spec = spec
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.config = config

    @classmethod
    def from_parts(cls, graph: Graph, program: Any, spec: CacheSpec, vocab_size: int,
                   max_positions: int, config: dict[str, Any]) -> CompiledLM:
        cm = CompiledModel(graph, program, target="cpu", backend="cpu", pipeline="O2,"
                           "insert_kv_cache", records={})
        return cls(cm, spec, vocab_size, max_positions, config)

    @property
    def graph(self) -> Graph:
        return self.compiled.graph

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.spec, batch, max_len)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[B, V]`` of the last token with ``last_only``) for tokens
        ``ids`` at ``positions``; their K and V rows are written into ``cache``."""
        if int(positions.max()) >= cache.max_len:
            raise CompilerError(f"position {int(positions.max())} is past the cache's "
                                f"{cache.max_len} rows")
        kv = [t for pair in zip(cache.k, cache.v) for t in pair]
        out = self.compiled.program(ids, positions, *kv)
        logits = out[0]
        return logits[:, -1] if last_only else logits


class _Forward(torch.nn.Module):
    """``(ids, positions) -> logits`` of a `transformers` causal LM, without its own cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=positions, use_cache=False).logits


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list | tuple) else [v])]


def compile_lm(model: torch.nn.Module, *, probe_len: int = 8) -> CompiledLM:
    """Compiles a `transformers` causal LM (any decoder whose attention the O2 pipeline fuses
    and whose mask is causal in the positions) for generation on the CPU."""
    from ember.backends.cpu.lowering import lower_graph
    from ember.backends.cpu.program import CpuProgram
    from ember.frontends import fx
    from ember.passmanager import PassContext, PassManager

    cfg = getattr(model, "config", None)
    if cfg is None:
        raise FrontendError(f"{type(model).__name__} has no .config: compile_lm takes a "
                            f"transformers causal LM")
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0)
                  or 2048)
    model = model.eval()
    # batch 2 and distinct rows: an example size of 1 would make torch.export fix the dim
    ids = torch.arange(2 * probe_len).reshape(2, probe_len) % max(vocab, 1)
    positions = torch.arange(probe_len).repeat(2, 1)
    dims = {"ids": {0: "batch", 1: "seq"}, "positions": {0: "batch", 1: "seq"}}
    g = fx.import_module(_Forward(model).eval(), (ids, positions), dynamic_dims=dims)
    ctx = PassContext(target="cpu")
    g = PassManager("O2,insert_kv_cache").run(g, ctx)
    verify(g)
    caches = [v for v in g.inputs if v.name.startswith("k_cache_")]
    if not caches:
        raise CompilerError("compile_lm: no attention was turned into a cached attention")
    k0 = caches[0].type
    windows = tuple(ctx.records.get("insert_kv_cache", {}).get("windows") or ())
    spec = CacheSpec(len(caches), int(k0.shape[1]), int(k0.shape[3]), k0.dtype, windows)
    program = CpuProgram("eager", lower_graph(g), g, {"backend": "cpu", "kind": "eager"})
    config = {"eos_token_id": _ids(getattr(cfg, "eos_token_id", None)),
              "bos_token_id": _ids(getattr(cfg, "bos_token_id", None)),
              "pad_token_id": _ids(getattr(cfg, "pad_token_id", None)),
              "model_type": str(getattr(cfg, "model_type", ""))}
    cm = CompiledModel(g, program, target="cpu", backend="cpu", pipeline="O2,insert_kv_cache",
                       records=dict(ctx.records))
    log.info("compile_lm: %d layers, %d KV heads x %d, vocabulary %d", spec.layers,
             spec.kv_heads, spec.head_dim, vocab)
    return CompiledLM(cm, spec, vocab, max_pos, config)
