"""Side-by-side timing: eager PyTorch, torch.compile (Inductor), ONNX Runtime, Ember.

Every contender runs in its OWN process (`ember.isolated`): eager and Inductor load one saved
``torch.export`` program of the module, ONNX Runtime a ``torch.onnx`` export of it, Ember its
saved artifact (as a user loads it); all are called on the same inputs, with the same thread
count, in interleaved rounds, and each figure is the median of ``repeats`` rounds after
warm-up. (In one process, ONNX Runtime sessions' spinning workers slowed whichever contender
ran next by up to 2x.) Outputs are checked against eager (or ONNX Runtime for ONNX files)
before any timing is trusted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Timing", "BenchResult", "ort_session", "bench_module",
           "bench_model_file", "format_results", "geomean"]

log = logging.getLogger(__name__)


def geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


@dataclass
class Timing:
    name: str
    ms: float | None
    error: str = ""
    max_rel_err: float | None = None


@dataclass
class BenchResult:
    model: str
    timings: dict[str, Timing] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratio(self, base: str, of: str = "ember") -> float | None:
        a, b = self.timings.get(of), self.timings.get(base)
        if not a or not b or a.ms is None or b.ms is None:
            return None
        return b.ms / a.ms

    def best_baseline(self) -> str | None:
        cands = [t for n, t in self.timings.items() if n != "ember" and t.ms is not None]
        return min(cands, key=lambda t: t.ms).name if cands else None  # type: ignore[arg-type]


def ort_session(onnx_path: str | Path, threads: int) -> Any:
    from ember.backends.cpu.onnx.session import open_session, session_options

    return open_session(onnx_path, session_options(threads, quiet=False))


def _rel_err(got: Sequence[Any], want: Sequence[Any]) -> float:
    from .driver import relative_error

    return relative_error([torch.as_tensor(np.asarray(g)) for g in got],
                          [torch.as_tensor(np.asarray(w)) for w in want])


def export_onnx_for_ort(module: torch.nn.Module, inputs: Sequence[torch.Tensor],
                        path: Path) -> None:
    """torch.onnx.export (TorchScript exporter, opset 17), quietly; raises on failure.

    The TorchScript exporter needs no extra package (the dynamo exporter needs onnxscript) and
    gives ONNX Runtime the graph shape it is tuned for (its fusions match these patterns).
    """
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17)


def bench_module(name: str, module: torch.nn.Module, inputs: Sequence[torch.Tensor], *,
                 repeats: int = 10, warmup: int = 3, threads: int = 2,
                 contenders: Sequence[str] = ("eager", "inductor", "onnxruntime", "ember"),
                 ember_model: Any = None,
                 progress: Callable[[str], None] | None = None) -> BenchResult:
    """Times ``module`` under each contender, each in its own process (`ember.isolated`);
    ``ember_model`` is the `CompiledModel` to time as "ember" (saved, then loaded)."""
    from .isolated import (
        Contender,
        artifact_contenders,
        exported_contender,
        flat_outputs,
        time_isolated,
    )

    torch.set_num_threads(threads)
    module = module.eval()
    res = BenchResult(name)
    say = progress or (lambda s: None)
    with torch.no_grad():
        ref = flat_outputs(module(*inputs))
    work = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    cs: dict[str, Contender] = {}
    for c in contenders:
        try:
            if c in ("eager", "inductor"):
                pt2 = work / "module.pt2"
                if not pt2.exists():
                    with torch.no_grad():
                        exported_contender(module, inputs, pt2)
                cs[c] = Contender("ember.isolated:load_exported", (str(pt2), c == "inductor"))
            elif c == "onnxruntime":
                path = work / "m.onnx"
                export_onnx_for_ort(module, inputs, path)
                cs[c] = Contender("ember.isolated:load_ort", (str(path), threads))
            elif c == "ember":
                if ember_model is None:
                    raise ValueError("no Ember model given")
                cs[c] = artifact_contenders({"ember": ember_model}, work)["ember"]
            else:
                raise ValueError(f"unknown contender {c}")
        except Exception as e:  # a baseline that cannot be built is reported, not fatal
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            res.timings[c] = Timing(c, None, error=first)
            log.warning("%s: %s failed: %s", name, c, first)
    timed = time_isolated(cs, inputs, repeats=repeats, warmup=warmup, threads=threads,
                          progress=lambda s: say(f"{name}: {s}"))
    for c, r in timed.items():
        err = _rel_err(r.outputs[: len(ref)], ref) if r.outputs else None
        res.timings[c] = Timing(c, r.ms, error=r.error, max_rel_err=err)
        if r.error:
            log.warning("%s: %s failed: %s", name, c, r.error)
    res.timings = {c: res.timings[c] for c in contenders if c in res.timings}
    return res


def format_results(results: Sequence[BenchResult]) -> str:
    """Markdown table: ms per contender, Ember's speedup vs each and vs the best baseline."""
    names = ["eager", "inductor", "onnxruntime", "ember"]
    head = ("| model | " + " | ".join(f"{n} ms" for n in names)
            + " | vs eager | vs inductor | vs ORT | vs best |")
    lines = [head, "|" + "---|" * (len(names) + 5)]
    vs_best = []
    for r in results:
        cells = []
        for n in names:
            t = r.timings.get(n)
            cells.append("n/a" if t is None else (f"{t.ms:.2f}" if t.ms is not None else "fail"))
        ratios = [r.ratio(b) for b in ("eager", "inductor", "onnxruntime")]
        best = r.best_baseline()
        rb = r.ratio(best) if best else None
        if rb:
            vs_best.append(rb)
        fmt = [f"{x:.2f}x" if x else "-" for x in (*ratios, rb)]
        lines.append(f"| {r.model} | " + " | ".join(cells) + " | " + " | ".join(fmt) + " |")
    lines.append(f"\ngeomean Ember speedup vs best baseline: {geomean(vs_best):.3f}x "
                 f"(min {min(vs_best) if vs_best else float('nan'):.3f}x)")
    return "\n".join(lines)


