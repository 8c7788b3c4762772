"""IR -> ``torch.fx.GraphModule``: one call per IR node, weights as parameters/buffers.

Each IR op is lowered by a function ``fn(inputs, attrs) -> Tensor | tuple`` looked up in
`LOWERINGS` by op name; ops without an entry use their `OpDef.reference` (every reference is a
torch call, so it traces and compiles). Symbolic dims in attributes become fx arithmetic on
``sym_size`` nodes of the inputs (see `symdims`), so ``torch.export`` keeps them dynamic and the
eager GraphModule computes them from the actual input sizes.

The generated module is both the eager program (called directly) and what ``torch.export``
traces for AOTInductor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import UnsupportedOp, UnsupportedOpError
from ember.ir import Graph, Node, get_op, has_op, to_torch_dtype

from .symdims import DimEvalError, FxArith, eval_attr, is_symbolic

__all__ = ["LOWERINGS", "register_lowering", "lower_graph", "unsupported_nodes", "symbol_sources"]

log = logging.getLogger(__name__)

LowerFn = Callable[[Sequence[torch.Tensor | None], Mapping[str, Any]], Any]

# op name -> lowering; entries override the op's reference where torch has a faster path
LOWERINGS: dict[str, LowerFn] = {}


def register_lowering(*ops: str) -> Callable[[LowerFn], LowerFn]:
    def deco(fn: LowerFn) -> LowerFn:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------- fast lowerings
@register_lowering("attention")
def _attention(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    """Fused SDPA (flash kernel on CPU); a bool "keep" mask becomes additive for the kernel."""
    q, k, v = x[0], x[1], x[2]
    mask = x[3] if len(x) > 3 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["is_causal"],
                                          scale=a["scale"], enable_gqa=a["enable_gqa"])


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "gelu": lambda t: F.gelu(t), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "hardswish": F.hardswish, "relu6": lambda t: F.hardtanh(t, 0.0, 6.0),
}


def activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The torch function of an epilogue activation name (None or "none" -> no activation)."""
    if name in (None, "none", ""):
        return None
    if name not in _ACTS:
        raise KeyError(name)
    return _ACTS[name]


# ----------------------------------------------------------------------------- support
def unsupported_nodes(g: Graph) -> list[UnsupportedOp]:
    """Nodes this backend cannot lower: unregistered ops with no lowering of their own."""
    bad = []
    for n in g.nodes:
        if n.op not in LOWERINGS and not has_op(n.op):
            bad.append(UnsupportedOp(n.op, str(n.loc), "no CPU lowering and no reference"))
    return bad


def node_fn(n: Node) -> LowerFn:
    fn = LOWERINGS.get(n.op)
    if fn is not None:
        return fn
    return get_op(n.op).reference


def symbol_sources(g: Graph) -> dict[str, tuple[int, int]]:
    """symbol name -> (input index, dim) of the first input dim that is exactly that symbol."""
    out: dict[str, tuple[int, int]] = {}
    for i, v in enumerate(g.inputs):
        for d, dim in enumerate(v.type.shape):
            if getattr(dim, "is_Symbol", False) and dim.name not in out:
                out[dim.name] = (i, d)
    return out


# ----------------------------------------------------------------------------- graph building
def _attr_name(prefix: str, name: str, taken: set[str]) -> str:
    base = prefix + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    cand, i = base, 0
    while cand in taken:
        i += 1
        cand = f"{base}_{i}"
    taken.add(cand)
    return cand


def _free_symbol_names(v: Any) -> set[str]:
    if isinstance(v, tuple | list):
        return set().union(*(_free_symbol_names(x) for x in v)) if v else set()
    if isinstance(v, Mapping):
        return _free_symbol_names(list(v.values()))
    if is_symbolic(v):
        return {s.name for s in v.free_symbols}
    return set()


def lower_graph(g: Graph) -> torch.fx.GraphModule:
    """Builds the fx program of ``g``. Raises `UnsupportedOpError` listing every bad node."""
    bad = unsupported_nodes(g)
    if bad:
        raise UnsupportedOpError(bad, backend="cpu")
    root = nn.Module()
    fx = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    taken: set[str] = set()

    placeholders = []
    for v in g.inputs:
        ph = fx.placeholder(_attr_name("", v.name, taken))
        env[v.name] = ph
        placeholders.append(ph)

    # one attribute per distinct tensor: tied weights (GPT-2 wte/lm_head) stay one tensor
    by_id: dict[int, str] = {}
    for v in g.params:
        t = g.weights[v.name]
        attr = by_id.get(id(t))
        if attr is None:
            attr = _attr_name("w_", v.name, taken)
            by_id[id(t)] = attr
            if t.is_floating_point():
                root.register_parameter(attr, nn.Parameter(t.detach(), requires_grad=False))
            else:
                root.register_buffer(attr, t.detach())
        env[v.name] = fx.get_attr(attr)

    sources = symbol_sources(g)
    sym_nodes: dict[str, Any] = {}

    def sym_env(names: set[str], node: Node) -> dict[str, Any]:
        for s in names:
            if s in sym_nodes:
                continue
            if s not in sources:
                raise UnsupportedOpError([UnsupportedOp(
                    node.op, str(node.loc),
                    f"symbol '{s}' in an attribute is not the size of any input dim")],
                    backend="cpu")
            i, d = sources[s]
            sym_nodes[s] = fx.call_function(torch.ops.aten.sym_size.int, (placeholders[i], d))
        return sym_nodes

    arith = FxArith(fx)
    for n in g.nodes:
        attrs: dict[str, Any] = dict(n.attrs)
        names = _free_symbol_names(attrs)
        if names:
            try:
                attrs = eval_attr(attrs, sym_env(names, n), arith)
            except DimEvalError as e:
                raise UnsupportedOpError([UnsupportedOp(n.op, str(n.loc), str(e))],
                                         backend="cpu") from e
        ins = [None if v is None else env[v.name] for v in n.inputs]
        call = fx.call_function(node_fn(n), (ins, attrs))
        call.meta["ember_op"] = n.op
        call.meta["ember_loc"] = str(n.loc)
        if len(n.outputs) == 1:
            env[n.outputs[0].name] = call
        else:
            for i, v in enumerate(n.outputs):
                env[v.name] = fx.call_function(_getitem, (call, i))

    fx.output(tuple(env[v.name] for v in g.outputs))
    gm = torch.fx.GraphModule(root, fx, class_name=f"Ember_{g.name}")
    gm.eval()
    n_fast = sum(1 for n in g.nodes if n.op in LOWERINGS)
    log.debug("lowered %d nodes (%d with a fast lowering) to fx", len(g.nodes), n_fast)
    return gm


def _getitem(t: Any, i: int) -> Any:
    return t[i]


def cast_inputs(g: Graph, args: Sequence[Any]) -> list[torch.Tensor]:
    """Converts arguments to the declared dtypes, contiguous (AOTI assumes dense strides)."""
    out = []
    for a, v in zip(args, g.inputs):
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
        want = to_torch_dtype(v.type.dtype)
        if t.dtype != want:
            t = t.to(want)
        out.append(t.contiguous())
    return out
