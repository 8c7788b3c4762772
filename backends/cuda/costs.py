"""Roofline estimates of Ember's CUDA kernels (H100 / A100 `DeviceSpec`s).

Each estimate counts the bytes the *kernel* moves (compressed weights, not their dense size)
and the FLOPs it issues (sparse kernels compute as dense, so their FLOPs are dense), and puts
them on the right peak: int8 tensor cores for W8A8, fp32 CUDA cores (or TF32 tensor cores with
``tf32=True``) for fp32 activations, the memory-bound classes' bandwidth efficiency for gathers
and norms. ``latency = max(flops / (peak * eff), bytes / (bw * eff)) + launch overhead``
(`ember.cost_models.analytical.roofline_s`).

`node_estimate` is what a partitioner calls for a node placed on the CUDA backend: the kernel
estimate when an Ember kernel runs the node, else the analytical model's per-node estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ember.cost_models.analytical import Estimate, estimate_node, roofline_s
from ember.cost_models.devices import DeviceSpec
from ember.ir import Node, Value
from ember.ir.shapes import evaluate

__all__ = ["kernel_estimate", "node_estimate", "KERNEL_COSTS", "w8a8_estimate",
           "woq_estimate", "sparse_estimate", "gather_estimate", "pool_estimate",
           "norm_estimate", "attention_estimate"]

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4,
          "int64": 8, "bool": 1}


def _shape(v: Value | None, env: Mapping[str, int]) -> list[int]:
    return [] if v is None else [evaluate(d, env) for d in v.type.shape]


def _numel(v: Value | None, env: Mapping[str, int]) -> int:
    n = 1
    for d in _shape(v, env):
        n *= d
    return 0 if v is None else n


def _nbytes(v: Value | None, env: Mapping[str, int]) -> int:
    return 0 if v is None else _numel(v, env) * _BYTES.get(v.type.dtype, 4)


def _est(flops: float, nbytes: float, dev: DeviceSpec, cls: str, dtype: str) -> Estimate:
    return Estimate(int(flops), int(nbytes), roofline_s(flops, nbytes, dev, cls, dtype), cls,
                    dtype)


def _mnk(node: Node, env: Mapping[str, int], k: int) -> tuple[int, int]:
    x = _shape(node.inputs[0], env)
    m = 1
    for d in x[:-1]:
        m *= d
    y = _shape(node.outputs[0], env)
    return m, y[-1]


def _epilogue_bytes(node: Node, env: Mapping[str, int], m: int, n: int) -> int:
    res = node.inputs[4] if len(node.inputs) > 4 else None
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    return 4 * m * n + _nbytes(res, env) + _nbytes(bias, env)


def w8a8_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                  tf32: bool = False) -> Estimate:
    """quantize (read x fp32, write codes) + int8 GEMM (codes, int8 W, scales, fp32 out)."""
    k = _shape(node.inputs[1], env)[1]
    m, n = _mnk(node, env, k)
    quant = 4 * m * k + m * k
    gemm = m * k + n * k + 12 * n + 8 * m + _epilogue_bytes(node, env, m, n)
    return _est(2 * m * n * k, quant + gemm, dev, "gemm", "int8")


def woq_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                 tf32: bool = False) -> Estimate:
    """Packed weights (K/2 bytes per row for int4) + group scales + fp32 activations."""
    bits, g = node.attrs["bits"], node.attrs["group_size"]
    k = _shape(node.inputs[1], env)[1] * (2 if bits == 4 else 1)
    m, n = _mnk(node, env, k)
    nbytes = 4 * m * k + n * k * bits // 8 + 4 * n * (k // g) + _epilogue_bytes(node, env, m, n)
    return _est(2 * m * n * k, nbytes, dev, "gemm", "tfloat32" if tf32 else "float32")


def sparse_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                    tf32: bool = False) -> Estimate:
    """Load-as-sparse (compressed bytes), compute-as-dense (dense FLOPs)."""
    n_out, k = node.attrs["shape"]
    m, n = _mnk(node, env, k)
    if node.attrs["format"] == "nm":
        w = _nbytes(node.inputs[1], env) + _nbytes(node.inputs[2], env)
    else:  # bitmap: 1 bit per weight + values + one int32 start per (row, k-tile)
        w = n_out * (-(-k // 8)) + _nbytes(node.inputs[1], env) + 4 * n_out * (-(-k // 64))
    nbytes = 4 * m * k + w + _epilogue_bytes(node, env, m, n)
    return _est(2 * m * n * k, nbytes, dev, "gemm", "tfloat32" if tf32 else "float32")


def gather_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                    tf32: bool = False) -> Estimate:
    """Gathers read each output row once and write it once (plus indices)."""
    out = sum(_nbytes(v, env) for v in node.outputs)
    idx = sum(_nbytes(v, env) for v in node.inputs[1:] if v is not None
              and v.type.dtype == "int64")
    return _est(0, 2 * out + idx, dev, "gather", node.outputs[0].type.dtype)


def pool_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                  tf32: bool = False) -> Estimate:
    """token_merge: matching (the [N/2, N/2] similarity GEMM) + atomic pooling (read x, a
    read-modify-write of the fp32 accumulators per token) + the normalizing pass."""
    b, n, d = _shape(node.inputs[0], env)
    c = _shape(node.inputs[1], env)[-1]
    n_out = _shape(node.outputs[0], env)[1]
    flops = 2 * b * (n // 2) * ((n + 1) // 2) * c + 3 * b * n * d
    nbytes = _nbytes(node.inputs[1], env) + 4 * b * n * d + 8 * b * n * d + 12 * b * n_out * d
    return _est(flops, nbytes, dev, "gather", "float32")


def norm_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                  tf32: bool = False) -> Estimate:
    """One read of the row (re-reads of the variance pass hit L2) and one write."""
    x = _nbytes(node.inputs[0], env)
    w = sum(_nbytes(v, env) for v in node.inputs[1:] if v is not None)
    return _est(8 * _numel(node.inputs[0], env), 2 * x + w, dev, "norm", "float32")


def attention_estimate(node: Node, dev: DeviceSpec, env: Mapping[str, int],
                       tf32: bool = False) -> Estimate:
    """FlashAttention: q, k, v, out and the (broadcast) mask cross HBM once; 4 B H Nq Nk d."""
    b, h, nq, d = _shape(node.inputs[0], env)
    nk = _shape(node.inputs[1], env)[2]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    nbytes = sum(_nbytes(v, env) for v in node.inputs[:3]) + _nbytes(node.outputs[0], env) \
        + _nbytes(mask, env)
    return _est(4 * b * h * nq * nk * d, nbytes, dev, "attention",
                "tfloat32" if tf32 else node.inputs[0].type.dtype)  # type: ignore[union-attr]


KERNEL_COSTS: dict[str, Any] = {
    "qlinear_dynamic": w8a8_estimate, "qlinear_static": w8a8_estimate,
    "linear_woq": woq_estimate, "sparse_linear": sparse_estimate,
    "token_merge": pool_estimate, "token_select": gather_estimate,
    "token_unmerge": gather_estimate, "layer_norm": norm_estimate, "rms_norm": norm_estimate,
    "attention": attention_estimate,
}


def kernel_estimate(node: Node, dev: DeviceSpec, symbols: Mapping[str, int] | None = None,
                    tf32: bool = False) -> Estimate | None:
    """The estimate of the Ember kernel that runs ``node`` (None: no kernel for its op)."""
    fn = KERNEL_COSTS.get(node.op)
    return None if fn is None else fn(node, dev, dict(symbols or {}), tf32)


def node_estimate(node: Node, dev: DeviceSpec, symbols: Mapping[str, int] | None = None,
                  *, kernel: bool = True, tf32: bool = False) -> Estimate:
    """Concrete estimate of ``node`` on the CUDA backend: its Ember kernel when ``kernel``
    (and one exists), else the analytical model's (cuBLAS / ATen) estimate."""
    est = kernel_estimate(node, dev, symbols, tf32) if kernel else None
    if est is not None:
        return est
    return estimate_node(node, dev).at(dict(symbols or {}))
