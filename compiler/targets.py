"""The compile targets: their names, the cost model's device for each, and what passes read there.

`pass_options` is what the driver and the planner put in ``PassContext.options`` for a target:
the example inputs and, on the CPU target, how its ONNX Runtime program is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TARGETS", "DEVICE_OF_TARGET", "pass_options"]

TARGETS = ("cpu", "cuda", "mobile", "reference")
# the cost model's device for each target (cuda: an H100-class GPU; mobile: a phone big core)
DEVICE_OF_TARGET = {"cpu": "cpu", "reference": "cpu", "cuda": "h100", "mobile": "phone"}


def pass_options(target: str, example: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    """What passes may read from ``ctx.options``: the compile's example inputs and, for the
    CPU target, how its ONNX Runtime program is built (passes that time their rewrite in ORT
    must build sessions the same way)."""
    opts: dict[str, Any] = {"example_inputs": list(example) if example is not None else None}
    if target == "cpu":
        try:
            from ember.backends.cpu.ort_tuning import disabled_optimizers, export_choices
        except ImportError:
            return opts
        threads = torch.get_num_threads()
        opts["ort_export"] = {**export_choices(threads),
                              "disabled_optimizers": disabled_optimizers(threads)}
    return opts
