"""Latency model of the CPU backend's ONNX Runtime program (the candidate that usually ships).

The CPU backend exports the optimized IR to ONNX and runs it with ONNX Runtime (CPU EP, all
graph optimizations). Every IR node becomes one or a few ORT kernels: views are real kernels
(``Transpose`` and ``Expand`` copy, ``Reshape`` is a dispatch), fused IR ops decompose into a
base op plus epilogue that ORT may re-fuse, and a symbolic dim used in an attribute the first
time adds a few shape-computing kernels. One call costs::

    call_overhead + per_io * (inputs + outputs) + sum over IR nodes of
        roofline(node) * exp(correction(features(node)))

where the roofline reads and writes every node's tensors (no cross-node fusion: ORT's own
fusions are learned by the correction from the node's producer/consumer context) and the
correction is a gradient-boosted regressor (`ember.cost_models.ort_fit`) fit on per-node ORT
profiles of synthetic training graphs (collected by ``examples/ort_collect.py``), each node's
measured time including the executor's per-kernel gap. The model is JSON (`OrtModel`): the trees, the overhead terms and the
device spec its rooflines were computed with. That learned correction generalizes worse than
the plain roofline and is off by default (`ORT_MODEL_BY_DEFAULT`).

The roofline itself reads the kernels the device spec measured in ONNX Runtime on this machine
(spec version 4, `devices._measure_ort_kernels`), each timed inside a graph and taken as a
median: GEMMs and convolutions by their interpolated (M, K, N) throughput, memory-bound nodes by
a bytes -> seconds-per-node table (dispatch-, cache- then DRAM-bound) times a per-op factor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy

from ember.ir import Graph, Node
from ember.ir.opset_quant import matmulnbits_level
from ember.ir.shapes import evaluate

from .analytical import (
    CLASS_IDS,
    DTYPE_BYTES,
    GraphEstimate,
    GroupEstimate,
    _effs,
    _ev,
    _numel,
    node_cost,
    op_class,
    vbytes,
)
from .devices import DeviceSpec
from .measured import Correction

__all__ = [
    "ORT_MODEL_VERSION",
    "DEFAULT_ORT_MODEL",
    "ORT_FEATURES",
    "OrtModel",
    "load_ort_model",
    "node_features",
    "node_roofline_s",
    "gemm_flops_per_s",
    "estimate_graph_ort",
    "gemm_weight_bytes",
    "weights_exceed_l3",
]

log = logging.getLogger(__name__)

ORT_MODEL_VERSION = 1
DEFAULT_ORT_MODEL = Path(__file__).parent / "data" / "cpu_ort_model.json"

# op vocabulary for the ``op`` feature (trees split on the code; unknown ops are -1)
OP_VOCAB = (
    "linear", "fused_linear", "matmul", "conv", "fused_conv", "attention", "layer_norm",
    "rms_norm", "batch_norm", "softmax", "embedding", "reshape", "permute", "expand", "slice",
    "select", "concat", "add", "sub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "exp",
    "tanh", "sigmoid", "relu", "gelu", "silu", "mean", "sum", "max_pool", "avg_pool",
    "adaptive_avg_pool", "where", "cast", "full", "arange", "gather", "index_select", "clamp",
    "cos", "sin", "tril", "triu", "flatten", "hardswish", "erf", "amax", "unsqueeze",
    "squeeze", "pad", "einsum", "logical_not", "eq", "lt", "gt", "maximum", "minimum",
)
_OP_CODE = {op: i for i, op in enumerate(OP_VOCAB)}
_ACT_CODE = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "sigmoid": 4, "tanh": 5, "clamp": 6,
             "hardswish": 7}
ORT_FEATURES = (
    "cls", "op", "log_flops", "log_bytes", "log_ai", "log_m", "log_n", "log_k", "log_out",
    "log_in", "rank", "dtype_bytes", "compute_bound", "act", "residual", "has_bias",
    "new_syms", "sym_out", "prod_cls", "cons_cls", "n_cons", "w_param", "is_output",
)
# a node's learned factor stays within this range either way (fused-away nodes are cheap)
MAX_LOG_FACTOR = math.log(50.0)


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class OrtModel:
    """Learned per-node correction plus per-call overheads of the ORT program.

    Attributes:
        correction: gradient-boosted trees over `ORT_FEATURES` predicting
            log(measured node time / roofline).
        call_overhead_s: fixed cost of one call (Python wrapper, numpy conversion, session).
        per_io_s: extra cost per graph input or output.
        device_spec: the spec the training rooflines used (JSON), or None.
        meta: provenance and fit metrics.
    """

    correction: Correction
    call_overhead_s: float
    per_io_s: float
    device_spec: Mapping[str, Any] | None
    meta: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": "ember-ort-model", "version": ORT_MODEL_VERSION,
                "call_overhead_s": self.call_overhead_s, "per_io_s": self.per_io_s,
                "correction": self.correction.to_json(), "device_spec": self.device_spec,
                "meta": dict(self.meta)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> OrtModel:
        if d.get("format") != "ember-ort-model":
            raise ValueError("not an Ember ORT latency model (format != 'ember-ort-model')")
        if d.get("version") != ORT_MODEL_VERSION:
            raise ValueError(f"ORT latency model version {d.get('version')} is not "
                             f"{ORT_MODEL_VERSION}; refit it with `python examples/ort_collect.py fit`")
        return OrtModel(Correction.from_json(d["correction"]), float(d["call_overhead_s"]),
                        float(d["per_io_s"]), d.get("device_spec"), dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        return p

    def log_factor(self, feats: Mapping[str, float]) -> float:
        from .measured import _raw

        return max(-MAX_LOG_FACTOR, min(MAX_LOG_FACTOR, _raw(self.correction, feats)))


_LOADED: dict[str, OrtModel | None] = {}


def load_ort_model(path: str | os.PathLike | None = None) -> OrtModel | None:
    """The committed ORT latency model (or ``path``); None when absent or of another version."""
    from .measured import load_json_model

    p = Path(path) if path is not None else DEFAULT_ORT_MODEL
    return load_json_model(p, OrtModel.from_json, _LOADED, "ORT latency model")


# ----------------------------------------------------------------------------- features
def _syms_in_attrs(n: Node) -> set[str]:
    """Distinct symbolic expressions in a node's attributes (each exported as shape math)."""
    out: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, sympy.Basic) and not v.is_number:
            out.add(str(v))
        elif isinstance(v, tuple | list):
            for x in v:
                walk(x)
    for v in n.attrs.values():
        walk(v)
    return out


