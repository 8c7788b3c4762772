"""`CompiledModel`: what ``ember.compile`` and ``ember.load`` return.

A graph and the program a backend built for it, callable on numpy arrays or torch tensors, with
its records (the pass decisions, fidelity check and placement that go into the manifest). It
saves itself as a ``.ember`` artifact through `ember.artifact`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CompilerError
from .ir import Graph, TensorType, to_torch_dtype
from .ir.shapes import ShapeError, bind_symbols, free_symbols
from .targets import DEVICE_OF_TARGET

__all__ = ["CompiledModel", "load", "describe"]


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
        """Human-readable summary: signature, backend and why, passes, IR op counts."""
        return describe(self)

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target!r}, backend={self.backend!r}, "
                f"nodes={len(self.graph.nodes)}, pipeline={self.pipeline!r})")


def load(path: str | os.PathLike, **kwargs: Any) -> CompiledModel:
    """Loads a ``.ember`` artifact into a callable `CompiledModel`; the keyword arguments
    (``fallback``, ``trusted_keys``, ``trust_native``) are `ember.artifact.read_artifact`'s.

    Raises:
        ArtifactError: one line naming the artifact, the member or field, and the problem.
    """
    from .artifact import read_artifact

    a = read_artifact(path, **kwargs)
    return CompiledModel(a.graph, a.program, target=a.target, backend=a.backend,
                         pipeline=a.pipeline, records=a.records, fidelity=a.fidelity,
                         placement=a.placement)


RUNTIME_LABELS = {"inductor": "fused kernels", "eager": "one kernel per op",
                  "onnxruntime": "ONNX Runtime"}


def describe(cm: CompiledModel) -> str:
    """`CompiledModel.summary`: signature, backend and why, signature, passes, IR op counts."""
    sig = cm.signature()
    lines = [f"target: {cm.target}   backend: {cm.backend}"]
    prog = (cm.placement or {}).get("program") or getattr(cm.program, "info", {}) or {}
    if prog:
        chosen = prog.get("chosen") or prog.get("kind")
        why = prog.get("why") or prog.get("reason", "")
        lines.append(f"program: {chosen}" + (f"  ({why})" if why else ""))
        plan = prog.get("plan") or []
        if plan:
            lines.append(f"kernel plan ({len(plan)} nodes"
                         + (f", predicted {prog['predicted_h100_us']:.1f} us on H100"
                            if prog.get("predicted_h100_us") is not None else "") + "):")
            for p in plan[:40]:
                kern = p.get("kernels") or p.get("kernel") or ""
                us = p.get("h100_us")
                lines.append(f"  {p.get('op', '?')} -> {p.get('impl', '?')}"
                             + (f" {kern}" if kern else "")
                             + (f"  {us:.2f} us" if isinstance(us, int | float) else ""))
            if len(plan) > 40:
                lines.append(f"  ... {len(plan) - 40} more")
    trust = (cm.placement or {}).get("trust")
    if trust:
        lines.append(f"signature: {trust.get('signature')}")
        if trust.get("native") != "none":
            lines.append(f"native program: {trust.get('native')}")
    fb = (cm.placement or {}).get("fallback")
    if fb:
        lines.append(f"fallback: {fb['from']} -> {fb['to']}: {fb['reason']}")
    lines.append(f"passes: {cm.pipeline or '(none)'}")
    lines.append("inputs:")
    lines += [f"  {n}: {t}" for n, t in sig["inputs"]]
    lines.append("outputs:")
    lines += [f"  {n}: {t}" for n, t in sig["outputs"]]
    g = cm.graph
    lines.append(f"IR: {len(g.nodes)} nodes, {len(g.params)} params "
                 f"({g.param_bytes() / 1e6:.2f} MB)")
    counts = g.op_counts()
    lines.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in
                                       sorted(counts.items(), key=lambda kv: -kv[1])))
    cost = (cm.placement or {}).get("cost_model")
    if cost:
        sym = ", ".join(f"{k}={v}" for k, v in (cost.get("symbols") or {}).items())
        # the cost model's "inductor" runtime means fused kernels: AOTI on CPU, Triton on
        # CUDA, TVM's fused ops on mobile (the name alone read as "Inductor" on a phone)
        how = RUNTIME_LABELS.get(cost["runtime"], cost["runtime"])
        lines.append(f"predicted latency on {cost['device']} ({how}"
                     + (f", {sym}" if sym else "") + f"): {cost['predicted_ms']:.3f} ms")
        top = sorted((cost.get("by_class_us") or {}).items(), key=lambda kv: -kv[1])[:6]
        if top:
            lines.append("  by op class: " + ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in top))
    if cm.fidelity:
        lines.append("fidelity: " + ", ".join(f"{k}={v}" for k, v in cm.fidelity.items()))
    for name, rec in (cm.records or {}).items():
        lines.append(f"pass {name}: " + json.dumps(rec, default=str)[:300])
    return "\n".join(lines)
