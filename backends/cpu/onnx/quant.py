"""ONNX emitters for the quantization and sparsity ops (`ember.ir.opset_quant`).

Registered into `ember.backends.cpu.onnx.registry` with `register_emitter`; each writes standard ONNX (or
ONNX Runtime ``com.microsoft``) nodes so that Ember's CPU backend can run the rewritten graph in
ONNX Runtime. Ops without an emitter here still export to the ``ai.ember`` custom domain.

Forms (each matches the op's reference within one quantization step; weights stay the IR
params, reshaped or transposed by nodes that ONNX Runtime constant-folds at session start)::

    qlinear_dynamic  act_quant=tensor:  ReduceMin/Max -> u7 (scale, zp) -> QuantizeLinear
                                        -> MatMulIntegerToFloat (com.microsoft, bias fused)
                     act_quant=token:   |x|max per row / 63 -> QuantizeLinear (axis 0, zp 64)
                                        -> MatMulIntegerToFloat (a_scale [M, 1] per row,
                                        b_scale per column) -> Add bias
                     act_quant=tensor_u8: DynamicQuantizeMatMul (com.microsoft: quantization,
                                        int8 GEMM, scales and bias in one kernel)
    qlinear_static   Clip to the u7 range -> QuantizeLinear -> MatMulIntegerToFloat
    epilogues        exact (erf) gelu as com.microsoft Gelu (ORT fuses bias + Gelu)
    linear_woq       int4, power-of-two groups: MatMulNBits (com.microsoft, zero point 8;
                     accuracy level 4 for act_quant=block);
                     otherwise dequantized in the graph (Cast, Mul) + MatMul
    lut_linear       codes unpacked and looked up in the HLQ codebooks in the graph + MatMul

u7 activations (codes 0..127) keep MLAS's AVX2 u8 x s8 kernel exact: its int16 pair sums
(vpmaddubsw) cannot saturate, as full-range u8 codes can.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from ember.ir import Node
from ember.ir.opset_quant import (
    TOKEN_MIN_SCALE,
    TOKEN_QMAX,
    TOKEN_ZP,
    U7_QMAX,
    _sign_matrix,
    matmulnbits_level,
)

from .emit import _reduce_node
from .registry import NoMapping, register_emitter

__all__: list[str] = []

MS = "com.microsoft"
X = Any  # the exporter (`ember.backends.cpu.onnx.emit._Exporter`)


def _in(ins: list[str], i: int) -> str:
    return ins[i] if len(ins) > i and ins[i] else ""


def _const_param(x: X, n: Node, i: int) -> bool:
    v = n.inputs[i] if len(n.inputs) > i else None
    return v is not None and v.name in x.g.weights


def _flatten(x: X, n: Node, inp: str) -> str:
    """x [..., K] as [M, K]."""
    if n.inputs[0].type.rank == 2:
        return inp
    return x.one("Reshape", [inp, x.const([-1, n.inputs[0].type.shape[-1]])])


def _unflatten(x: X, n: Node, y: str) -> str:
    if n.inputs[0].type.rank == 2:
        return y
    return x.one("Reshape", [y, x.shape(n.outputs[0].type.shape)])


def _epilogue(x: X, n: Node, ins: list[str], y: str, res_pos: int = 4) -> str:
    """Residual and activation of a linear's output ``y``."""
    a = n.attrs
    res = _in(ins, res_pos)
    if res and a.get("residual") == "before_act":
        y = x.one("Add", [y, res])
    if a.get("activation") == "gelu" and a.get("approximate", "none") == "none":
        # ORT's erf Gelu kernel; the decomposed Div/Erf/Add/Mul/Mul form costs four more
        # passes over the output
        y = x.one("Gelu", [y], domain=MS)
    else:
        y = x._activation(y, a.get("activation", "none"), a)
    if res and a.get("residual") == "after_act":
        y = x.one("Add", [y, res])
    return y


def _outliers(x: X, ins: list[str], x2: str) -> str | None:
    """x[:, idx] @ w_outlier.T (fp32) when the node carries outlier channels."""
    idx, wo = _in(ins, 5), _in(ins, 6)
    if not (idx and wo):
        return None
    xo = x.one("Gather", [x2, idx], axis=1)
    return x.one("MatMul", [xo, x.one("Transpose", [wo], perm=[1, 0])])


def _outlier_mask(x: X, n: Node) -> str | None:
    """[K] fp32 mask with zeros at the outlier channels (row scales leave them out)."""
    if not (_const_param(x, n, 5) and _const_param(x, n, 6)):
        return None
    k = n.inputs[0].type.shape[-1]
    m = np.ones(k, dtype=np.float32)
    m[x.g.weights[n.inputs[5].name].numpy()] = 0.0
    return x.const(m, "float32")


def _zero_outliers(x: X, n: Node, ins: list[str], x2: str) -> str:
    """x with its outlier channels zeroed, as the references quantize it (else x itself)."""
    if _in(ins, 5):
        mask = _outlier_mask(x, n)
        if mask is not None:
            return x.one("Mul", [x2, mask])
    return x2


