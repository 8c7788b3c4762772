"""The compile targets: their names, the cost model's device for each, and what passes read there.

`pass_context_fields` is what the driver and the planner put in a `PassContext` for a target:
the example inputs and, on the CPU target, the gate through which passes time their rewrites in
the ONNX Runtime program the backend ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TARGETS", "DEVICE_OF_TARGET", "pass_context_fields"]

TARGETS = ("cpu", "cuda", "mobile", "reference")
# the cost model's device for each target (cuda: an H100-class GPU; mobile: a phone big core)
DEVICE_OF_TARGET = {"cpu": "cpu", "reference": "cpu", "cuda": "h100", "mobile": "phone"}


def pass_context_fields(target: str, example: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    """The `PassContext` fields the driver and the planner fill: the compile's example inputs
    and the target's gate (for the CPU target with onnxruntime, `ember.backends.cpu.gate.CpuGate`,
    built with the ONNX Runtime program's export choices so passes time layers as it runs
    them)."""
    gate = None
    if target == "cpu":
        from ember.backends.cpu.gate import cpu_gate

        gate = cpu_gate()
    return {"example_inputs": list(example) if example is not None else None, "gate": gate}
