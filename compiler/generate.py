"""The generation loop over a compiled causal LM's step function and its KV cache.

Works with any model object that has the step contract of `ember.lm.CompiledLM`::

    lm.new_cache(batch, max_len) -> cache            # allocated once per call, reused
    lm.step(ids[B, T], positions[B, T], cache, last_only=True) -> logits[B, V]
                                                      # writes the T new K/V rows in place

One prefill step runs every prompt of the batch, right-padded, each row with its own positions
``0..len-1`` (a padded row's extra cache rows are masked by position and overwritten by its
decode steps); then one decode step per new token for every row. Logits processing follows
`transformers`' order: repetition penalty, temperature, top-k, top-p, then sampling with a
seeded generator (or argmax when ``do_sample`` is off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from .errors import CompilerError

__all__ = ["GenerationConfig", "Generation", "StepModel", "process_logits", "seen_mask",
           "generate", "stream_tokens"]

log = logging.getLogger(__name__)


class StepModel(Protocol):
    """What the loop needs of a compiled LM (`ember.lm.CompiledLM` is one)."""

    vocab_size: int
    max_positions: int

    def new_cache(self, batch: int, max_len: int) -> Any: ...

    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
             last_only: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``do_sample=False`` is greedy whatever the temperature."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0

    def check(self) -> GenerationConfig:
        if self.max_new_tokens < 0:
            raise CompilerError("max_new_tokens must be >= 0")
        if self.do_sample and self.temperature <= 0:
            raise CompilerError("temperature must be > 0 when sampling (or do_sample=False)")
        if not 0 < self.top_p <= 1:
            raise CompilerError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise CompilerError("top_k must be >= 0 and repetition_penalty > 0")
        return self


@dataclass
class Generation:
    """The result of `generate`: per prompt the new token ids (stop token excluded) and why it
    ended, with timings of the whole batch."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (each step makes one token per unfinished row)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def seen_mask(history: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[B, V] bool: which tokens each row has seen (prompt and output)."""
    m = torch.zeros((len(history), vocab), dtype=torch.bool)
    for b, seen in enumerate(history):
        if seen:
            m[b, torch.as_tensor(list(seen), dtype=torch.long)] = True
    return m


def process_logits(logits: torch.Tensor, seen: torch.Tensor | Sequence[Sequence[int]],
                   cfg: GenerationConfig) -> torch.Tensor:
    """Scores [B, V] after repetition penalty, temperature, top-k and top-p (filtered entries
    -inf), in `transformers`' order and with its semantics. ``seen``: a `seen_mask` (kept up to
    date by the loop, so a step costs the same at any context length) or token lists."""
    x = logits.float().clone()
    if cfg.repetition_penalty != 1.0:
        m = seen if isinstance(seen, torch.Tensor) else seen_mask(seen, x.shape[-1])
        pen = torch.where(x < 0, x * cfg.repetition_penalty, x / cfg.repetition_penalty)
        x = torch.where(m, pen, x)
    if not cfg.do_sample:
        return x
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, x.shape[-1])
        kth = torch.topk(x, k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        srt, order = torch.sort(x, descending=False, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= (1 - cfg.top_p)
        drop[:, -1] = False  # keep at least the most likely token
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return x


def _pick(scores: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> torch.Tensor:
    if not cfg.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)


def _stop_string_hit(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _run(lm: StepModel, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
         decode: Any | None, halt: list[bool] | None = None) -> Iterator[tuple[int, int]]:
    """Yields (row, token) as tokens are made; the caller collects them and may set
    ``halt[row]`` to end a row (a stop string). ``decode`` (ids -> text) is needed for stop
    strings."""
    cfg.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CompilerError("every prompt needs at least one token")
    if cfg.stop_strings and decode is None:
        raise CompilerError("stop strings need a tokenizer to decode the text")
    lens = [len(p) for p in prompts]
    max_len = max(lens) + cfg.max_new_tokens
    if max_len > lm.max_positions:
        raise CompilerError(f"prompt ({max(lens)} tokens) + max_new_tokens "
                            f"({cfg.max_new_tokens}) exceeds the model's {lm.max_positions} "
                            f"positions")
    b = len(prompts)
    cache = lm.new_cache(b, max_len)  # once: every step writes into it in place
    ids = torch.full((b, max(lens)), cfg.pad_token_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = torch.arange(max(lens)).expand(b, -1).contiguous()
    logits = lm.step(ids, positions, cache)  # [B, T, V]
    last = logits[torch.arange(b), torch.tensor(lens) - 1]
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = seen_mask(prompts, last.shape[-1]) if cfg.repetition_penalty != 1.0 else \
        torch.zeros((b, 0), dtype=torch.bool)
    done = [cfg.max_new_tokens == 0] * b
    pos = torch.tensor(lens, dtype=torch.long)
    step_ids = torch.empty((b, 1), dtype=torch.long)
    produced = [0] * b
    while not all(done):
        nxt = _pick(process_logits(last, seen, cfg), cfg, gen)
        for r in range(b):
            if done[r]:
                continue
            t = int(nxt[r])
            if seen.shape[1]:
                seen[r, t] = True
            produced[r] += 1
            yield r, t
            if t in cfg.stop_token_ids or produced[r] >= cfg.max_new_tokens or \
                    (halt is not None and halt[r]):
                done[r] = True
        if all(done):
            break
        # finished rows still step (their token is ignored): the batch keeps one shape
        step_ids[:, 0] = nxt
        last = lm.step(step_ids, pos.view(b, 1), cache, last_only=True)
        pos += 1


def generate(lm: StepModel, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None,
             *, decode: Any | None = None, **overrides: Any) -> Generation:
    """Generates for a batch of token-id prompts of any lengths.

    Args:
        lm: a compiled LM (`StepModel`).
        prompts: token ids per prompt.
        cfg: decoding settings (`GenerationConfig`); keyword overrides replace its fields.
        decode: ids -> text, for stop strings and ``Generation.texts``.
    """
    cfg = replace(cfg or GenerationConfig(), **overrides)
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    stopped = [False] * b
    t0 = time.perf_counter()
    ttft = 0.0
    steps = 0
    seen_first = False
    for r, t in _run(lm, prompts, cfg, decode, stopped):
        if not seen_first:
            ttft, seen_first = time.perf_counter() - t0, True
        if stopped[r]:
            continue
        if t in cfg.stop_token_ids:
            stopped[r], reasons[r] = True, "stop_token"
            continue
        out[r].append(t)
        steps = max(steps, len(out[r]))
        if cfg.stop_strings:
            text = decode(out[r])
            hit = _stop_string_hit(text, cfg.stop_strings)
            if hit is not None:
                stopped[r], reasons[r] = True, "stop_string"
    total = time.perf_counter() - t0
    res = Generation(out, reasons, ttft_s=ttft, decode_s=max(total - ttft, 0.0),
                     decode_steps=max(steps - 1, 0))
    if decode is not None:
        texts = []
        for toks, why in zip(out, reasons):
            text = decode(toks)
            hit = _stop_string_hit(text, cfg.stop_strings) if why == "stop_string" else None
            texts.append(text if hit is None else text[:hit])
        res.texts = texts
    return res


def stream_tokens(lm: StepModel, prompt: Sequence[int], cfg: GenerationConfig | None = None,
                  **overrides: Any) -> Iterator[int]:
    """Yields the new token ids of one prompt as they are made (the stop token excluded)."""
    cfg = replace(cfg or GenerationConfig(), **overrides)
    for _, t in _run(lm, [prompt], replace(cfg, stop_strings=()), None):
        if t in cfg.stop_token_ids:
            return
        yield t
