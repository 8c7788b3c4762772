"""Token-stream gathers and scatters for token merging, selection and unmerging.

- ``gather_rows_kernel``: ``out[b, i, :] = src[b, idx[b, i], :]``; a negative index takes
  ``fallback[b, i, :]`` (token_unmerge of dropped tokens) or row 0 without one (the IR's
  ``clamp_min(0)``). Serves token_select (kept tokens), token_unmerge and size gathers.
- ``pool_scatter_kernel``: the size-weighted pooling of token_merge / fused token_select:
  ``num[b, map[b, i], :] += w[b, i] * x[b, i, :]``, ``den[b, map] += w``, ``cnt[b, map] +=
  size``, skipping tokens with a negative map (atomics: several tokens may merge into one).
  The caller divides ``num / max(den, eps)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["gather_rows_kernel", "pool_scatter_kernel"]


@triton.jit
def gather_rows_kernel(src_ptr, idx_ptr, fb_ptr, out_ptr, N_OUT, D, stride_sb, stride_sn,
                       stride_ib, stride_fb, stride_fn, stride_ob, stride_on,
                       HAS_FALLBACK: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < N_OUT
    idx = tl.load(idx_ptr + b.to(tl.int64) * stride_ib + offs_t, mask=t_ok, other=0)
    dropped = idx < 0
    src_rows = src_ptr + b.to(tl.int64) * stride_sb + tl.maximum(idx, 0).to(tl.int64) * stride_sn
    out_rows = out_ptr + b.to(tl.int64) * stride_ob + offs_t.to(tl.int64) * stride_on
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = t_ok[:, None] & (offs_d[None, :] < D)
        if HAS_FALLBACK:
            v = tl.load(src_rows[:, None] + offs_d[None, :], mask=mask & ~dropped[:, None])
            fb_rows = fb_ptr + b.to(tl.int64) * stride_fb + offs_t.to(tl.int64) * stride_fn
            f = tl.load(fb_rows[:, None] + offs_d[None, :], mask=mask & dropped[:, None])
            v = tl.where(dropped[:, None], f, v)
        else:
            v = tl.load(src_rows[:, None] + offs_d[None, :], mask=mask)
        tl.store(out_rows[:, None] + offs_d[None, :], v, mask=mask)


@triton.jit
def pool_scatter_kernel(x_ptr, w_ptr, size_ptr, map_ptr, num_ptr, den_ptr, cnt_ptr, N, D,
                        N_OUT, stride_xb, stride_xn, stride_wb, stride_sb, stride_mb,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mp = tl.load(map_ptr + b.to(tl.int64) * stride_mb + offs_t, mask=offs_t < N, other=-1)
    ok = (offs_t < N) & (mp >= 0)
    w = tl.load(w_ptr + b.to(tl.int64) * stride_wb + offs_t, mask=ok, other=0.0).to(tl.float32)
    sz = tl.load(size_ptr + b.to(tl.int64) * stride_sb + offs_t, mask=ok, other=0.0)
    dst = b.to(tl.int64) * N_OUT + tl.maximum(mp, 0).to(tl.int64)
    tl.atomic_add(den_ptr + dst, w, mask=ok)
    tl.atomic_add(cnt_ptr + dst, sz.to(tl.float32), mask=ok)
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + offs_t.to(tl.int64) * stride_xn
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(num_ptr + dst[:, None] * D + offs_d[None, :], x * w[:, None], mask=mask)
