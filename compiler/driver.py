"""The driver: ``ember.compile`` ties frontend -> passes -> backend together.

    model (nn.Module | ExportedProgram | .pt2 | .onnx | ModelProto)
      -> frontend -> IR -> PassManager(pipeline) -> backend.compile -> CompiledModel

`CompiledModel` is callable with numpy arrays or torch tensors and saves a ``.ember`` artifact.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BackendUnavailableError, CompilerError, FrontendError
from .ir import Graph, TensorType, evaluate, to_torch_dtype
from .ir.shapes import ShapeError, bind_symbols, free_symbols
from .passmanager import PassContext, PassManager, format_pipeline, parse_pipeline
from .pipelines import DEFAULT_PIPELINE
from .progress import Progress

__all__ = ["compile", "CompiledModel", "import_model", "make_example_inputs", "TARGETS",
           "relative_error"]

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "mobile", "reference")
# the cost model's device for each target (cuda: an H100-class GPU; mobile: a phone big core)
DEVICE_OF_TARGET = {"cpu": "cpu", "reference": "cpu", "cuda": "h100", "mobile": "phone"}


# ----------------------------------------------------------------------------- frontends
def _is_onnx(model: Any) -> bool:
    if isinstance(model, str | os.PathLike):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto"


def import_model(
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    dynamic_dims: Any = None,
    input_names: Sequence[str] | None = None,
) -> Graph:
    """Imports any supported model form into the Ember IR."""
    if _is_onnx(model):
        from .frontends.onnx import import_onnx

        shapes = None
        if isinstance(dynamic_dims, Mapping) and all(isinstance(v, list | tuple)
                                                     for v in dynamic_dims.values()):
            shapes = dynamic_dims
        return import_onnx(model, input_shapes=shapes)
    from .frontends import fx

    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.exists():
            raise FrontendError(f"{path}: no such file")
        if path.suffix != ".pt2":
            raise FrontendError(f"{path}: unknown model format (expected .onnx or a "
                                f"torch.export .pt2 file)")
        model = fx.load_pt2(path)
    if isinstance(model, torch.export.ExportedProgram):
        return fx.import_exported_program(model, input_names=input_names)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise FrontendError("compiling an nn.Module needs example_inputs")
        return fx.import_module(model, tuple(example_inputs), dynamic_dims=dynamic_dims,
                                input_names=input_names)
    raise FrontendError(f"cannot compile a {type(model).__name__}: expected nn.Module, "
                        f"ExportedProgram, a .pt2/.onnx path or an onnx.ModelProto")


def _default_symbol_value(name: str) -> int:
    low = name.lower()
    return 1 if ("batch" in low or low in ("n", "b", "bs")) else 16


def pass_context_fields(target: str, example: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    """The `PassContext` fields the driver fills: the compile's example inputs and the target's
    gate (for the CPU target with onnxruntime, `ember.backends.cpu.gate.CpuGate`, built with
    the ONNX Runtime program's export choices so passes time layers as it runs them)."""
    gate = None
    if target == "cpu":
        from ember.backends.cpu.gate import cpu_gate

        gate = cpu_gate()
    return {"example_inputs": list(example) if example is not None else None, "gate": gate}


def make_example_inputs(g: Graph, symbols: Mapping[str, int] | None = None,
                        seed: int = 0) -> list[torch.Tensor]:
    """Random inputs matching the graph signature (symbolic dims get typical values)."""
    env = {s: _default_symbol_value(s) for s in free_symbols(
        d for v in g.inputs for d in v.type.shape)}
    env.update(symbols or {})
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        shape = tuple(evaluate(d, env) for d in v.type.shape)
        dt = to_torch_dtype(v.type.dtype)
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dt))
        elif dt == torch.bool:
            out.append(torch.ones(shape, dtype=dt))
        else:
            out.append(torch.zeros(shape, dtype=dt))
    return out


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """max |got - want| / max(1, max |want|) over all outputs (the tests' fp32 metric)."""
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            return math.inf
        if a.numel() == 0:
            continue
        scale = max(1.0, float(b.abs().max()))
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