# ----------------------------------------------------------------------------- int8 GEMMs
@register_emitter("qlinear_dynamic", "qlinear_static")
def _qlinear(x: X, n: Node, ins: list[str]) -> list[str]:
    if not (_const_param(x, n, 1) and _const_param(x, n, 2)):
        raise NoMapping
    if (_in(ins, 5) or _in(ins, 6)) and not (_const_param(x, n, 5) and _const_param(x, n, 6)):
        raise NoMapping
    a = n.attrs
    x2 = _flatten(x, n, ins[0])
    wt = x.one("Transpose", [ins[1]], perm=[1, 0])  # [K, N] int8, folded by ORT at load
    bias = _in(ins, 3)
    u8 = "uint8"
    if n.op == "qlinear_dynamic" and a.get("act_quant", "tensor") == "tensor_u8":
        src = _zero_outliers(x, n, ins, x2)
        y = x.one("DynamicQuantizeMatMul", [src, wt, ins[2], "", bias] if bias
                  else [src, wt, ins[2]], domain=MS)
    elif n.op == "qlinear_dynamic" and a.get("act_quant", "tensor") == "token":
        mask = _outlier_mask(x, n)
        if mask is not None:
            am = _reduce_node(x, "ReduceMax", x.one("Mul", [x.one("Abs", [x2]), mask]), [1],
                              False)
        else:  # |x|max per row from two read-only reductions (no |x| tensor written)
            am = x.one("Max", [_reduce_node(x, "ReduceMax", x2, [1], False),
                               x.one("Neg", [_reduce_node(x, "ReduceMin", x2, [1], False)])])
        s = x.one("Max", [x.one("Div", [am, x.const(float(TOKEN_QMAX), "float32")]),
                          x.const(TOKEN_MIN_SCALE, "float32")])  # [M]
        zp_rows = x.one("Expand", [x.const([TOKEN_ZP], u8), x.one("Shape", [s])])
        xq = x.one("QuantizeLinear", [x2, s, zp_rows], axis=0)
        # MatMulIntegerToFloat scales rows by an [M, 1] a_scale; its bias input is left out:
        # ORT 1.32 adds it wrongly together with a per-row a_scale (tests catch a regression)
        y = x.one("MatMulIntegerToFloat", [xq, wt, x.one("Unsqueeze", [s, x.const([1])]),
                                            ins[2], x.const(TOKEN_ZP, u8)], domain=MS)
        # (ORT's BiasGelu would take the bias with the activation, but on the AVX-512 EPYC
        # its kernel ran 3.44 ms for ViT-B's 12 MLPs against 2.4 ms for Add + Gelu)
        if bias:
            y = x.one("Add", [y, bias])
    else:
        if n.op == "qlinear_static":
            sc, zp = float(a["x_scale"]), int(a["x_zero_point"])
            xs, xz = x.const(sc, "float32"), x.const(zp, u8)
            xq = x.one("QuantizeLinear", [x2, xs, xz])
            xq = x.one("Clip", [xq, x.const(0, u8), x.const(U7_QMAX, u8)])
        else:
            xs, xz = _u7_qparams(x, x2, ins, n)
            xq = x.one("QuantizeLinear", [x2, xs, xz])
        y = x.one("MatMulIntegerToFloat", [xq, wt, xs, ins[2], xz, "", bias] if bias
                  else [xq, wt, xs, ins[2], xz], domain=MS)
    o = _outliers(x, ins, x2)
    if o is not None:
        y = x.one("Add", [y, o])
    return [_epilogue(x, n, ins, _unflatten(x, n, y))]


def _u7_qparams(x: X, x2: str, ins: list[str], n: Node) -> tuple[str, str]:
    """fbgemm's ChooseQuantizationParams(min(x, 0), max(x, 0)) for u7, in the graph."""
    src = _zero_outliers(x, n, ins, x2)
    f = "float32"
    zero = x.const(0.0, f)
    lo = x.one("Min", [_reduce_node(x, "ReduceMin", src, [0, 1], False), zero])
    hi = x.one("Max", [_reduce_node(x, "ReduceMax", src, [0, 1], False), zero])
    scale = x.one("Div", [x.one("Sub", [hi, lo]), x.const(float(U7_QMAX), f)])
    # an all-zero tensor: fbgemm uses scale 0.1
    is0 = x.one("Equal", [scale, zero])
    scale = x.one("Where", [is0, x.const(0.1, f), scale])
    zp = x.one("Round", [x.one("Neg", [x.one("Div", [lo, scale])])])
    zp = x.one("Clip", [zp, zero, x.const(float(U7_QMAX), f)])
    return scale, x.one("Cast", [zp], to=TensorProto.UINT8)


