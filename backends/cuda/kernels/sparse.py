"""Sparse-weight GEMMs in Flash-LLM's load-as-sparse, compute-as-dense style.

Decode GEMMs (a few activation rows) are bound by reading the weight, so these kernels read
only the compressed weight from memory, rebuild each dense [BLOCK_N, BLOCK_K] weight tile in
registers, and multiply it with ``tl.dot`` on the tensor cores (the zeros cost FLOPs, not bytes).

- ``nm_gemm_kernel``: N:M weights (2:4) as stored by the sparsify pass: ``values``
  [N, K * NN / MM] and in-block positions ``pos`` (uint8) of the same shape. The dense tile is
  rebuilt by a compare-and-select over the NN slots of each block of MM columns.
- ``bitmap_gemm_kernel``: unstructured weights in a tiled bitmap format (the successor of
  Flash-LLM's Tiled-CSL): one bit per weight in ``bitmap`` [N, ceil(K / 8)] (bit j of byte b is
  column 8b + j), nonzero ``values`` in row-major order (a CSR value array as is), and
  ``tile_start`` [N, cdiv(K, TILE_K)]: the offset of each (row, k-tile) in ``values``. A nonzero's
  slot is its tile start plus the exclusive prefix count of set bits before it in the row tile,
  so a warp reads one contiguous run of values per row tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import apply_act

__all__ = ["nm_gemm_kernel", "bitmap_gemm_kernel"]


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, m_ok, n_ok, bias_ptr, pre_ptr, post_ptr, out_ptr,
                    stride_pre, stride_post, stride_om, p0, p1, HAS_BIAS: tl.constexpr,
                    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, ACT: tl.constexpr):
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
def nm_gemm_kernel(x_ptr, v_ptr, pos_ptr, bias_ptr, pre_ptr, post_ptr, out_ptr, M, N, K,
                   stride_xm, stride_vn, stride_pre, stride_post, stride_om, p0, p1,
                   NN: tl.constexpr, MM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, ACT: tl.constexpr,
                   TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    GK: tl.constexpr = BLOCK_K // MM  # blocks of MM columns per k-tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    g = tl.arange(0, GK)
    s = tl.arange(0, NN)
    j = tl.arange(0, MM)
    n_blocks = K // MM
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        blk = k0 // MM + g  # [GK] block index along K
        col = blk[None, :, None] * NN + s[None, None, :]  # [1, GK, NN] compressed column
        ok = n_ok[:, None, None] & (blk[None, :, None] < n_blocks)
        base = offs_n[:, None, None].to(tl.int64) * stride_vn + col
        vals = tl.load(v_ptr + base, mask=ok, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + base, mask=ok, other=MM).to(tl.int32)
        # rebuild the dense tile: w[n, g, j] = the value whose slot holds position j
        hit = pos[:, :, :, None] == j[None, None, None, :]  # [BN, GK, NN, MM]
        w = tl.sum(tl.where(hit, vals[:, :, :, None], 0.0), axis=2)  # [BN, GK, MM]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if TF32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    _epilogue_store(acc, offs_m, offs_n, m_ok, n_ok, bias_ptr, pre_ptr, post_ptr, out_ptr,
                    stride_pre, stride_post, stride_om, p0, p1, HAS_BIAS, HAS_PRE, HAS_POST, ACT)


@triton.jit
def bitmap_gemm_kernel(x_ptr, bm_ptr, start_ptr, v_ptr, bias_ptr, pre_ptr, post_ptr, out_ptr,
                       M, N, K, stride_xm, stride_bn, stride_tn, stride_pre, stride_post,
                       stride_om, p0, p1, HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr,
                       HAS_POST: tl.constexpr, ACT: tl.constexpr, TF32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_b = tl.arange(0, TILE_K // 8)
    bit = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, TILE_K)):
        k0 = t * TILE_K
        byte_idx = k0 // 8 + offs_b
        byte = tl.load(bm_ptr + offs_n[:, None].to(tl.int64) * stride_bn + byte_idx[None, :],
                       mask=n_ok[:, None] & (byte_idx[None, :] < (K + 7) // 8), other=0)
        bits = (byte.to(tl.int32)[:, :, None] >> bit[None, None, :]) & 1
        bits = tl.reshape(bits, (BLOCK_N, TILE_K))
        slot = tl.cumsum(bits, axis=1) - bits  # exclusive prefix count in the row tile
        start = tl.load(start_ptr + offs_n.to(tl.int64) * stride_tn + t, mask=n_ok, other=0)
        w = tl.load(v_ptr + start[:, None].to(tl.int64) + slot, mask=bits != 0, other=0.0)
        offs_k = k0 + tl.arange(0, TILE_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if TF32:
            acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="tf32")
        else:
            acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    _epilogue_store(acc, offs_m, offs_n, m_ok, n_ok, bias_ptr, pre_ptr, post_ptr, out_ptr,
                    stride_pre, stride_post, stride_om, p0, p1, HAS_BIAS, HAS_PRE, HAS_POST, ACT)
