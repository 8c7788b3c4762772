"""Compile an IR graph for CPU: fx lowering -> torch.export -> AOTInductor package.

``compile_graph(g, example_inputs, mode=...)`` returns a `CpuProgram` of one of two kinds:

- ``"aoti"``: an AOTInductor package (``cpu.pt2``: generated C++/OpenMP kernels + oneDNN/MKL
  GEMMs, weights frozen and prepacked, compiled into a shared library). No Python at run time.
- ``"eager"``: the generated fx module run by eager PyTorch (the IR interpreted with torch ops,
  with the backend's fast lowerings). Its payload is the artifact's ir.json + weights.
- ``"onnxruntime"``: the optimized IR exported to ONNX (``model.onnx``) and run by ONNX Runtime's
  CPU execution provider (its MLAS kernels), when every op has an ONNX form.

``mode="auto"`` builds every candidate, times each on the example inputs (median of several runs
after warm-up) and ships the fastest: a CPU artifact is never slower than eager, nor than ONNX
Runtime on Ember's own optimized graph. The measurements and the reason go into
``program.info``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.errors import ArtifactError, CompilerError
from ember.ir import Graph
from ember.timing import median_ms, round_robin_ms

from ..base import read_artifact_graph
from .lowering import cast_inputs, lower_graph, symbol_sources

__all__ = [
    "CpuProgram",
    "compile_graph",
    "load_program",
    "DEFAULT_INDUCTOR_CONFIGS",
    "PACKAGE_FILE",
    "find_pickles",
]

log = logging.getLogger(__name__)

PACKAGE_FILE = "cpu.pt2"

# Freezing constant-folds the weights so Inductor can prepack GEMM/conv weights for oneDNN/MKL
# (cpp.weight_prepack), fold BatchNorm and weight transposes and pick blocked conv layouts;
# without it every linear pays a weight transpose per call. (Not A/B-measured per model yet: the
# shared 2-core machine was too loaded; examples/bench_zoo.py has the end-to-end numbers.)
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {
    "freezing": True,
    "cpp.weight_prepack": True,
}


def interleaved_medians_ms(fns: Mapping[str, Callable[[], Any]], repeats: int = 5,
                           warmup: int = 2, settle_s: float = 0.02) -> dict[str, float]:
    """Median wall time (ms) of each ``fn``, timed round-robin in a rotating order so that
    a load burst hits every candidate alike (timing one candidate after another let the order
    decide close calls), with ``settle_s`` idle before each call so that the previous
    runtime's still-spinning worker threads do not slow the next one."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = round_robin_ms(fns, max(1, repeats), rotate=True, settle_s=settle_s)
    return {n: statistics.median(t) for n, t in times.items()}


class CpuProgram:
    """A compiled CPU program: ``program(*tensors) -> list[Tensor]``.

    Attributes:
        graph: the IR it was compiled from (None for an AOTI program loaded without one).
        kind: "aoti" or "eager".
        info: JSON-able record: kind, timings of every candidate, the choice and why, versions.
    """

    def __init__(self, kind: str, runner: Callable[..., Any], graph: Graph | None,
                 info: dict[str, Any], package: Path | None = None,
                 input_dtypes: Sequence[torch.dtype] | None = None) -> None:
        self.kind = kind
        self.graph = graph
        self.info = info
        self._runner = runner
        self._package = package
        self._dtypes = list(input_dtypes) if input_dtypes is not None else None

    def _prepare(self, args: Sequence[Any]) -> list[torch.Tensor]:
        if self.graph is not None:
            return cast_inputs(self.graph, args)
        out = []
        for i, a in enumerate(args):
            t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            if self._dtypes is not None and t.dtype != self._dtypes[i]:
                t = t.to(self._dtypes[i])
            out.append(t.contiguous())
        return out

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        ts = self._prepare(args)
        with torch.inference_mode():
            out = self._runner(*ts)
        return list(out)

    def save(self, directory: str | Path) -> list[str]:
        """Writes the payload; the eager kind's payload is the artifact's IR (nothing extra)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        name = {"aoti": PACKAGE_FILE, "onnxruntime": ORT_FILE}.get(self.kind)
        if name is None:
            return []
        assert self._package is not None
        dst = d / name
        if self.kind == "onnxruntime" and self.graph is not None:
            _save_onnx_without_params(self._package, dst, self.graph)
        elif self._package.resolve() != dst.resolve():
            shutil.copyfile(self._package, dst)
        return [name]

    def __repr__(self) -> str:
        return f"CpuProgram(kind={self.kind!r})"


# ----------------------------------------------------------------------------- onnxruntime
ORT_FILE = "model.onnx"


def _save_onnx_without_params(src: Path, dst: Path, g: Graph) -> None:
    """Writes the ONNX model at ``src`` to ``dst`` with the IR params left out: the artifact's
    weights.safetensors holds them once, and `load_program` hands them to ONNX Runtime."""
    import onnx

    from ember.backends.cpu.onnx import detach_params

    model = onnx.load(str(src))
    names = detach_params(model, g.weights)
    onnx.save(model, str(dst))
    log.info("saved %s: %d params refer to the artifact's weights", dst, len(names))


class _OrtRunner:
    """Runs an ONNX export of the optimized IR in ONNX Runtime (CPU EP), torch in and out.

    A model saved by `_save_onnx_without_params` gets its params from ``weights`` (the IR's)."""

    def __init__(self, path: Path, threads: int,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 spinning: bool = True, disabled: Sequence[str] = ()) -> None:
        import onnxruntime as ort

        from ember.backends.cpu.onnx.session import open_session, session_options

        so = session_options(threads, spinning=spinning)
        self._params = _external_params(path, weights)
        if self._params:
            names = list(self._params)
            so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a)
                                                 for a in self._params.values()])
        # ORT transformers measured slower on this machine (`ort_tuning`) stay off
        self.disabled = list(disabled)
        self.session = open_session(path, so, self.disabled)
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: a.detach().contiguous().numpy() for n, a in zip(self.names, args)}
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]


