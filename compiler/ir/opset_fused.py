"""Ops introduced by Ember's fusion passes: linear/conv with a fused epilogue.

``fused_linear(x, w, b?, residual?)`` and ``fused_conv(x, w, b?, residual?)`` compute::

    y = linear(x, w, b)            | conv(x, w, b) {stride, padding, dilation, groups}
    y = y + residual               if residual == "before_act"
    y = activation(y)
    y = y + residual               if residual == "after_act"

``activation`` is one of `ACTIVATIONS`; its parameters are attributes: ``approximate`` (gelu),
``alpha`` (leaky_relu negative slope, elu alpha), ``min``/``max`` (clamp; relu6 is clamp 0..6).
The residual must have exactly the type of ``y`` (no broadcasting). The references call the
core ops' references, so an unfused graph and its fused form compute the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .ops import REQUIRED, OpDef, OpTypeError, get_op, register_op
from .opset import check_types_equal
from .types import TensorType, is_float

__all__ = ["ACTIVATIONS", "RESIDUAL_MODES", "activation_attrs", "apply_activation"]

# activation name -> the core op that computes it and the fused attrs it reads
ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "none": ("", ()),
    "relu": ("relu", ()),
    "gelu": ("gelu", ("approximate",)),
    "silu": ("silu", ()),
    "sigmoid": ("sigmoid", ()),
    "tanh": ("tanh", ()),
    "hardswish": ("hardswish", ()),
    "hardsigmoid": ("hardsigmoid", ()),
    "mish": ("mish", ()),
    "leaky_relu": ("leaky_relu", ("alpha",)),
    "elu": ("elu", ("alpha",)),
    "clamp": ("clamp", ("min", "max")),
}
RESIDUAL_MODES = ("none", "before_act", "after_act")

_EPILOGUE_ATTRS: dict[str, Any] = {
    "activation": "none",
    "approximate": "none",
    "alpha": None,
    "min": None,
    "max": None,
    "residual": "none",
}


def activation_attrs(act: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attrs of the core op for fused activation ``act``."""
    if act == "gelu":
        return {"approximate": attrs["approximate"]}
    if act == "leaky_relu":
        return {"negative_slope": attrs["alpha"]}
    if act == "elu":
        return {"alpha": attrs["alpha"]}
    if act == "clamp":
        return {"min": attrs["min"], "max": attrs["max"]}
    return {}


def apply_activation(y: torch.Tensor, attrs: Mapping[str, Any]) -> torch.Tensor:
    act = attrs["activation"]
    if act == "none":
        return y
    op = ACTIVATIONS[act][0]
    return get_op(op).reference([y], activation_attrs(act, attrs))


def _check_epilogue(name: str, y: TensorType, types: Sequence[TensorType | None],
                    attrs: Mapping[str, Any]) -> None:
    act = attrs["activation"]
    if act not in ACTIVATIONS:
        raise OpTypeError(f"{name}: unknown activation '{act}'; known: {', '.join(ACTIVATIONS)}")
    if act in ("leaky_relu", "elu") and attrs["alpha"] is None:
        raise OpTypeError(f"{name}: activation '{act}' needs alpha")
    if act != "none" and act not in ("relu", "clamp", "leaky_relu") and not is_float(y.dtype):
        raise OpTypeError(f"{name}: activation '{act}' needs a float output, got {y.dtype}")
    mode = attrs["residual"]
    if mode not in RESIDUAL_MODES:
        raise OpTypeError(f"{name}: residual must be one of {RESIDUAL_MODES}, got '{mode}'")
    res = types[3] if len(types) > 3 else None
    if (res is None) != (mode == "none"):
        raise OpTypeError(f"{name}: residual input and residual='{mode}' disagree")
    if res is not None and not check_types_equal(res, y):
        raise OpTypeError(f"{name}: residual {res} must have the output type {y}")


def _epilogue(y: torch.Tensor, x: Sequence[torch.Tensor | None], attrs: Mapping[str, Any]) -> Any:
    res = x[3] if len(x) > 3 else None
    if attrs["residual"] == "before_act":
        y = y + res
    y = apply_activation(y, attrs)
    if attrs["residual"] == "after_act":
        y = y + res
    return y


def _fused_infer(base: str) -> Any:
    def infer(types: Sequence[TensorType | None], attrs: Mapping[str, Any]) -> list[TensorType]:
        base_attrs = {k: v for k, v in attrs.items() if k not in _EPILOGUE_ATTRS}
        y = get_op(base).infer(list(types[:3]), base_attrs)[0]
        _check_epilogue(f"fused_{base}", y, types, attrs)
        return [y]
    return infer


def _fused_ref(base: str) -> Any:
    def ref(x: Sequence[torch.Tensor | None], attrs: Mapping[str, Any]) -> Any:
        base_attrs = {k: v for k, v in attrs.items() if k not in _EPILOGUE_ATTRS}
        ins = list(x[:3]) + [None] * (3 - len(x[:3]))
        return _epilogue(get_op(base).reference(ins, base_attrs), x, attrs)
    return ref


register_op(OpDef(
    "fused_linear", _fused_infer("linear"), _fused_ref("linear"),
    {**_EPILOGUE_ATTRS, "activation": REQUIRED}, 2, 4,
    doc="act(x @ w.T + b [+ residual]) [+ residual]: linear with a fused epilogue",
    traits=frozenset({"gemm", "linear", "fused"})))
register_op(OpDef(
    "fused_conv", _fused_infer("conv"), _fused_ref("conv"),
    {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **_EPILOGUE_ATTRS,
     "activation": REQUIRED}, 2, 4,
    doc="act(conv(x, w, b) [+ residual]) [+ residual]: convolution with a fused epilogue",
    traits=frozenset({"conv", "fused"})))
