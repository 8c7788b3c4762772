"""Timing contenders each alone in its own process, driven in interleaved rounds.

    time_isolated({"ember": Contender("ember.isolated:load_ember", (path,)),
                   "ort": Contender("ember.isolated:load_ort", (onnx_path,))},
                  inputs, repeats=10)
      -> {"ember": IsolatedResult(ms=..., samples=[...], outputs=[...]), "ort": ...}

Why a process per contender: a user runs one model per process. Sharing one process (or one
machine without a pause between calls) lets one runtime's idle workers slow the next: ONNX
Runtime's intra-op threads spin for a while after each call, and every session has its own
pool. On the 2-core machine of this project, a MiniLM ORT fp32 session in one process with four
other contenders ran at 113 ms against 55 ms alone, and an isolated fp32 MatMul ran at 3.2 ms
beside 21 ms with nine idle sessions spinning next to it.

Each worker builds its contender from a factory named ``"module:function"`` (imported in the
fresh process; ``sys_path`` entries are added first, so example scripts can name their own
factories), answers with its first outputs, then times one call (or ``calls`` back to back)
per request, blocked on the pipe (idle) while the others run. The parent drives rounds in a
seeded random order with ``settle_s`` of idle time before each call. The median of each
contender's own samples is the figure; outputs come back so callers can check them before
trusting any time.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Contender", "IsolatedResult", "time_isolated", "artifact_contenders",
           "exported_contender", "flat_outputs", "load_ember", "load_ort", "load_exported"]

log = logging.getLogger(__name__)

Runner = Callable[..., Any]


@dataclass(frozen=True)
class Contender:
    """How a worker process builds one contender: ``factory(*args) -> runner``.

    ``runner(*inputs)`` takes the numpy inputs and returns its outputs (tensors, arrays, or
    nested lists/tuples of them). ``inputs``, when given, replace the shared inputs of
    `time_isolated` for this contender (one model timed at several shapes)."""

    factory: str
    args: tuple[Any, ...] = ()
    inputs: tuple[Any, ...] | None = None


@dataclass
class IsolatedResult:
    """One contender's timing: median ms, every sample, its first outputs, or why it failed."""

    ms: float | None = None
    samples: list[float] = field(default_factory=list)
    warm_ms: float | None = None
    warm_samples: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    build_s: float | None = None
    error: str = ""


def _resolve(factory: str) -> Callable[..., Runner]:
    mod, _, fn = factory.partition(":")
    if not fn:
        raise ValueError(f"factory '{factory}' must be 'module:function'")
    return getattr(importlib.import_module(mod), fn)


def flat_outputs(out: Any) -> list[np.ndarray]:
    """Every tensor / array of a model output (tuples, dicts, HF ModelOutputs), as numpy."""
    if hasattr(out, "detach"):
        return [out.detach().cpu().numpy()]
    if isinstance(out, np.ndarray):
        return [out]
    if isinstance(out, Mapping):
        return [a for v in out.values() for a in flat_outputs(v)]
    if isinstance(out, list | tuple):
        return [a for v in out for a in flat_outputs(v)]
    if hasattr(out, "to_tuple"):
        return flat_outputs(out.to_tuple())
    return []


