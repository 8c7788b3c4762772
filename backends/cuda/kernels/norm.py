"""Fused residual add + LayerNorm / RMSNorm over the last dim, one row per program.

``h = x + residual`` (optional, written out when the residual stream is used again), then
``y = norm(h) * weight + bias`` with fp32 statistics. Rows loop over ``BLOCK_D`` chunks: mean,
variance around the mean, normalize (RMSNorm skips the variance pass); re-reads hit L1/L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["add_norm_kernel"]


@triton.jit
def add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, y_ptr, D, stride_x, stride_r, stride_h,
                    stride_y, eps, HAS_RES: tl.constexpr, STORE_H: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
            if STORE_H:
                tl.store(h_ptr + row * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=ok)
        if RMS:
            acc += h * h
        else:
            acc += h
    if RMS:
        mean = 0.0
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
    else:
        # a second pass around the mean: E[x^2] - mean^2 cancels on residual streams
        mean = tl.sum(acc, axis=0) / D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            ok = offs < D
            h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
            acc += tl.where(ok, (h - mean) * (h - mean), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_W:
            y *= tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            y += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