# ----------------------------------------------------------------------------- compiled model
class CompiledModel:
    """A compiled model: callable, saveable, inspectable."""

    def __init__(self, graph: Graph, program: Any, *, target: str, backend: str,
                 pipeline: str, records: Mapping[str, Any], source_graph: Graph | None = None,
                 fidelity: Mapping[str, Any] | None = None,
                 placement: Mapping[str, Any] | None = None) -> None:
        self.graph = graph
        self.program = program
        self.target = target
        self.backend = backend
        self.pipeline = pipeline
        self.records = dict(records)
        self.source_graph = source_graph
        self.fidelity = dict(fidelity or {})
        self.placement = dict(placement or {})

    @property
    def input_names(self) -> list[str]:
        return list(self.graph.input_names or [v.name for v in self.graph.inputs])

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.output_names or [v.name for v in self.graph.outputs])

    def signature(self) -> dict[str, list[tuple[str, TensorType]]]:
        return {"inputs": list(zip(self.input_names, [v.type for v in self.graph.inputs])),
                "outputs": list(zip(self.output_names, [v.type for v in self.graph.outputs]))}

    def run(self, *args: Any) -> list[torch.Tensor]:
        """Runs on torch tensors or numpy arrays; returns a list of torch tensors."""
        if len(args) == 1 and isinstance(args[0], Mapping):
            m = args[0]
            missing = [n for n in self.input_names if n not in m]
            if missing:
                raise CompilerError(f"missing inputs: {', '.join(missing)}")
            args = tuple(m[n] for n in self.input_names)
        if len(args) != len(self.graph.inputs):
            raise CompilerError(f"model takes {len(self.graph.inputs)} inputs "
                                f"({', '.join(self.input_names)}), got {len(args)}")
        tensors = []
        for a, v, name in zip(args, self.graph.inputs, self.input_names):
            t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) \
                else a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            want = to_torch_dtype(v.type.dtype)
            if t.dtype != want:
                if t.is_floating_point() != want.is_floating_point:
                    raise CompilerError(f"input '{name}': expected {v.type.dtype}, got {t.dtype}")
                t = t.to(want)
            if t.dim() != v.type.rank:
                raise CompilerError(f"input '{name}': expected shape {v.type}, "
                                    f"got {tuple(t.shape)}")
            tensors.append(t)
        self._check_sizes(tensors)
        with torch.no_grad():
            return list(self.program(*tensors))

    def _check_sizes(self, tensors: Sequence[torch.Tensor]) -> None:
        """The sizes the program was built for: static dims, and one value per symbol shared
        by inputs (a wrong size otherwise fails deep inside the runtime)."""
        try:
            bind_symbols([v.type.shape for v in self.graph.inputs],
                         [tuple(t.shape) for t in tensors], self.input_names)
        except ShapeError as e:
            dims = [d for v in self.graph.inputs for d in v.type.shape]
            hint = "" if free_symbols(dims) else \
                " (every dim of this model is static: compile it with dynamic_dims to vary one)"
            raise CompilerError(f"{e}{hint}") from None

    def __call__(self, *args: Any) -> Any:
        as_numpy = any(isinstance(a, np.ndarray) for a in args)
        outs = self.run(*args)
        if as_numpy:
            outs = [o.detach().cpu().numpy() for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _runtime_kind(self) -> str:
        from ember import cost_models

        prog = (self.placement or {}).get("program") or getattr(self.program, "info", {}) or {}
        return cost_models.runtime_of_program(self.backend, prog)

    def predicted_latency_ms(self, *inputs: Any, device: str | None = None,
                             host_probe: bool = False) -> float:
        """The cost model's predicted latency of one call at these inputs' shapes.

        The figure is the steady-state call (back to back, as a serving loop or a benchmark
        calls; the device spec is timed that way). A call after the process idled is slower
        on a shared host, where the runtime's worker threads must be woken: on the 2-vCPU
        EPYC of BENCHMARKS.md section 6, a 25 ms LLaMA call took 3-11 ms longer after
        0.3 s idle and needed about four calls to warm up again.

        Args:
            inputs: example inputs (tensors, arrays) or a single {symbol: value} mapping.
            device: a device name ("cpu", "h100", "a100", "phone"); default: the target's.
            host_probe: CPU only: scale the prediction by the host's speed now against when
                its device spec was measured (`cost_models.devices.host_speed`, ~1 s): on a
                shared host whose speed drifts 10-30% within minutes. The probe matches the
                grid the model is priced at: the cold probe (weights from DRAM) when the
                model's GEMM weights exceed the L3, else the cached one.
        """
        from ember import cost_models

        dev = device or DEVICE_OF_TARGET.get(self.target, "cpu")
        arg: Any = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], Mapping) \
            else list(inputs)
        ms = cost_models.predict_latency_ms(self.graph, dev, arg, runtime=self._runtime_kind())
        if host_probe:
            spec = cost_models.get_device(dev)
            if spec.kind != "cpu":
                raise ValueError(f"host_probe times this CPU; the prediction is for {dev}")
            cold = cost_models.ort.weights_exceed_l3(self.graph, spec.l3_bytes)
            ms *= (cost_models.devices.host_speed(spec, cold=cold)
                   or cost_models.devices.host_speed(spec) or 1.0)
        return ms

    def save(self, path: str | os.PathLike) -> Path:
        from .artifact import save_artifact

        return save_artifact(self, Path(path))

    def summary(self) -> str:
        from .artifact import describe

        return describe(self)

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target!r}, backend={self.backend!r}, "
                f"nodes={len(self.graph.nodes)}, pipeline={self.pipeline!r})")


