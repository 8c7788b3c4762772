"""Post-training quantization of linear layers, gated per layer by measured speed on this CPU.

Before -> After (scheme w8a8-dynamic)::

    %y = linear(%x, %w, %b)              %y = qlinear_dynamic(%x, %w_q, %w_scale, %b)
    %z = fused_linear(%x, %w, %b, %r)    %z = qlinear_dynamic(%x, %w_q, %w_scale, %b, %r)
         {activation=gelu, ...}               {activation=gelu, ...}

Schemes (``quantize{scheme=...}``):

- ``w8a8-dynamic``: int8 per-channel weights, activations quantized per call to u7, with one
  scale per token (``act_quant=token``, the default when ONNX Runtime runs the graph on a CPU
  without int8 dot products: MiniLM
  cosine 0.993 with every layer quantized) or per tensor (``act_quant=tensor``, fbgemm's
  scheme: 0.973) or per tensor in full-range u8 (``act_quant=tensor_u8``: ONNX
  DynamicQuantizeLinear, which ONNX Runtime runs as one fused DynamicQuantizeMatMul kernel; exact
  only on CPUs with VNNI/AMX int8 dot products). ``act_quant=auto`` (the default, = ``measure``)
  on such a CPU, with ONNX Runtime, picks per layer (ViT-B/16 on a VNNI Xeon: 2.58x Ember fp32,
  1.09x ORT int8 at cosine 0.9994; MiniLM 5% faster than all-token): it runs the layer's activations from the example (or calibration) inputs through both
  references and takes tensor_u8 unless its output error exceeds ``act_error_ratio`` x the
  per-token error (a few huge tokens make per-tensor scales coarse; plain ViT activations do
  not); where the per-token form is then measured slower than fp32 (narrow layers: 0.62x at
  3200 x 64 x 64), the u8 form is tried while its error is within ``act_speed_ratio`` x the
  per-token error (the alternative being fp32); with ``outliers=true`` (needs calibration) the few massive-activation input channels
  (abs-max >= ``outlier_ratio`` x the median channel's, at most 2%) are computed in fp32:
  MiniLM cosine 0.973 -> 0.994, at the cost of a copy of x per call (the gate times it).
  For ``w8a8-static`` outliers are on by default (no copy: the kernel clamps them away).
- ``w8a8-static``: activation range calibrated on ``ctx.calib`` (``calib_method`` minmax or
  percentile).
- ``w8``, ``w4g32|w4g64|w4g128``: weight-only, group-wise symmetric scales.
  Their 4-bit group scales are clipped where that lowers the group's squared weight error
  (``clip=auto``, = ``mse`` for 4 bits; ``clip=none``: |w|max / 7).
- ``w4a8g32|w4a8g64|w4a8g128``: the int4 weights of ``w4gN`` with the activations rounded to
  int8 per row and group at run time (ONNX Runtime's MatMulNBits at accuracy level 4): its int8
  kernels make a decode step's int4 products faster than fp32 (1 x 576 x 1536 on an AVX2 EPYC:
  66 us vs ~220 us fp32 and 280 us for weight-only int4), at the cost of rounding activations.
- ``lut2|lut3|lut4`` (optionally ``lut3g64``): non-uniform HLQ codebooks (ELUTQ-style).
- ``bf16``: bf16 weights and activations.

Gating (``gate=measure``, default): a layer is rewritten only where the roofline predicts the
kernel is not slower and a cached interleaved micro-benchmark at its (M, K, N) measures it at
least ``min_speedup`` faster than fp32 (`._qkernels.gate`); M comes from the example inputs.
The micro-benchmark times what will run: with ``gate_runtime=onnxruntime`` (the default for the
CPU target when its context carries the target's gate, ``ctx.gate``, which the driver sets when
onnxruntime is installed, as the CPU backend ships ORT on Ember's graph when it is fastest) the
layer's ONNX export against the fp32 layer, both in ONNX Runtime (``ctx.gate.linear_runners``);
with ``gate_runtime=torch`` (or no gate) the op's torch kernel (fbgemm) against ``F.linear``.
``gate=predict`` trusts the roofline, ``gate=always`` rewrites every eligible layer.
With ``gate=measure`` and ONNX Runtime, the whole model is then timed before and after in ONNX
Runtime on the compile's example inputs (``ctx.gate.compare``), and the rewrite is dropped
unless it is at least ``min_model_speedup`` faster: layers that each win alone can lose together.
With ``sensitivity=true`` and calibration data, each gated layer is quantized alone and the
output cosine against fp32 is measured on the calibration inputs; a layer whose drop exceeds
``max_layer_drop`` falls back along its scheme's chain (w4 -> w8, lut2 -> lut3 -> w8,
w8a8-dynamic -> w8a8-dynamic with outliers) and finally to fp32. Every decision and its numbers
go to ``ctx.records["quantize"]`` and from there into the artifact manifest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ember.errors import CompilerError
from ember.hostinfo import has_int8_dot
from ember.ir import (
    Graph,
    GraphBuilder,
    Node,
    TensorType,
    Value,
    bind_symbols,
    evaluate,
    get_op,
    ops_with,
    rewrite,
    run_graph,
    sym,
)
from ember.ir.opset_quant import (
    ACT_QUANT_MODES,
    EPILOGUE_ATTRS,
    choose_u7_qparams,
    fit_hlq,
    pack_bits,
    quantize_weight_groups,
    quantize_weight_per_channel,
)
from ember.passmanager import PassContext, TargetGate, register_pass

from . import _calib
from ._qkernels import GateResult, gate
from ._rewrite import eliminate_dead

__all__ = ["QuantizeConfig", "quantize", "parse_scheme", "SchemeSpec", "linear_candidates",
           "example_env"]

log = logging.getLogger(__name__)

LINEAR_OPS = ops_with("linear") - ops_with("quantized")  # the float linears it quantizes


@dataclass(frozen=True)
class QuantizeConfig:
    """Knobs of the quantize pass (see the module docstring)."""

    scheme: str = "w8a8-dynamic"
    gate: str = "measure"  # measure | predict | always
    min_speedup: float = 1.05
    # the whole quantized model must run at least this much faster than fp32 (gate=measure)
    min_model_speedup: float = 1.02
    calib_method: str = "minmax"  # minmax | percentile (static scheme)
    percentile: float = 99.99
    outliers: bool | None = None  # None: on for w8a8-static when calibration data is given
    outlier_ratio: float = 4.0
    sensitivity: bool = False
    max_layer_drop: float = 0.002  # 1 - cosine, per layer quantized alone
    skip: str = ""  # "|"-separated substrings of weight names left in fp32
    min_features: int = 32
    # w8a8-dynamic activations: one u7 scale per token (ONNX Runtime form), per tensor u7
    # (fbgemm) or per tensor u8 (ONNX Runtime's fused DynamicQuantizeMatMul; VNNI/AMX only);
    # auto / measure: per layer token or tensor_u8 by measured error on VNNI/AMX CPUs with ONNX
    # Runtime; elsewhere token when the gate times ONNX Runtime, else tensor
    act_quant: str = "auto"
    act_error_ratio: float = 1.0  # measure: tensor_u8 while its error <= this x token's
    # measure: a layer whose per-token form is not faster than fp32 tries tensor_u8 while that
    # error <= this x token's (the alternative is fp32, not the more exact int8 form)
    act_speed_ratio: float = 2.0
    embeddings: str = "none"  # none | int8: embedding tables as int8 rows + fp32 row scales
    gate_runtime: str = "auto"  # auto | onnxruntime | torch: whose kernels the gate times
    # weight-only group scales: mse = per group the clipped scale with the least squared
    # weight error (`quantize_weight_groups`); auto = mse for 4-bit weights, none for 8-bit
    clip: str = "auto"

    def __post_init__(self) -> None:
        parse_scheme(self.scheme)
        if self.gate not in ("measure", "predict", "always"):
            raise ValueError(f"gate must be measure, predict or always, got '{self.gate}'")
        if self.calib_method not in ("minmax", "percentile"):
            raise ValueError("calib_method must be minmax or percentile")
        if self.act_quant not in ("auto", "measure", *ACT_QUANT_MODES):
            raise ValueError(f"act_quant must be auto, measure, {', '.join(ACT_QUANT_MODES)}; got "
                             f"'{self.act_quant}'")
        if self.embeddings not in ("none", "int8"):
            raise ValueError(f"embeddings must be none or int8, got '{self.embeddings}'")
        if self.gate_runtime not in ("auto", "onnxruntime", "torch"):
            raise ValueError("gate_runtime must be auto, onnxruntime or torch")
        if self.clip not in ("auto", "none", "mse"):
            raise ValueError(f"clip must be auto, none or mse, got '{self.clip}'")


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    kind: str  # dynamic | static | woq | lut | bf16
    bits: int = 8
    group: int = 0  # 0 = whole row
    outliers: bool = False
    act: str = "none"  # woq: "block" rounds the activations to int8 per group too (W4A8)


_SCHEME_RE = re.compile(r"^(?:(w8a8-dynamic|w8a8-static|w8|bf16)|w4(a8)?g(\d+)"
                        r"|lut([1-4])(?:g(\d+))?)$")


def parse_scheme(s: str) -> SchemeSpec:
    m = _SCHEME_RE.match(s)
    if not m:
        raise ValueError(f"unknown quantization scheme '{s}'; known: w8a8-dynamic, "
                         f"w8a8-static, w8, w4g32, w4g64, w4g128, w4a8g32, w4a8g64, "
                         f"w4a8g128, bf16, lut2, lut3, lut4[gN]")
    if m.group(1):
        kind = {"w8a8-dynamic": "dynamic", "w8a8-static": "static", "w8": "woq",
                "bf16": "bf16"}[m.group(1)]
        return SchemeSpec(s, kind, 16 if kind == "bf16" else 8)
    if m.group(3):
        return SchemeSpec(s, "woq", 4, int(m.group(3)), act="block" if m.group(2) else "none")
    return SchemeSpec(s, "lut", int(m.group(4)), int(m.group(5) or 128))


def _fallbacks(spec: SchemeSpec, has_calib: bool) -> list[SchemeSpec]:
    """Candidate schemes for one layer, most compressed first (sensitivity fallbacks)."""
    chain = [spec]
    if spec.kind == "dynamic" and not spec.outliers and has_calib:
        chain.append(SchemeSpec(spec.name, "dynamic", 8, 0, outliers=True))
    if spec.kind == "woq" and spec.bits == 4:
        if spec.act == "block":  # the activations' rounding first, then the weights'
            chain.append(parse_scheme(f"w4g{spec.group}"))
        chain.append(parse_scheme("w8"))
    if spec.kind == "lut":
        if spec.bits < 3:
            chain.append(parse_scheme(f"lut3g{spec.group}"))
        chain.append(parse_scheme("w8"))
    return chain


# ----------------------------------------------------------------------------- candidates
def example_env(g: Graph, ctx: PassContext) -> dict[str, int]:
    """Symbol values from the example inputs (``ctx.example_inputs``)."""
    ex = ctx.example_inputs
    if not ex:
        return {}
    try:
        return bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in ex],
                            list(g.input_names or [v.name for v in g.inputs]))
    except Exception as e:  # shapes that do not bind: fall back to defaults
        log.warning("example inputs do not bind the graph's symbols: %s", e)
        return {}


def _rows(x: Value, env: dict[str, int], default: int = 128) -> int:
    m = 1
    for d in x.type.shape[:-1]:
        try:
            m *= int(evaluate(d, env)) if not isinstance(d, int) else d
        except Exception:
            m *= default
            default = 1
    return max(m, 1)


def linear_candidates(g: Graph, skip: str = "",
                      min_features: int = 1) -> list[tuple[Node, torch.Tensor]]:
    """(node, fp32 weight) of every linear/fused_linear with a constant 2-d fp32 weight."""
    skips = [s for s in skip.split("|") if s]
    out = []
    for n in g.nodes:
        if n.op not in LINEAR_OPS or len(n.inputs) < 2 or n.inputs[1] is None:
            continue
        x, w = n.inputs[0], n.inputs[1]
        t = g.weights.get(w.name)
        if x is None or t is None or t.dim() != 2 or t.dtype != torch.float32:
            continue
        if x.type.dtype != "float32" or any(s in w.name for s in skips):
            continue
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        if bias is not None and bias.name not in g.weights:
            continue
        if min(t.shape) < min_features:
            continue
        out.append((n, t))
    return out


# ----------------------------------------------------------------------------- emission
@dataclass
class _Prepared:
    op: str
    tensors: list[tuple[str, torch.Tensor]]  # (suffix, tensor) params after x
    attrs: dict[str, Any]
    outlier: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, w_outlier)


def prepare(spec: SchemeSpec, w: torch.Tensor, x_range: tuple[float, float] | None = None,
            outlier_idx: Sequence[int] = (), act_quant: str = "tensor",
            clip: str = "none") -> _Prepared:
    """Quantized operands of one weight under ``spec``."""
    w = w.detach().float()
    n, k = w.shape
    if spec.kind in ("dynamic", "static"):
        outlier = None
        if outlier_idx:
            idx = torch.tensor(sorted(outlier_idx), dtype=torch.int64)
            outlier = (idx, w[:, idx].contiguous())
            w = w.index_fill(1, idx, 0.0)
        q, s = quantize_weight_per_channel(w)
        attrs: dict[str, Any] = {"act_quant": act_quant} if spec.kind == "dynamic" else {}
        if spec.kind == "static":
            if x_range is None:
                raise CompilerError("quantize{scheme=w8a8-static} needs calibration inputs "
                                    "(ember.compile(..., calib=[...]))")
            sc, zp = choose_u7_qparams(*x_range)
            attrs = {"x_scale": sc, "x_zero_point": zp}
        op = "qlinear_dynamic" if spec.kind == "dynamic" else "qlinear_static"
        return _Prepared(op, [("q", q), ("scale", s)], attrs, outlier)
    if spec.kind == "woq":
        g = spec.group or k
        if clip == "auto":
            clip = "mse" if spec.bits == 4 else "none"
        q, s = quantize_weight_groups(w, spec.bits, g, clip=clip)
        attrs = {"bits": spec.bits, "group_size": g}
        if spec.act != "none":
            attrs["act_quant"] = spec.act
        return _Prepared("linear_woq", [("q", q), ("scale", s)], attrs)
    if spec.kind == "lut":
        codes, coef = fit_hlq(w, spec.bits, spec.group)
        return _Prepared("lut_linear", [("codes", pack_bits(codes, spec.bits)), ("coef", coef)],
                         {"bits": spec.bits, "group_size": spec.group, "shape": (n, k)})
    if spec.kind == "bf16":
        return _Prepared("linear_bf16", [("bf16", w.to(torch.bfloat16))], {})
    raise ValueError(spec.kind)


def eligible(spec: SchemeSpec, w: torch.Tensor) -> str | None:
    """Why ``spec`` cannot apply to weight ``w`` (None when it can)."""
    n, k = w.shape
    if spec.kind == "woq" and spec.bits == 4 and k % (spec.group or k):
        return f"in-features {k} not divisible by group {spec.group}"
    if spec.kind == "lut" and (k % spec.group or k % 8):
        return f"in-features {k} not divisible by group {spec.group}"
    return None


def emit(node: Node, b: GraphBuilder, prep: _Prepared) -> Value:
    """Appends the quantized replacement of linear/fused_linear ``node`` to ``b``."""
    x, w = node.inputs[0], node.inputs[1]
    assert x is not None and w is not None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    res = node.inputs[3] if len(node.inputs) > 3 else None
    ins: list[Value | None] = [x]
    for suffix, t in prep.tensors:
        ins.append(b.add_param(f"{w.name}_{suffix}", t))
    epi = {k: node.attrs[k] for k in EPILOGUE_ATTRS if k in node.attrs}
    if prep.op == "linear_bf16":
        ins += [bias, res] if res is not None else [bias]
    else:
        ins += [bias, res]
        if prep.outlier is not None:
            ins += [b.add_param(f"{w.name}_oidx", prep.outlier[0]),
                    b.add_param(f"{w.name}_ow", prep.outlier[1])]
    while ins and ins[-1] is None:
        ins.pop()
    out = b.op(prep.op, ins, {**prep.attrs, **epi}, loc=node.loc, name=node.output.name)
    assert isinstance(out, Value)
    return out


def quantize_embeddings(g: Graph) -> tuple[Graph, list[dict[str, Any]]]:
    """``embedding(w, ids)`` with a constant fp32 table -> ``embedding(w_q, ids)`` (int8,
    symmetric per row) times ``embedding(w_scale, ids)``: a quarter of the bytes for the tables
    that dominate small LMs (SmolLM2-135M: 21% of its parameters)."""
    recs: list[dict[str, Any]] = []

    def fn(n: Node, b: GraphBuilder) -> list[Value] | None:
        if n.op != "embedding" or len(n.inputs) < 2 or n.inputs[0] is None:
            return None
        w = n.inputs[0]
        t = g.weights.get(w.name)
        if t is None or t.dim() != 2 or t.dtype != torch.float32:
            return None
        q, s = quantize_weight_per_channel(t)
        ids = n.inputs[1]
        rows = b.op("embedding", [b.add_param(f"{w.name}_q", q), ids], {}, loc=n.loc)
        scale = b.op("embedding", [b.add_param(f"{w.name}_scale", s[:, None].contiguous()),
                                   ids], {}, loc=n.loc)
        f = b.op("cast", [rows], {"dtype": "float32"}, loc=n.loc)
        out = b.op("mul", [f, scale], {}, loc=n.loc, name=n.output.name)
        assert isinstance(out, Value)
        recs.append({"weight": w.name, "shape": list(t.shape), "decision": "int8-rows"})
        return [out]
    return eliminate_dead(rewrite(g, fn)), recs


def apply(g: Graph, plan: dict[str, _Prepared]) -> Graph:
    """Rewrites the nodes named (by output) in ``plan``; drops the dead fp32 weights."""
    def fn(n: Node, b: GraphBuilder) -> list[Value] | None:
        prep = plan.get(n.outputs[0].name)
        return None if prep is None else [emit(n, b, prep)]
    return eliminate_dead(rewrite(g, fn))


def kernel_factory(spec: SchemeSpec, n: int, k: int,
                   act_quant: str = "tensor") -> Callable[[torch.Tensor], Callable]:
    """``x -> (() -> y)`` running the scheme's op reference on random weights of [n, k]."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.05
    # with outliers, time the worst case the calibration may pick (2% of the channels)
    idx = list(range(0, k, 50)) if spec.outliers else []
    prep = prepare(spec, w, x_range=(-4.0, 4.0), outlier_idx=idx, act_quant=act_quant)
    opdef = get_op(prep.op)
    attrs = opdef.normalize_attrs(dict(prep.attrs))
    bias = torch.zeros(n)

    def make(x: torch.Tensor) -> Callable[[], Any]:
        ops: list[torch.Tensor | None] = [x] + [t for _, t in prep.tensors]
        ops += [bias.to(torch.bfloat16) if spec.kind == "bf16" else bias]
        if prep.outlier is not None:
            ops += [None, prep.outlier[0], prep.outlier[1]]
        return lambda: opdef.reference(ops, attrs)
    return make


