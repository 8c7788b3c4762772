"""Wall-clock timing: the one place Ember times a function.

It imports nothing of Ember's, so every layer (passes, cost models, backends, the bench) uses it:

- `median_ms(fn, repeats, warmup)`: median milliseconds of one call after warm-up calls;
- `call_samples_s(fn, repeats, warmup, inner)`: per-call seconds, each sample the mean over
  ``inner`` back-to-back calls;
- `pass_time_s(fns)`: seconds of one call of each function in turn (to size rounds to a budget);
- `round_robin_ms(fns, rounds, inner, rotate, settle_s)`: per-round milliseconds of each
  function, run alternately round by round so a load burst hits every candidate alike;
- `time_interleaved(fns, rounds, budget_s)`: `round_robin_ms` after warm-up, with the batch
  size and the rounds sized to ``budget_s``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["median_ms", "call_samples_s", "pass_time_s", "round_robin_ms", "time_interleaved"]


def median_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 3,
              min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls (at least one, and
    more until ``min_time_s`` has passed, at most 10x ``repeats``) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    repeats = max(1, repeats)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) > 10 * repeats:
            break
    return statistics.median(times)


def call_samples_s(fn: Callable[[], Any], repeats: int, warmup: int = 0,
                   inner: int = 1) -> list[float]:
    """``repeats`` samples of seconds per call of ``fn``, each the mean over ``inner``
    back-to-back calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return ts


def pass_time_s(fns: Mapping[str, Callable[[], Any]] | list[Callable[[], Any]]) -> float:
    """Seconds of one call of each function, one after another."""
    calls = list(fns.values()) if isinstance(fns, Mapping) else list(fns)
    t0 = time.perf_counter()
    for f in calls:
        f()
    return time.perf_counter() - t0


def round_robin_ms(fns: Mapping[str, Callable[[], Any]], rounds: int, inner: int = 1,
                   rotate: bool = False, settle_s: float = 0.0) -> dict[str, list[float]]:
    """Per-round milliseconds per call of each function (the mean over ``inner`` calls),
    the functions run one after another in each of ``rounds`` rounds.

    ``rotate``: round r starts at the r-th function (the order does not decide close calls);
    ``settle_s``: idle before each timed call, so the previous runtime's still-spinning worker
    threads do not slow the next one."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else names
        for k in order:
            if settle_s:
                time.sleep(settle_s)
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out[k].append((time.perf_counter() - t0) / inner * 1e3)
    return out


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int = 9,
                     budget_s: float = 1.0) -> dict[str, list[float]]:
    """Per-round wall times (ms) of each function, run alternately round by round: two
    warm-up calls each (caches, packing, allocator), calls batched to about 20 ms a round,
    at least 3 rounds and at most ``rounds``, fewer when ``budget_s`` would be exceeded."""
    for f in fns.values():
        f()
        f()
    one = max(pass_time_s(fns), 1e-6)
    inner = max(1, min(20, int(0.02 / one * len(fns))))
    rounds = max(3, min(rounds, int(budget_s / (one * inner) + 1)))
    return round_robin_ms(fns, rounds, inner)
