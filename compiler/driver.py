"""The driver: ``ember.compile`` ties frontend -> passes -> backend together.

    model (nn.Module | ExportedProgram | .pt2 | .onnx | ModelProto)
      -> frontend -> IR -> PassManager(pipeline) -> backend.compile -> CompiledModel

With ``max_drop`` the accuracy-budget planner (`ember.planner`) chooses the pipeline first.
The driver sits on top: it imports the planner, the artifact writer and `ember.compiled`;
none of them imports it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .compiled import CompiledModel
from .errors import BackendUnavailableError, CompilerError
from .frontends import import_model
from .ir import Graph, evaluate, to_torch_dtype
from .ir.shapes import free_symbols
from .passmanager import PassContext, PassManager, format_pipeline, parse_pipeline
from .pipelines import DEFAULT_PIPELINE
from .progress import Progress
from .targets import DEVICE_OF_TARGET, TARGETS, pass_context_fields

__all__ = ["compile", "make_example_inputs", "relative_error"]

log = logging.getLogger(__name__)


def _default_symbol_value(name: str) -> int:
    low = name.lower()
    return 1 if ("batch" in low or low in ("n", "b", "bs")) else 16


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
