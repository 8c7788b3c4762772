"""Analytical roofline cost model: FLOPs and bytes per IR node, symbolic in the IR dims.

``estimate_node(node, device)`` gives an `Estimate` whose ``flops`` and ``bytes`` are ints or
sympy expressions over the graph's symbols (``batch``, ``seq``), so one estimate serves every
shape; ``latency_s`` is ``max(flops / (peak * eff), bytes / (bw * eff)) + overhead`` with the
efficiency of the node's op class (`op_class`).

``estimate_graph(g, device, symbols)`` evaluates at concrete shapes and models how the backend
runs the graph (``runtime``):

- ``"inductor"`` (the CPU backend's AOTInductor program, Triton on CUDA, TVM FuseOps on mobile):
  views are free, and pointwise ops fuse into their producer (a GEMM/conv epilogue or a
  pointwise/reduction kernel), so a fused chain reads its external inputs and writes its
  escaping outputs once and pays one kernel overhead (`fusion_groups`).
- ``"eager"``: every node is one kernel launch / dispatch, views included (the CPU backend's
  eager program kind).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

from ember.ir import Graph, Node, Value, has_trait
from ember.ir.shapes import Dim, evaluate

from .devices import DeviceSpec

__all__ = [
    "Estimate",
    "NodeCost",
    "GraphEstimate",
    "GroupEstimate",
    "op_class",
    "node_cost",
    "estimate_node",
    "estimate_graph",
    "fusion_groups",
    "DTYPE_BYTES",
    "roofline_s",
]

log = logging.getLogger(__name__)

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}

# ----------------------------------------------------------------------------- op classes
# (op trait, cost class) in priority order: the first trait an op has gives its class
_CLASS_OF_TRAIT = (("movement", "view"), ("conv", "conv"), ("gemm", "gemm"),
                   ("attention", "attention"), ("norm", "norm"), ("reduction", "reduction"),
                   ("gather", "gather"), ("token", "gather"), ("data", "data"))
# FLOPs per output element of pointwise ops that are more than one instruction
_TRANSCENDENTAL = {"exp": 8, "log": 8, "sqrt": 4, "rsqrt": 4, "sin": 8, "cos": 8, "tanh": 10,
                   "sigmoid": 10, "silu": 11, "erf": 10, "gelu": 14, "mish": 20, "softplus": 12,
                   "elu": 9, "hardswish": 4, "hardsigmoid": 3, "log1p": 8, "expm1": 8,
                   "atan": 12, "atan2": 14, "pow": 10, "reciprocal": 2, "div": 2}
_ACT_FLOPS = {"none": 0, "relu": 1, "clamp": 2, "leaky_relu": 2}


def op_class(node: Node) -> str:
    """The cost class of a node: gemm, conv, dwconv, attention, norm, reduction, gather,
    data, elementwise or view, from its op's traits (`ember.ir.ops`); an op that is not
    registered is elementwise.
    """
    op = node.op
    for trait, cls in _CLASS_OF_TRAIT:
        if has_trait(op, trait):
            if cls == "conv":
                g = node.attrs.get("groups", 1)
                return "dwconv" if g > 1 and _conv_cin(node) == g else "conv"
            return cls
    return "elementwise"


def _conv_cin(node: Node) -> Dim:
    x = node.inputs[0]
    return x.type.shape[1] if x is not None and x.type.rank > 1 else 1


# ----------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class Estimate:
    """Cost of one node or fused group.

    ``flops`` and ``bytes`` are ints or sympy expressions in the graph's symbols; ``latency_s``
    is a float when they are concrete, else a sympy expression (evaluate with `at`).
    """

    flops: Dim
    bytes: Dim
    latency_s: Any
    op_class: str = ""
    compute_dtype: str = "float32"

    def at(self, symbols: Mapping[str, int]) -> Estimate:
        """This estimate at concrete symbol values."""
        def ev(e: Any) -> Any:
            if isinstance(e, int | float):
                return e
            subs = {s: symbols[s.name] for s in e.free_symbols if s.name in symbols}
            v = e.subs(subs)
            return float(v) if v.is_number else v
        f, b = ev(self.flops), ev(self.bytes)
        return Estimate(int(f) if isinstance(f, float) else f,
                        int(b) if isinstance(b, float) else b,
                        ev(self.latency_s), self.op_class, self.compute_dtype)


@dataclass(frozen=True)
class NodeCost:
    """FLOPs and bytes of a node, symbolic, plus the class and compute dtype."""

    flops: Dim
    bytes: Dim
    op_class: str
    compute_dtype: str
    reads: tuple[tuple[str, Dim], ...] = ()     # (value name, bytes) read
    writes: tuple[tuple[str, Dim], ...] = ()    # (value name, bytes) written


def vbytes(v: Value | None) -> Dim:
    if v is None:
        return 0
    return _ival(_numel(v.type.shape) * int(DTYPE_BYTES.get(v.type.dtype, 4)))


def _numel(shape: Sequence[Dim]) -> Dim:
    n: Any = 1
    for d in shape:
        n = n * d
    return _ival(n)


def _ival(e: Any) -> Dim:
    """An int when the expression is a number (sympy's automatic canonical form otherwise;
    no `sympy.simplify`, which is far too slow for per-node use)."""
    if isinstance(e, int):
        return e
    if isinstance(e, float):
        return int(e) if e.is_integer() else e
    e = sympy.sympify(e)
    if e.is_Integer:
        return int(e)
    if e.is_Rational:
        return float(e)
    return e


def _float_dtype(vals: Sequence[Value | None]) -> str:
    for v in vals:
        if v is not None and v.type.dtype in ("float32", "bfloat16", "float16", "float64"):
            return v.type.dtype
    return "float32"


def _gemm_dtype(node: Node) -> str:
    ins = [v for v in node.inputs[:2] if v is not None]
    if ins and all(v.type.dtype in ("int8", "uint8") for v in ins):
        return "int8"
    scheme = str(node.attrs.get("scheme", node.attrs.get("act_dtype", "")))
    if "a8" in scheme or scheme == "int8":
        return "int8"
    return _float_dtype([node.inputs[0], *node.outputs])


def _gemm_flops(node: Node) -> Dim:
    """2 * M * N * K for linear / matmul (batched, broadcasting) and their fused forms."""
    x, out = node.inputs[0], node.outputs[0]
    if x is None:
        return 0
    op = node.op
    if op == "einsum":
        return _einsum_flops(node)
    if "matmul" in op and "linear" not in op and node.inputs[1] is not None \
            and node.inputs[1].type.rank >= 1 and x.type.rank >= 1:
        k = x.type.shape[-1]
    else:
        # linear-like: K is x's last dim (w is [N, K] or a packed form of it)
        k = x.type.shape[-1]
    flops = 2 * _numel(out.type.shape) * k
    if op in ("fused_linear",) or node.attrs.get("activation") not in (None, "none"):
        flops = flops + _numel(out.type.shape) * _epilogue_flops(node)
    if node.inputs[2:3] and node.inputs[2] is not None and "linear" in op:
        flops = flops + _numel(out.type.shape)   # bias
    return _ival(flops)


def _epilogue_flops(node: Node) -> int:
    act = node.attrs.get("activation", "none")
    f = _ACT_FLOPS.get(act, _TRANSCENDENTAL.get(act, 4))
    if node.attrs.get("residual", "none") != "none":
        f += 1
    return f


def _einsum_flops(node: Node) -> Dim:
    eq = str(node.attrs.get("equation", ""))
    try:
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        sizes: dict[str, Dim] = {}
        for term, v in zip(terms, node.inputs):
            if v is None or "." in term:
                raise ValueError("ellipsis")
            for ch, d in zip(term, v.type.shape):
                sizes[ch] = d
        total: Any = 1
        for d in sizes.values():
            total = total * d
        return _ival(2 * total)
    except (ValueError, KeyError):
        return _ival(2 * _numel(node.outputs[0].type.shape))


def _conv_flops(node: Node) -> Dim:
    """2 * out_elems * Cin/groups * prod(kernel) (+ bias, epilogue); conv_transpose by input."""
    x, w, out = node.inputs[0], node.inputs[1], node.outputs[0]
    if x is None or w is None:
        return 0
    kprod: Any = 1
    for d in w.type.shape[2:]:
        kprod = kprod * d
    if node.op == "conv_transpose":
        # each input element scatters into Cout/groups * prod(k) outputs (w is [Cin, Cout/g, *k])
        flops = 2 * _numel(x.type.shape) * w.type.shape[1] * kprod
    else:
        flops = 2 * _numel(out.type.shape) * w.type.shape[1] * kprod
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        flops = flops + _numel(out.type.shape)
    if node.op == "fused_conv":
        flops = flops + _numel(out.type.shape) * _epilogue_flops(node)
    return _ival(flops)


def _attention_flops(node: Node) -> Dim:
    """QK^T and PV matmuls: 2*B*Lq*Lk*(D + Dv) (causal: only the kept Lq*(Lq+1)/2 pairs),
    plus softmax and scaling at 5 FLOPs per score."""
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    if q is None or k is None or v is None:
        return 0
    lq, d = q.type.shape[-2], q.type.shape[-1]
    lk, dv = k.type.shape[-2], v.type.shape[-1]
    batch = _numel(node.outputs[0].type.shape[:-2])
    pairs: Any = lq * lk
    if node.attrs.get("is_causal"):
        # torch's is_causal keeps the lower triangle aligned top-left: row i sees min(i+1, Lk)
        if isinstance(lq, int) and isinstance(lk, int):
            pairs = sum(min(i + 1, lk) for i in range(lq))
        else:
            pairs = lq * (lq + 1) * sympy.Rational(1, 2)
    return _ival(batch * pairs * (2 * d + 2 * dv + 5))


def _pool_flops(node: Node) -> Dim:
    out = node.outputs[0]
    k = node.attrs.get("kernel")
    if k is None:   # adaptive: every input element once
        x = node.inputs[0]
        return _numel(x.type.shape) if x is not None else 0
    kk = math.prod(k) if isinstance(k, tuple | list) else k ** (out.type.rank - 2)
    return _ival(_numel(out.type.shape) * kk)


def node_cost(node: Node, phys: Mapping[str, Dim] | None = None) -> NodeCost:
    """FLOPs and bytes moved by one node (symbolic).

    Args:
        node: the IR node.
        phys: value name -> bytes it physically occupies (broadcast views such as ``expand``
            occupy their source's bytes); default: logical size.
    """
    cls = op_class(node)
    phys = phys or {}

    def rb(v: Value | None) -> Dim:
        if v is None:
            return 0
        return phys.get(v.name, vbytes(v))

    seen: set[str] = set()
    reads: list[tuple[str, Dim]] = []
    for v in node.inputs:
        if v is not None and v.name not in seen:
            seen.add(v.name)
            reads.append((v.name, rb(v)))
    writes = [(v.name, vbytes(v)) for v in node.outputs]
    out = node.outputs[0] if node.outputs else None
    out_n: Dim = _numel(out.type.shape) if out is not None else 0
    dtype = _float_dtype([*node.inputs, *node.outputs])

    if cls == "view":
        return NodeCost(0, 0, cls, dtype, (), ())
    if cls == "gemm":
        flops, dtype = _gemm_flops(node), _gemm_dtype(node)
    elif cls in ("conv", "dwconv"):
        flops = _conv_flops(node)
    elif cls == "attention":
        flops = _attention_flops(node)
    elif cls == "norm":
        x = node.inputs[0]
        flops = _ival(8 * _numel(x.type.shape)) if x is not None else 0
    elif cls == "reduction":
        if has_trait(node.op, "pool"):
            flops = _pool_flops(node)
        else:
            x = node.inputs[0]
            per = 5 if "softmax" in node.op else 1
            flops = _ival(per * _numel(x.type.shape)) if x is not None else 0
    elif cls == "gather":
        # reads only the gathered rows/elements of the source, not the whole table
        flops = 0
        src = node.inputs[0]
        if src is not None and has_trait(node.op, "lookup"):
            reads = [(n, b if n != src.name else vbytes(out)) for n, b in reads]
    elif cls == "data":
        flops = 0
        if has_trait(node.op, "generator"):
            reads = []
    elif cls == "quant":
        flops = _ival(3 * out_n)
    else:
        per = _TRANSCENDENTAL.get(node.op, 1)
        if node.op == "gelu" and node.attrs.get("approximate") == "tanh":
            per = 12
        flops = _ival(per * out_n)
    total: Any = 0
    for _, b in reads:
        total = total + b
    for _, b in writes:
        total = total + b
    return NodeCost(flops, _ival(total), cls, dtype, tuple(reads), tuple(writes))


# op classes whose kernels are compute-bound (their rates are the device's GEMM-like peaks
# and grids); the rest are memory-bound
COMPUTE_CLASSES = frozenset({"gemm", "conv", "dwconv", "attention"})


def _effs(device: DeviceSpec, cls: str) -> tuple[float, float]:
    """(compute efficiency, memory efficiency) of an op class on ``device``."""
    if cls in COMPUTE_CLASSES:
        return device.eff(cls), device.eff("elementwise")
    # pointwise/reduction code is vectorized but not FMA-dense: a quarter of the GEMM peak
    return 0.25, device.eff(cls if cls != "view" else "data")


def roofline_s(flops: Any, nbytes: Any, device: DeviceSpec, cls: str, dtype: str,
               overhead: float | None = None) -> Any:
    """max(flops / (peak * eff), bytes / (bw * eff)) + overhead; symbolic if inputs are."""
    ce, me = _effs(device, cls)
    t_c = flops / (device.peak(dtype) * ce)
    t_m = nbytes / (device.mem_bw * me)
    ovh = device.launch_overhead_s if overhead is None else overhead
    if isinstance(t_c, int | float) and isinstance(t_m, int | float):
        return max(float(t_c), float(t_m)) + ovh
    return sympy.Max(sympy.sympify(t_c), sympy.sympify(t_m)) + ovh


def estimate_node(node: Node, device: DeviceSpec, phys: Mapping[str, Dim] | None = None) -> Estimate:
    """Roofline estimate of one node run as its own kernel, symbolic in the IR dims."""
    c = node_cost(node, phys)
    if c.op_class == "view":
        return Estimate(0, 0, 0.0, "view", c.compute_dtype)
    lat = roofline_s(c.flops, c.bytes, device, c.op_class, c.compute_dtype)
    return Estimate(c.flops, c.bytes, lat, c.op_class, c.compute_dtype)


# ----------------------------------------------------------------------------- fusion groups
_POINTWISE = ("elementwise", "quant")
_ANCHORS = ("gemm", "conv", "dwconv")


def physical_bytes(g: Graph) -> dict[str, Dim]:
    """value -> bytes it occupies: views share their source's storage (``expand`` of a
    [1, 1, L] mask to [B, H, L, L] still occupies L elements)."""
    phys: dict[str, Dim] = {}
    for v in (*g.inputs, *g.params):
        phys[v.name] = vbytes(v)
    for n in g.nodes:
        if op_class(n) == "view" and n.inputs and n.inputs[0] is not None:
            src = phys.get(n.inputs[0].name, vbytes(n.inputs[0]))
            out = vbytes(n.outputs[0])
            phys[n.outputs[0].name] = src if n.op == "expand" else out
        else:
            for v in n.outputs:
                phys[v.name] = vbytes(v)
    return phys


def fusion_groups(g: Graph) -> list[list[int]]:
    """Groups of node indices that Inductor-style fusion runs as one kernel.

    Rules (a model of Inductor's scheduler with oneDNN post-op fusion on CPU):
    views join their producer and cost nothing; a pointwise node joins the group of the
    producer of its largest input when that group is a GEMM/conv (epilogue), pointwise, or
    reduction/norm group (consumer fusion); a reduction/norm/softmax joins a purely
    pointwise producer group (prologue fusion). GEMMs, convs, attention, gathers and data
    movement start their own group.
    """
    prod: dict[str, int] = {}
    group_of: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    kind: dict[int, str] = {}   # group id -> "anchor" | "pointwise" | "reduction" | other class
    for i, n in enumerate(g.nodes):
        cls = op_class(n)
        target: int | None = None
        cands = [(v, prod[v.name]) for v in n.inputs if v is not None and v.name in prod]
        cands.sort(key=lambda p: -_static_size(p[0]))
        if cls == "view" and cands:
            target = group_of[cands[0][1]]
        elif cls in _POINTWISE:
            for _, j in cands:
                gid = group_of[j]
                if kind[gid] in ("anchor", "pointwise", "reduction"):
                    target = gid
                    break
        elif cls in ("reduction", "norm"):
            for _, j in cands:
                gid = group_of[j]
                if kind[gid] == "pointwise":
                    target = gid
                    break
        if target is None:
            group_of[i] = i
            groups[i] = [i]
            kind[i] = ("anchor" if cls in _ANCHORS else "pointwise" if cls in _POINTWISE
                       else "reduction" if cls in ("reduction", "norm") else cls)
        else:
            group_of[i] = target
            groups[target].append(i)
            if cls in ("reduction", "norm") and kind[target] == "pointwise":
                kind[target] = "reduction"
        for v in n.outputs:
            prod[v.name] = i
    return [groups[k] for k in sorted(groups)]


def _static_size(v: Value) -> int:
    n = 1
    for d in v.type.shape:
        n *= d if isinstance(d, int) else 64
    return n


# ----------------------------------------------------------------------------- graph estimate
@dataclass(frozen=True)
class GroupEstimate:
    """One kernel: the nodes it runs, its cost at concrete shapes, its anchor op class."""

    nodes: tuple[int, ...]
    op_class: str
    compute_dtype: str
    flops: float
    bytes: float
    latency_s: float
    analytical_s: float
    features: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphEstimate:
    """Per node and total predictions at one binding of the symbols (times in microseconds)."""

    device: str
    runtime: str
    symbols: Mapping[str, int]
    node_us: tuple[float, ...]
    groups: tuple[GroupEstimate, ...]
    total_us: float
    flops: float
    bytes: float
    corrected: bool

    @property
    def total_ms(self) -> float:
        return self.total_us / 1e3

    def by_class(self) -> dict[str, float]:
        """op class -> microseconds."""
        out: dict[str, float] = {}
        for gr in self.groups:
            out[gr.op_class] = out.get(gr.op_class, 0.0) + gr.latency_s * 1e6
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def compute_us(self) -> float:
        """Microseconds of the compute-bound kernels (`COMPUTE_CLASSES`: GEMMs, convs,
        attention); the rest of `total_us` is memory-bound kernels, dispatch and the call."""
        return sum(gr.latency_s for gr in self.groups if gr.op_class in COMPUTE_CLASSES) * 1e6

    def scaled_us(self, compute: float, other: float) -> float:
        """`total_us` on a host whose compute-bound kernels run ``compute`` times and whose
        other kernels (and the call) ``other`` times as long as the device spec measured:
        the two slowdowns two host-speed probes read (`devices.host_speed`)."""
        comp = self.compute_us()
        return comp * compute + (self.total_us - comp) * other

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "runtime": self.runtime, "symbols": dict(self.symbols),
                "total_us": round(self.total_us, 3), "flops": self.flops, "bytes": self.bytes,
                "kernels": len(self.groups), "corrected": self.corrected,
                "by_class_us": {k: round(v, 3) for k, v in self.by_class().items()}}


Correction = Callable[[Mapping[str, float]], float]


def _ev(d: Dim, env: Mapping[str, int]) -> float:
    if isinstance(d, int | float):
        return float(d)
    v = d.subs({s: env[s.name] for s in d.free_symbols if s.name in env})
    if not v.is_number:
        raise ValueError(f"expression {d} needs values for "
                         f"{', '.join(sorted(s.name for s in v.free_symbols))}")
    return float(v)


def group_features(g: Graph, idx: Sequence[int], costs: Sequence[NodeCost],
                   env: Mapping[str, int], flops: float, nbytes: float,
                   device: DeviceSpec) -> dict[str, float]:
    """Features of one kernel for the learned correction (see `measured`)."""
    anchor = g.nodes[idx[0]]
    for i in idx:
        if costs[i].op_class not in ("view",) + _POINTWISE:
            anchor = g.nodes[i]
            break
    cls = op_class(anchor)
    m = n = k = 1.0
    if cls == "gemm" and anchor.inputs[0] is not None:
        x, out = anchor.inputs[0], anchor.outputs[0]
        k = float(evaluate(x.type.shape[-1], env))
        n = float(evaluate(out.type.shape[-1], env)) if out.type.rank else 1.0
        m = max(1.0, float(evaluate(_numel(out.type.shape), env)) / max(n, 1.0))
    elif cls in ("conv", "dwconv") and anchor.inputs[1] is not None:
        w, out = anchor.inputs[1], anchor.outputs[0]
        n = float(evaluate(w.type.shape[0], env))
        k = float(evaluate(_numel(w.type.shape[1:]), env))
        m = max(1.0, float(evaluate(_numel(out.type.shape), env)) / max(n, 1.0))
    elif cls == "attention" and anchor.inputs[0] is not None and anchor.inputs[1] is not None:
        q, kk = anchor.inputs[0], anchor.inputs[1]
        m = float(evaluate(q.type.shape[-2], env))
        n = float(evaluate(kk.type.shape[-2], env))
        k = float(evaluate(q.type.shape[-1], env))
    out_elems = sum(float(evaluate(_numel(v.type.shape), env)) for v in anchor.outputs)
    return {
        "cls": float(CLASS_IDS.get(cls, CLASS_IDS["elementwise"])),
        "log_flops": math.log10(flops + 1.0), "log_bytes": math.log10(nbytes + 1.0),
        "log_ai": math.log10((flops + 1.0) / (nbytes + 1.0)),
        "log_m": math.log10(m), "log_n": math.log10(n), "log_k": math.log10(k),
        "log_out": math.log10(out_elems + 1.0), "n_nodes": float(len(idx)),
        "dtype_bytes": float(DTYPE_BYTES.get(_float_dtype(list(anchor.outputs)), 4)),
        "compute_bound": float(flops / device.peak("float32") > nbytes / device.mem_bw),
    }


CLASS_IDS: dict[str, int] = {c: i for i, c in enumerate(
    ("gemm", "conv", "dwconv", "attention", "norm", "reduction", "gather", "data", "quant",
     "elementwise", "view"))}


def estimate_graph(g: Graph, device: DeviceSpec, symbols: Mapping[str, int] | None = None, *,
                   runtime: str = "inductor", correction: Correction | None = None,
                   kernel_overhead_s: float | None = None) -> GraphEstimate:
    """Predicted latency of ``g`` on ``device`` at concrete symbol values.

    Args:
        g: the graph as the backend runs it (after the pipeline).
        device: the device spec.
        symbols: symbol name -> value (``{"batch": 4, "seq": 128}``); all free symbols needed.
        runtime: "inductor" (fused kernels) or "eager" (one dispatch per node, views included).
        correction: kernel features -> multiplicative factor on the analytical latency (the
            learned residual model, `measured.Correction.factor`); None: pure roofline.
        kernel_overhead_s: fixed cost per kernel (default: the device's launch overhead).

    Returns:
        A `GraphEstimate` with per-node and total microseconds.
    """
    if runtime not in ("inductor", "eager"):
        raise ValueError(f"runtime must be 'inductor' or 'eager', got {runtime!r}")
    env = dict(symbols or {})
    phys = physical_bytes(g) if runtime == "inductor" else {}
    costs = [node_cost(n, phys) for n in g.nodes]
    ovh = device.launch_overhead_s if kernel_overhead_s is None else kernel_overhead_s
    if runtime == "inductor":
        groups = fusion_groups(g)
    else:
        groups = [[i] for i in range(len(g.nodes))]
    users = g.users()
    out_names = {v.name for v in g.outputs}
    node_us = [0.0] * len(g.nodes)
    results: list[GroupEstimate] = []
    tot_f = tot_b = tot_s = 0.0
    for idx in groups:
        members = set(idx)
        produced = {v.name: i for i in idx for v in g.nodes[i].outputs}
        member_ids = {id(g.nodes[i]) for i in members}
        flops = 0.0
        compute_s = 0.0
        read: dict[str, float] = {}
        write: dict[str, float] = {}
        anchor_cls, anchor_dt = costs[idx[0]].op_class, costs[idx[0]].compute_dtype
        for i in idx:
            c = costs[i]
            if c.op_class == "view" and runtime == "inductor":
                continue
            if anchor_cls in ("view",) + _POINTWISE and c.op_class not in _POINTWISE:
                anchor_cls, anchor_dt = c.op_class, c.compute_dtype
            f = _ev(c.flops, env)
            flops += f
            ce, _ = _effs(device, c.op_class)
            compute_s += f / (device.peak(c.compute_dtype) * ce)
            for name, b in c.reads:
                if name not in produced or runtime == "eager":
                    read.setdefault(name, _ev(b, env))
            for name, b in c.writes:
                esc = name in out_names or any(
                    id(u) not in member_ids for u in users.get(name, []))
                if esc or runtime == "eager":
                    write.setdefault(name, _ev(b, env))
        nbytes = sum(read.values()) + sum(write.values())
        all_views = all(costs[i].op_class == "view" for i in idx)
        if all_views and runtime == "inductor":
            results.append(GroupEstimate(tuple(idx), "view", anchor_dt, 0.0, 0.0, 0.0, 0.0))
            continue
        _, me = _effs(device, anchor_cls)
        mem_s = nbytes / (device.mem_bw * me)
        analytical = max(compute_s, mem_s) + ovh
        lat = analytical
        feats: dict[str, float] = {}
        if correction is not None:
            feats = group_features(g, idx, costs, env, flops, nbytes, device)
            lat = analytical * correction(feats)
        results.append(GroupEstimate(tuple(idx), anchor_cls, anchor_dt, flops, nbytes, lat,
                                     analytical, feats))
        # attribute the kernel's time to its nodes by their standalone roofline share
        shares = [max(_ev(costs[i].flops, env), 1.0) if costs[i].op_class != "view" else 0.0
                  for i in idx]
        tot = sum(shares) or 1.0
        for i, s in zip(idx, shares):
            node_us[i] += lat * 1e6 * s / tot
        tot_f += flops
        tot_b += nbytes
        tot_s += lat
    return GraphEstimate(device.name, runtime, env, tuple(node_us), tuple(results),
                         tot_s * 1e6, tot_f, tot_b, correction is not None)