def _ort_bytes(n: Node, env: Mapping[str, int]) -> float:
    """Bytes an ORT kernel for ``n`` moves: its inputs and outputs (views copy in ORT)."""
    if op_class(n) == "view":
        if n.op in ("reshape", "flatten", "squeeze", "unsqueeze", "view", "identity"):
            return 0.0
        return 2.0 * _ev(vbytes(n.outputs[0]), env)
    c = node_cost(n)
    return _ev(c.bytes, env)


def _gemm_mkn(n: Node, env: Mapping[str, int]) -> tuple[float, float, float]:
    """(M, K, N) of a gemm-class node: rows (every leading dim folded in), reduction, columns."""
    x, out = n.inputs[0], n.outputs[0]
    if x is None or not x.type.rank:
        return 1.0, 1.0, 1.0
    k = float(evaluate(x.type.shape[-1], env))
    nn = float(evaluate(out.type.shape[-1], env)) if out.type.rank else 1.0
    m = max(1.0, float(evaluate(_numel(out.type.shape), env)) / max(nn, 1.0))
    return m, k, nn


def gemm_flops_per_s(grid: Sequence[Sequence[float]], m: float, k: float, n: float) -> float:
    """ONNX Runtime's fp32 GEMM throughput at (M, K, N), interpolated from the device's
    measured grid (``measured["ort"]["gemm"]``): inverse-distance weights over the four nearest
    grid points in log space, each coordinate clamped to the grid's range."""
    pts = [(math.log2(r[0]), math.log2(r[1]), math.log2(r[2]), math.log(r[3])) for r in grid]
    lo = [min(p[i] for p in pts) for i in range(3)]
    hi = [max(p[i] for p in pts) for i in range(3)]
    q = [min(max(math.log2(max(v, 1.0)), lo[i]), hi[i]) for i, v in enumerate((m, k, n))]
    near = sorted((sum((p[i] - q[i]) ** 2 for i in range(3)), p[3]) for p in pts)[:4]
    if near[0][0] < 1e-9:
        return math.exp(near[0][1])
    w = [1.0 / d for d, _ in near]
    return math.exp(sum(wi * v for wi, (_, v) in zip(w, near)) / sum(w))