def bench_model_file(model: str, *, repeats: int = 10, threads: int = 2,
                     symbols: Mapping[str, int] | None = None, passes: str = "O2") -> str:
    """``ember bench MODEL``: a .pt2 gets all four contenders, an .onnx gets ORT vs Ember
    (each in its own process)."""
    import ember

    from .driver import make_example_inputs
    from .frontends import import_model
    from .isolated import Contender, artifact_contenders, time_isolated

    torch.set_num_threads(threads)
    path = Path(model)
    g = import_model(str(path))
    inputs = make_example_inputs(g, symbols)
    em = ember.compile(str(path), inputs, target="cpu", passes=passes, progress=True)
    if path.suffix.lower() == ".onnx":
        work = Path(tempfile.mkdtemp(prefix="ember-bench-"))
        cs = {"onnxruntime": Contender("ember.isolated:load_ort", (str(path), threads)),
              **artifact_contenders({"ember": em}, work)}
        timed = time_isolated(cs, inputs, repeats=repeats, threads=threads)
        res = BenchResult(path.name)
        want = timed["onnxruntime"].outputs
        for c, r in timed.items():
            err = _rel_err(r.outputs[: len(want)], want) if c == "ember" and r.outputs and \
                want else None
            res.timings[c] = Timing(c, r.ms, error=r.error, max_rel_err=err)
        e = res.timings["ember"].max_rel_err
        return format_results([res]) + "\nEmber max rel error vs ORT: " + \
            (f"{e:.2e}" if e is not None else "n/a")
    from .frontends.fx import load_pt2

    module = load_pt2(path).module()
    res = bench_module(path.name, module, inputs, repeats=repeats, threads=threads,
                       ember_model=em)
    return format_results([res])
