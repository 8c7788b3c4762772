"""Progress reporting for long steps (compile, passes, benchmarks) on stderr.

Quiet when stderr is not a terminal unless forced; a line per stage with elapsed seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Progress"]


class Progress:
    """Prints ``[ember] stage ... done (1.2s)`` lines; ``enabled=False`` silences it."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._t0 = time.perf_counter()

    def note(self, msg: str) -> None:
        if self.enabled:
            el = time.perf_counter() - self._t0
            print(f"[ember {el:6.1f}s] {msg}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.note(f"{name} ...")
        yield
        self.note(f"{name} done ({time.perf_counter() - t0:.1f}s)")

    def pass_hook(self, name: str, i: int, n: int) -> None:
        self.note(f"  pass {i + 1}/{n}: {name}")