def _one_linear_graph(k: int, prep: _Prepared | None, w: torch.Tensor,
                      bias: torch.Tensor) -> Graph:
    """``y = linear(x, w, b)`` over x [m, k] (symbolic m), or its quantized form ``prep``."""
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("m"), k)))
    if prep is None:
        y = b.op("linear", [x, b.add_param("w", w), b.add_param("b", bias)])
    else:
        ins: list[Value | None] = [x] + [b.add_param(f"w_{s}", t) for s, t in prep.tensors]
        ins.append(b.add_param("b", bias))
        if prep.outlier is not None:
            ins += [None, b.add_param("oidx", prep.outlier[0]),
                    b.add_param("ow", prep.outlier[1])]
        y = b.op(prep.op, ins, prep.attrs)
    assert isinstance(y, Value)
    b.set_outputs([y])
    return b.build()


def ort_factories(gate: TargetGate, spec: SchemeSpec, n: int, k: int, act_quant: str = "tensor"
                  ) -> tuple[Callable[[torch.Tensor], Callable], Callable[[torch.Tensor], Callable]]:
    """(fp32, quantized) ``x -> (() -> y)`` factories running the layer in the target's
    program (``gate.linear_runners``: for the CPU target its ONNX export in ONNX Runtime, one
    layer, same threads). Raises ImportError or CompilerError where the target cannot."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.05
    bias = torch.zeros(n)
    idx = list(range(0, k, 50)) if spec.outliers else []
    prep = prepare(spec, w, x_range=(-4.0, 4.0), outlier_idx=idx, act_quant=act_quant)
    fp32_f, q_f = gate.linear_runners([_one_linear_graph(k, p, w, bias) for p in (None, prep)])
    return fp32_f, q_f


def act_quant_errors(g: Graph, layers: Sequence[tuple[Node, torch.Tensor]],
                     inputs: Sequence[Any], modes: Sequence[str] = ("token", "tensor_u8"),
                     max_rows: int = 4096) -> dict[str, dict[str, float]]:
    """Mean per-token relative output error ||y_q - y|| / ||y|| of each activation mode per
    layer (by output name), on the layers' real inputs from one run of ``g`` on ``inputs``
    (per-tensor modes see the whole activation, as at run time; at most ``max_rows`` rows are
    scored)."""
    want = {n.inputs[0].name for n, _ in layers if n.inputs[0] is not None}
    acts: dict[str, torch.Tensor] = {}

    def watch(name: str, t: torch.Tensor) -> None:
        if name in want and name not in acts and t.is_floating_point():
            acts[name] = t
    run_graph(g, *inputs, watch=watch)
    d = get_op("qlinear_dynamic")
    out: dict[str, dict[str, float]] = {}
    spec = SchemeSpec("w8a8-dynamic", "dynamic")
    with torch.no_grad():
        for n, w in layers:
            x = acts.get(n.inputs[0].name)  # type: ignore[union-attr]
            if x is None:
                continue
            x = x.float()
            r2 = F.linear(x, w).reshape(-1, w.shape[0])[:max_rows]
            # mean of per-token errors: a few huge tokens must not hide the rest
            rn = r2.norm(dim=1)
            rn = rn.clamp_min(1e-6 * float(rn.max().clamp_min(1e-12)))
            errs: dict[str, float] = {}
            for mode in modes:
                prep = prepare(spec, w, act_quant=mode)
                y = d.reference([x] + [t for _, t in prep.tensors],
                                d.normalize_attrs(dict(prep.attrs)))
                y2 = y.reshape(-1, w.shape[0])[:max_rows]
                errs[mode] = float(((y2 - r2).norm(dim=1) / rn).mean())
            out[n.output.name] = errs
    return out


def _gate_runtime(cfg: QuantizeConfig, ctx: PassContext) -> str:
    if cfg.gate_runtime != "auto":
        return cfg.gate_runtime
    if ctx.target != "cpu" or ctx.gate is None:  # no gate: nothing but torch kernels to time
        return "torch"
    return "onnxruntime"


# ----------------------------------------------------------------------------- the pass
@register_pass(config=QuantizeConfig, numerics="approx",
               requires=("types", "shapes"))
def quantize(g: Graph, cfg: QuantizeConfig, ctx: PassContext) -> Graph:
    """Quantizes linear layers to the chosen scheme where it is measured faster on this CPU."""
    spec = parse_scheme(cfg.scheme)
    calib = _calib.as_input_tuples(ctx.calib) if ctx.calib else None
    want_outliers = cfg.outliers if cfg.outliers is not None else \
        bool(calib) and spec.kind == "static"
    if want_outliers and spec.kind in ("dynamic", "static"):
        spec = SchemeSpec(spec.name, spec.kind, spec.bits, spec.group, outliers=True)
    if (spec.kind == "static" or cfg.outliers) and not calib:
        raise CompilerError(f"quantize{{scheme={cfg.scheme}"
                            f"{',outliers=true' if cfg.outliers else ''}}} needs calibration "
                            f"inputs: ember.compile(..., calib=[input tuples])")
    cands = linear_candidates(g, cfg.skip, cfg.min_features)
    env = example_env(g, ctx)
    stats: dict[str, _calib.ActStats] = {}
    if calib and (spec.kind == "static" or spec.outliers or cfg.sensitivity):
        xs = {n.inputs[0].name for n, _ in cands if n.inputs[0] is not None}
        stats = _calib.collect_stats(g, calib, xs, seed=ctx.seed)

    def prep_for(s: SchemeSpec, n: Node, w: torch.Tensor) -> tuple[_Prepared, dict[str, Any]]:
        act_quant = act_for.get(n.output.name, default_act)
        x = n.inputs[0]
        assert x is not None
        st = stats.get(x.name)
        info: dict[str, Any] = {}
        rng = None
        if s.kind == "static" and st is not None:
            rng = _calib.activation_range(st, cfg.calib_method, cfg.percentile)
            info["x_range"] = [round(rng[0], 5), round(rng[1], 5)]
        idx: list[int] = []
        if s.outliers and st is not None:
            idx = _calib.outlier_channels(st, cfg.outlier_ratio)
            info["outlier_channels"] = idx
        return prepare(s, w, rng, idx, act_quant, cfg.clip), info

    layers: list[dict[str, Any]] = []
    plan: dict[str, tuple[SchemeSpec, Node, torch.Tensor, GateResult]] = {}
    runtime = _gate_runtime(cfg, ctx)
    default_act = cfg.act_quant if cfg.act_quant not in ("auto", "measure") else \
        "token" if runtime == "onnxruntime" else "tensor"
    act_for: dict[str, str] = {}
    act_errs: dict[str, dict[str, float]] = {}
    score_on = calib[0] if calib else ctx.example_inputs
    if cfg.act_quant in ("auto", "measure") and spec.kind == "dynamic" and not spec.outliers \
            and runtime == "onnxruntime" and has_int8_dot() and score_on and cands:
        act_errs = act_quant_errors(g, [(n, w) for n, w in cands if not eligible(spec, w)],
                                    score_on)
        for name, e in act_errs.items():
            act_for[name] = "tensor_u8" if \
                e["tensor_u8"] <= cfg.act_error_ratio * e["token"] else "token"
    base_tag = cfg.scheme + ("+outliers" if spec.outliers else "")  # the gate cache's key
    for n, w in cands:
        nn_, k = w.shape
        x = n.inputs[0]
        assert x is not None
        m = _rows(x, env)
        rec: dict[str, Any] = {"node": n.output.name, "weight": n.inputs[1].name,  # type: ignore
                               "op": n.op, "M": m, "K": k, "N": nn_}
        why = eligible(spec, w)
        if why:
            rec.update(decision="fp32", reason=why)
            layers.append(rec)
            continue
        act_quant = act_for.get(n.output.name, default_act)
        if spec.kind == "dynamic":
            rec["act_quant"] = act_quant
            if n.output.name in act_errs:
                rec["act_error"] = {k: round(v, 6) for k, v in act_errs[n.output.name].items()}

        def ort_gate(act: str, m: int = m, k: int = k, nn_: int = nn_) -> GateResult | None:
            """The layer's gate timed in ONNX Runtime with activations ``act`` (None when
            the gate does not time ORT or ORT cannot build the layer)."""
            if runtime != "onnxruntime" or cfg.gate != "measure" or ctx.gate is None:
                return None
            tag = base_tag + (f"+{act}" if spec.kind == "dynamic" else "")
            try:
                fp32_f, q_f = ort_factories(ctx.gate, spec, nn_, k, act)
                return gate(m, k, nn_, tag, q_f, mode=cfg.gate, min_speedup=cfg.min_speedup,
                            cache_tag="ort", fp32_factory=fp32_f)
            except (ImportError, CompilerError) as e:
                log.info("ORT gate unavailable for %s (%s)", tag, e)
                return None

        gr = ort_gate(act_quant)
        if gr is None:
            tag = base_tag + (f"+{act_quant}" if spec.kind == "dynamic" else "")
            gr = gate(m, k, nn_, tag, kernel_factory(spec, nn_, k, act_quant),
                      mode=cfg.gate, min_speedup=cfg.min_speedup)
        errs = act_errs.get(n.output.name)
        if not gr.apply and act_quant == "token" and errs is not None and \
                errs["tensor_u8"] <= cfg.act_speed_ratio * errs["token"]:
            # the per-token form loses to fp32 here; the fused per-tensor form may not
            gu = ort_gate("tensor_u8")
            if gu is not None and gu.apply:
                rec["token_gate"] = gr.to_json()
                gr, act_quant = gu, "tensor_u8"
                act_for[n.output.name] = act_quant
                rec["act_quant"] = act_quant
                gr = replace(gr, reason=f"token: {rec['token_gate']['reason']}; tensor_u8 "
                             f"(error {errs['tensor_u8']:.4g} vs {errs['token']:.4g}): "
                             f"{gr.reason}")
        rec["gate"] = gr.to_json()
        if not gr.apply:
            rec.update(decision="fp32", reason=gr.reason)
        else:
            plan[n.output.name] = (spec, n, w, gr)
            rec.update(decision=spec.name, reason=gr.reason)
        layers.append(rec)

    final: dict[str, _Prepared] = {}
    by_node = {r["node"]: r for r in layers}
    if cfg.sensitivity and calib and plan:
        ref_out = [run_graph(g, *a) for a in calib]
        for name, (s0, n, w, _) in plan.items():
            chosen = None
            trials = []
            for s in _fallbacks(s0, True):
                if eligible(s, w):
                    continue
                prep, info = prep_for(s, n, w)
                g1 = apply(g, {name: prep})
                cos = _calib.output_fidelity(ref_out, [run_graph(g1, *a) for a in calib])
                trials.append({"scheme": s.name + ("+outliers" if s.outliers else ""),
                               "cosine": round(cos, 6), **info})
                if 1.0 - cos <= cfg.max_layer_drop:
                    chosen = prep
                    break
            by_node[name]["sensitivity"] = trials
            if chosen is None:
                by_node[name].update(decision="fp32",
                                     reason=f"every scheme drops > {cfg.max_layer_drop} alone")
            else:
                final[name] = chosen
                by_node[name]["decision"] = trials[-1]["scheme"]
    else:
        for name, (s0, n, w, _) in plan.items():
            final[name], info = prep_for(s0, n, w)
            by_node[name].update(info)

    out = apply(g, final) if final else g
    model_gate: dict[str, Any] | None = None
    example = ctx.example_inputs
    if final and runtime == "onnxruntime" and cfg.gate == "measure" and example and \
            ctx.gate is not None:
        model_gate = ctx.gate.compare(g, out, list(example))
        if model_gate is not None and model_gate["speedup"] < cfg.min_model_speedup:
            why = (f"whole model measured {model_gate['after_ms']:.3f} ms quantized vs "
                   f"{model_gate['before_ms']:.3f} ms fp32 in ONNX Runtime "
                   f"({model_gate['speedup']:.2f}x < {cfg.min_model_speedup})")
            for name in final:
                by_node[name].update(decision="fp32", reason=why)
            final, out = {}, g
            model_gate["decision"] = "fp32: " + why
        elif model_gate is not None:
            model_gate["decision"] = "kept"
    emb: list[dict[str, Any]] = []
    if cfg.embeddings == "int8":
        out, emb = quantize_embeddings(out)
    ctx.record("quantize", scheme=cfg.scheme, gate=cfg.gate, min_speedup=cfg.min_speedup,
               gate_runtime=runtime,
               act_quant=default_act if not act_for
               else "measure: " + ", ".join(f"{m} {sum(v == m for v in act_for.values())}"
                                         for m in ("tensor_u8", "token")),
               candidates=len(cands), quantized=len(final), model_gate=model_gate,
               param_bytes_before=g.param_bytes(), param_bytes_after=out.param_bytes(),
               layers=layers, embeddings=emb)
    log.info("quantize %s: %d/%d linears rewritten, params %.1f -> %.1f MB", cfg.scheme,
             len(final), len(cands), g.param_bytes() / 1e6, out.param_bytes() / 1e6)
    return out
