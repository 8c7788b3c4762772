"""The CPU target's answers to a pass's speed questions, timed in the runtime it ships.

`CpuGate` implements `ember.passmanager.TargetGate` for the CPU backend's ONNX Runtime
program: the driver builds one (`cpu_gate`) and puts it on the pass context, so passes ask it
instead of building sessions themselves. It times single layers (`CpuGate.linear_runners`: the
quantize pass's per-layer gate) and whole models before and after a rewrite
(`CpuGate.compare`, below), both as the CPU backend exports and opens them.

Whole-model check of an approximate rewrite:

Per-layer gates time each rewritten layer alone; the model as a whole can still come out
slower (the quantize nodes of many small layers, fusions the fp32 graph had and the rewritten
one loses). On the Fashion-MNIST ViT (width 64) the per-layer gate kept 6 of 24 layers as
int8, each measured >= 1.05x alone, and the model ran 24.3 ms against 20.8 ms in fp32. So
before a pass returns, `compare_in_ort` exports the graph before and after to ONNX, times both
in ONNX Runtime on the compile's example inputs (interleaved rounds), and the pass keeps its
rewrite only when it is measured faster.

The figure is each graph's fastest round, not the median: two sessions in the compiling process
disturb each other (and whatever else the process holds), and disturbance only adds time. On the
same ViT (AVX-512 EPYC) the medians read fp32 22-41 ms against 19.0 ms for the same file alone in
its own process, and once called the int8 model 0.79x of fp32 where alone it ran 1.16x faster;
the fastest rounds read 17.5-18.1 ms and 1.14-1.26x.

The export choices are the CPU backend's measured ones (`ember.backends.cpu.ort_tuning`: whether
the fused SkipLayerNorm kernel is used and which ORT transformers are off), fixed when the gate
is built, so the two sessions are built as the CPU backend builds its own.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ember.errors import CompilerError
from ember.ir import Graph
from ember.timing import pass_time_s, round_robin_ms

__all__ = ["CpuGate", "cpu_gate", "compare_in_ort"]

log = logging.getLogger(__name__)


def _session(g: Graph, path: Path, opts: Mapping[str, Any]) -> Any:
    from .onnx import export_onnx
    from .onnx.session import open_session, session_options

    rep = export_onnx(g, path, contrib_ops=True,
                      skip_layernorm=bool(opts.get("skip_layernorm", True)),
                      masked_mha=bool(opts.get("masked_mha", True)))
    if rep.custom:
        raise ValueError(f"no ONNX form for {sorted(rep.custom)}")
    return open_session(path, session_options(torch.get_num_threads()),
                        opts.get("disabled_optimizers", ()))


def compare_in_ort(before: Graph, after: Graph, inputs: Sequence[torch.Tensor],
                   opts: Mapping[str, Any] | None = None, rounds: int = 15,
                   budget_s: float = 6.0, settle_s: float = 0.02) -> dict[str, Any] | None:
    """``{"before_ms", "after_ms", "speedup"}`` of the two graphs in ONNX Runtime on
    ``inputs``, or None when either has no ONNX form or ONNX Runtime is missing."""
    try:
        with tempfile.TemporaryDirectory() as d:
            sess = {k: _session(g, Path(d) / f"{k}.onnx", opts or {})
                    for k, g in (("before", before), ("after", after))}
    except (ImportError, ValueError) as e:
        log.info("whole-model check skipped: %s", e)
        return None
    feeds = {}
    for k, s in sess.items():
        names = [i.name for i in s.get_inputs()]
        feeds[k] = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs)}
    for k, s in sess.items():  # warm-up: first runs allocate and pick kernels
        s.run(None, feeds[k])
    runs = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sess.items()}
    one = max(pass_time_s(runs), 1e-6)
    rounds = max(3, min(rounds, int(budget_s / one)))
    ms = round_robin_ms(runs, rounds, rotate=True, settle_s=settle_s)
    b, a = min(ms["before"]), min(ms["after"])
    return {"before_ms": round(b, 4), "after_ms": round(a, 4), "speedup": round(b / a, 4),
            "rounds": rounds, "stat": "min",
            "median_ms": [round(statistics.median(ms[k]), 4) for k in ("before", "after")]}


Runner = Callable[[torch.Tensor], Callable[[], Any]]


@dataclass
class CpuGate:
    """`ember.passmanager.TargetGate` of the CPU backend's ONNX Runtime program.

    Attributes:
        export: the export and session choices of the shipped program (``skip_layernorm``,
            ``masked_mha``, ``disabled_optimizers``) for whole-model comparisons.
    """

    export: dict[str, Any] = field(default_factory=dict)

    def linear_runners(self, graphs: Sequence[Graph]) -> list[Runner]:
        """One ``x -> (() -> y)`` factory per one-input graph (the input named ``x``), each
        running the graph's plain ONNX export in ONNX Runtime with the process's threads: the
        form the CPU backend's ``onnxruntime`` program runs a layer in. Raises ImportError
        without onnxruntime, CompilerError where a graph has no ONNX form."""
        import onnxruntime  # noqa: F401  (ImportError without it: the caller times torch kernels)

        from .onnx import export_onnx
        from .onnx.session import open_session, session_options

        so = session_options(torch.get_num_threads())
        sessions = []
        with tempfile.TemporaryDirectory() as d:
            for i, g in enumerate(graphs):
                path = Path(d) / f"l{i}.onnx"
                rep = export_onnx(g, path)
                if rep.custom:
                    raise CompilerError(f"no ONNX form for {sorted(rep.custom)}")
                sessions.append(open_session(path, so))

        def factory(sess: Any) -> Runner:
            def make(x: torch.Tensor) -> Callable[[], Any]:
                feed = {"x": x.contiguous().numpy()}
                return lambda: sess.run(None, feed)
            return make
        return [factory(s) for s in sessions]

    def compare(self, before: Graph, after: Graph,
                inputs: Sequence[torch.Tensor]) -> dict[str, Any] | None:
        """`compare_in_ort` of the two graphs with the shipped program's export choices."""
        return compare_in_ort(before, after, inputs, self.export)


def cpu_gate() -> CpuGate | None:
    """The CPU target's gate with this machine's measured export choices (at the process's
    thread count), or None without onnxruntime (passes then time torch kernels)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from .ort_tuning import disabled_optimizers, export_choices

    threads = torch.get_num_threads()
    return CpuGate({**export_choices(threads), "disabled_optimizers": disabled_optimizers(threads)})
