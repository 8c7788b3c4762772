"""The op registry: one `OpDef` per op (name, attribute schema, type inference, reference).

The reference is an eager-torch implementation; it is both what the graph evaluator
(`ember.ir.interpret`) runs and the oracle of every test. Each op declares its traits (the op
groups passes and cost models query, as tinygrad's ``GroupOp``): `ops_with` / `has_trait`.
The op definitions live in the opset modules (`opset.py`, `opset_extra.py`, `opset_fused.py`,
`opset_quant.py`, `opset_tokens.py`), which register themselves through `register_op`;
importing `ember.ir` imports them all. This module imports none of them.

Traits (an op may have several):

=================  ============================================================================
``elementwise``    output element i depends only on input element i (after broadcasting)
``movement``       a view of its input (reshape, permute, expand, select, slice): no compute
``gemm``           a matrix product (linear, matmul, einsum and their fused/quantized forms)
``linear``         ``y = x @ W^T (+ b)`` with the weight as operand 1 (float or packed)
``conv``           a convolution (grouped, transposed or fused)
``fused``          a float linear/conv with a fused epilogue (activation, residual operand 3)
``quantized``      a linear over a compressed weight (int8/int4/LUT/2:4 sparse/bf16)
``attention``      attention or its scores
``norm``           a normalization over features (layer, RMS, group, batch)
``reduction``      reduces axes (sum, mean, softmax, pools, top-k, ...)
``pool``           a spatial pooling window
``gather``         reads elements by index (embedding, gather, scatter, one-hot)
``lookup``         reads only the indexed rows/elements of operand 0, not all of it
``data``           builds or rearranges data without arithmetic (concat, pad, full, ...)
``generator``      builds its output from attributes alone (full, arange)
``token``          an op of the token passes (reads or changes the token axis of a stream)
``token_reduction``  shortens the token axis (token_merge, token_select)
``order_compare``  an ordering comparison (lt, le, gt, ge)
=================  ============================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import TensorType

__all__ = ["OpDef", "REQUIRED", "register_op", "get_op", "has_op", "all_ops", "OpTypeError",
           "TRAITS", "ops_with", "has_trait"]


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
        traits: the op groups it belongs to (`TRAITS`; see the module docstring).
        doc: one line for `ember inspect` and the docs.
    """

    name: str
    infer: InferFn
    reference: RefFn
    attrs: Mapping[str, Any] = field(default_factory=dict)
    min_inputs: int = 1
    max_inputs: int = 1
    traits: frozenset[str] = frozenset()
    doc: str = ""

    @property
    def elementwise(self) -> bool:
        """Output element i depends only on input element i (after broadcasting)."""
        return "elementwise" in self.traits

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


TRAITS = frozenset({
    "elementwise", "movement", "gemm", "linear", "conv", "fused", "quantized", "attention",
    "norm", "reduction", "pool", "gather", "lookup", "data", "generator", "token",
    "token_reduction", "order_compare", "cache", "stateful",
})

_REGISTRY: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY and _REGISTRY[opdef.name] is not opdef:
        raise ValueError(f"op '{opdef.name}' registered twice")
    unknown = set(opdef.traits) - TRAITS
    if unknown:
        raise ValueError(f"op '{opdef.name}': unknown trait(s) {sorted(unknown)}")
    inner = opdef.infer

    def checked_infer(types: Sequence[TensorType | None], attrs: Mapping[str, Any]) -> list:
        opdef.check_arity(len(types))
        return inner(types, attrs)

    opdef = OpDef(opdef.name, checked_infer, opdef.reference, opdef.attrs, opdef.min_inputs,
                  opdef.max_inputs, frozenset(opdef.traits), opdef.doc)
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown IR op '{name}'") from None


def has_op(name: str) -> bool:
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


def has_trait(op: str, trait: str) -> bool:
    """Whether op ``op`` has ``trait`` (False for an op that is not registered)."""
    if trait not in TRAITS:
        raise ValueError(f"unknown trait '{trait}'")
    d = _REGISTRY.get(op)
    return d is not None and trait in d.traits


def ops_with(*traits: str) -> frozenset[str]:
    """The names of the registered ops having any of ``traits``."""
    unknown = set(traits) - TRAITS
    if unknown:
        raise ValueError(f"unknown trait(s) {sorted(unknown)}")
    return frozenset(name for name, d in _REGISTRY.items() if not d.traits.isdisjoint(traits))
