"""Ops introduced by the quantization and sparsity passes.

Every op is a linear layer ``y = x @ W.T + b`` whose weight ``W`` is stored compressed, followed
by the same epilogue as ``fused_linear`` (optional residual before/after an activation)::

    qlinear_dynamic(x, w_q, w_scale, b?, residual?, outlier_idx?, w_outlier?)
        int8 weights (per output channel, symmetric), activations quantized per call:
        per tensor, asymmetric, 7-bit (u7: [0, 127]; the fbgemm "reduce_range" scheme, whose
        u8 x s8 pair products cannot saturate int16 on AVX2), int32 accumulation, fp32 dequant.
        ``act_quant="token"``: one symmetric scale per row instead (|x|max / 63, codes -63..63
        stored as u7 with zero point 64: the form ONNX Runtime runs as QuantizeLinear +
        MatMulIntegerToFloat without int16 saturation on AVX2).
        ``act_quant="tensor_u8"``: one asymmetric full-range u8 scale per tensor, exactly ONNX's
        DynamicQuantizeLinear (the form ONNX Runtime fuses into one DynamicQuantizeMatMul
        kernel; exact only where the CPU's u8 x s8 dot products do not saturate: VNNI / AMX).
        ``outlier_idx`` lists input channels computed in fp32 instead (``w_outlier`` [N, k]):
        their activations are zeroed before quantization and added back exactly.
    qlinear_static(x, w_q, w_scale, b?, residual?, outlier_idx?, w_outlier?)
        as above with a calibrated (x_scale, x_zp)
    linear_woq(x, w_q, w_scale, b?, residual?)        weight-only int8 / int4 (packed 2 per
        uint8), symmetric, one scale per group of ``group_size`` input channels; fp32 compute.
        ``act_quant="block"`` (int4 only): the activations are rounded too, per row and per
        group of ``group_size`` input channels, to symmetric int8 (|x|max / 127, half to even:
        ONNX Runtime's MatMulNBits at accuracy level 4, whose int8 kernels then run the
        product)
    lut_linear(x, codes, coef, b?, residual?)         non-uniform ``bits``-bit weights: per group
        a hierarchical linear codebook (ELUTQ HLQ) ``level(c) = coef0 + sum_i coef_i * s_i(c)``
        with ``s_i(c) = +1 if bit i of c else -1``; codes bit-packed into uint8
    sparse_linear(x, values, indices, b?, residual?)  pruned weights in compressed storage:
        ``format="nm"``: N:M (e.g. 2:4) values [O, I*n/m] + in-block positions (uint8);
        ``format="block"``: nonzero blocks values [nb, bh, bw] + block coordinates (int32);
        ``format="csr"``: unstructured values + (crow, col) in ``indices`` (int32, one row)
    linear_bf16(x, w_bf16, b?, residual?)             bf16 operands, fp32 result

The quantized GEMMs call fbgemm (``quantized::linear_dynamic`` / ``linear_with_input_q_dq_
qweight_dq_output_fp32``) through the custom ops ``ember::qgemm_dynamic`` and
``ember::qgemm_static``; they accumulate in int32 exactly, so the references *are* the fast
kernels, and tests compare them with naive fake-quant code. The custom ops trace through
``torch.export`` and run inside AOTInductor programs (proxy executor). Packed fbgemm weights are
cached per weight tensor (keyed by storage address, shape and a fingerprint of the scales).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .ops import REQUIRED, OpDef, OpTypeError, register_op
from .opset_fused import ACTIVATIONS, RESIDUAL_MODES, apply_activation
from .shapes import dims_equal
from .types import TensorType, is_float

__all__ = [
    "EPILOGUE_ATTRS",
    "U7_QMAX",
    "choose_u7_qparams",
    "quantize_weight_per_channel",
    "quantize_weight_groups",
    "dequantize_weight_groups",
    "fake_quant_act_blocks",
    "WOQ_ACT_QUANT",
    "matmulnbits_level",
    "pack_bits",
    "unpack_bits",
    "hlq_levels",
    "fit_hlq",
    "decode_sparse",
    "qgemm_dynamic",
    "qgemm_static",
    "qgemm_token",
    "qgemm_u8",
    "u8_qparams",
    "token_u7_scale",
    "spmm_linear",
    "encode_sparse",
]

U7_QMAX = 127  # 7-bit unsigned activations (reduce_range): exact int16 pair sums on AVX2
TOKEN_QMAX = 63  # act_quant="token": symmetric codes -63..63 stored as u7 with zero point 64
TOKEN_ZP = 64
TOKEN_MIN_SCALE = 1e-12
U8_QMAX = 255  # act_quant="tensor_u8": ONNX DynamicQuantizeLinear codes
ACT_QUANT_MODES = ("tensor", "token", "tensor_u8")

EPILOGUE_ATTRS: dict[str, Any] = {
    "activation": "none",
    "approximate": "none",
    "alpha": None,
    "min": None,
    "max": None,
    "residual": "none",
}

Types = Sequence[TensorType | None]
Attrs = Mapping[str, Any]


# ----------------------------------------------------------------------------- fbgemm kernels
_PACK_LOCK = threading.Lock()
_PACKED: OrderedDict[tuple, Any] = OrderedDict()
_PACK_CAP = 4096


def _pack_key(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    # the address alone could be reused by another weight after a free: add a fingerprint
    fp = (float(w_scale.double().sum()), int(w_q.view(-1)[:: max(1, w_q.numel() // 64)]
                                             .to(torch.int64).sum()))
    bkey = None if bias is None else (bias.data_ptr(), float(bias.double().sum()))
    return (w_q.data_ptr(), tuple(w_q.shape), w_scale.data_ptr(), fp, bkey)


def _packed(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """fbgemm-packed weight (x86 qengine) for int8 ``w_q`` [N, K] with per-row scales."""
    key = _pack_key(w_q, w_scale, bias)
    with _PACK_LOCK:
        p = _PACKED.get(key)
        if p is not None:
            _PACKED.move_to_end(key)
            return p
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86"
    n = w_q.shape[0]
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm packing is not
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            w_q.contiguous(), w_scale.double(), torch.zeros(n, dtype=torch.long), 0)
        p = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())
    with _PACK_LOCK:
        _PACKED[key] = p
        while len(_PACKED) > _PACK_CAP:
            _PACKED.popitem(last=False)
    return p


@torch.library.custom_op("ember::qgemm_dynamic", mutates_args=())
def qgemm_dynamic(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x [..., K] -> per-tensor u7 dynamic quant -> int8 GEMM (int32 acc) -> fp32 [..., N]."""
    p = _packed(w_q, w_scale, bias)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.quantized.linear_dynamic(x2, p, True)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