# ----------------------------------------------------------------------------- compile
def compile(  # noqa: A001  (the public name is ember.compile)
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    target: str = "cpu",
    passes: str = DEFAULT_PIPELINE,
    dynamic_dims: Any = None,
    *,
    input_names: Sequence[str] | None = None,
    calib: Any = None,
    strict: bool = False,
    verify: bool = False,
    progress: bool = False,
    backend_options: Mapping[str, Any] | None = None,
    check_fidelity: bool = True,
    max_drop: float | None = None,
    metric: Any = None,
) -> CompiledModel:
    """Compiles a model for a target.

    Args:
        model: an nn.Module, a torch.export ExportedProgram, a path to a .pt2 or .onnx file,
            or an onnx.ModelProto.
        example_inputs: a tuple of example tensors (required for nn.Module; optional for ONNX
            and .pt2, whose signatures carry shapes).
        target: "cpu" (default), "cuda", "mobile" or "reference".
        passes: a named pipeline ("O0".."O3") or a text pipeline such as
            "O2,quantize{scheme=w8a8-dynamic}" (the CLI's --passes).
        dynamic_dims: which input dims are symbolic, e.g. {"input_ids": {0: "batch", 1: "seq"}}.
        input_names: names for the inputs (default: the forward's argument names).
        calib: calibration inputs for passes that need data (list of input tuples), or
            (inputs, labels).
        strict: make every backend fallback an error.
        verify: verify the IR after every pass.
        progress: print progress lines on stderr.
        backend_options: passed to the backend's compile.
        check_fidelity: compare the compiled model with the reference on the example inputs
            and record the error in the manifest.
        max_drop: run the accuracy-budget planner (`ember.planner.plan`) on ``calib =
            (inputs, labels_or_None)`` and compile the fastest pipeline (``passes`` plus
            approximate passes) whose measured drop stays within this fraction; the plan goes
            to ``records["planner"]``.
        metric: the planner's metric: "accuracy", "top1_agreement", "cosine" or a callable.

    Returns:
        A `CompiledModel`.
    """
    if target not in TARGETS:
        raise CompilerError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    pr = Progress(progress)
    steps = parse_pipeline(passes)
    with pr.stage("import"):
        g0 = import_model(model, example_inputs, dynamic_dims, input_names)
    if example_inputs is None:
        example = make_example_inputs(g0)
    else:
        example = [torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a
                   for a in example_inputs]
    plan = None
    if max_drop is not None:  # the planner picks the pipeline; passes see its calib batches
        from .planner import plan as _plan

        plan = _plan(g0, example, max_drop=max_drop, calib=calib, metric=metric, target=target,
                     base=passes, progress=progress, backend_options=backend_options)
        steps, calib = parse_pipeline(plan.pipeline), plan.pass_calib
    calib_inputs, labels = _split_calib(calib)
    ctx = PassContext(target=target, calib=calib_inputs, labels=labels,
                      **pass_context_fields(target, example))
    with pr.stage(f"passes [{format_pipeline(steps) or 'none'}]"):
        g = PassManager(steps, verify_each=verify,
                        progress=pr.pass_hook if progress else None).run(g0, ctx)
    from ember.backends.registry import get_backend

    placement: dict[str, Any] = {}
    backend_name = target
    be = get_backend(target)
    avail = be.available()
    # a backend may build artifacts on a machine that cannot run them (CUDA without a GPU)
    build = getattr(be, "available_for_compile", be.available)()
    if not build.ok:
        raise BackendUnavailableError(f"backend '{target}' cannot compile here: {build.reason}")
    runnable = avail.ok
    if not runnable:
        warnings.warn(f"ember: building a '{target}' artifact that cannot run on this machine "
                      f"({avail.reason})", stacklevel=2)
    reuse = None
    if plan is not None and plan.program is not None and plan.graph is not None \
            and runnable and _reusable(plan, g, example):
        reuse = plan.program  # the planner built and timed this very graph for this target
        placement["reused_planner_build"] = True
    with pr.stage(f"backend {target}: codegen" + (" (the planner's timed build)" if reuse
                                                 is not None else "")):
        try:
            program = reuse if reuse is not None else be.compile(g, example,
                                                                 **dict(backend_options or {}))
        except RuntimeError as e:  # torch refusing the example inputs (e.g. too small an image)
            shapes = ", ".join(str(tuple(t.shape)) for t in example)
            raise CompilerError(
                f"running the model on example inputs of shape {shapes} failed: "
                f"{str(e).splitlines()[0][:200]}; pass example inputs, or concrete sizes for "
                f"its symbolic dims (CLI: --symbol NAME=VALUE)") from e
        except CompilerError as e:
            if strict or target == "reference":
                raise
            warnings.warn(f"ember: backend '{target}' failed ({str(e).splitlines()[0]}); "
                          f"falling back to the reference backend", stacklevel=2)
            placement["fallback"] = {"from": target, "to": "reference",
                                     "reason": str(e).splitlines()[0]}
            backend_name = "reference"
            program = get_backend("reference").compile(g, example)
    placement.update({"backend": backend_name, "program": dict(getattr(program, "info", {}))})
    cost = _cost_estimate(g, target, example, placement)
    if cost:
        placement["cost_model"] = cost
    fidelity: dict[str, Any] = {}
    if check_fidelity and not runnable:
        fidelity = {"skipped": f"cannot run here: {avail.reason}"}
    elif check_fidelity:
        with pr.stage("fidelity check vs reference"):
            from ember.ir import run_graph

            want = run_graph(g0, *example)
            with torch.no_grad():
                got = list(program(*example))
            err = relative_error(got, want)
            fidelity = {"example_max_rel_error": err, "reference": "unoptimized IR"}
            if not math.isfinite(err):
                raise CompilerError("compiled model outputs differ in shape from the reference")
    if plan is not None:
        ctx.records["planner"] = plan.to_json()
    return CompiledModel(g, program, target=target, backend=backend_name,
                         pipeline=format_pipeline(steps), records=ctx.records, source_graph=g0,
                         fidelity=fidelity, placement=placement)


