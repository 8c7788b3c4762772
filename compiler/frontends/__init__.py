"""Frontends: PyTorch (torch.export / FX) and ONNX models into the Ember IR.

`import_model` takes any supported model form (an nn.Module with example inputs, an
ExportedProgram, a ``.pt2`` or ``.onnx`` path, an ``onnx.ModelProto``) to one `Graph`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.errors import FrontendError
from ember.ir import Graph

__all__ = ["import_model"]


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
        from .onnx import import_onnx

        shapes = None
        if isinstance(dynamic_dims, Mapping) and all(isinstance(v, list | tuple)
                                                     for v in dynamic_dims.values()):
            shapes = dynamic_dims
        return import_onnx(model, input_shapes=shapes)
    from . import fx

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
