"""FlashAttention-style attention (online softmax) for reduced token sets.

``out = softmax(q k^T * scale + mask + log(size_k)) v`` over q [B, H, Nq, d] and k, v
[B, Hk, Nk, d] (GQA when Hk divides H), tiled over keys so the [Nq, Nk] logits never leave
registers. Token merging shortens the key set (Nk < Nq or any ragged length); its size bias
(ToMe proportional attention, the log of how many tokens each key stands for) is read from
``size`` [B, Nk] and added to the logits inside the kernel. ``mask`` is additive (float) or
boolean keep-mask (uint8), read through four strides so a broadcast mask costs no copy.
Rows whose keys are all masked produce zeros (not NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["flash_attention_kernel"]


@triton.jit
def flash_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, size_ptr, out_ptr, H, HK, NQ, NK, D,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smq, smk,
                           ssb, sob, soh, son, scale,
                           MASK: tl.constexpr, SIZE_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                           TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """MASK: 0 none, 1 additive float, 2 boolean keep (uint8)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is one instruction
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_end = NK
    if CAUSAL:
        n_end = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        if TF32:
            s = tl.dot(q, tl.trans(k), input_precision="tf32") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        keep = m_ok[:, None] & n_ok[None, :]
        if MASK != 0:
            mp = (mask_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh
                  + offs_m[:, None].to(tl.int64) * smq + offs_n[None, :].to(tl.int64) * smk)
            if MASK == 1:
                s += tl.load(mp, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
            else:
                keep = keep & (tl.load(mp, mask=keep, other=0) != 0)
        if SIZE_BIAS:
            sz = tl.load(size_ptr + b.to(tl.int64) * ssb + offs_n, mask=n_ok, other=1.0)
            s += tl.log2(sz.to(tl.float32))[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        if TF32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
             + offs_m[:, None].to(tl.int64) * son + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