def _external_params(path: Path, weights: Mapping[str, torch.Tensor] | None,
                     ) -> dict[str, Any]:
    """numpy views of the params a saved model refers to (kept alive by the runner: ONNX
    Runtime reads them while it builds the session)."""
    import onnx

    from ember.backends.cpu.onnx import detached_param_names

    if weights is None:  # a model that holds its params (as exported at compile time)
        return {}
    model = onnx.load(str(path), load_external_data=False)
    names = detached_param_names(model)
    # any other external reference would make ONNX Runtime open a file the artifact names
    stray = [i.name for i in model.graph.initializer
             if i.data_location == onnx.TensorProto.EXTERNAL and i.name not in set(names)]
    if stray:
        raise ArtifactError(f"{path}: initializer(s) {stray[:3]} refer to external files; an "
                            f"Ember payload takes its params only from the artifact's weights")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ArtifactError(f"{path} refers to params the artifact's weights lack: {missing[:3]}")
    return {n: weights[n].detach().cpu().contiguous().numpy() for n in names}


# Ops whose ONNX form may round differently from their eager kernel (a requantization tie, a
# different accumulation order before a rounding step): the ORT candidate of a graph holding
# them is accepted within one quantization step rather than fp32 noise.
ROUNDING_OPS = frozenset({"qlinear_dynamic", "qlinear_static", "linear_woq", "lut_linear",
                          "linear_bf16"})


ROUNDING_MIN_COSINE = 0.998


def has_rounding_ops(g: Graph) -> bool:
    return any(n.op in ROUNDING_OPS for n in g.nodes)


def ort_tolerance(g: Graph) -> float:
    """Max relative error allowed between the ORT candidate and the eager program of ``g``."""
    return 2e-2 if has_rounding_ops(g) else 1e-4