def stream_s(table: Sequence[Sequence[float]], nbytes: float) -> float:
    """Seconds per node of a memory-bound ONNX Runtime kernel moving ``nbytes``, from the
    device's measured Add chain (``measured["ort"]["stream"]``: [bytes, s] rows): linear in
    log-log space between rows (dispatch-bound below the smallest, cache- then DRAM-bound
    above), extrapolated at the last row's bandwidth."""
    pts = sorted((float(b), float(t)) for b, t in table)
    b = max(float(nbytes), 1.0)
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if b <= b1:
            f = (math.log(b) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return pts[-1][1] * b / pts[-1][0]


def _conv_mkn(n: Node, env: Mapping[str, int]) -> tuple[float, float, float]:
    """(output positions, reduction, output channels) of a conv node (batch folded into M)."""
    w = n.inputs[1] if len(n.inputs) > 1 else None
    out = n.outputs[0]
    if w is None or w.type.rank < 3:
        return 1.0, 1.0, 1.0
    nn = float(evaluate(w.type.shape[0], env))
    k = float(evaluate(_numel(w.type.shape[1:]), env))
    m = max(1.0, float(evaluate(_numel(out.type.shape), env)) / max(nn, 1.0))
    return m, k, nn


# op class -> the key of its measured ONNX Runtime throughput in ``measured["ort"]``
_ORT_CLASS_FLOPS = {"dwconv": "dwconv_flops", "conv": "conv_flops",
                    "attention": "attention_flops"}
# op classes ORT runs as memory-bound kernels (timed by the device's Add-chain table)
_STREAM_CLASSES = frozenset({"elementwise", "data", "gather", "reduction", "norm", "quant"})


def node_roofline_s(n: Node, device: DeviceSpec, env: Mapping[str, int],
                    cold_weights: bool = False) -> tuple[float, float, float]:
    """(roofline seconds incl. the per-node overhead, flops, bytes) of one node.

    With ONNX Runtime's kernels measured on this device (``device.measured["ort"]``) compute-
    bound nodes divide by the throughput ORT itself reached: GEMMs and convolutions at the
    interpolated (M, K, N) of their grids, attention at its measured shape; memory-bound nodes
    take the measured in-graph seconds for their bytes (x the op's own factor: a LayerNorm
    costs about two Adds). Kernels timed inside graphs (spec version 4) already include the
    per-node dispatch; others pay ORT's measured per-node overhead. Without ORT measurements:
    the device peaks x the op-class efficiencies and the torch dispatch overhead.

    ``cold_weights``: the node's weight is not in cache when it runs (the model's GEMM weights
    exceed the L3, `weights_exceed_l3`): fp32 GEMMs read the grid timed with weights streamed from DRAM
    (``gemm_cold``, spec version 6) up to its largest M, the cached grid past it."""
    c = node_cost(n)
    cls = c.op_class
    flops = _ev(c.flops, env)
    nbytes = _ort_bytes(n, env)
    ce, me = _effs(device, cls if cls != "view" else "data")
    ortk = (device.measured or {}).get("ort") or {}
    rate = device.peak(c.compute_dtype) * ce
    in_graph = bool(ortk.get("in_graph"))
    ovh = float(ortk.get("node_overhead_s", device.launch_overhead_s))
    fp32 = ortk and c.compute_dtype == "float32"
    level = matmulnbits_level(n.attrs) if n.op == "linear_woq" else None
    if level is not None and str(level) in (ortk.get("nbits") or {}):
        # int4 weights in ORT's MatMulNBits: its own measured grid (level 4 runs int8 kernels
        # on rounded activations: a decode step 3-4x faster than level 0 on an AVX2 EPYC)
        rate = gemm_flops_per_s(ortk["nbits"][str(level)], *_gemm_mkn(n, env))
        return flops / rate, flops, nbytes
    if fp32 and cls == "gemm" and ortk.get("gemm"):
        mkn = _gemm_mkn(n, env)
        cold = ortk.get("gemm_cold") if cold_weights else None
        grid = cold if cold and mkn[0] <= max(r[0] for r in cold) else ortk["gemm"]
        rate = gemm_flops_per_s(grid, *mkn)
        if in_graph:
            return max(flops / rate, nbytes / device.mem_bw), flops, nbytes
    elif fp32 and cls in ("conv", "dwconv") and ortk.get(cls):
        rate = gemm_flops_per_s(ortk[cls], *_conv_mkn(n, env))
        return max(flops / rate, nbytes / device.mem_bw), flops, nbytes
    elif fp32 and cls in _ORT_CLASS_FLOPS and ortk.get(_ORT_CLASS_FLOPS[cls]):
        rate = float(ortk[_ORT_CLASS_FLOPS[cls]])
    if ortk.get("stream") and cls in _STREAM_CLASSES:
        factor = float((ortk.get("stream_factor") or {}).get(n.op, 1.0))
        return max(flops / rate, stream_s(ortk["stream"], nbytes) * factor), flops, nbytes
    if ortk.get("stream") and cls == "view":
        # a copy (transpose, expand, slice) moves its bytes; every view is dispatched, and a
        # symbolic target shape is computed in the graph (one small node per symbolic dim,
        # then a Concat): the smallest row of the table is one such node
        floor = stream_s(ortk["stream"], 0.0)
        t = stream_s(ortk["stream"], nbytes) if nbytes > 0 else floor
        return t + floor * len(_syms_in_attrs(n)), flops, nbytes
    t = max(flops / rate, nbytes / (device.mem_bw * me))
    return t + ovh, flops, nbytes


def node_features(g: Graph, env: Mapping[str, int], device: DeviceSpec,
                  flops: Sequence[float], nbytes: Sequence[float]) -> list[dict[str, float]]:
    """`ORT_FEATURES` of every node of ``g`` at the symbol values ``env``."""
    prod: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.outputs:
            prod[v.name] = i
    users = g.users()
    params = {v.name for v in g.params}
    outs = {v.name for v in g.outputs}
    seen_syms: set[str] = set()
    feats = []
    peak = device.peak("float32")
    for i, n in enumerate(g.nodes):
        cls = op_class(n)
        out = n.outputs[0]
        m = nn = k = 1.0
        x = n.inputs[0] if n.inputs else None
        if cls == "gemm" and x is not None and x.type.rank:
            m, k, nn = _gemm_mkn(n, env)
        elif cls in ("conv", "dwconv") and len(n.inputs) > 1 and n.inputs[1] is not None:
            m, k, nn = _conv_mkn(n, env)
        elif cls == "attention" and x is not None and n.inputs[1] is not None:
            m = float(evaluate(x.type.shape[-2], env))
            nn = float(evaluate(n.inputs[1].type.shape[-2], env))
            k = float(evaluate(x.type.shape[-1], env))
        out_n = float(evaluate(_numel(out.type.shape), env))
        in_n = float(evaluate(_numel(x.type.shape), env)) if x is not None else 0.0
        new = _syms_in_attrs(n) - seen_syms
        seen_syms |= new
        p = prod.get(x.name) if x is not None else None
        cons = users.get(out.name, [])
        f, b = flops[i], nbytes[i]
        feats.append({
            "cls": float(CLASS_IDS.get(cls, CLASS_IDS["elementwise"])),
            "op": float(_OP_CODE.get(n.op, -1)),
            "log_flops": math.log10(f + 1.0), "log_bytes": math.log10(b + 1.0),
            "log_ai": math.log10((f + 1.0) / (b + 1.0)),
            "log_m": math.log10(m), "log_n": math.log10(nn), "log_k": math.log10(k),
            "log_out": math.log10(out_n + 1.0), "log_in": math.log10(in_n + 1.0),
            "rank": float(out.type.rank),
            "dtype_bytes": float(DTYPE_BYTES.get(out.type.dtype, 4)),
            "compute_bound": float(f / peak > b / device.mem_bw),
            "act": float(_ACT_CODE.get(str(n.attrs.get("activation", "none")), 8)),
            "residual": float(n.attrs.get("residual", "none") not in ("none", None)),
            "has_bias": float(len(n.inputs) > 2 and n.inputs[2] is not None),
            "new_syms": float(len(new)),
            "sym_out": float(sum(not isinstance(d, int) for d in out.type.shape)),
            "prod_cls": float(CLASS_IDS.get(op_class(g.nodes[p]), -1)) if p is not None
            else -1.0,
            "cons_cls": float(CLASS_IDS.get(op_class(cons[0]), -1)) if cons else -1.0,
            "n_cons": float(len(cons)),
            "w_param": float(len(n.inputs) > 1 and n.inputs[1] is not None
                             and n.inputs[1].name in params),
            "is_output": float(out.name in outs),
        })
    return feats


# ----------------------------------------------------------------------------- estimate
def gemm_weight_bytes(g: Graph) -> int:
    """Bytes of the weights a call of ``g`` reads whole: the right-hand operands of its GEMMs
    (an embedding table that is only gathered from does not count, a tied LM head does)."""
    names = {n.inputs[1].name for n in g.nodes
             if op_class(n) == "gemm" and len(n.inputs) > 1 and n.inputs[1].name in g.weights}
    return sum(g.weights[w].numel() * g.weights[w].element_size() for w in names)


def weights_exceed_l3(g: Graph, l3_bytes: int) -> bool:
    """Whether the GEMM weights of ``g`` together exceed the L3; then none of them is in cache
    when its GEMM runs (`estimate_graph_ort` prices them at the cold grid, the host-speed
    probe that matches them is the cold one). A call reads them in the same order every
    time, the pattern an LRU-like cache keeps nothing of, so each block's weights were
    evicted by the rest of the model since the previous call (and a single weight bigger
    than the L3, an LM head, is evicted by itself).

    Measured on an AVX2 EPYC (32 MiB L3, 2 vCPUs): the earlier rule, only a weight bigger
    than the L3, under-predicted the 120 MiB LLaMA's calls by ~4 ms at every shape up to 512
    rows (b1 s32: 17.4 ms predicted, 21.2-21.9 measured), the gap the cold grid accounts for
    at small M; rescoring four 33-point runs with this rule moved them from 85/82/88/67% to
    91/91/100/64% within 10% (probe-scaled; BENCHMARKS.md section 6). A per-kernel profile on
    an AVX-512 EPYC had put BERT's and GPT-2's block GEMMs at the cached rates; the profiler's
    own per-kernel cost makes such small differences hard to read."""
    return l3_bytes > 0 and gemm_weight_bytes(g) > l3_bytes


def _cold_weight(n: Node, g: Graph, exceed: bool) -> bool:
    """Whether ``n`` multiplies by a weight that is not in cache when it runs: a weight of a
    model whose GEMM weights exceed the L3 (``exceed``, `weights_exceed_l3`)."""
    w = n.inputs[1] if len(n.inputs) > 1 else None
    return exceed and w is not None and w.name in g.weights


def estimate_graph_ort(g: Graph, device: DeviceSpec, symbols: Mapping[str, int] | None = None,
                       model: OrtModel | None | bool = True) -> GraphEstimate:
    """Predicted latency of one call of the ORT program of ``g`` at concrete symbols.

    Args:
        g: the graph the CPU backend exported (after the pass pipeline).
        device: the CPU spec; replaced by the model's own spec when the model has one for
            this CPU (the correction is only valid with the rooflines it was fit against).
        symbols: symbol name -> value.
        model: True: the committed model; False/None: bare rooflines, no call overhead.
    """
    env = dict(symbols or {})
    m = load_ort_model() if model is True else (model or None)
    if m is not None and m.device_spec is not None:
        spec = DeviceSpec.from_json(m.device_spec)
        if spec.measured.get("cpu_model") == device.measured.get("cpu_model"):
            device = spec
    exceed = weights_exceed_l3(g, device.l3_bytes)
    roofs = [node_roofline_s(n, device, env, _cold_weight(n, g, exceed))
             for n in g.nodes]
    flops = [r[1] for r in roofs]
    nbytes = [r[2] for r in roofs]
    feats = node_features(g, env, device, flops, nbytes) if m is not None else [{}] * len(roofs)
    node_us = []
    groups = []
    for i, (t, f, b) in enumerate(roofs):
        lat = t * math.exp(m.log_factor(feats[i])) if m is not None else t
        node_us.append(lat * 1e6)
        groups.append(GroupEstimate((i,), op_class(g.nodes[i]), "float32", f, b, lat, t,
                                    feats[i]))
    call = float(((device.measured or {}).get("ort") or {}).get("call_overhead_s", 0.0))
    if m is not None:
        call = m.call_overhead_s + m.per_io_s * (len(g.inputs) + len(g.outputs))
    total_us = sum(node_us) + call * 1e6
    return GraphEstimate(device.name, "onnxruntime", env, tuple(node_us), tuple(groups),
                         total_us, sum(flops), sum(nbytes), m is not None)
