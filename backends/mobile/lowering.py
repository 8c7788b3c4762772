"""Ember IR -> TVM Relax.

The graph is lowered with the CPU backend's IR -> torch fx lowering (one torch call per IR
node, weights as module parameters), exported with ``torch.export`` at the example input shapes
(mobile artifacts are static-shape), decomposed to core ATen, and imported by TVM's
``from_exported_program`` with the weights kept as function parameters (so they ship in a weights
file, not inside the code). Before importing, every ATen op is checked against TVM's converter
table; ops TVM cannot convert are traced back to the IR nodes they came from and reported all
together as one `UnsupportedOpError`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ember.errors import UnsupportedOp, UnsupportedOpError
from ember.ir import Graph, GraphBuilder, Node, TensorType, to_torch_dtype
from ember.ir.opset_quant import U8_QMAX, u8_qparams
from ember.ir.shapes import free_symbols

__all__ = ["RelaxModel", "to_relax", "export_graph", "unsupported_nodes", "probe_node",
           "int8_matmul_rewrite"]

log = logging.getLogger(__name__)

BACKEND = "mobile"
# dtypes the runner and TVM's param format carry
SUPPORTED_DTYPES = {"float32", "float16", "int64", "int32", "int8", "uint8", "bool"}


@dataclass
class RelaxModel:
    """A Relax module whose ``main`` takes (inputs..., params...) and the params' tensors."""

    mod: Any  # tvm.IRModule
    params: list[torch.Tensor]
    input_types: list[TensorType]
    output_types: list[TensorType]


def _concrete(g: Graph, example: Sequence[torch.Tensor]) -> list[TensorType]:
    return [TensorType(v.type.dtype, tuple(int(d) for d in t.shape))
            for v, t in zip(g.inputs, example)]


def _ir_origin(gm: torch.fx.GraphModule) -> dict[str, tuple[str, str]]:
    """fx node name -> (ember op, source location) for the lowered module's calls."""
    out = {}
    for n in gm.graph.nodes:
        if "ember_op" in n.meta:
            loc = n.meta.get("ember_loc", "")
            where = f"IR node %{n.name}"
            out[n.name] = (n.meta["ember_op"],
                           where if loc in ("", "<unknown location>") else f"{loc} ({where})")
    return out