def _ort_candidate(g: Graph, ins: Sequence[torch.Tensor], work: Path, info: dict[str, Any],
                   reference: Sequence[torch.Tensor]) -> CpuProgram | None:
    """The optimized IR exported to ONNX and run by ONNX Runtime, when every op has an ONNX
    form and its outputs match; None (with the reason in ``info``) otherwise."""
    # the ONNX exporter lives with the frontends; imported lazily (backends stay light)
    from ember.backends.cpu.onnx import export_onnx

    from .ort_tuning import disabled_optimizers, export_choices

    path = work / ORT_FILE
    threads = torch.get_num_threads()
    try:
        rep = export_onnx(g, path, contrib_ops=True, **export_choices(threads))
        if rep.custom:
            info["onnxruntime"] = {"skipped": f"ops without an ONNX form: {sorted(rep.custom)}"}
            return None
        runner = _OrtRunner(path, threads, disabled=disabled_optimizers(threads))
        got = runner(*ins)
    except Exception as e:  # noqa: BLE001  (a candidate that cannot run is not chosen)
        info["onnxruntime"] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
        return None
    err, cos = 0.0, 1.0
    for a, b in zip(got, reference):
        scale = max(1.0, float(b.detach().float().abs().max())) if b.numel() else 1.0
        if a.shape != b.shape:
            err, cos = math.inf, -1.0
            break
        if a.numel():
            af, bf = a.float().flatten(), b.detach().float().flatten()
            err = max(err, float((af - bf).abs().max()) / scale)
            if af.is_floating_point() and float(bf.norm()) > 0:
                cos = min(cos, float(torch.nn.functional.cosine_similarity(af, bf, dim=0)))
    tol = ort_tolerance(g)
    # rounding graphs: two exact implementations of the same quantized math part where a
    # one-ulp difference flips a code, and deep models carry the flip on (random-init ViT-B
    # with 49 int8 layers: 5.2% max error but cosine 0.9986 vs eager, each as far from fp32 as
    # the other); an export bug shows as a cosine far below `ROUNDING_MIN_COSINE`
    rounding_ok = has_rounding_ops(g) and cos >= ROUNDING_MIN_COSINE and err <= 10 * tol
    if not (err <= tol or rounding_ok):
        info["onnxruntime"] = {"skipped": f"outputs differ from the eager program ({err:.2e} "
                                          f"> {tol:.0e}, cosine {cos:.5f})"}
        return None
    runner, spinning, times = _choose_spinning(path, runner, ins)
    info["onnxruntime"] = {"max_rel_error": err, "tolerance": tol, "cosine": round(cos, 6),
                           "allow_spinning": spinning,
                           "spinning_ms": times, "disabled_optimizers": runner.disabled}
    return CpuProgram("onnxruntime", runner, g, info, package=path)


CLOSE_CALL = 0.15  # candidates this close are timed again before one is chosen
SLEEP_MARGIN = 0.10  # sleeping ORT workers are chosen only when this much faster


def _choose_spinning(path: Path, runner: _OrtRunner, ins: Sequence[torch.Tensor],
                     ) -> tuple[_OrtRunner, bool, dict[str, float]]:
    """Times the session with ORT's default busy-waiting workers and with sleeping ones (in
    alternating blocks, best median of each) and keeps the faster. Spinning saves a wake-up per
    op on an idle machine; on a shared one the spinning worker takes the core the next op
    needs (ResNet-50 under load 6: 0.88x of plain ORT spinning vs 1.16x sleeping). Sleeping
    must win by ``SLEEP_MARGIN``: on a quiet machine the two are within noise (ResNet-50: 59.7
    vs 58.0 ms), and a session that sleeps loses to any spinning runtime next to it."""
    other = _OrtRunner(path, torch.get_num_threads(), spinning=False, disabled=runner.disabled)
    best = {"on": math.inf, "off": math.inf}
    for _ in range(2):
        for key, r in (("on", runner), ("off", other)):
            best[key] = min(best[key], median_ms(lambda r=r: r(*ins), repeats=3, warmup=1))
    spin = best["on"] <= best["off"] * (1 + SLEEP_MARGIN)
    return runner if spin else other, spin, {k: round(v, 4) for k, v in best.items()}


