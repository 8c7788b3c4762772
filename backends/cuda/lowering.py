"""IR -> ``torch.fx.GraphModule`` for CUDA: Ember's Triton kernels where one fits, torch
(cuBLAS / ATen CUDA kernels) for every other op.

`plan_graph` decides per node (`NodePlan`: which implementation and why); `lower_graph` builds
the module from that plan. Each kernel lowering may *prepare* derived weights once at build time
(int8 weight row sums for the zero-point correction, the bitmap layout of unstructured sparse
weights); they become buffers of the module. One backend-local fusion happens here: a residual
``add`` whose result feeds a LayerNorm/RMSNorm becomes one `add_norm` kernel producing both
the new residual stream and the normalized output.

The same module runs the Triton JIT on CUDA tensors, the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, the tests), and records kernel specializations on meta tensors (the
ahead-of-time build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import UnsupportedOp, UnsupportedOpError
from ember.ir import Graph, Node, get_op, has_op

from ..cpu.symdims import (
    DimEvalError,
    FxArith,
    eval_attr,
    free_symbol_names,
    fx_attr_name,
)
from . import ops

__all__ = ["NodePlan", "plan_graph", "lower_graph", "KERNEL_OPS", "norm_fusions"]

log = logging.getLogger(__name__)

Tensors = Sequence[torch.Tensor | None]
Attrs = Mapping[str, Any]


@dataclass(frozen=True)
class NodePlan:
    """How one node runs: ``impl`` is "kernel" or "torch"; ``kernels`` the Triton kernels."""

    index: int
    op: str
    impl: str
    kernels: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"node": self.index, "op": self.op, "impl": self.impl,
                "kernels": list(self.kernels), "reason": self.reason}


def _opt(x: Sequence[Any], i: int) -> Any:
    return x[i] if len(x) > i else None


# ----------------------------------------------------------------------------- epilogues
def _linear_call(kernel: Callable[..., torch.Tensor], xs: Tensors, a: Attrs, res_pos: int,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """Runs ``kernel(pre=, post=, act=)`` with the IR epilogue (residual before/after an
    activation); an activation no kernel has runs in torch after it."""
    res = _opt(xs, res_pos)
    mode = a.get("residual", "none")
    act = ops.act_params(a)
    pre = extra
    if mode == "before_act" and res is not None:
        pre = res if pre is None else pre + res
    if act is not None:
        return kernel(pre=pre, post=res if mode == "after_act" else None, act=act)
    from ember.ir.opset_fused import apply_activation

    y = apply_activation(kernel(pre=pre, post=None, act=(0, 0.0, 0.0)), a)
    return y + res if mode == "after_act" and res is not None else y


class KernelLowering:
    """Base: ``supports(node) -> reason or None``, ``prepare`` derived weights, ``__call__``."""

    kernels: tuple[str, ...] = ()

    def supports(self, node: Node, g: Graph) -> str | None:
        return None

    def prepare(self, node: Node, g: Graph) -> dict[str, torch.Tensor]:
        return {}

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        raise NotImplementedError


def _param(node: Node, g: Graph, i: int) -> torch.Tensor | None:
    v = node.inputs[i] if i < len(node.inputs) else None
    return None if v is None else g.weights.get(v.name)


class _QLinear(KernelLowering):
    kernels = ("quantize_rows_kernel", "w8a8_gemm_kernel")

    def supports(self, node: Node, g: Graph) -> str | None:
        if node.attrs.get("act_quant", "tensor") != "tensor":
            return (f"act_quant={node.attrs['act_quant']} has no Triton kernel yet (the "
                    "per-tensor u7 kernel would compute other numbers)")
        return None

    def prepare(self, node: Node, g: Graph) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        wq = _param(node, g, 1)
        if wq is not None:
            out["w_sum"] = wq.to(torch.int32).sum(1, dtype=torch.int32)
        if node.op == "qlinear_static":
            out["x_scale"] = torch.tensor([float(node.attrs["x_scale"])], dtype=torch.float32)
            out["x_zp"] = torch.tensor([int(node.attrs["x_zero_point"])], dtype=torch.int32)
        return out

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        x, wq, ws, b = xs[0], xs[1], xs[2], _opt(xs, 3)
        idx, wo = _opt(xs, 5), _opt(xs, 6)
        assert x is not None and wq is not None and ws is not None
        extra = None
        if idx is not None and wo is not None:  # fp32 outlier channels, added back exactly
            extra = F.linear(x.index_select(-1, idx), wo)
            x = x.index_fill(-1, idx, 0.0)
        if "x_scale" in ex:
            sc, zp = ex["x_scale"], ex["x_zp"]
        else:
            sc, zp = ops.u7_qparams(x)
        return _linear_call(lambda **kw: ops.w8a8_linear(
            x, wq, ws, b, a_scale=sc, a_zp=zp, w_sum=ex.get("w_sum"), **kw), xs, a, 4, extra)


class _Woq(KernelLowering):
    kernels = ("woq_gemv_kernel", "woq_gemm_kernel")

    def supports(self, node: Node, g: Graph) -> str | None:
        gs = node.attrs["group_size"]
        if gs < 16 or gs & (gs - 1):
            return f"group size {gs} is not a power of two >= 16"
        return None

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        x, wq, s = xs[0], xs[1], xs[2]
        assert x is not None and wq is not None and s is not None
        if a.get("act_quant", "none") == "block":
            # W4A8's rounding of the activations (elementwise, on the GPU); the product then
            # runs in the int4 kernel on the rounded values, as the reference computes it
            from ember.ir.opset_quant import fake_quant_act_blocks

            x = fake_quant_act_blocks(x, a["group_size"])
        return _linear_call(lambda **kw: ops.woq_linear(
            x, wq, s, a["bits"], a["group_size"], _opt(xs, 3), tf32=opts.get("tf32", False),
            **kw), xs, a, 4)


class _Sparse(KernelLowering):
    def supports(self, node: Node, g: Graph) -> str | None:
        fmt = node.attrs["format"]
        if fmt == "nm":
            n, m = node.attrs["n"], node.attrs["m"]
            if n & (n - 1) or m & (m - 1) or m > 64:
                return f"N:M {n}:{m} needs powers of two"
            return None
        if _param(node, g, 1) is None or _param(node, g, 2) is None:
            return f"format '{fmt}' needs its values/indices as constants to re-layout"
        return None

    def kernels_for(self, node: Node) -> tuple[str, ...]:
        return ("nm_gemm_kernel",) if node.attrs["format"] == "nm" else ("bitmap_gemm_kernel",)

    def prepare(self, node: Node, g: Graph) -> dict[str, torch.Tensor]:
        fmt = node.attrs["format"]
        if fmt == "nm":
            return {}
        vals, idx = _param(node, g, 1), _param(node, g, 2)
        assert vals is not None and idx is not None
        n, k = node.attrs["shape"]
        if fmt == "csr":
            crow = idx[: n + 1].to(torch.int64)
            cols = idx[n + 1:].to(torch.int64)
            rows = torch.repeat_interleave(torch.arange(n), crow.diff())
            v = vals
        else:  # block: decode once, keep the nonzeros
            from ember.ir.opset_quant import decode_sparse

            dense = decode_sparse(vals, idx, node.attrs)
            rows, cols = torch.nonzero(dense, as_tuple=True)
            v = dense[rows, cols]
        bm, start, v = ops.bitmap_from_triplets(rows, cols, v, (n, k))
        return {"bitmap": bm, "tile_start": start, "values": v}

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        x = xs[0]
        assert x is not None
        k = a["shape"][1]
        tf32 = opts.get("tf32", False)
        if a["format"] == "nm":
            v, p = xs[1], xs[2]
            assert v is not None and p is not None
            return _linear_call(lambda **kw: ops.nm_linear(
                x, v, p, a["n"], a["m"], k, _opt(xs, 3), tf32=tf32, **kw), xs, a, 4)
        return _linear_call(lambda **kw: ops.bitmap_linear(
            x, ex["bitmap"], ex["tile_start"], ex["values"], k, _opt(xs, 3), tf32=tf32, **kw),
            xs, a, 4)


class _TokenMerge(KernelLowering):
    kernels = ("pool_scatter_kernel",)

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        from ember.ir.opset_tokens import _rep_from_map, bipartite_map

        x, metric, size = xs[0], xs[1], _opt(xs, 2)
        assert x is not None and metric is not None
        b, n, _ = x.shape
        size = x.new_ones(b, n, 1) if size is None else size
        mp = bipartite_map(metric, a["r"], a["protect"])  # matching: cuBLAS + sort
        n_out = n - a["r"]
        y, s = ops.pool_tokens(x, size, size, mp, n_out)
        return y, s, mp, _rep_from_map(mp, n_out)


class _TokenSelect(KernelLowering):
    kernels = ("gather_rows_kernel", "pool_scatter_kernel")

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        from ember.ir.opset_tokens import fused_representative

        x, score, size = xs[0], xs[1], _opt(xs, 2)
        assert x is not None and score is not None
        b, n, _ = x.shape
        dev = x.device
        keep, p, fuse = a["keep"], a["protect"], bool(a["fuse"])
        size = x.new_ones(b, n, 1) if size is None else size
        rest = n - p
        if not 0 <= keep <= rest:
            raise ValueError(f"token_select: keep={keep} out of range for {rest} tokens")
        kept = score[:, p:].float().topk(keep, dim=-1, sorted=False).indices.sort(-1).values
        rest_map = torch.full((b, rest), -1, dtype=torch.int64, device=dev)
        rest_map.scatter_(1, kept, torch.arange(keep, device=dev).expand(b, keep))
        head = torch.arange(p, device=dev).expand(b, p)
        idx = torch.cat([head, p + kept], dim=1)
        y = ops.gather_rows(x, idx)
        s = ops.gather_rows(size, idx)
        if not fuse:  # dropped tokens map to -1 (the op's documented contract)
            return y, s, torch.cat([head, torch.where(rest_map < 0, -1, p + rest_map)], 1), idx
        # the dropped tokens pool into one extra token
        dropped = torch.cat([torch.full((b, p), -1, dtype=torch.int64, device=dev),
                             torch.where(rest_map < 0, 0, -1)], dim=1)
        w = size.reshape(b, n)
        counted = size
        if a["weighting"] == "score":  # the fused token counts the tokens of nonzero weight
            w = w * score.clamp_min(0).to(w.dtype)
            counted = torch.where(score.unsqueeze(-1) > 0, size, torch.zeros_like(size))
        yf, sf = ops.pool_tokens(x, w, counted, dropped, 1)
        mp = torch.cat([head, p + torch.where(rest_map < 0, keep, rest_map)], dim=1)
        rep = torch.cat([idx, p + fused_representative(score[:, p:], rest_map < 0)[:, None]], 1)
        return torch.cat([y, yf], 1), torch.cat([s, sf], 1), mp, rep


class _TokenUnmerge(KernelLowering):
    kernels = ("gather_rows_kernel",)

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        y, mp, fb = xs[0], xs[1], _opt(xs, 2)
        assert y is not None and mp is not None
        return ops.gather_rows(y, mp, fb)


def _norm_eps(a: Attrs, x: torch.Tensor, rms: bool) -> float:
    if rms and a["eps"] is None:
        return float(torch.finfo(x.dtype).eps)
    return float(a["eps"])


class _Norm(KernelLowering):
    kernels = ("add_norm_kernel",)

    def supports(self, node: Node, g: Graph) -> str | None:
        if node.attrs["axes"] != 1:
            return f"normalizes over {node.attrs['axes']} dims (kernel: the last one)"
        x = node.inputs[0]
        if x is None or x.type.dtype not in ("float32", "float16", "bfloat16"):
            return "input is not fp32/fp16/bf16"
        for v in node.inputs[1:]:
            if v is not None and v.type.rank != 1:
                return "weight/bias are not 1-d"
        return None

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        x = xs[0]
        assert x is not None
        rms = "rms" in opts.get("_op", "")
        return ops.add_norm(x, None, _opt(xs, 1), _opt(xs, 2), _norm_eps(a, x, rms), rms)[1]


class _Attention(KernelLowering):
    kernels = ("flash_attention_kernel",)

    def supports(self, node: Node, g: Graph) -> str | None:
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        assert q is not None and k is not None and v is not None
        if q.type.rank != 4:
            return f"rank {q.type.rank} (kernel: [B, H, N, d])"
        if not (isinstance(q.type.shape[-1], int) and q.type.shape[-1] <= 256):
            return "head dim is not a static size <= 256"
        if q.type.shape[-1] != v.type.shape[-1] or q.type.shape[-1] != k.type.shape[-1]:
            return "q, k, v head dims differ"
        if q.type.dtype not in ("float32", "float16", "bfloat16"):
            return f"dtype {q.type.dtype}"
        m = _opt(node.inputs, 3)
        if m is not None and node.attrs["is_causal"]:
            return "mask together with is_causal"
        if m is not None and m.type.rank > 4:
            return "mask rank > 4"
        return None

    def __call__(self, xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any]) -> Any:
        q, k, v = xs[0], xs[1], xs[2]
        assert q is not None and k is not None and v is not None
        return ops.flash_attention(q, k, v, mask=_opt(xs, 3), scale=a["scale"],
                                   is_causal=a["is_causal"], tf32=opts.get("tf32", False))


_SPARSE = _Sparse()
KERNEL_OPS: dict[str, KernelLowering] = {
    "qlinear_dynamic": _QLinear(), "qlinear_static": _QLinear(), "linear_woq": _Woq(),
    "sparse_linear": _SPARSE, "token_merge": _TokenMerge(), "token_select": _TokenSelect(),
    "token_unmerge": _TokenUnmerge(), "layer_norm": _Norm(), "rms_norm": _Norm(),
    "attention": _Attention(),
}


def _kernels_of(node: Node) -> tuple[str, ...]:
    low = KERNEL_OPS[node.op]
    return low.kernels_for(node) if isinstance(low, _Sparse) else low.kernels


def _act_ok(node: Node) -> str:
    if "activation" in node.attrs and ops.act_params(node.attrs) is None:
        return f"; activation '{node.attrs['activation']}' runs in torch after the kernel"
    return ""


def norm_fusions(g: Graph, plans: Sequence[NodePlan]) -> dict[int, int]:
    """add node index -> norm node index for residual adds fused into `add_norm`."""
    prod = {v.name: i for i, n in enumerate(g.nodes) for v in n.outputs}
    out: dict[int, int] = {}
    for j, n in enumerate(g.nodes):
        if n.op not in ("layer_norm", "rms_norm") or plans[j].impl != "kernel":
            continue
        x = n.inputs[0]
        i = prod.get(x.name) if x is not None else None
        if i is None or i in out:
            continue
        add = g.nodes[i]
        if add.op != "add" or len(add.inputs) != 2 or any(v is None for v in add.inputs):
            continue
        a, b = add.inputs[0], add.inputs[1]
        assert a is not None and b is not None
        params = {v.name for v in g.params}
        wb = [v for v in n.inputs[1:] if v is not None]
        if a.type != b.type or a.type != x.type or any(v.name not in params for v in wb):
            continue
        out[i] = j
    return out


def plan_graph(g: Graph) -> list[NodePlan]:
    """The implementation of every node: an Ember kernel (and which), or torch with why."""
    plans = []
    for i, n in enumerate(g.nodes):
        low = KERNEL_OPS.get(n.op)
        if low is not None:
            why = low.supports(n, g)
            if why is None:
                plans.append(NodePlan(i, n.op, "kernel", _kernels_of(n),
                                      "Ember Triton kernel" + _act_ok(n)))
                continue
            plans.append(NodePlan(i, n.op, "torch", (), f"kernel not applicable: {why}"))
            continue
        if not has_op(n.op):
            plans.append(NodePlan(i, n.op, "unsupported", (), "no op definition"))
            continue
        lib = "cuBLAS" if n.op in ("linear", "fused_linear", "matmul", "einsum") else "ATen CUDA"
        plans.append(NodePlan(i, n.op, "torch", (), f"torch ({lib})"))
    fused = norm_fusions(g, plans)
    for i, j in fused.items():
        plans[i] = NodePlan(i, "add", "kernel", ("add_norm_kernel",),
                            f"fused into the add_norm kernel of node {j}")
    return plans


# ----------------------------------------------------------------------------- module


def _torch_fn(op: str) -> Callable[..., Any]:
    ref = get_op(op).reference

    def run(xs: Tensors, a: Attrs) -> Any:
        return ref(xs, a)

    run.__name__ = run.__qualname__ = f"torch_{op}"
    return run


def _kernel_fn(op: str, low: KernelLowering, opts: Mapping[str, Any]) -> Callable[..., Any]:
    o = {**opts, "_op": op}

    def run(xs: Tensors, a: Attrs, ex: Mapping[str, torch.Tensor]) -> Any:
        return low(xs, a, ex, o)

    run.__name__ = run.__qualname__ = f"ember_{op}"
    return run


def _add_norm_fn(op: str, store_h: bool) -> Callable[..., Any]:
    rms = op == "rms_norm"

    def run(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
            a: Attrs) -> Any:
        return ops.add_norm(x, r, w, b, _norm_eps(a, x, rms), rms, store_h=store_h)

    run.__name__ = run.__qualname__ = f"ember_add_{op}"
    return run


def _getitem(t: Any, i: int) -> Any:
    return t[i]


def lower_graph(g: Graph, plans: Sequence[NodePlan] | None = None,
                options: Mapping[str, Any] | None = None) -> torch.fx.GraphModule:
    """Builds the CUDA program of ``g`` as an fx module (weights and prepared buffers on CPU;
    move it with ``.to(device)``). Raises `UnsupportedOpError` listing every bad node."""
    plans = list(plans) if plans is not None else plan_graph(g)
    bad = [UnsupportedOp(n.op, str(n.loc), p.reason) for n, p in zip(g.nodes, plans)
           if p.impl == "unsupported"]
    if bad:
        raise UnsupportedOpError(bad, backend="cuda")
    opts = dict(options or {})
    root = nn.Module()
    fx = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    taken: set[str] = set()
    placeholders = []
    for v in g.inputs:
        ph = fx.placeholder(fx_attr_name("", v.name, taken))
        env[v.name] = ph
        placeholders.append(ph)
    by_id: dict[int, str] = {}
    for v in g.params:
        t = g.weights[v.name]
        attr = by_id.get(id(t))
        if attr is None:
            attr = fx_attr_name("w_", v.name, taken)
            by_id[id(t)] = attr
            root.register_buffer(attr, t.detach())
        env[v.name] = fx.get_attr(attr)

    sources: dict[str, tuple[int, int]] = {}
    for i, v in enumerate(g.inputs):
        for d, dim in enumerate(v.type.shape):
            if getattr(dim, "is_Symbol", False) and dim.name not in sources:
                sources[dim.name] = (i, d)
    sym_nodes: dict[str, Any] = {}
    arith = FxArith(fx)

    def attrs_of(n: Node) -> dict[str, Any]:
        attrs = dict(n.attrs)
        names = free_symbol_names(attrs)
        if not names:
            return attrs
        for s in names:
            if s not in sym_nodes:
                if s not in sources:
                    raise UnsupportedOpError([UnsupportedOp(
                        n.op, str(n.loc), f"symbol '{s}' is not the size of any input dim")],
                        backend="cuda")
                i, d = sources[s]
                sym_nodes[s] = fx.call_function(torch.ops.aten.sym_size.int,
                                                (placeholders[i], d))
        try:
            return eval_attr(attrs, sym_nodes, arith)
        except DimEvalError as e:
            raise UnsupportedOpError([UnsupportedOp(n.op, str(n.loc), str(e))],
                                     backend="cuda") from e

    fused = norm_fusions(g, plans)
    fused_norms = {j: i for i, j in fused.items()}
    users = g.users()
    for idx, (n, plan) in enumerate(zip(g.nodes, plans)):
        if idx in fused_norms:
            continue  # emitted with its add
        name = fx_attr_name("", n.outputs[0].name, taken)
        ins = [None if v is None else env[v.name] for v in n.inputs]
        if idx in fused:
            norm = g.nodes[fused[idx]]
            h_val = n.outputs[0]
            store_h = any(u is not norm for u in users.get(h_val.name, [])) or \
                h_val in g.outputs
            w = env[norm.inputs[1].name] if len(norm.inputs) > 1 and norm.inputs[1] else None
            b = env[norm.inputs[2].name] if len(norm.inputs) > 2 and norm.inputs[2] else None
            call = fx.call_function(_add_norm_fn(norm.op, store_h),
                                    (ins[0], ins[1], w, b, attrs_of(norm)), name=name)
            y = fx.call_function(_getitem, (call, 1))
            env[norm.outputs[0].name] = y
            if store_h:
                env[h_val.name] = fx.call_function(_getitem, (call, 0))
            continue
        attrs = attrs_of(n)
        if plan.impl == "kernel":
            low = KERNEL_OPS[n.op]
            ex_nodes = {}
            for key, t in low.prepare(n, g).items():
                attr = fx_attr_name(f"ex_{key}_", n.outputs[0].name, taken)
                root.register_buffer(attr, t)
                ex_nodes[key] = fx.get_attr(attr)
            hi = get_op(n.op).max_inputs
            ins += [None] * (hi - len(ins))
            call = fx.call_function(_kernel_fn(n.op, low, opts), (ins, attrs, ex_nodes),
                                    name=name)
        else:
            hi = get_op(n.op).max_inputs
            if hi <= 8:
                ins += [None] * (hi - len(ins))
            call = fx.call_function(_torch_fn(n.op), (ins, attrs), name=name)
        call.meta["ember_op"] = n.op
        if len(n.outputs) == 1:
            env[n.outputs[0].name] = call
        else:
            for i, v in enumerate(n.outputs):
                env[v.name] = fx.call_function(_getitem, (call, i))
    fx.output(tuple(env[v.name] for v in g.outputs))
    gm = torch.fx.GraphModule(root, fx, class_name=f"EmberCuda_{g.name}")
    gm.eval()
    n_k = sum(1 for p in plans if p.impl == "kernel")
    log.debug("cuda lowering: %d of %d nodes on Ember kernels", n_k, len(plans))
    return gm


