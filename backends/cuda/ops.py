"""Torch-facing launchers of Ember's Triton kernels: shapes, block sizes, grids, epilogues.

Each function takes and returns torch tensors (CUDA tensors on a GPU, CPU tensors under
``TRITON_INTERPRET=1``) and never synchronizes with the host, so a graph of them can be
captured. Block sizes depend on static weight dims and on a bucket of the row count M; while
launches are being recorded (`launch.record_launches`) every bucket a symbolic M could take is
recorded, so the ahead-of-time build covers decode and prefill shapes alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from .kernels.epilogue import ACT_CODES
from .launch import _RECORDER, launch

__all__ = [
    "act_params", "quantize_rows", "w8a8_linear", "u7_qparams", "woq_linear", "nm_linear",
    "bitmap_from_triplets", "bitmap_linear", "gather_rows", "pool_tokens", "add_norm",
    "flash_attention", "M_BUCKETS",
]

log = logging.getLogger(__name__)

M_BUCKETS = (16, 64)   # BLOCK_M of the decode and the prefill configuration
GEMV_MAX_M = 4         # woq: rows at or below this use the GEMV kernel


def _recording() -> bool:
    return _RECORDER.get() is not None


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def _block_ms(m: int) -> list[int]:
    """BLOCK_M for M rows; all buckets while recording (M may be symbolic)."""
    if _recording():
        return list(M_BUCKETS)
    return [M_BUCKETS[0] if m <= M_BUCKETS[0] else M_BUCKETS[1]]


def act_params(attrs: Mapping[str, Any]) -> tuple[int, float, float] | None:
    """(ACT code, p0, p1) of a fused-linear epilogue, or None when no kernel has it."""
    act = attrs.get("activation", "none")
    if act == "gelu" and attrs.get("approximate", "none") == "tanh":
        act = "gelu_tanh"
    if act not in ACT_CODES:
        return None
    if act == "clamp":
        lo, hi = attrs.get("min"), attrs.get("max")
        return ACT_CODES[act], -math.inf if lo is None else float(lo), \
            math.inf if hi is None else float(hi)
    if act in ("leaky_relu", "elu"):
        return ACT_CODES[act], float(attrs["alpha"]), 0.0
    return ACT_CODES[act], 0.0, 0.0


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[..., n] -> contiguous [M, n] (None stays None)."""
    return None if t is None else t.reshape(-1, n).contiguous()


def _epilogue_args(out: torch.Tensor, bias: torch.Tensor | None, pre: torch.Tensor | None,
                   post: torch.Tensor | None) -> tuple[list[Any], dict[str, bool]]:
    """Pointers (absent ones alias ``out``, never read) and their HAS_* flags."""
    flags = {"HAS_BIAS": bias is not None, "HAS_PRE": pre is not None,
             "HAS_POST": post is not None}
    ptrs = [out if bias is None else bias.contiguous(), out if pre is None else pre,
            out if post is None else post]
    return ptrs, flags


