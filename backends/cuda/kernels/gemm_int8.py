"""W8A8: activation quantization and an int8 tensor-core GEMM with a fused dequant epilogue.

``quantize_rows_kernel`` quantizes fp activations to int8 codes either per token (symmetric,
scale = absmax / 127, written out) or with given (scale, zero point) pointers (the IR's
per-tensor u7 scheme: codes in [0, 127], which an int8 tensor-core MMA reads exactly).

``w8a8_gemm_kernel`` computes, with int32 accumulation on the int8 tensor cores::

    acc[m, n] = sum_k a_q[m, k] * w_q[n, k]
    y[m, n]   = act((acc - zp[m] * w_sum[n]) * a_scale[m] * w_scale[n] + bias[n] + pre[m, n])
                + post[m, n]

``a_scale``/``zp`` are read with a row stride, so a per-tensor scale is a stride-0 vector.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import apply_act

__all__ = ["quantize_rows_kernel", "w8a8_gemm_kernel"]


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, M, K, stride_xm, stride_qm,
                         stride_s, QMIN: tl.constexpr, QMAX: tl.constexpr,
                         DYNAMIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row. DYNAMIC: symmetric per-row scale (written to ``scale_ptr``)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    if DYNAMIC:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / QMAX, 1e-12)
        tl.store(scale_ptr + row * stride_s, scale)
        zp = 0.0
    else:
        scale = tl.load(scale_ptr + row * stride_s)
        zp = tl.load(zp_ptr + row * stride_s).to(tl.float32)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.floor(x * inv + 0.5) + zp
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def w8a8_gemm_kernel(a_ptr, w_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_sum_ptr, bias_ptr,
                     pre_ptr, post_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_s,
                     stride_pre, stride_post, stride_om, p0, p1,
                     HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr,
                     HAS_POST: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each weight column tile in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + offs_m * stride_s, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_ZP:
        zp = tl.load(a_zp_ptr + offs_m * stride_s, mask=m_ok, other=0)
        w_sum = tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
        acc = acc - zp[:, None] * w_sum[None, :]
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_PRE:
        y += tl.load(pre_ptr + offs_m[:, None].to(tl.int64) * stride_pre + offs_n[None, :],
                     mask=mask, other=0.0)
    y = apply_act(y, ACT, p0, p1)
    if HAS_POST:
        y += tl.load(post_ptr + offs_m[:, None].to(tl.int64) * stride_post + offs_n[None, :],
                     mask=mask, other=0.0)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
