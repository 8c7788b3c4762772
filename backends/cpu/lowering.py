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

from .symdims import DimEvalError, FxArith, eval_attr, free_symbol_names, fx_attr_name

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
@register_lowering("linear")
def _linear(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    return F.linear(x[0], x[1], x[2] if len(x) > 2 else None)


@register_lowering("attention")
def _attention(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    """Fused SDPA (flash kernel on CPU); a bool "keep" mask becomes additive for the kernel."""
    q, k, v = x[0], x[1], x[2]
    mask = x[3] if len(x) > 3 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["is_causal"],
                                          scale=a["scale"], enable_gqa=a["enable_gqa"])


def epilogue(y: torch.Tensor, x: Sequence[torch.Tensor | None],
             a: Mapping[str, Any]) -> torch.Tensor:
    """The ``fused_linear`` / ``fused_conv`` epilogue (residual ``x[3]``, activation) in plain
    torch calls; the mobile backend's int8 linear lowering reuses it."""
    from ember.ir.opset_fused import apply_activation

    res = x[3] if len(x) > 3 else None
    if a["residual"] == "before_act":
        y = y + res
    act = a["activation"]
    if act == "relu":
        y = torch.relu(y)
    elif act == "gelu":
        y = F.gelu(y, approximate=a["approximate"])
    elif act != "none":
        y = apply_activation(y, a)
    if a["residual"] == "after_act":
        y = y + res
    return y


@register_lowering("fused_linear")
def _fused_linear(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    """linear + epilogue as separate torch calls; Inductor fuses the epilogue into the GEMM
    (oneDNN post-ops) or into one C++ loop after it."""
    return epilogue(F.linear(x[0], x[1], x[2] if len(x) > 2 else None), x, a)


@register_lowering("fused_conv")
def _fused_conv(x: Sequence[torch.Tensor | None], a: Mapping[str, Any]) -> torch.Tensor:
    from ember.ir import get_op

    conv_attrs = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
    y = get_op("conv").reference([x[0], x[1], x[2] if len(x) > 2 else None], conv_attrs)
    return epilogue(y, x, a)


# ----------------------------------------------------------------------------- support
def unsupported_nodes(g: Graph) -> list[UnsupportedOp]:
    """Nodes this backend cannot lower: unregistered ops with no lowering of their own."""
    bad = []
    for n in g.nodes:
        if n.op not in LOWERINGS and not has_op(n.op):
            bad.append(UnsupportedOp(n.op, str(n.loc), "no CPU lowering and no reference"))
    return bad


_NAMED: dict[tuple[str, int], LowerFn] = {}


def node_fn(n: Node) -> LowerFn:
    """The lowering of ``n`` as a named function (readable generated code and profiles)."""
    fn = LOWERINGS.get(n.op) or get_op(n.op).reference
    key = (n.op, id(fn))
    named = _NAMED.get(key)
    if named is None:
        def named(xs: Sequence[torch.Tensor | None], a: Mapping[str, Any],
                  _fn: LowerFn = fn) -> Any:
            return _fn(xs, a)

        named.__name__ = named.__qualname__ = f"ember_{n.op}"
        _NAMED[key] = named
    return named


def _arity(op: str) -> int:
    """Inputs a lowering may index: the op's max arity (variadic ops are not padded)."""
    if not has_op(op):
        return 0
    hi = get_op(op).max_inputs
    return hi if hi <= 8 else 0


def symbol_sources(g: Graph) -> dict[str, tuple[int, int]]:
    """symbol name -> (input index, dim) of the first input dim that is exactly that symbol."""
    out: dict[str, tuple[int, int]] = {}
    for i, v in enumerate(g.inputs):
        for d, dim in enumerate(v.type.shape):
            if getattr(dim, "is_Symbol", False) and dim.name not in out:
                out[dim.name] = (i, d)
    return out


# ----------------------------------------------------------------------------- graph building


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
        ph = fx.placeholder(fx_attr_name("", v.name, taken))
        env[v.name] = ph
        placeholders.append(ph)

    # one attribute per distinct tensor: tied weights (GPT-2 wte/lm_head) stay one tensor
    by_id: dict[int, str] = {}
    for v in g.params:
        t = g.weights[v.name]
        attr = by_id.get(id(t))
        if attr is None:
            attr = fx_attr_name("w_", v.name, taken)
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
        names = free_symbol_names(attrs)
        if names:
            try:
                attrs = eval_attr(attrs, sym_env(names, n), arith)
            except DimEvalError as e:
                raise UnsupportedOpError([UnsupportedOp(n.op, str(n.loc), str(e))],
                                         backend="cpu") from e
        ins = [None if v is None else env[v.name] for v in n.inputs]
        # absent trailing optional inputs are passed as None (x[2] of a bias-less linear)
        ins += [None] * (_arity(n.op) - len(ins))
        call = fx.create_node("call_function", node_fn(n), (ins, attrs),
                              name=fx_attr_name("", n.outputs[0].name, taken))
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
