"""Ember's hardware cost model: device specs, symbolic roofline, learned correction.

Public API::

    from ember import cost_models as cm
    dev = cm.get_device("cpu")                       # measured once, cached in ~/.cache/ember
    ms = cm.predict_latency_ms(graph, "cpu", {"batch": 4, "seq": 128})
    est = cm.estimate_graph(graph, dev, {"batch": 4, "seq": 128})   # per node / kernel
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ember.ir import Graph
from ember.ir.shapes import bind_symbols

from . import analytical, ort
from .analytical import Estimate, GraphEstimate, estimate_node, fusion_groups, op_class
from .devices import DeviceSpec, known_devices
from .devices import get_device as _get_device
from .measured import Correction, load_correction
from .ort import OrtModel, load_ort_model

__all__ = [
    "DeviceSpec",
    "Estimate",
    "GraphEstimate",
    "Correction",
    "get_device",
    "known_devices",
    "estimate_node",
    "estimate_graph",
    "predict_latency_ms",
    "load_correction",
    "load_ort_model",
    "OrtModel",
    "runtime_of_program",
    "fusion_groups",
    "op_class",
    "symbols_from_inputs",
]

log = logging.getLogger(__name__)


def get_device(name: str = "cpu", **kw: Any) -> DeviceSpec:
    """Device spec by name: "cpu" (this machine, measured and cached), "h100", "a100", "phone".

    For "cpu", when the committed correction model was fit on this CPU model, the spec it was
    fit against is returned (roofline and residual stay a calibrated pair); pass
    ``calibrated=False`` for the locally measured spec.
    """
    calibrated = kw.pop("calibrated", True)
    if name.lower() in ("cpu", "host") and calibrated and not kw:
        paired = _paired_cpu_spec()
        if paired is not None:
            return paired
    return _get_device(name, **kw)


def _paired_cpu_spec() -> DeviceSpec | None:
    from ember.hostinfo import cpu_model

    corr = load_correction()
    if corr is None or "device_spec" not in corr.meta:
        return None
    spec = DeviceSpec.from_json(corr.meta["device_spec"])
    if spec.measured.get("cpu_model") != cpu_model():
        return None
    import torch

    if spec.measured.get("threads") != torch.get_num_threads():
        return None
    return spec


def _resolve(device: str | DeviceSpec) -> DeviceSpec:
    return device if isinstance(device, DeviceSpec) else get_device(device)


def _correction_for(dev: DeviceSpec, correction: Correction | bool | None) -> Correction | None:
    if correction is False or correction is None:
        return None
    if isinstance(correction, Correction):
        return correction
    # the committed correction is only valid with the spec it was fit against
    corr = load_correction()
    if corr is None or dev.kind != "cpu":
        return None
    if corr.meta.get("device_spec", {}).get("measured") != dict(dev.measured):
        return None
    return corr


# Whether ``correction=True`` applies the committed learned ORT model. Session 4 (AVX-512
# EPYC, examples/cost_model_accuracy.py --size base, 31 held-out points on five real-size
# models): the per-node roofline with the device's measured peaks is within +-10% for 65% of
# the points (median |error| 6.6%); the gradient-boosted ORT model fit on 64 synthetic graphs
# for 6-12% (median 44%). The model stays available as an explicit ``correction=OrtModel``.
ORT_MODEL_BY_DEFAULT = False


def estimate_graph(g: Graph, device: str | DeviceSpec = "cpu",
                   symbols: Mapping[str, int] | None = None, *, runtime: str = "inductor",
                   correction: Correction | OrtModel | bool | None = True) -> GraphEstimate:
    """Per-node and total predicted latency of ``g`` at concrete symbols.

    ``runtime`` is "inductor" or "eager" (`analytical.estimate_graph`) or "onnxruntime" (the
    CPU backend's ORT program, `ort.estimate_graph_ort`); ``correction=True`` applies the
    committed learned correction of that runtime when it matches the device spec."""
    dev = _resolve(device)
    if runtime == "onnxruntime" and dev.kind != "cpu":
        runtime = "inductor"   # ORT is the CPU backend's; other devices run fused kernels
    if runtime == "onnxruntime":
        if isinstance(correction, OrtModel):
            model: OrtModel | bool = correction
        else:  # True: the committed model only where it was measured to beat the roofline
            model = bool(correction) and ORT_MODEL_BY_DEFAULT
        return ort.estimate_graph_ort(g, dev, symbols, model=model)
    corr = _correction_for(dev, correction)
    return analytical.estimate_graph(g, dev, symbols, runtime=runtime,
                                     correction=corr.factor if corr is not None else None)


def runtime_of_program(backend: str, program_info: Mapping[str, Any] | None) -> str:
    """The ``runtime`` to predict a compiled program with: its backend and shipped kind."""
    kind = (program_info or {}).get("chosen") or (program_info or {}).get("kind")
    if backend == "reference" or kind in ("eager", None):
        return "eager"
    return "onnxruntime" if kind == "onnxruntime" else "inductor"


def symbols_from_inputs(g: Graph, inputs: Sequence[Any]) -> dict[str, int]:
    """Binds the graph's symbolic dims from concrete inputs (tensors / arrays / shapes)."""
    shapes = [tuple(int(d) for d in (x if isinstance(x, tuple | list) else x.shape))
              for x in inputs]
    names = list(g.input_names or [v.name for v in g.inputs])
    return bind_symbols([v.type.shape for v in g.inputs], shapes, names)


def predict_latency_ms(g: Graph, device: str | DeviceSpec = "cpu",
                       inputs_or_symbols: Mapping[str, int] | Sequence[Any] | None = None, *,
                       runtime: str = "inductor", correction: Correction | OrtModel | bool | None = True,
                       ) -> float:
    """Predicted end-to-end latency of one call of ``g`` in milliseconds.

    Args:
        g: the graph the backend runs (after the pass pipeline).
        device: a `DeviceSpec` or a device name.
        inputs_or_symbols: symbol values ({"batch": 4}) or the call's inputs (tensors, arrays,
            or shapes), from which symbols are bound.
        runtime: "onnxruntime" (the CPU backend's ONNX Runtime program, which ships on most
            models here), "inductor" (fused kernels: its AOTI program) or "eager" (one
            dispatch per node: its eager program kind).
        correction: True: the committed learned correction when valid; False: pure roofline.
    """
    if inputs_or_symbols is None:
        symbols: dict[str, int] = {}
    elif isinstance(inputs_or_symbols, Mapping):
        symbols = dict(inputs_or_symbols)
    else:
        symbols = symbols_from_inputs(g, list(inputs_or_symbols))
    return estimate_graph(g, device, symbols, runtime=runtime, correction=correction).total_ms


