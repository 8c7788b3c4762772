"""The GEMM epilogue shared by every Ember linear kernel: ``act(acc + pre) + post``.

Activation codes (`ACT_CODES`) are constexprs so each kernel variant compiles only its own
branch; ``p0``/``p1`` carry the activation parameters (leaky-relu/elu alpha, clamp bounds).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACT_CODES", "apply_act"]

# fused-linear activation name -> the constexpr code the kernels branch on
ACT_CODES: dict[str, int] = {
    "none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "sigmoid": 5, "tanh": 6,
    "leaky_relu": 7, "clamp": 8, "hardswish": 9, "hardsigmoid": 10, "elu": 11,
}


@triton.jit
def apply_act(y, ACT: tl.constexpr, p0, p1):
    """Elementwise activation ``ACT`` of fp32 ``y`` (tanh via the sigmoid identity)."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 4:
        y = y * tl.sigmoid(y)
    elif ACT == 5:
        y = tl.sigmoid(y)
    elif ACT == 6:
        y = 2.0 * tl.sigmoid(2.0 * y) - 1.0
    elif ACT == 7:
        y = tl.where(y >= 0.0, y, y * p0)
    elif ACT == 8:
        y = tl.minimum(tl.maximum(y, p0), p1)
    elif ACT == 9:
        y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 10:
        y = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 11:
        y = tl.where(y > 0.0, y, p0 * (tl.exp(y) - 1.0))
    return y
