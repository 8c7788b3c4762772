"""The CPU backend's IR -> ONNX / ONNX Runtime lowering.

`registry` holds the per-op emitter table; `emit` the exporter and the standard ONNX emitters
(`export_onnx`, also behind ``ember compile --emit onnx``); `fusions` the exporter's fusion
stage (SkipLayerNormalization, HardSigmoid); `attention`, `quant` and `tokens` the emitters of
the fused-attention, quantization/sparsity and token ops (ONNX Runtime contrib ops where they
are faster), registered per IR op name; `session` opens ONNX Runtime sessions the one way Ember
times and ships them. Importing this package registers every emitter once.
"""

from __future__ import annotations

from . import attention, quant, tokens  # noqa: F401  (register their emitters)
from .emit import (
    EMBER_DOMAIN,
    PARAMS_LOCATION,
    ExportReport,
    checkable,
    detach_params,
    detached_param_names,
    export_onnx,
)

__all__ = ["export_onnx", "checkable", "ExportReport", "EMBER_DOMAIN", "PARAMS_LOCATION",
           "detach_params", "detached_param_names"]