def _worker(c: Contender, inputs: list[np.ndarray], threads: int, sys_path: list[str],
            conn: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    for p in sys_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        t0 = time.perf_counter()
        run = _resolve(c.factory)(*c.args)
        with torch.inference_mode():
            out = flat_outputs(run(*inputs))  # the first call may compile
        conn.send(("ok", out, time.perf_counter() - t0))
    except Exception as e:  # a contender that cannot be built is reported, not fatal
        conn.send(("failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                   0.0))
        return
    with torch.inference_mode():
        def timed() -> float:
            t0 = time.perf_counter()
            run(*inputs)
            return (time.perf_counter() - t0) * 1e3

        while (req := conn.recv()) != "stop":
            _, calls, warm_s = req  # ("run", calls, warm_s)
            t_start = time.perf_counter()
            ms = [timed()]  # the first, after the round's idle time
            if calls > 1:
                while time.perf_counter() - t_start < warm_s:
                    run(*inputs)  # untimed: until the host has run this for warm_s
                ms += [timed() for _ in range(calls - 1)]
            conn.send(ms)


def time_isolated(contenders: Mapping[str, Contender], inputs: Sequence[Any], *,
                  repeats: int = 10, warmup: int = 2, threads: int = 2, settle_s: float = 0.05,
                  seed: int = 0, sys_path: Sequence[str] = (), calls: int = 1,
                  warm_s: float = 0.2,
                  progress: Callable[[str], None] | None = None) -> dict[str, IsolatedResult]:
    """Medians over ``repeats`` interleaved rounds, each contender in its own process.

    Args:
        contenders: name -> `Contender`.
        inputs: the call's inputs (tensors or arrays; sent to each worker as numpy).
        repeats: timed rounds; each round calls every contender once, in a random order.
        warmup: untimed rounds first.
        threads: torch (and, through the factories here, ONNX Runtime) threads per worker.
        settle_s: idle time before each timed call.
        calls: calls back to back per round and contender. ``samples`` (and ``ms``) keep the
            first, made after the round's idle time (a sporadic caller's latency);
            ``warm_samples`` (and ``warm_ms``) the median of the others (a busy server's or
            a benchmark loop's latency), timed once the worker has been calling back to back
            for ``warm_s`` (untimed calls fill the gap). With 1, no warm figures.
        warm_s: busy time before the warm calls: a 25 ms LLaMA call measured 27.7, 26.5,
            25.1, 25.9, then 23-24 ms from the fifth call on after 0.3 s idle (2 threads).
        sys_path: folders added to ``sys.path`` in the workers (to import example factories).
    """
    def as_arrays(xs: Sequence[Any]) -> list[np.ndarray]:
        return [np.ascontiguousarray(a.detach().numpy() if hasattr(a, "detach") else
                                     np.asarray(a)) for a in xs]

    shared = as_arrays(inputs)
    ctx = mp.get_context("spawn")
    res: dict[str, IsolatedResult] = {n: IsolatedResult() for n in contenders}
    live: dict[str, Any] = {}
    procs = []
    say = progress or (lambda s: None)
    try:
        for name, c in contenders.items():  # one build at a time: compiles do not overlap
            say(f"building {name}")
            parent, child = ctx.Pipe()
            arrays = shared if c.inputs is None else as_arrays(c.inputs)
            # the worker gets numpy copies only: torch tensors pickled to a spawned process
            # travel as shared-memory storages, and with those alive an AOTI BERT package
            # aborted in its embedding kernel ("index out of bounds") in every worker
            bare = replace(c, inputs=None)
            p = ctx.Process(target=_worker, args=(bare, arrays, threads, list(sys_path), child),
                            daemon=True)
            p.start()
            child.close()  # the worker holds the other end: its death reads as EOF here
            procs.append((p, parent))
            try:
                status, payload, build_s = parent.recv()
            except EOFError:
                status, payload, build_s = "failed", f"worker died (exit code {p.join(5) or p.exitcode})", 0.0
            if status != "ok":
                res[name].error = payload
                log.warning("%s: %s", name, payload)
                continue
            res[name].outputs, res[name].build_s = payload, round(build_s, 2)
            live[name] = parent
        names = list(live)
        rng = random.Random(seed)
        for r in range(warmup + repeats):
            for n in rng.sample(names, len(names)):
                time.sleep(settle_s)
                try:
                    live[n].send(("run", calls, warm_s))
                    ms = [float(t) for t in live[n].recv()]
                except (EOFError, BrokenPipeError, OSError):
                    res[n].error = "worker died while timed"
                    names.remove(n)
                    del live[n]
                    continue
                if r >= warmup:
                    res[n].samples.append(ms[0])
                    if calls > 1:
                        res[n].warm_samples.append(statistics.median(ms[1:]))
        for n in names:
            res[n].ms = statistics.median(res[n].samples) if res[n].samples else None
            if res[n].warm_samples:
                res[n].warm_ms = statistics.median(res[n].warm_samples)
    finally:
        for p, conn in procs:
            if p.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send("stop")
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return res


# ----------------------------------------------------------------------------- contenders
def artifact_contenders(models: Mapping[str, Any], work: str | Path) -> dict[str, Contender]:
    """Each `CompiledModel` saved under ``work`` and loaded back in its worker (as a user
    would load it)."""
    return {k: Contender("ember.isolated:load_ember", (str(cm.save(Path(work) / f"v{i}.ember")),))
            for i, (k, cm) in enumerate(models.items())}


def exported_contender(module: Any, inputs: Sequence[Any], path: str | Path,
                       compile: bool = False) -> Contender:
    """``module`` saved as a ``torch.export`` program at ``path``, run eagerly or by Inductor."""
    import torch

    torch.export.save(torch.export.export(module, tuple(inputs)), str(path))
    return Contender("ember.isolated:load_exported", (str(path), compile))


# ----------------------------------------------------------------------------- factories
def load_ember(path: str) -> Runner:
    """An Ember artifact, as a user loads it."""
    from ember.compiled import load

    cm = load(path)
    return lambda *xs: cm(*xs)


def load_ort(path: str, threads: int = 2, spinning: bool = True) -> Runner:
    """ONNX Runtime's CPU provider on an ONNX file, all graph optimizations on."""
    from ember.backends.cpu.onnx.session import open_session, session_options

    sess = open_session(path, session_options(threads, spinning=spinning, quiet=False))
    names = [i.name for i in sess.get_inputs()]

    def run(*xs: np.ndarray) -> Any:
        return sess.run(None, dict(zip(names, xs)))
    return run


def load_exported(path: str, compile: bool = False) -> Runner:
    """A saved ``torch.export`` program run by eager PyTorch, or by ``torch.compile``
    (Inductor) when ``compile``."""
    import torch

    from ember.frontends.fx import load_pt2

    mod = load_pt2(path).module()
    fn = torch.compile(mod) if compile else mod

    def run(*xs: np.ndarray) -> Any:
        return fn(*[torch.from_numpy(x) for x in xs])
    return run
