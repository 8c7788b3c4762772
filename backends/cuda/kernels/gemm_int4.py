"""Weight-only int4/int8 GEMM and GEMV with group-wise dequantization inside the kernel.

Weights are symmetric codes with one fp32 scale per group of ``GROUP`` input channels. int4
codes are offset by 8 and packed two per uint8, low nibble first (`ember.ir.opset_quant.
pack_bits` layout), so ``w[n, 2j] = (byte & 15) - 8`` and ``w[n, 2j + 1] = (byte >> 4) - 8``.

A k-tile never straddles a group (``GROUP % BLOCK_K == 0``), so the scale is applied once per
tile to the partial product instead of to every weight::

    acc[m, n] += (x[m, tile] @ q[n, tile]^T) * scale[n, group(tile)]

``woq_gemm_kernel`` uses ``tl.dot`` (tensor cores) for prefill-sized M; ``woq_gemv_kernel``
serves decode (M of a few rows): one program per (row, N tile), a multiply-reduce on CUDA cores,
which reads each packed weight byte once per row and wastes no MMA padding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import apply_act

__all__ = ["woq_gemm_kernel", "woq_gemv_kernel"]


@triton.jit
def _load_codes(w_ptr, offs_n, n_ok, k0, K, stride_wn, BITS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed weight codes of one [BLOCK_N, BLOCK_K] tile as fp32."""
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ok = n_ok[:, None] & (offs_b[None, :] < K // 2)
        byte = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :],
                       mask=ok, other=0x88)
        lo = (byte & 15).to(tl.int32) - 8
        hi = (byte >> 4).to(tl.int32) - 8
        q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = n_ok[:, None] & (offs_k[None, :] < K)
        q = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=ok, other=0)
    return q.to(tl.float32)


@triton.jit
def woq_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, pre_ptr, post_ptr, out_ptr, M, N, K,
                    stride_xm, stride_wn, stride_sn, stride_pre, stride_post, stride_om, p0, p1,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, ACT: tl.constexpr,
                    TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        q = _load_codes(w_ptr, offs_n, n_ok, k0, K, stride_wn, BITS, BLOCK_N, BLOCK_K)
        if TF32:
            part = tl.dot(x, tl.trans(q), input_precision="tf32")
        else:
            part = tl.dot(x, tl.trans(q), input_precision="ieee")
        scale = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + k0 // GROUP, mask=n_ok,
                        other=0.0)
        acc += part * scale[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_PRE:
        acc += tl.load(pre_ptr + offs_m[:, None].to(tl.int64) * stride_pre + offs_n[None, :],
                       mask=mask, other=0.0)
    acc = apply_act(acc, ACT, p0, p1)
    if HAS_POST:
        acc += tl.load(post_ptr + offs_m[:, None].to(tl.int64) * stride_post + offs_n[None, :],
                       mask=mask, other=0.0)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def woq_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, pre_ptr, post_ptr, out_ptr, M, N, K,
                    stride_xm, stride_wn, stride_sn, stride_pre, stride_post, stride_om, p0, p1,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        q = _load_codes(w_ptr, offs_n, n_ok, k0, K, stride_wn, BITS, BLOCK_N, BLOCK_K)
        scale = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + k0 // GROUP, mask=n_ok,
                        other=0.0)
        acc += tl.sum(q * x[None, :], axis=1) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_PRE:
        acc += tl.load(pre_ptr + row.to(tl.int64) * stride_pre + offs_n, mask=n_ok, other=0.0)
    acc = apply_act(acc, ACT, p0, p1)
    if HAS_POST:
        acc += tl.load(post_ptr + row.to(tl.int64) * stride_post + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_n,
             acc.to(out_ptr.dtype.element_ty), mask=n_ok)