def _reusable(plan: Any, g: Graph, example: Sequence[torch.Tensor]) -> bool:
    """The planner's program for its chosen graph serves this compile: the same graph, and
    every example input fits the graph's input types (a static dim the timing batch had)."""
    from .ir.shapes import is_static
    from .planner import same_graph

    if not same_graph(g, plan.graph):
        return False
    for v, t in zip(g.inputs, example):
        if len(v.type.shape) != t.dim() or any(
                is_static(d) and d != n for d, n in zip(v.type.shape, t.shape)):
            return False
    return True


def _split_calib(calib: Any) -> tuple[list[tuple[Any, ...]] | None, Any]:
    if calib is None:
        return None, None
    if isinstance(calib, tuple) and len(calib) == 2 and isinstance(calib[0], list | tuple) \
            and not isinstance(calib[0][0], torch.Tensor | np.ndarray):
        inputs, labels = calib
    else:
        inputs, labels = calib, None
    norm = [tuple(x) if isinstance(x, list | tuple) else (x,) for x in inputs]
    return norm, labels


def _cost_estimate(g: Graph, target: str, example: Sequence[Any],
                   placement: Mapping[str, Any]) -> dict[str, Any]:
    """The cost model's view of the compiled graph at the example shapes (for the manifest).

    Never fails the compile: a cost-model problem is logged and the record left empty.
    """
    try:
        from ember import cost_models

        runtime = cost_models.runtime_of_program(placement.get("backend", target),
                                                 placement.get("program") or {})
        dev = cost_models.get_device(DEVICE_OF_TARGET.get(target, "cpu"))
        symbols = cost_models.symbols_from_inputs(g, example)
        est = cost_models.estimate_graph(g, dev, symbols, runtime=runtime)
        return {"device": dev.name, "runtime": runtime, "symbols": symbols,
                "predicted_ms": round(est.total_ms, 4),
                "by_class_us": {k: round(v, 2) for k, v in est.by_class().items()}}
    except Exception as e:  # noqa: BLE001  (the estimate is advisory)
        log.warning("cost model estimate failed: %s", e)
        return {}