# ----------------------------------------------------------------------------- pickle check
def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` starts with a well-formed pickle stream of any protocol (0-5): its
    opcodes parse up to a STOP with a consistent stack and memo (``pickletools.dis`` checks
    both, so text such as ``hello.`` is not taken for one). Binary data fails within a few
    bytes."""
    import io
    import pickletools

    if len(data) < 2:
        return False
    try:
        pickletools.dis(data, out=io.StringIO())
    except Exception:  # noqa: BLE001  (not a well-formed pickle stream)
        return False
    return True


def find_pickles(package: str | Path | Any, _depth: int = 0) -> list[str]:
    """Members of a zip that are, or hold, a pickle: ``.pkl`` names, pickle streams of every
    protocol, and the same inside zips nested in it (named ``outer!inner``)."""
    import io

    found = []
    with zipfile.ZipFile(package) as z:
        for info in z.infolist():
            name = info.filename
            if name.endswith((".pkl", ".pickle")):
                found.append(name)
                continue
            data = z.read(info)
            if data[:4] == b"PK\x03\x04" and _depth < 4:
                try:
                    found += [f"{name}!{n}" for n in find_pickles(io.BytesIO(data), _depth + 1)]
                except zipfile.BadZipFile:
                    found.append(name)  # a zip we cannot read is not a zip we can vouch for
                continue
            if _is_pickle(data):
                found.append(name)
    return found


# ----------------------------------------------------------------------------- export + AOTI
def _trace_inputs(g: Graph, inputs: Sequence[torch.Tensor], dynamic: bool) -> list[torch.Tensor]:
    """Example inputs for export; symbolic dims of size 0/1 are grown to 2 (export would
    otherwise specialize them), repeating existing data so token ids stay in range."""
    if not dynamic:
        return list(inputs)
    out = []
    for v, t in zip(g.inputs, inputs):
        for d, dim in enumerate(v.type.shape):
            if not isinstance(dim, int) and t.shape[d] < 2:
                idx = torch.arange(2) % max(1, t.shape[d])
                t = t.index_select(d, idx) if t.shape[d] else t.new_zeros(
                    (*t.shape[:d], 2, *t.shape[d + 1:]))
        out.append(t.contiguous())
    return out


_FIX_RE = re.compile(r"^\s*(\w+) = (?:Dim\('(\w+)'(.*)\)|(\d+))\s*$")
_BOUND_RE = re.compile(r"(min|max)=(\d+)")


def _suggested_fixes(msg: str) -> dict[str, dict[str, int] | int] | None:
    """Parses torch.export's "Suggested fixes" (``seq = Dim('seq', max=512)``, ``batch = 1``).

    Returns symbol -> bounds or a static value; None when a fix is not of those forms.
    """
    if "Suggested fixes" not in msg:
        return None
    fixes: dict[str, dict[str, int] | int] = {}
    for line in msg.split("Suggested fixes", 1)[1].splitlines()[1:]:
        if not line.strip():
            continue
        m = _FIX_RE.match(line)
        if m is None:
            if "=" in line:
                return None  # a derived-dim fix (seq = 2*_seq): not handled here
            break
        if m.group(4) is not None:
            fixes[m.group(1)] = int(m.group(4))
        else:
            fixes[m.group(1)] = {k: int(v) for k, v in _BOUND_RE.findall(m.group(3))}
    return fixes or None


def _dynamic_shapes(g: Graph, auto: bool,
                    fixes: Mapping[str, Mapping[str, int] | int] | None = None,
                    ) -> list[dict[int, Any]]:
    from torch.export import Dim

    dims: dict[str, Any] = {}
    specs: list[dict[int, Any]] = []
    sources = symbol_sources(g)
    fixes = fixes or {}
    for v in g.inputs:
        spec: dict[int, Any] = {}
        for d, dim in enumerate(v.type.shape):
            if isinstance(dim, int):
                continue
            if auto:
                spec[d] = Dim.AUTO
            elif getattr(dim, "is_Symbol", False) and dim.name in sources:
                fix = fixes.get(dim.name)
                if isinstance(fix, int):
                    continue  # export proved this dim static
                if dim.name not in dims:
                    bounds = {"min": 1, **(fix or {})}
                    dims[dim.name] = Dim(dim.name, **bounds)
                spec[d] = dims[dim.name]
            else:  # a derived dim (2*seq): let export relate it to the others
                spec[d] = Dim.AUTO
        specs.append(spec)
    return specs


def _export(gm: torch.fx.GraphModule, g: Graph, trace: Sequence[torch.Tensor],
            dynamic: bool) -> tuple[Any, str]:
    if not dynamic or all(v.type.is_static for v in g.inputs):
        return torch.export.export(gm, tuple(trace), strict=False), "static"
    fixes: dict[str, Any] = {}
    for attempt in range(3):  # named dims, then named dims with export's suggested bounds
        try:
            ep = torch.export.export(gm, tuple(trace), strict=False,
                                     dynamic_shapes=_dynamic_shapes(g, False, fixes))
            return ep, "named" + (f" {fixes}" if fixes else "")
        except Exception as e:  # a guard narrowed a named dim (e.g. seq <= max positions)
            new = _suggested_fixes(str(e))
            log.info("export with named dims failed (%s)%s", str(e).splitlines()[0][:200],
                     f"; retrying with {new}" if new else "")
            if not new or attempt == 2:
                break
            fixes.update(new)
    ep = torch.export.export(gm, tuple(trace), dynamic_shapes=_dynamic_shapes(g, True),
                             strict=False)
    return ep, "auto"


def _aoti_compile(gm: torch.fx.GraphModule, g: Graph, trace: Sequence[torch.Tensor],
                  dynamic: bool, path: Path, configs: Mapping[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    with torch.no_grad():
        ep, how = _export(gm, g, trace, dynamic)
    t1 = time.perf_counter()
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                 inductor_configs=dict(configs))
    t2 = time.perf_counter()
    ranges = {str(k): str(v) for k, v in ep.range_constraints.items()}
    return {"export_s": round(t1 - t0, 3), "aoti_compile_s": round(t2 - t1, 3),
            "dynamic_dims": how, "ranges": ranges}


def compile_graph(
    g: Graph,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic: bool = True,
    workdir: str | Path | None = None,
    mode: str = "auto",
    inductor_configs: Mapping[str, Any] | None = None,
    repeats: int = 5,
) -> CpuProgram:
    """Compiles ``g`` for this CPU.

    Args:
        g: a verified IR graph.
        example_inputs: one input per graph input (used to trace and, in auto mode, to time).
        dynamic: keep the graph's symbolic input dims dynamic in the AOTI program.
        workdir: where the package is built (a temporary directory when None).
        mode: "aoti", "eager", "onnxruntime", or "auto" (measure every candidate, ship the
            fastest).
        inductor_configs: overrides of `DEFAULT_INDUCTOR_CONFIGS`.
        repeats: timed runs per candidate in auto mode (median; at least 5).

    Raises:
        UnsupportedOpError: a node has no lowering (lists every one, with its location).
        CompilerError: mode="aoti" and export/AOTI compilation failed.
    """
    if mode not in ("auto", "aoti", "eager", "onnxruntime"):
        raise CompilerError(f"cpu backend: unknown mode '{mode}' "
                            f"(auto, aoti, eager, onnxruntime)")
    t_start = time.perf_counter()
    gm = lower_graph(g)
    ins = cast_inputs(g, example_inputs)
    info: dict[str, Any] = {"backend": "cpu", "torch": torch.__version__, "mode": mode,
                            "threads": torch.get_num_threads(), "candidates": {}}

    def eager_program() -> CpuProgram:
        return CpuProgram("eager", gm, g, info)

    if mode == "eager":
        info.update(kind="eager", chosen="eager", why="mode=eager",
                    compile_s=round(time.perf_counter() - t_start, 3))
        return eager_program()

    configs = {**DEFAULT_INDUCTOR_CONFIGS, **(inductor_configs or {})}
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ember_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    if mode == "onnxruntime":
        ort_prog = _ort_candidate(g, ins, work, info, eager_program()(*ins))
        if ort_prog is None:
            raise CompilerError(f"cpu backend: ONNX Runtime path unavailable: "
                                f"{info['onnxruntime']['skipped']}")
        spin = info["onnxruntime"]["spinning_ms"]
        info["candidates"]["onnxruntime"] = spin["on" if info["onnxruntime"]["allow_spinning"]
                                                 else "off"]
        info["timed_on"] = [list(t.shape) for t in ins]
        info.update(kind="onnxruntime", chosen="onnxruntime", why="mode=onnxruntime",
                    compile_s=round(time.perf_counter() - t_start, 3))
        return ort_prog
    eager = eager_program()
    programs: dict[str, CpuProgram] = {"eager": eager}
    aoti = _aoti_candidate(gm, g, ins, dynamic, work / PACKAGE_FILE, configs, info,
                           strict=mode == "aoti")
    if mode == "aoti":
        assert aoti is not None  # strict: failures raised
        info.update(kind="aoti", chosen="aoti", why="mode=aoti",
                    compile_s=round(time.perf_counter() - t_start, 3))
        return aoti
    if aoti is not None:
        programs["aoti"] = aoti
    ort_prog = _ort_candidate(g, ins, work, info, eager(*ins))
    if ort_prog is not None:
        programs["onnxruntime"] = ort_prog
    repeats = max(5, repeats)
    cand = info["candidates"]
    timed = interleaved_medians_ms({k: (lambda p=p: p(*ins)) for k, p in programs.items()},
                                   repeats)
    how = f"median of {repeats} interleaved runs"
    top = sorted(timed, key=lambda k: timed[k])[:2]
    if len(top) == 2 and timed[top[1]] <= timed[top[0]] * (1 + CLOSE_CALL):
        # a close call (AOTI and ORT often are): the two again, three times as long
        again = interleaved_medians_ms({k: (lambda p=programs[k]: p(*ins)) for k in top},
                                       3 * repeats, warmup=1)
        timed.update(again)
        how += f"; {top[0]} and {top[1]} within {CLOSE_CALL:.0%}: {3 * repeats} more runs"
    cand.update({k: round(v, 4) for k, v in timed.items()})
    info["timed_on"] = [list(t.shape) for t in ins]
    chosen = min(cand, key=lambda k: cand[k])
    info.update(kind=chosen, chosen=chosen,
                why=f"{how}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in cand.items()),
                compile_s=round(time.perf_counter() - t_start, 3))
    log.info("cpu backend chose %s (%s)", chosen, info["why"])
    return programs[chosen]


def _aoti_candidate(gm: torch.fx.GraphModule, g: Graph, ins: Sequence[torch.Tensor],
                    dynamic: bool, pkg: Path, configs: Mapping[str, Any], info: dict[str, Any],
                    strict: bool) -> CpuProgram | None:
    """Builds the AOTInductor package; None (reason in ``info``) when it fails or would hold a
    pickle, or a CompilerError when ``strict``."""
    try:
        stats = _aoti_compile(gm, g, _trace_inputs(g, ins, dynamic), dynamic, pkg, configs)
        runner = torch._inductor.aoti_load_package(str(pkg))
    except Exception as e:
        if strict:
            raise CompilerError(f"cpu backend: AOTInductor compilation failed: {e}") from e
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log.warning("AOTInductor compilation failed (other candidates remain): %s", first)
        info["aoti"] = {"skipped": f"compilation failed: {first}"}
        return None
    info["aoti"] = {**stats, "inductor_configs": dict(configs)}
    pickles = find_pickles(pkg)
    if pickles:  # loading must never unpickle: refuse such a package
        if strict:
            raise CompilerError(f"cpu backend: the AOTI package contains pickles: {pickles}")
        log.warning("AOTI package holds pickles %s; not a candidate", pickles)
        info["aoti"]["skipped"] = f"package holds pickles {pickles}"
        return None
    return CpuProgram("aoti", runner, g, info, package=pkg)


def load_program(directory: str | Path, info: Mapping[str, Any],
                 graph: Graph | None = None, allow_native: bool = True) -> CpuProgram:
    """Rebuilds a program saved by `CpuProgram.save` (+ the artifact's IR for the eager kind).

    With ``allow_native=False`` (an untrusted artifact) an AOTInductor package, which is a
    shared library, is not loaded: the program is rebuilt eagerly from the IR and weights."""
    d = Path(directory)
    kind = info.get("kind")
    info = dict(info)
    if kind == "eager":
        g = graph if graph is not None else read_artifact_graph(d)
        return CpuProgram("eager", lower_graph(g), g, info)
    if kind == "onnxruntime":
        path = d / ORT_FILE
        if not path.is_file():
            raise ArtifactError(f"cpu payload missing: {path}")
        ort_info = info.get("onnxruntime") or {}
        runner = _OrtRunner(path, torch.get_num_threads(),
                            graph.weights if graph is not None else None,
                            spinning=ort_info.get("allow_spinning", True),
                            disabled=ort_info.get("disabled_optimizers", ()))
        return CpuProgram("onnxruntime", runner, graph, info, package=path)
    if kind != "aoti":
        raise ArtifactError(f"cpu payload in {d}: unknown kind {str(kind)[:40]!r}")
    if not allow_native:
        g = graph if graph is not None else read_artifact_graph(d)
        return CpuProgram("eager", lower_graph(g), g,
                          {**info, "kind": "eager", "not_loaded": "aoti (untrusted)"})
    pkg = d / PACKAGE_FILE
    if not pkg.is_file():
        raise ArtifactError(f"cpu payload missing: {pkg}")
    built = info.get("torch")
    if built and built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ArtifactError(f"cpu payload {pkg} was built with torch {built}; this is torch "
                            f"{torch.__version__} (AOTInductor packages are version-bound)")
    pickles = find_pickles(pkg)
    if pickles:
        raise ArtifactError(f"cpu payload {pkg} contains pickled members {pickles}; refusing")
    # op modules register Ember's custom torch ops (ember::qgemm_*) that packages may call
    from ember.ir import all_ops

    all_ops()
    runner = torch._inductor.aoti_load_package(str(pkg))
    dtypes = None
    if graph is not None:
        from ember.ir import to_torch_dtype

        dtypes = [to_torch_dtype(v.type.dtype) for v in graph.inputs]
    return CpuProgram("aoti", runner, graph, info, package=pkg, input_dtypes=dtypes)