# ----------------------------------------------------------------------------- weight-only
# MatMulNBits' compute type (`matmulnbits_level`), from the op's ``act_quant``. Level 0 (fp32 on
# dequantized blocks) keeps weight-only semantics, and is slow here: a 1 x 576 x 1536 int4
# product took 280 us on an AVX2 EPYC vs ~220 us for the fp32 MatMul. Level 4 (activations
# rounded to int8 per block, MLAS's int8 kernels) took 66 us and matches ``act_quant=block``'s
# reference to 4e-7.
@register_emitter("linear_woq")
def _woq(x: X, n: Node, ins: list[str]) -> list[str]:
    if not (_const_param(x, n, 1) and _const_param(x, n, 2)):
        raise NoMapping
    a = n.attrs
    bits, g = int(a["bits"]), int(a["group_size"])
    act = str(a.get("act_quant", "none"))
    wq = x.g.weights[n.inputs[1].name]
    nn_ = wq.shape[0]
    k = wq.shape[1] * (2 if bits == 4 else 1)
    bias = _in(ins, 3)
    level = matmulnbits_level(a)
    if level is not None:
        # our packing (q + 8, low nibble first along K) is MatMulNBits' [N, K/g, g/2] blob with
        # the default zero point 8
        b = x.one("Reshape", [ins[1], x.const([nn_, k // g, g // 2])])
        y = x.one("MatMulNBits", [ins[0], b, ins[2]], domain=MS, K=k, N=nn_, bits=4,
                  block_size=g, accuracy_level=level)
        if bias:
            y = x.one("Add", [y, bias])
        return [_epilogue(x, n, ins, y)]
    w = _dequant_groups(x, ins[1], ins[2], bits, g, nn_, k)
    inp = _fake_quant_blocks(x, ins[0], g, k) if act == "block" else ins[0]
    y = x.one("MatMul", [inp, x.one("Transpose", [w], perm=[1, 0])])
    if bias:
        y = x.one("Add", [y, bias])
    return [_epilogue(x, n, ins, y)]


def _fake_quant_blocks(x: X, inp: str, g: int, k: int) -> str:
    """`fake_quant_act_blocks` in standard ops (groups MatMulNBits does not take)."""
    f = "float32"
    shape = x.one("Shape", [inp])
    xb = x.one("Reshape", [inp, x.const([-1, k // g, g])])
    m = _reduce_node(x, "ReduceMax", x.one("Abs", [xb]), [2], True)
    zero = x.const(0.0, f)
    nz = x.one("Not", [x.one("Equal", [m, zero])])
    inv = x.one("Where", [nz, x.one("Div", [x.const(127.0, f),
                                             x.one("Where", [nz, m, x.const(1.0, f)])]), zero])
    q = x.one("Round", [x.one("Mul", [xb, inv])])  # ONNX Round: half to even
    y = x.one("Mul", [q, x.one("Div", [m, x.const(127.0, f)])])
    return x.one("Reshape", [y, shape])


def _unpack(x: X, packed: str, bits: int, rows: int, k: int) -> str:
    """`unpack_bits` in the graph: uint8 [rows, k * bits / 8] -> int64 codes [rows, k]."""
    b = x.one("Cast", [x.one("Reshape", [packed, x.const([rows, k // 8, bits])])],
              to=TensorProto.INT64)
    word = x.one("ReduceSum", [x.one("Mul", [b, x.const([256 ** j for j in range(bits)])]),
                               x.const([2])], keepdims=1)  # [rows, k/8, 1]
    c = x.one("Div", [word, x.const([2 ** (bits * i) for i in range(8)])])
    c = x.one("Mod", [c, x.const(2 ** bits)])
    return x.one("Reshape", [c, x.const([rows, k])])


def _dequant_groups(x: X, wq: str, scale: str, bits: int, g: int, nn_: int, k: int) -> str:
    if bits == 4:
        q = x.one("Sub", [_unpack(x, wq, 4, nn_, k), x.const(8)])
    else:
        q = wq
    qf = x.one("Reshape", [x.one("Cast", [q], to=TensorProto.FLOAT),
                           x.const([nn_, k // g, g])])
    w = x.one("Mul", [qf, x.one("Unsqueeze", [scale, x.const([2])])])
    return x.one("Reshape", [w, x.const([nn_, k])])


# ----------------------------------------------------------------------------- lookup tables
@register_emitter("lut_linear")
def _lut(x: X, n: Node, ins: list[str]) -> list[str]:
    if not (_const_param(x, n, 1) and _const_param(x, n, 2)):
        raise NoMapping
    a = n.attrs
    out_f, in_f = a["shape"]
    bits, g = int(a["bits"]), int(a["group_size"])
    codes = x.one("Reshape", [_unpack(x, ins[1], bits, out_f, in_f),
                              x.const([out_f, in_f // g, g])])
    levels = x.one("MatMul", [ins[2], x.const(_sign_matrix(bits).T.numpy(), "float32")])
    w = x.one("GatherElements", [levels, codes], axis=2)  # [N, G, g]
    w = x.one("Reshape", [w, x.const([out_f, in_f])])
    y = x.one("MatMul", [ins[0], x.one("Transpose", [w], perm=[1, 0])])
    if _in(ins, 3):
        y = x.one("Add", [y, ins[3]])
    return [_epilogue(x, n, ins, y)]