# ----------------------------------------------------------------------------- W8A8
def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None = None,
                  zp: torch.Tensor | None = None, qmin: int = -127,
                  qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of 2-D ``x``: per-row symmetric (scale None) or with given per-row or
    per-tensor (1-element) scale/zero point. Returns (codes [M, K], scales [M] or [1])."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    dynamic = scale is None
    if dynamic:
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        zp = scale  # unused
    assert zp is not None
    stride_s = 0 if scale.numel() == 1 and m != 1 else 1
    launch("quantize_rows_kernel", (m,),
           [x, q, scale, zp, m, k, x.stride(0), q.stride(0), stride_s],
           {"QMIN": qmin, "QMAX": qmax, "DYNAMIC": dynamic,
            "BLOCK_K": _pow2(k, 16, 1024)})
    return q, scale


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, pre: torch.Tensor | None = None,
                post: torch.Tensor | None = None, act: tuple[int, float, float] = (0, 0., 0.),
                a_scale: torch.Tensor | None = None, a_zp: torch.Tensor | None = None,
                w_sum: torch.Tensor | None = None) -> torch.Tensor:
    """y = act(dequant(q(x) @ w_q^T) + bias + pre) + post with int8 x int8 -> int32 MMAs.

    Without ``a_scale``, activations are quantized per token (symmetric int8). With a 1-element
    ``a_scale``/``a_zp`` (the IR's per-tensor u7 scheme), codes lie in [0, 127] and the zero
    point is removed in the epilogue through ``w_sum`` (row sums of ``w_q``).
    """
    n, k = w_q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if a_scale is None:
        a_q, a_s = quantize_rows(x2)
        has_zp = False
        zp_t = a_s
    else:
        assert a_zp is not None
        a_q, a_s = quantize_rows(x2, a_scale, a_zp, qmin=0, qmax=127)
        has_zp = True
        zp_t = a_zp.to(torch.int32)
    if w_sum is None:
        w_sum = w_q.to(torch.int32).sum(1, dtype=torch.int32)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    ptrs, flags = _epilogue_args(out, bias, _rows(pre, n), _rows(post, n))
    stride_s = 0 if a_s.numel() == 1 and m != 1 else 1
    for bm in _block_ms(m):
        bn, bk = 64, 64
        grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
        launch("w8a8_gemm_kernel", grid,
               [a_q, w_q, a_s, zp_t, w_scale, w_sum, *ptrs, out, m, n, k, a_q.stride(0),
                w_q.stride(0), stride_s, n, n, out.stride(0), float(act[1]), float(act[2])],
               {"HAS_ZP": has_zp, **flags, "ACT": act[0], "BLOCK_M": bm, "BLOCK_N": bn,
                "BLOCK_K": bk, "GROUP_M": 8}, num_warps=4, num_stages=3)
    return out.reshape(*lead, n)


