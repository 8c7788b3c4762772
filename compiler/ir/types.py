"""Tensor types: a dtype name and a shape of `Dim`s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .shapes import Dim, dim_from_json, dim_to_json, is_static, simplify

__all__ = ["DTYPES", "TensorType", "to_torch_dtype", "from_torch_dtype", "is_float"]

# Ember dtype name -> torch dtype. Names follow numpy/torch spelling.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_FROM_TORCH = {v: k for k, v in DTYPES.items()}


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; known: {', '.join(DTYPES)}") from None


def from_torch_dtype(dt: torch.dtype) -> str:
    try:
        return _FROM_TORCH[dt]
    except KeyError:
        raise ValueError(f"dtype {dt} is not supported by Ember") from None


def is_float(dtype: str) -> bool:
    return dtype in ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True, slots=True)
class TensorType:
    """The static type of a value: dtype name and shape (ints or sympy expressions)."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}'")
        object.__setattr__(self, "shape", tuple(simplify(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(is_static(d) for d in self.shape)

    def with_shape(self, shape: Sequence[Dim]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": [dim_to_json(d) for d in self.shape]}

    @staticmethod
    def from_json(d: dict, where: str = "type") -> TensorType:
        """Raises ValueError (ShapeError for dims) naming ``where`` on a malformed type."""
        if not isinstance(d, dict) or not isinstance(d.get("dtype"), str) \
                or not isinstance(d.get("shape"), list):
            raise ValueError(f"{where}: a type needs a 'dtype' string and a 'shape' list")
        if d["dtype"] not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {d['dtype'][:40]!r}")
        return TensorType(d["dtype"], tuple(dim_from_json(x, f"{where} dim {i}")
                                            for i, x in enumerate(d["shape"])))