def _origin_of(node: torch.fx.Node, origin: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """Walks torch.export's ``from_node`` provenance back to the IR node that produced ``node``."""
    todo = list(node.meta.get("from_node") or [])
    seen = 0
    while todo and seen < 10_000:
        src = todo.pop()
        seen += 1
        name = getattr(src, "name", None)
        if name in origin:
            return origin[name]
        todo.extend(getattr(src, "from_node", None) or [])
    return (str(node.target), "<unknown location>")


def export_graph(g: Graph, example: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """The IR as a core-ATen ExportedProgram at the example shapes; raises on unsupported ops."""
    from ember.backends.cpu.lowering import cast_inputs, lower_graph

    bad = [UnsupportedOp(v.type.dtype, f"value %{v.name}", "dtype not supported on mobile")
           for v in (*g.inputs, *g.outputs) if v.type.dtype not in SUPPORTED_DTYPES]
    if bad:
        raise UnsupportedOpError(bad, backend=BACKEND)
    try:
        gm = lower_graph(g)
    except UnsupportedOpError as e:
        raise UnsupportedOpError(e.ops, backend=BACKEND) from e
    _use_mobile_lowerings(gm)
    args = tuple(cast_inputs(g, example))
    with torch.no_grad():
        ep = torch.export.export(gm, args, strict=False)
        ep = ep.run_decompositions()
    _check_convertible(ep, _ir_origin(gm))
    return ep


# ----------------------------------------------------------------------------- int8 linears
def _qlinear_dynamic(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    """``qlinear_dynamic`` in plain ATen ops that TVM converts (the CPU lowering calls fbgemm).

    Same arithmetic as the op's reference: activations quantized per call (per tensor: u7
    asymmetric, fbgemm's reduce_range choice of scale and zero point; per token: |x|max / 63,
    codes -64..63), the codes (minus the zero point: -127..127) times the int8 weight summed in
    int32 (`_int8_gemm`), dequantized by the two scales, outlier channels added back in fp32.
    """
    import torch.nn.functional as F  # noqa: N812

    from ember.backends.cpu.lowering import epilogue

    inp, wq, ws = x[0], x[1], x[2]
    assert inp is not None and wq is not None and ws is not None
    bias = x[3] if len(x) > 3 else None
    res = x[4] if len(x) > 4 else None
    idx = x[5] if len(x) > 5 else None
    wo = x[6] if len(x) > 6 else None
    xs = inp
    if idx is not None:  # outlier channels zeroed (TVM has index_put, not index_fill)
        keep = torch.ones(inp.shape[-1], dtype=inp.dtype, device=inp.device)
        xs = inp * keep.index_put((idx,), torch.zeros((), dtype=inp.dtype))
    if a.get("act_quant", "tensor") == "token":
        k = xs.shape[-1]  # row |x|max as a max-pool: TVM lowers max.dim to a topk it cannot build
        amax = F.max_pool1d(xs.abs().reshape(-1, 1, k), k).reshape(*xs.shape[:-1], 1)
        s = (amax / 63.0).clamp_min(1e-12)
        acc = _int8_gemm(torch.clamp(torch.round(inp / s), -64.0, 63.0), wq)
    elif a.get("act_quant") == "tensor_u8":
        # full-range u8 codes minus their zero point span -255..255: not int8, so an int32
        # GEMM (exact, without sdot); the u7 forms are the fast ones on Arm
        s, zp = u8_qparams(xs)
        codes = torch.clamp(torch.round(xs / s) + zp, 0.0, float(U8_QMAX)) - zp
        k = codes.shape[-1]
        acc = torch.mm(codes.reshape(-1, k).to(torch.int32), wq.to(torch.int32).t())
        acc = acc.reshape(*codes.shape[:-1], wq.shape[0]).to(torch.float32)
    else:
        lo, hi = torch.min(xs).clamp(max=0.0), torch.max(xs).clamp(min=0.0)
        s = ((hi - lo) / 127.0).clamp_min(torch.finfo(torch.float32).eps)
        zp = torch.clamp(torch.round(0.0 - lo / s), 0.0, 127.0)
        acc = _int8_gemm(torch.clamp(torch.round(xs / s) + zp, 0.0, 127.0) - zp, wq)
    y = acc * s * ws
    if bias is not None:
        y = y + bias
    if idx is not None and wo is not None:
        y = y + F.linear(inp.index_select(-1, idx), wo)
    return epilogue(y, (None, None, None, res), a)


def _int8_gemm(codes: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``codes @ wq.T`` in integer arithmetic, as fp32: ``codes`` holds whole numbers in
    -127..127 (activation codes minus their zero point), ``wq`` the int8 weight (out, in).

    Written as int8 -> int32 casts around an int32 ``mm``; `int8_matmul_rewrite` turns that
    into a Relax ``matmul`` of the int8 tensors with ``out_dtype="int32"``, so the weight stays
    int8 in the weights file and the kernel widens (or ``sdot``s) int8 products into int32.
    """
    k = codes.shape[-1]
    a = codes.reshape(-1, k).to(torch.int8).to(torch.int32)
    acc = torch.mm(a, wq.to(torch.int32).t())
    return acc.reshape(*codes.shape[:-1], wq.shape[0]).to(torch.float32)


# IR op -> the mobile lowering that replaces the CPU backend's (whose kernel TVM cannot take)
MOBILE_LOWERINGS = {"qlinear_dynamic": _qlinear_dynamic}


def _use_mobile_lowerings(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        fn = MOBILE_LOWERINGS.get(n.meta.get("ember_op", ""))
        if fn is not None and n.op == "call_function":
            n.target = fn
    # int8 weights as (frozen) parameters: TVM's importer keeps parameters as function inputs,
    # which land in the weights file, but folds buffers into constants inside the library
    for name, buf in list(gm.named_buffers(recurse=False)):
        if buf.dtype == torch.int8:
            delattr(gm, name)
            gm.register_parameter(name, torch.nn.Parameter(buf, requires_grad=False))
    gm.recompile()


@functools.cache
def _tvm_convert_names() -> frozenset[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(k for k in ExportedProgramImporter().convert_map if isinstance(k, str))


def _check_convertible(ep: torch.export.ExportedProgram,
                       origin: Mapping[str, tuple[str, str]]) -> None:
    known = _tvm_convert_names()
    bad: dict[tuple[str, str], set[str]] = {}
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if name not in known:
            bad.setdefault(_origin_of(n, origin), set()).add(name)
    if bad:
        ops = [UnsupportedOp(op, loc or "<unknown location>",
                             f"TVM cannot convert ATen {', '.join(sorted(aten))}")
               for (op, loc), aten in bad.items()]
        raise UnsupportedOpError(ops, backend=BACKEND)


def unsupported_nodes(g: Graph, example: Sequence[torch.Tensor]) -> list[UnsupportedOp]:
    """Every node of ``g`` the mobile backend cannot compile (empty when all are fine)."""
    try:
        export_graph(g, example)
    except UnsupportedOpError as e:
        return list(e.ops)
    return []


def to_relax(g: Graph, example: Sequence[torch.Tensor], *, dot4: bool = False) -> RelaxModel:
    """Lowers ``g`` to a Relax module with ``main(inputs..., params...)``; ``dot4``: int8
    GEMMs use the 4x4-packed weight kernel that the ``+dotprod`` schedule tensorizes to
    ``sdot`` (`int8_matmul_rewrite`)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = export_graph(g, example)
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False)
    mod = int8_matmul_rewrite(mod, dot4=dot4)
    mod, params = relax.frontend.detach_params(mod)
    tensors = [torch.from_numpy(p.numpy()) for p in params.get("main", [])]
    mod = relax.transform.DeadCodeElimination()(mod)
    out_types = _output_types(g, example)
    return RelaxModel(mod, tensors, _concrete(g, example), out_types)


def int8_matmul_rewrite(mod: Any, *, dot4: bool = False) -> Any:
    """``matmul(astype(x_i8, i32), permute_dims(astype(w_i8, i32)))`` -> ``matmul(x_i8,
    permute_dims(w_i8), out_dtype="int32")`` in every Relax function of ``mod``.

    Without it the int8 -> int32 weight cast is weight-only work that ``LiftTransformParams``
    runs ahead of time: the weights file would hold int32 weights (4x the int8 bytes) and the
    kernel would multiply int32s. After it, only the transpose is lifted (int8 stays int8) and
    the casts happen inside the GEMM kernel.

    With ``dot4`` (targets with ``+dotprod``) a 2-D GEMM whose out and in features are
    multiples of 4 becomes a call of `schedules.sdot_gemm` on the weight packed into 4x4 blocks
    (``(out/4, in/4, 4, 4)``, int8, packed ahead of time by ``LiftTransformParams``): the layout
    the ``sdot`` tensor intrinsic reads with one 16-byte load.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, w = wildcard(), wildcard()
    wt = is_op("relax.permute_dims")(is_op("relax.astype")(w))
    pat = is_op("relax.matmul")(is_op("relax.astype")(x), wt)

    def dtype(e: Any) -> str:
        return str(getattr(e.ty, "dtype", ""))

    def rewrite(expr: Any, m: Mapping[Any, Any]) -> Any:
        casts = (expr.args[0], m[wt].args[0])
        if any(dtype(c) != "int32" for c in casts) or dtype(m[x]) != "int8" \
                or dtype(m[w]) != "int8":
            return expr
        axes = m[wt].attrs.axes
        acc = _dot4_gemm(m[x], m[w], axes, bb, funcs) if dot4 else None
        if acc is None:
            acc = relax.op.matmul(m[x], relax.op.permute_dims(m[w], axes), out_dtype="int32")
        # TVM's importer gives aten.mm of int32s out_dtype float32 (then casts): same values
        return acc if dtype(expr) == "int32" else relax.op.astype(acc, dtype(expr))

    bb = relax.BlockBuilder(mod)  # gives added PrimFuncs GlobalVars that call_tir accepts
    funcs: dict[str, Any] = {}
    done = {gv: rewrite_call(pat, rewrite, func) for gv, func in mod.functions_items()
            if isinstance(func, relax.Function)}
    out = bb.get()
    for gv, func in done.items():
        out[gv] = func
    return out


def _dot4_gemm(x: Any, w: Any, axes: Any, bb: Any, funcs: dict[str, Any]) -> Any:
    """``x (M, K) int8 @ w (N, K).T`` through the packed-weight sdot kernel (added to ``bb``
    once per shape, GlobalVars in ``funcs``), or None when the shapes do not fit it (the caller
    keeps the plain int32 matmul)."""
    from tvm import relax

    from .schedules import sdot_gemm

    try:
        (m, k), (n, k2) = ([int(d) for d in e.ty.shape] for e in (x, w))
    except (TypeError, ValueError):  # not 2-D or not static
        return None
    if k != k2 or n % 4 or k % 4 or (axes is not None and [int(a) for a in axes] != [1, 0]):
        return None
    name = f"ember_sdot_gemm_{m}x{n}x{k}"
    if name not in funcs:
        funcs[name] = bb.add_func(sdot_gemm(m, n, k), name)
    packed = relax.op.permute_dims(relax.op.reshape(w, (n // 4, 4, k // 4, 4)), [0, 2, 1, 3])
    return relax.call_tir(funcs[name], [x, packed],
                          relax.TensorType((m, n), "int32"))


def _output_types(g: Graph, example: Sequence[torch.Tensor]) -> list[TensorType]:
    env: dict[str, int] = {}
    for v, t in zip(g.inputs, example):
        for d, n in zip(v.type.shape, t.shape):
            if getattr(d, "is_Symbol", False):
                env[d.name] = int(n)
    from ember.ir import evaluate

    return [TensorType(v.type.dtype, tuple(int(evaluate(d, env)) for d in v.type.shape))
            for v in g.outputs]


# ----------------------------------------------------------------------------- per-node probe
def _node_key(n: Node) -> str:
    ins = ",".join("-" if v is None else str(v.type) for v in n.inputs)
    return f"{n.op}|{ins}|{sorted(n.attrs.items(), key=lambda kv: kv[0])!r}"


@functools.lru_cache(maxsize=512)
def _probe(key: str, node: Node) -> str:
    """'' when a one-node graph of ``node`` converts to Relax, else the reason."""
    syms = free_symbols(d for v in node.inputs if v is not None for d in v.type.shape)
    env = {s: 2 for s in syms}
    if free_symbols(_attr_dims(node.attrs)) - set(env):
        return "an attribute uses a symbol that is not an input dim"
    from ember.ir import evaluate

    b = GraphBuilder("probe")
    ins: list[Any] = []
    example: list[torch.Tensor] = []
    for i, v in enumerate(node.inputs):
        if v is None:
            ins.append(None)
            continue
        shape = tuple(int(evaluate(d, env)) for d in v.type.shape)
        ins.append(b.add_input(f"x{i}", v.type))
        dt = to_torch_dtype(v.type.dtype)
        example.append(torch.randn(shape).to(dt) if dt.is_floating_point
                       else torch.zeros(shape, dtype=dt))
    try:
        out = b.op(node.op, ins, node.attrs)
    except Exception as e:  # the node does not even type-check on its own
        return f"cannot build a probe graph: {e}"
    b.set_outputs(out if isinstance(out, tuple) else (out,))
    try:
        export_graph(b.build(), example)
    except UnsupportedOpError as e:
        return "; ".join(o.reason for o in e.ops)
    except Exception as e:  # export failures are reasons too
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def _attr_dims(attrs: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, list | tuple):
            for y in x:
                walk(y)
        elif isinstance(x, Mapping):
            for y in x.values():
                walk(y)
        elif getattr(x, "free_symbols", None):
            out.append(x)

    walk(attrs)
    return out


def probe_node(node: Node) -> str:
    """Why ``node`` cannot run on mobile ('' when it can); cached per op/types/attrs."""
    return _probe(_node_key(node), node)
