"""The op registry: one `OpDef` per op (name, attribute schema, type inference, reference).

The reference is an eager-torch implementation; it is both the interpreter of the reference
backend and the oracle of every test. Op definitions live in `opset.py` (core ops) and in the
modules of passes that introduce ops of their own (registered through `register_op`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import TensorType

__all__ = ["OpDef", "REQUIRED", "register_op", "get_op", "has_op", "all_ops", "OpTypeError"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class OpTypeError(TypeError):
    """Type inference rejected the operand types or attributes of an op."""


InferFn = Callable[[Sequence[TensorType | None], Mapping[str, Any]], list[TensorType]]
RefFn = Callable[[Sequence[torch.Tensor | None], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class OpDef:
    """Definition of one IR op.

    Attributes:
        name: the op name used in the IR.
        infer: (input types, attrs) -> output types; raises `OpTypeError` on bad operands.
        reference: (input tensors, attrs with concrete dims) -> tensor or tuple of tensors.
        attrs: attribute name -> default value (`REQUIRED` when it has none).
        min_inputs / max_inputs: arity; trailing optional inputs may be ``None``.
        elementwise: output element i depends only on input element i (after broadcasting).
        doc: one line for `ember inspect` and the docs.
    """

    name: str
    infer: InferFn
    reference: RefFn
    attrs: Mapping[str, Any] = field(default_factory=dict)
    min_inputs: int = 1
    max_inputs: int = 1
    elementwise: bool = False
    doc: str = ""

    def normalize_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpTypeError(f"op '{self.name}': unknown attribute(s) {sorted(unknown)}")
        out = {}
        for k, default in self.attrs.items():
            if k in attrs:
                out[k] = _freeze(attrs[k])
            elif default is REQUIRED:
                raise OpTypeError(f"op '{self.name}': missing required attribute '{k}'")
            else:
                out[k] = default
        return out

    def check_arity(self, n: int) -> None:
        if not self.min_inputs <= n <= self.max_inputs:
            want = (str(self.min_inputs) if self.min_inputs == self.max_inputs
                    else f"{self.min_inputs}..{self.max_inputs}")
            raise OpTypeError(f"op '{self.name}' takes {want} inputs, got {n}")


def _freeze(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


_REGISTRY: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY and _REGISTRY[opdef.name] is not opdef:
        raise ValueError(f"op '{opdef.name}' registered twice")
    inner = opdef.infer

    def checked_infer(types: Sequence[TensorType | None], attrs: Mapping[str, Any]) -> list:
        opdef.check_arity(len(types))
        return inner(types, attrs)

    opdef = OpDef(opdef.name, checked_infer, opdef.reference, opdef.attrs, opdef.min_inputs,
                  opdef.max_inputs, opdef.elementwise, opdef.doc)
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown IR op '{name}'") from None


def has_op(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


_LOADED = False


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        # core ops, ops the fusion/quantization/token passes introduce, extra (ONNX) ops
        from . import opset, opset_extra, opset_fused, opset_quant, opset_tokens  # noqa: F401