def u7_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (scale, zero point) for u7 codes [0, 127], on the device (no host sync).

    The range is widened to include 0 and the zero point rounded and clamped, as fbgemm's
    ChooseQuantizationParams does (`ember.ir.opset_quant.choose_u7_qparams`).
    """
    lo = torch.clamp(x.min(), max=0.0).float()
    hi = torch.clamp(x.max(), min=0.0).float()
    scale = (hi - lo) / 127.0
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 0.1))
    zp = torch.clamp(torch.round(-lo / scale), 0, 127).to(torch.int32)
    return scale.reshape(1), zp.reshape(1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- weight-only
def woq_linear(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, bits: int,
               group: int, bias: torch.Tensor | None = None, *, pre: torch.Tensor | None = None,
               post: torch.Tensor | None = None, act: tuple[int, float, float] = (0, 0., 0.),
               tf32: bool = False) -> torch.Tensor:
    """Weight-only int4 (packed) / int8 linear with group-wise scales dequantized in-kernel."""
    n = w_q.shape[0]
    k = w_q.shape[1] * (2 if bits == 4 else 1)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    ptrs, flags = _epilogue_args(out, bias, _rows(pre, n), _rows(post, n))
    bk = min(group, 64)
    common = [x2, w_q, scales, *ptrs, out, m, n, k, x2.stride(0), w_q.stride(0),
              scales.stride(0), n, n, out.stride(0), float(act[1]), float(act[2])]
    cst = {"BITS": bits, "GROUP": group, **flags, "ACT": act[0]}
    if m <= GEMV_MAX_M or _recording():
        bn = 64
        launch("woq_gemv_kernel", (m, triton_cdiv(n, bn)), common,
               {**cst, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=2)
    if m > GEMV_MAX_M or _recording():
        for bm in _block_ms(m):
            bn = 64
            launch("woq_gemm_kernel", (triton_cdiv(m, bm), triton_cdiv(n, bn)), common,
                   {**cst, "TF32": tf32, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                   num_warps=4, num_stages=3)
    return out.reshape(*lead, n)


# ----------------------------------------------------------------------------- sparse
def nm_linear(x: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, nn_: int, mm: int,
              k: int, bias: torch.Tensor | None = None, *, pre: torch.Tensor | None = None,
              post: torch.Tensor | None = None, act: tuple[int, float, float] = (0, 0., 0.),
              tf32: bool = False) -> torch.Tensor:
    """N:M sparse linear (values/positions as the sparsify pass stores them)."""
    n = values.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    ptrs, flags = _epilogue_args(out, bias, _rows(pre, n), _rows(post, n))
    for bm in _block_ms(m):
        bn, bk = 32, 64
        launch("nm_gemm_kernel", (triton_cdiv(m, bm), triton_cdiv(n, bn)),
               [x2, values, pos, *ptrs, out, m, n, k, x2.stride(0), values.stride(0), n, n,
                out.stride(0), float(act[1]), float(act[2])],
               {"NN": nn_, "MM": mm, **flags, "ACT": act[0], "TF32": tf32, "BLOCK_M": bm,
                "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3)
    return out.reshape(*lead, n)


TILE_K = 64  # k-tile of the bitmap format (part of the stored layout)


def bitmap_from_triplets(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                         shape: tuple[int, int],
                         tile_k: int = TILE_K) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(bitmap uint8 [N, ceil(K/8)], tile_start int32 [N, cdiv(K, tile_k)], values) of a
    sparse weight given by nonzero coordinates (any order; duplicates are not allowed)."""
    n, k = shape
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    order = torch.argsort(rows * k + cols)
    rows, cols, vals = rows[order], cols[order], vals[order].contiguous()
    kb = -(-k // 8)
    bits = torch.zeros(n, kb * 8, dtype=torch.int64)
    bits[rows, cols] = 1
    bitmap = (bits.reshape(n, kb, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    kt = -(-k // tile_k)
    counts = torch.zeros(n, kt, dtype=torch.int64)
    counts.index_put_((rows, cols // tile_k), torch.ones_like(rows), accumulate=True)
    per_row = counts.sum(1)
    row_start = torch.cumsum(per_row, 0) - per_row
    start = row_start[:, None] + torch.cumsum(counts, 1) - counts
    if vals.numel() >= 2**31:
        raise ValueError("bitmap format: more than 2**31 nonzeros")
    return bitmap.contiguous(), start.to(torch.int32).contiguous(), vals


def bitmap_linear(x: torch.Tensor, bitmap: torch.Tensor, tile_start: torch.Tensor,
                  values: torch.Tensor, k: int, bias: torch.Tensor | None = None, *,
                  pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
                  act: tuple[int, float, float] = (0, 0., 0.),
                  tf32: bool = False) -> torch.Tensor:
    """Unstructured sparse linear from the tiled bitmap format (`bitmap_from_triplets`)."""
    n = bitmap.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    ptrs, flags = _epilogue_args(out, bias, _rows(pre, n), _rows(post, n))
    vals = values if values.numel() else torch.zeros(1, dtype=values.dtype, device=x.device)
    for bm in _block_ms(m):
        bn = 32
        launch("bitmap_gemm_kernel", (triton_cdiv(m, bm), triton_cdiv(n, bn)),
               [x2, bitmap, tile_start, vals, *ptrs, out, m, n, k, x2.stride(0),
                bitmap.stride(0), tile_start.stride(0), n, n, out.stride(0), float(act[1]),
                float(act[2])],
               {**flags, "ACT": act[0], "TF32": tf32, "BLOCK_M": bm, "BLOCK_N": bn,
                "TILE_K": TILE_K}, num_warps=4, num_stages=3)
    return out.reshape(*lead, n)


# ----------------------------------------------------------------------------- tokens
def gather_rows(src: torch.Tensor, idx: torch.Tensor,
                fallback: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, i] = src[b, idx[b, i]] ([B, N, D] x int64 [B, K]); idx < 0 takes fallback[b, i]
    (or row 0 without one)."""
    b = idx.shape[0]
    d = src.shape[-1]
    src = src.expand(b, *src.shape[1:]) if src.shape[0] != b else src
    if src.stride(-1) != 1:
        src = src.contiguous()
    idx = idx.contiguous()
    k = idx.shape[1]
    out = torch.empty((b, k, d), dtype=src.dtype, device=src.device)
    fb = out if fallback is None else fallback.expand(b, k, d).contiguous()
    bt, bd = 16, _pow2(d, 16, 128)
    launch("gather_rows_kernel", (b, triton_cdiv(k, bt)),
           [src, idx, fb, out, k, d, src.stride(0), src.stride(1), idx.stride(0),
            fb.stride(0), fb.stride(1), out.stride(0), out.stride(1)],
           {"HAS_FALLBACK": fallback is not None, "BLOCK_T": bt, "BLOCK_D": bd},
           num_warps=4, num_stages=1)
    return out


def pool_tokens(x: torch.Tensor, w: torch.Tensor, size: torch.Tensor, mp: torch.Tensor,
                n_out: int, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens mapped to each output position and the summed
    sizes: ``(sum w x / max(sum w, eps), sum size)`` per (b, map) (tokens with map < 0
    are skipped)."""
    b, n, d = x.shape
    xc = x.contiguous()
    w2 = w.reshape(b, n).contiguous()
    s2 = size.reshape(b, n).contiguous()
    mp = mp.contiguous()
    num = torch.zeros((b, n_out, d), dtype=torch.float32, device=x.device)
    den = torch.zeros((b, n_out), dtype=torch.float32, device=x.device)
    cnt = torch.zeros((b, n_out), dtype=torch.float32, device=x.device)
    bt, bd = 16, _pow2(d, 16, 128)
    launch("pool_scatter_kernel", (b, triton_cdiv(n, bt)),
           [xc, w2, s2, mp, num, den, cnt, n, d, n_out, xc.stride(0), xc.stride(1),
            w2.stride(0), s2.stride(0), mp.stride(0)],
           {"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=4, num_stages=1)
    y = (num / den.clamp_min(eps).unsqueeze(-1)).to(x.dtype)
    return y, cnt.unsqueeze(-1).to(size.dtype)


# ----------------------------------------------------------------------------- norms
def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, rms: bool,
             store_h: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h = x + residual or None, norm(h) * weight + bias) over the last dim."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if (r2 is not None and store_h) else None
    launch("add_norm_kernel", (m,),
           [x2, y if r2 is None else r2, y if weight is None else weight.contiguous(),
            y if bias is None else bias.contiguous(), y if h is None else h, y, d,
            x2.stride(0), d, d, d, float(eps)],
           {"HAS_RES": r2 is not None, "STORE_H": h is not None, "HAS_W": weight is not None,
            "HAS_B": bias is not None, "RMS": rms, "BLOCK_D": _pow2(d, 16, 1024)},
           num_warps=4 if d <= 2048 else 8, num_stages=1)
    return (None if h is None else h.reshape(x.shape)), y.reshape(x.shape)


# ----------------------------------------------------------------------------- attention
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None, size: torch.Tensor | None = None,
                    scale: float | None = None, is_causal: bool = False,
                    tf32: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask + log(size)) v for q [B, H, Nq, d], k/v [B, Hk, Nk, d].

    ``mask`` broadcasts to [B, H, Nq, Nk] (float: additive; bool: keep); ``size`` [B, Nk]
    (or [B, Nk, 1]) is the ToMe token size whose log biases each key.
    """
    bsz, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"flash_attention: {h} query heads not a multiple of {hk} kv heads")
    bq = q.shape[0]
    k = k.expand(bq, *k.shape[1:]) if k.shape[0] != bq else k
    v = v.expand(bq, *v.shape[1:]) if v.shape[0] != bq else v
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((bsz, h, nq, v.shape[-1]), dtype=q.dtype, device=q.device)
    mode = 0
    mk = out
    ms = (0, 0, 0, 0)
    if mask is not None:
        mode = 2 if mask.dtype == torch.bool else 1
        mk = mask.view(torch.uint8) if mode == 2 else mask
        while mk.dim() < 4:
            mk = mk.unsqueeze(0)
        mk = mk.expand(bsz, h, nq, nk)
        ms = tuple(int(s) for s in mk.stride())
    sz = out
    ssb = 0
    if size is not None:
        sz = size.reshape(size.shape[0], nk).expand(bsz, nk)
        if sz.stride(-1) != 1:
            sz = sz.contiguous()
        ssb = sz.stride(0)
    if scale is None:
        scale = d ** -0.5
    bd = _pow2(max(d, v.shape[-1]), 16, 256)
    bm = 16 if nq <= 16 else 64
    bn = 32 if bd > 64 else 64
    for bm_ in ([16, 64] if _recording() else [bm]):
        launch("flash_attention_kernel", (triton_cdiv(nq, bm_), bsz * h),
               [q, k, v, mk, sz, out, h, hk, nq, nk, d, q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                *ms, ssb, out.stride(0), out.stride(1), out.stride(2), float(scale)],
               {"MASK": mode, "SIZE_BIAS": size is not None, "CAUSAL": bool(is_causal),
                "TF32": tf32, "BLOCK_M": bm_, "BLOCK_N": bn, "BLOCK_D": bd},
               num_warps=4, num_stages=2)
    return out