@qgemm_dynamic.register_fake
def _(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op("ember::qgemm_static", mutates_args=())
def qgemm_static(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, x_scale: float, x_zp: int) -> torch.Tensor:
    """fp32 x -> u7 quant with a fixed (scale, zero point) -> int8 GEMM -> fp32.

    The fbgemm op quantizes to the full u8 range, whose u8 x s8 pair sums can saturate int16 on
    AVX2; clamping x to the u7 range first keeps every code in [0, 127] and the GEMM exact.
    """
    p = _packed(w_q, w_scale, bias)
    lo, hi = (0 - x_zp) * x_scale, (U7_QMAX - x_zp) * x_scale
    x2 = torch.clamp(x.reshape(-1, x.shape[-1]), lo, hi).contiguous()
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, x_scale, x_zp, p)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


@qgemm_static.register_fake
def _(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
      x_scale: float, x_zp: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


# ----------------------------------------------------------------------------- quant helpers
def choose_u7_qparams(xmin: float, xmax: float) -> tuple[float, int]:
    """(scale, zero point) of fbgemm's ChooseQuantizationParams for range [xmin, xmax] -> u7."""
    t = torch.tensor([min(xmin, 0.0), max(xmax, 0.0)], dtype=torch.float32)
    scale, zp = torch._choose_qparams_per_tensor(t, True)
    return float(scale), int(zp)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (w_q int8 [N, K], scale fp32 [N]), levels -127..127."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


# clip="mse": the group scale's shrink factors tried (|w|max x f / qmax, f = 1 .. 0.5)
CLIP_FACTORS = tuple(1.0 - 0.025 * i for i in range(21))


def quantize_weight_groups(w: torch.Tensor, bits: int, group_size: int,
                           clip: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit (8 or 4) weights, one scale per group of input channels.

    ``clip="none"``: scale = |w|max / qmax (round to nearest, nothing clipped). ``clip="mse"``:
    per group the scale |w|max x f / qmax (f in `CLIP_FACTORS`) with the least squared error of
    the group's dequantized weights: clipping the few largest weights buys a finer grid for
    the rest (SmolLM2-135M's linears at int4 g32: perplexity 47.9 -> 45.7, fp32 36.7).

    Returns (w_q, scale [N, K // group_size]); int8 weights are int8 [N, K], int4 weights are
    offset by 8 and packed two per uint8 (low nibble first) into uint8 [N, K // 2].
    """
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in-features {k} not divisible by group size {group_size}")
    if clip not in ("none", "mse"):
        raise ValueError(f"clip must be none or mse, got '{clip}'")
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax - 1 if bits == 4 else -qmax
    wg = w.reshape(n, k // group_size, group_size)
    amax = wg.abs().amax(dim=2)
    scale = (amax / qmax).clamp_min(1e-12)
    if clip == "mse":
        best = torch.full_like(amax, float("inf"))
        chosen = scale
        for f in CLIP_FACTORS:
            sc = (amax * f / qmax).clamp_min(1e-12)
            err = ((torch.clamp(torch.round(wg / sc[..., None]), qmin, qmax) * sc[..., None]
                    - wg) ** 2).sum(dim=2)
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, sc, chosen)
        scale = chosen
    q = torch.clamp(torch.round(wg / scale[..., None]), qmin, qmax)
    q = q.reshape(n, k)
    if bits == 8:
        return q.to(torch.int8), scale
    if bits != 4:
        raise ValueError(f"weight-only bits must be 8 or 4, got {bits}")
    return pack_bits((q + 8).to(torch.uint8), 4), scale


def dequantize_weight_groups(w_q: torch.Tensor, scale: torch.Tensor, bits: int,
                             group_size: int) -> torch.Tensor:
    n = w_q.shape[0]
    if bits == 4:
        k = w_q.shape[1] * 2
        q = unpack_bits(w_q, 4, k).to(torch.int16) - 8
    else:
        k = w_q.shape[1]
        q = w_q
    wg = q.reshape(n, k // group_size, group_size).float() * scale[..., None]
    return wg.reshape(n, k)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs ``bits``-bit codes (uint8 [..., n], n % 8 == 0) little-endian into uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"last dim {n} must be a multiple of 8 to pack")
    c = codes.to(torch.int64).reshape(*lead, n // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # 8 * bits <= 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 [..., n * bits / 8] -> uint8 codes [..., n]."""
    *lead, _ = packed.shape
    b = packed.to(torch.int64).reshape(*lead, n // 8, bits)
    word = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(-1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    c = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return c.to(torch.uint8).reshape(*lead, n)


def _sign_matrix(bits: int) -> torch.Tensor:
    """[2**bits, bits + 1]: a column of ones, then s_i(c) = +1 if bit i of c is set else -1."""
    c = torch.arange(2 ** bits)[:, None]
    s = ((c >> torch.arange(bits)) & 1).float() * 2 - 1
    return torch.cat([torch.ones(2 ** bits, 1), s], dim=1)


def hlq_levels(coef: torch.Tensor, bits: int) -> torch.Tensor:
    """Codebook levels [..., 2**bits] from HLQ coefficients [..., bits + 1]."""
    return coef.float() @ _sign_matrix(bits).T.to(coef.device)


def fit_hlq(w: torch.Tensor, bits: int, group_size: int,
            iters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Fits ELUTQ-style hierarchical linear codebooks per group of ``group_size`` inputs.

    Greedy residual binarization initialises (mean, alphas); then alternating least squares:
    assign each weight to its nearest level, re-solve the coefficients by least squares.
    Returns (codes uint8 [N, K] in 0..2**bits-1, coef fp32 [N, K // group_size, bits + 1]).
    """
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in-features {k} not divisible by group size {group_size}")
    wg = w.reshape(n, k // group_size, group_size)
    mu = wg.mean(-1)
    r = wg - mu[..., None]
    coefs = [mu]
    codes = torch.zeros_like(wg, dtype=torch.int64)
    for i in range(bits):  # greedy: alpha_i = mean |residual|, s_i = sign(residual)
        a = r.abs().mean(-1)
        s = torch.where(r >= 0, 1.0, -1.0)
        codes |= (s > 0).to(torch.int64) << i
        r = r - a[..., None] * s
        coefs.append(a)
    coef = torch.stack(coefs, -1)  # [N, G, bits+1]
    S = _sign_matrix(bits)  # [L, bits+1]
    for _ in range(iters):
        levels = coef @ S.T  # [N, G, L]
        codes = (wg[..., None] - levels[..., None, :]).abs().argmin(-1)  # [N, G, g]
        A = S[codes]  # [N, G, g, bits+1]
        AtA = A.transpose(-1, -2) @ A + 1e-6 * torch.eye(bits + 1)
        Atb = A.transpose(-1, -2) @ wg[..., None]
        coef = torch.linalg.solve(AtA, Atb)[..., 0]
    levels = coef @ S.T
    codes = (wg[..., None] - levels[..., None, :]).abs().argmin(-1)
    return codes.reshape(n, k).to(torch.uint8), coef


def decode_sparse(values: torch.Tensor, indices: torch.Tensor, attrs: Attrs) -> torch.Tensor:
    """Dense fp32 weight [out, in] of a `sparse_linear` in any storage format."""
    out_f, in_f = attrs["shape"]
    fmt = attrs["format"]
    if fmt == "nm":
        n, m = attrs["n"], attrs["m"]
        w = torch.zeros(out_f, in_f // m, m, dtype=values.dtype)
        w.scatter_(2, indices.to(torch.int64).reshape(out_f, in_f // m, n),
                   values.reshape(out_f, in_f // m, n))
        return w.reshape(out_f, in_f)
    if fmt == "block":
        bh, bw = attrs["block"]
        w = torch.zeros(out_f // bh, in_f // bw, bh, bw, dtype=values.dtype)
        idx = indices.to(torch.int64)
        w[idx[:, 0], idx[:, 1]] = values
        return w.permute(0, 2, 1, 3).reshape(out_f, in_f)
    if fmt == "csr":
        crow = indices[: out_f + 1].to(torch.int64)
        col = indices[out_f + 1:].to(torch.int64)
        return torch.sparse_csr_tensor(crow, col, values, (out_f, in_f)).to_dense()
    raise ValueError(f"unknown sparse format '{fmt}'")


def encode_sparse(w: torch.Tensor, fmt: str, n: int = 2, m: int = 4,
                  block: tuple[int, int] = (4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) storage of an already-pruned dense weight (inverse of decode)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    if fmt == "nm":
        g = w.reshape(out_f, in_f // m, m)
        pos = torch.topk((g != 0).float() + g.abs() * 1e-30, n, dim=2).indices.sort(2).values
        vals = torch.gather(g, 2, pos)
        return vals.reshape(out_f, -1).contiguous(), pos.to(torch.uint8).reshape(out_f, -1)
    if fmt == "block":
        bh, bw = block
        blocks = w.reshape(out_f // bh, bh, in_f // bw, bw).permute(0, 2, 1, 3)
        nz = torch.nonzero(blocks.abs().amax((2, 3)) > 0)  # sorted by (row, col)
        vals = blocks[nz[:, 0], nz[:, 1]].contiguous()
        return vals, nz.to(torch.int32)
    if fmt == "csr":
        c = w.to_sparse_csr()
        idx = torch.cat([c.crow_indices(), c.col_indices()]).to(torch.int32)
        return c.values().contiguous(), idx
    raise ValueError(f"unknown sparse format '{fmt}'")


# ----------------------------------------------------------------------------- shared infer
def _req(types: Types, i: int, op: str) -> TensorType:
    t = types[i] if i < len(types) else None
    if t is None:
        raise OpTypeError(f"op '{op}': input {i} is required")
    return t


def _linear_out(op: str, x: TensorType, out_f: Any, in_f: Any) -> TensorType:
    if x.dtype != "float32":
        raise OpTypeError(f"{op}: input must be float32, got {x}")
    if x.rank < 1 or not dims_equal(x.shape[-1], in_f):
        raise OpTypeError(f"{op}: input features {x.shape[-1] if x.rank else '?'} "
                          f"!= weight in-features {in_f}")
    return TensorType("float32", (*x.shape[:-1], out_f))


def _check_epilogue(op: str, y: TensorType, types: Types, attrs: Attrs,
                    res_pos: int = 4, bias_pos: int = 3) -> None:
    act = attrs["activation"]
    if act not in ACTIVATIONS:
        raise OpTypeError(f"{op}: unknown activation '{act}'")
    if attrs["residual"] not in RESIDUAL_MODES:
        raise OpTypeError(f"{op}: residual must be one of {RESIDUAL_MODES}")
    res = types[res_pos] if len(types) > res_pos else None
    if (res is None) != (attrs["residual"] == "none"):
        raise OpTypeError(f"{op}: residual input and residual='{attrs['residual']}' disagree")
    if res is not None and (res.dtype != y.dtype or len(res.shape) != len(y.shape)
                            or not all(dims_equal(a, b) for a, b in zip(res.shape, y.shape))):
        raise OpTypeError(f"{op}: residual {res} must have the output type {y}")
    bias = types[bias_pos] if len(types) > bias_pos else None
    if bias is not None and (not is_float(bias.dtype) or bias.rank != 1):
        raise OpTypeError(f"{op}: bias must be a 1-d float tensor, got {bias}")


def _epilogue(y: torch.Tensor, x: Sequence[torch.Tensor | None], attrs: Attrs,
              res_pos: int = 4) -> torch.Tensor:
    res = x[res_pos] if len(x) > res_pos else None
    if attrs["residual"] == "before_act":
        y = y + res
    y = apply_activation(y, attrs)
    if attrs["residual"] == "after_act":
        y = y + res
    return y


def _opt(x: Sequence[torch.Tensor | None], i: int) -> torch.Tensor | None:
    return x[i] if len(x) > i else None


# every op of this module is a linear over a compressed weight, with the fused epilogue
_TRAITS = frozenset({"gemm", "linear", "quantized"})


def _reg(name: str, infer: Any, ref: Any, attrs: dict[str, Any], lo: int, hi: int,
         doc: str) -> None:
    register_op(OpDef(name, infer, ref, {**EPILOGUE_ATTRS, **attrs}, lo, hi, _TRAITS, doc))


# ----------------------------------------------------------------------------- qlinear_dynamic
def _qlinear_infer(op: str) -> Any:
    def infer(types: Types, attrs: Attrs) -> list[TensorType]:
        x, wq, ws = (_req(types, i, op) for i in range(3))
        if wq.dtype != "int8" or wq.rank != 2:
            raise OpTypeError(f"{op}: w_q must be int8 [out, in], got {wq}")
        if ws.dtype != "float32" or ws.rank != 1 or not dims_equal(ws.shape[0], wq.shape[0]):
            raise OpTypeError(f"{op}: w_scale must be float32 [out], got {ws}")
        y = _linear_out(op, x, wq.shape[0], wq.shape[1])
        _check_epilogue(op, y, types, attrs)
        if attrs.get("act_quant", "tensor") not in ACT_QUANT_MODES:
            raise OpTypeError(f"{op}: act_quant must be one of {', '.join(ACT_QUANT_MODES)}, "
                              f"got '{attrs['act_quant']}'")
        idx = types[5] if len(types) > 5 else None
        wo = types[6] if len(types) > 6 else None
        if (idx is None) != (wo is None):
            raise OpTypeError(f"{op}: outlier_idx and w_outlier go together")
        if idx is not None and wo is not None:
            if idx.dtype != "int64" or idx.rank != 1 or wo.rank != 2 \
                    or not dims_equal(wo.shape[1], idx.shape[0]) \
                    or not dims_equal(wo.shape[0], wq.shape[0]):
                raise OpTypeError(f"{op}: bad outlier operands {idx}, {wo}")
        return [y]
    return infer


def token_u7_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row scale of ``act_quant="token"``: |x|max / 63, so codes q + 64 fit u7 [1, 127]."""
    return (x.abs().amax(-1, keepdim=True) / TOKEN_QMAX).clamp_min(TOKEN_MIN_SCALE)


def token_u7_codes(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Signed codes round(x / s) in [-63, 63] (stored as u7 with zero point 64)."""
    return torch.clamp(torch.round(x / s), -TOKEN_ZP, TOKEN_QMAX)


@torch.library.custom_op("ember::qgemm_token", mutates_args=())
def qgemm_token(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, scale_x: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token symmetric u7 activations x int8 weights, fp32 out.

    The integer products are summed in fp32: exact while ``63 * 127 * K < 2**24`` (K <= 2096),
    within fp32 rounding of the exact int32 sum above. ``scale_x`` overrides the row scales
    (outlier channels excluded from the abs-max). A custom op: the cached fp32 copy of the
    weight stays out of traced programs.
    """
    s = token_u7_scale(x) if scale_x is None else scale_x
    acc = F.linear(token_u7_codes(x, s), _float_weight(w_q))
    y = acc * s * w_scale
    return y if bias is None else y + bias


@qgemm_token.register_fake
def _(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
      scale_x: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


def u8_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of ONNX DynamicQuantizeLinear over all of ``x`` (fp32 scalars).

    The range is widened to contain 0; scale = (max - min) / 255 (1 for an all-zero tensor);
    zero point = round-half-even(clamp(-min / scale, 0, 255)), as ONNX Runtime computes them.
    """
    lo = torch.clamp(torch.min(x), max=0.0)  # full reductions (TVM builds these, not max.dim)
    hi = torch.clamp(torch.max(x), min=0.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / U8_QMAX)
    zp = torch.round(torch.clamp(-lo / scale, 0.0, float(U8_QMAX)))
    return scale, zp


@torch.library.custom_op("ember::qgemm_u8", mutates_args=())
def qgemm_u8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor full-range u8 activations (DynamicQuantizeLinear) x int8 weights, fp32 out.

    Codes ``q = clamp(round(x / s) + zp, 0, 255)``; the integer products ``(q - zp) * w`` are
    summed in fp64 (exact: |sum| < 2**53), then ``acc * (s * w_scale) + bias`` in fp32, the
    order ONNX Runtime's kernel uses.
    """
    s, zp = u8_qparams(x)
    q = torch.clamp(torch.round(x / s) + zp, 0.0, float(U8_QMAX)) - zp
    acc = F.linear(q.double(), _float_weight(w_q, torch.float64)).float()
    y = acc * (s * w_scale)
    return y if bias is None else y + bias


@qgemm_u8.register_fake
def _(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


_FLOATW: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _float_weight(w_q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The int8 weight as fp32 or fp64 (cached per weight, as the fbgemm packs are)."""
    key = (*_pack_key(w_q, w_q.new_zeros(1, dtype=torch.float32), None), dtype)
    with _PACK_LOCK:
        t = _FLOATW.get(key)
        if t is not None:
            return t
    t = w_q.to(dtype)
    with _PACK_LOCK:
        _FLOATW[key] = t
        while len(_FLOATW) > _PACK_CAP // 16:
            _FLOATW.popitem(last=False)
    return t


def _qlinear_dynamic_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    inp, wq, ws = x[0], x[1], x[2]
    idx, wo = _opt(x, 5), _opt(x, 6)
    assert inp is not None and wq is not None and ws is not None
    if a["act_quant"] == "token":
        # outlier channels: left out of the row scales; their int8 weight columns are zero, so
        # their (clamped) codes contribute nothing and the fp32 part carries them exactly
        s = None
        if idx is not None and wo is not None:
            s = token_u7_scale(inp.index_fill(-1, idx, 0.0))
        y = qgemm_token(inp, wq, ws, _opt(x, 3), s)
        if idx is not None and wo is not None:
            y = y + F.linear(inp.index_select(-1, idx), wo)
        return _epilogue(y, x, a)
    gemm = qgemm_u8 if a["act_quant"] == "tensor_u8" else qgemm_dynamic  # per tensor
    if idx is not None and wo is not None:
        xo = inp.index_select(-1, idx)
        y = gemm(inp.index_fill(-1, idx, 0.0), wq, ws, _opt(x, 3))
        y = y + F.linear(xo, wo)
    else:
        y = gemm(inp, wq, ws, _opt(x, 3))
    return _epilogue(y, x, a)


_reg("qlinear_dynamic", _qlinear_infer("qlinear_dynamic"), _qlinear_dynamic_ref,
     {"act_quant": "tensor"}, 3, 7,
     "int8 W (per-channel) x dynamic activations (u7 per tensor or per token, or u8 per "
     "tensor), fp32 epilogue")


def _qlinear_static_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    inp, wq, ws = x[0], x[1], x[2]
    assert inp is not None and wq is not None and ws is not None
    idx, wo = _opt(x, 5), _opt(x, 6)
    sc, zp = float(a["x_scale"]), int(a["x_zero_point"])
    if idx is not None and wo is not None:
        # no copy needed: qgemm_static clamps outlier channels into range and their int8
        # weight columns are zero, so only the exact fp32 part carries them
        y = qgemm_static(inp, wq, ws, _opt(x, 3), sc, zp)
        y = y + F.linear(inp.index_select(-1, idx), wo)
    else:
        y = qgemm_static(inp, wq, ws, _opt(x, 3), sc, zp)
    return _epilogue(y, x, a)


_reg("qlinear_static", _qlinear_infer("qlinear_static"), _qlinear_static_ref,
     {"x_scale": REQUIRED, "x_zero_point": REQUIRED}, 3, 7,
     "int8 W (per-channel) x calibrated u7 per-tensor activations, int32 acc, fp32 epilogue")


# ----------------------------------------------------------------------------- linear_woq
WOQ_ACT_QUANT = ("none", "block")


def matmulnbits_level(attrs: Attrs) -> int | None:
    """ONNX Runtime MatMulNBits' accuracy level for a ``linear_woq`` with these attrs, or None
    when the op has no MatMulNBits form (int8, or groups not a power of two >= 16). Level 0:
    fp32 compute on dequantized blocks (weight-only); level 4: int8 activations per block,
    exactly ``act_quant="block"``."""
    g = int(attrs.get("group_size", 0))
    if int(attrs.get("bits", 0)) != 4 or g < 16 or g & (g - 1):
        return None
    return 4 if attrs.get("act_quant", "none") == "block" else 0


def _woq_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    op = "linear_woq"
    x, wq, ws = (_req(types, i, op) for i in range(3))
    bits, g = attrs["bits"], attrs["group_size"]
    if bits not in (4, 8):
        raise OpTypeError(f"{op}: bits must be 4 or 8, got {bits}")
    want = "int8" if bits == 8 else "uint8"
    if wq.dtype != want or wq.rank != 2 or not isinstance(wq.shape[1], int):
        raise OpTypeError(f"{op}: w_q must be static {want} [out, in{'/2' * (bits == 4)}]")
    in_f = wq.shape[1] * (2 if bits == 4 else 1)
    if in_f % g or ws.rank != 2 or not dims_equal(ws.shape[1], in_f // g):
        raise OpTypeError(f"{op}: w_scale must be [out, in/{g}], got {ws}")
    act = attrs.get("act_quant", "none")
    if act not in WOQ_ACT_QUANT:
        raise OpTypeError(f"{op}: act_quant must be one of {', '.join(WOQ_ACT_QUANT)}, "
                          f"got '{act}'")
    if act == "block" and bits != 4:
        raise OpTypeError(f"{op}: act_quant=block needs bits=4 (MatMulNBits), got {bits}")
    y = _linear_out(op, x, wq.shape[0], in_f)
    _check_epilogue(op, y, types, attrs)
    return [y]


def fake_quant_act_blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` rounded to symmetric int8 per row and per block of ``group_size`` channels, and
    scaled back: ``q = round_half_even(x * (127 / m)) * (m / 127)`` with ``m`` the block's
    |x|max (all-zero blocks stay zero), each factor rounded to fp32 as MLAS computes it."""
    *lead, k = x.shape
    xb = x.float().reshape(*lead, k // group_size, group_size)
    m = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(m != 0, 127.0 / torch.where(m != 0, m, 1.0), 0.0)
    q = torch.round(xb * inv)  # torch.round is half to even, as _MM_ROUND_NEAREST
    return (q * (m / 127.0)).reshape(*lead, k).to(x.dtype)


def _woq_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    assert x[0] is not None and x[1] is not None and x[2] is not None
    w = dequantize_weight_groups(x[1], x[2], a["bits"], a["group_size"])
    inp = x[0]
    if a.get("act_quant", "none") == "block":
        # int8 codes times int4 codes summed per block, scaled by both scales: the same sum as
        # the fp32 product of the two dequantized operands, up to fp32 rounding
        inp = fake_quant_act_blocks(inp, a["group_size"])
    return _epilogue(F.linear(inp, w, _opt(x, 3)), x, a)


_reg("linear_woq", _woq_infer, _woq_ref,
     {"bits": REQUIRED, "group_size": REQUIRED, "act_quant": "none"}, 3, 5,
     "weight-only int8/int4 (group-wise symmetric scales), dequantized in-op, fp32 GEMM; "
     "act_quant=block also rounds the activations to int8 per group (W4A8)")


# ----------------------------------------------------------------------------- lut_linear
def _lut_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    op = "lut_linear"
    x, codes, coef = (_req(types, i, op) for i in range(3))
    bits, g = attrs["bits"], attrs["group_size"]
    out_f, in_f = attrs["shape"]
    if not 1 <= bits <= 4:
        raise OpTypeError(f"{op}: bits must be 1..4, got {bits}")
    if codes.dtype != "uint8" or tuple(codes.shape) != (out_f, in_f * bits // 8):
        raise OpTypeError(f"{op}: codes must be uint8 [{out_f}, {in_f * bits // 8}], got {codes}")
    if tuple(coef.shape) != (out_f, in_f // g, bits + 1):
        raise OpTypeError(f"{op}: coef must be [{out_f}, {in_f // g}, {bits + 1}], got {coef}")
    y = _linear_out(op, x, out_f, in_f)
    _check_epilogue(op, y, types, attrs)
    return [y]


def lut_weight(codes: torch.Tensor, coef: torch.Tensor, a: Attrs) -> torch.Tensor:
    out_f, in_f = a["shape"]
    bits, g = a["bits"], a["group_size"]
    c = unpack_bits(codes, bits, in_f).to(torch.int64).reshape(out_f, in_f // g, g)
    levels = hlq_levels(coef, bits)  # [N, G, L]
    return torch.gather(levels, 2, c).reshape(out_f, in_f)


def _lut_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    assert x[0] is not None and x[1] is not None and x[2] is not None
    return _epilogue(F.linear(x[0], lut_weight(x[1], x[2], a), _opt(x, 3)), x, a)


_reg("lut_linear", _lut_infer, _lut_ref,
     {"bits": REQUIRED, "group_size": REQUIRED, "shape": REQUIRED}, 3, 5,
     "non-uniform low-bit weights: bit-packed codes into per-group HLQ codebooks")


# ----------------------------------------------------------------------------- sparse_linear
def _sparse_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    op = "sparse_linear"
    x, vals, idx = (_req(types, i, op) for i in range(3))
    out_f, in_f = attrs["shape"]
    fmt = attrs["format"]
    if fmt not in ("nm", "block", "csr"):
        raise OpTypeError(f"{op}: format must be nm, block or csr, got '{fmt}'")
    if fmt == "nm" and (in_f % attrs["m"] or not 0 < attrs["n"] <= attrs["m"]):
        raise OpTypeError(f"{op}: bad N:M {attrs['n']}:{attrs['m']} for in-features {in_f}")
    if fmt == "block" and (out_f % attrs["block"][0] or in_f % attrs["block"][1]):
        raise OpTypeError(f"{op}: block {attrs['block']} does not tile [{out_f}, {in_f}]")
    if not is_float(vals.dtype) or idx.dtype not in ("uint8", "int16", "int32", "int64"):
        raise OpTypeError(f"{op}: bad storage {vals}, {idx}")
    sparse_ok = fmt == "csr" or (fmt == "block" and attrs["block"][0] == attrs["block"][1])
    if attrs["compute"] not in ("dense", "sparse") or (attrs["compute"] == "sparse"
                                                       and not sparse_ok):
        raise OpTypeError(f"{op}: compute must be dense, or sparse for csr / square blocks")
    y = _linear_out(op, x, out_f, in_f)
    _check_epilogue(op, y, types, attrs)
    return [y]


def _sparse_weight(values: torch.Tensor, indices: torch.Tensor, fmt: str, out_f: int,
                   in_f: int, bh: int, bw: int) -> torch.Tensor:
    """The stored weight as a torch CSR/BSR tensor (metadata rebuilt per call: O(nnz rows))."""
    if fmt == "csr":
        crow = indices[: out_f + 1].to(torch.int64)
        col = indices[out_f + 1:].to(torch.int64)
        return torch.sparse_csr_tensor(crow, col, values, (out_f, in_f), check_invariants=False)
    idx = indices.to(torch.int64)  # block coordinates, sorted by (row, col)
    counts = torch.bincount(idx[:, 0], minlength=out_f // bh)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    with warnings.catch_warnings():  # "BSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_bsr_tensor(crow, idx[:, 1], values, (out_f, in_f),
                                       check_invariants=False)


@torch.library.custom_op("ember::spmm_linear", mutates_args=())
def spmm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                bias: torch.Tensor | None, fmt: str, out_f: int, in_f: int, bh: int,
                bw: int) -> torch.Tensor:
    """y = x @ W.T + b with W sparse (CSR or BSR), computed by torch.sparse (MKL)."""
    w = _sparse_weight(values, indices, fmt, out_f, in_f, bh, bw)
    x2 = x.reshape(-1, in_f)
    y = torch.sparse.mm(w, x2.t().contiguous()).t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_f)


@spmm_linear.register_fake
def _(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
      fmt: str, out_f: int, in_f: int, bh: int, bw: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_f)


def _sparse_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    """``compute="dense"``: load-as-sparse, compute-as-dense (decode, then a dense GEMM);
    ``compute="sparse"``: sparse x dense product (CSR/BSR formats only)."""
    assert x[0] is not None and x[1] is not None and x[2] is not None
    if a["compute"] == "sparse":
        if a["format"] == "nm":
            raise ValueError("sparse_linear: N:M storage has no sparse compute path on CPU")
        bh, bw = a["block"] if a["format"] == "block" else (1, 1)
        out_f, in_f = a["shape"]
        y = spmm_linear(x[0], x[1], x[2], _opt(x, 3), a["format"], out_f, in_f, bh, bw)
        return _epilogue(y, x, a)
    w = decode_sparse(x[1], x[2], a).to(x[0].dtype)
    return _epilogue(F.linear(x[0], w, _opt(x, 3)), x, a)


_reg("sparse_linear", _sparse_infer, _sparse_ref,
     {"shape": REQUIRED, "format": REQUIRED, "n": 2, "m": 4, "block": (4, 4),
      "compute": "dense"}, 3, 5,
     "pruned linear in compressed storage (N:M, block or CSR), dense or sparse compute")


# ----------------------------------------------------------------------------- linear_bf16
def _bf16_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    op = "linear_bf16"
    x, w = _req(types, 0, op), _req(types, 1, op)
    if w.dtype != "bfloat16" or w.rank != 2:
        raise OpTypeError(f"{op}: weight must be bfloat16 [out, in], got {w}")
    y = _linear_out(op, x, w.shape[0], w.shape[1])
    _check_epilogue(op, y, types, attrs, res_pos=3, bias_pos=2)
    return [y]


def _bf16_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    assert x[0] is not None and x[1] is not None
    b = _opt(x, 2)
    y = F.linear(x[0].to(torch.bfloat16), x[1],
                 None if b is None else b.to(torch.bfloat16)).float()
    return _epilogue(y, x, a, res_pos=3)


_reg("linear_bf16", _bf16_infer, _bf16_ref, {}, 2, 4,
     "bf16 weights and activations (AMX/AVX512-BF16 where present), fp32 result")

