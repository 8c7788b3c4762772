"""Hypothesis strategies: random well-typed Ember graphs, each with its expected outputs.

`random_graphs()` draws a `RandomGraph`: a graph built with `GraphBuilder` (so every type is
inferred by the op definitions), concrete inputs, and the outputs computed *directly* with
torch while the graph was drawn (not through the op registry), so the reference interpreter
and the type inference are both checked against an independent evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from ember.ir import Graph, GraphBuilder, TensorType, Value

__all__ = ["RandomGraph", "random_graphs", "shapes", "UNARY", "BINARY"]

# IR op -> direct torch function. Bounded ops only, so values never overflow to inf/nan.
UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "neg": torch.neg,
    "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "gelu": F.gelu, "silu": F.silu,
    "erf": torch.erf,
}
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
    "minimum": torch.minimum,
}
MAX_NUMEL = 512


@dataclass
class RandomGraph:
    graph: Graph
    inputs: list[torch.Tensor]
    expected: list[torch.Tensor]
    ops: list[str]


def shapes(min_rank: int = 1, max_rank: int = 3, max_dim: int = 4) -> st.SearchStrategy:
    return st.lists(st.integers(1, max_dim), min_size=min_rank, max_size=max_rank).map(tuple)


def _tensor(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def random_graphs(draw: st.DrawFn, max_steps: int = 8) -> RandomGraph:
    b = GraphBuilder("random")
    vals: list[tuple[Value, torch.Tensor]] = []
    inputs = []
    for i in range(draw(st.integers(1, 2))):
        shape = draw(shapes())
        t = _tensor(draw, shape)
        vals.append((b.add_input(f"x{i}", TensorType("float32", shape)), t))
        inputs.append(t)
    ops: list[str] = []
    for _ in range(draw(st.integers(1, max_steps))):
        v, t = draw(st.sampled_from(vals))
        kind = draw(st.sampled_from(["unary", "binary", "binary_param", "matmul", "reduce",
                                     "reshape", "permute", "softmax", "concat", "slice"]))
        out = _step(draw, b, kind, v, t, vals)
        if out is None:
            continue
        nv, nt = out
        assert tuple(nv.type.shape) == tuple(nt.shape), (nv.type, nt.shape)
        assert nv.type.dtype == "float32"
        vals.append((nv, nt))
        ops.append(kind)
    outs = [vals[-1]]
    extra = draw(st.sampled_from(vals))
    if extra[0].name != outs[0][0].name:
        outs.append(extra)
    b.set_outputs([v for v, _ in outs])
    return RandomGraph(b.build(), inputs, [t for _, t in outs], ops)


def _step(draw: st.DrawFn, b: GraphBuilder, kind: str, v: Value, t: torch.Tensor,
          vals: list[tuple[Value, torch.Tensor]]) -> tuple[Value, torch.Tensor] | None:
    r = t.dim()
    if kind == "unary":
        op = draw(st.sampled_from(sorted(UNARY)))
        return b.op(op, [v]), UNARY[op](t)
    if kind == "binary":  # with another value of the same shape or a broadcastable suffix
        same = [(w, u) for w, u in vals if tuple(u.shape) == tuple(t.shape[-u.dim():])
                and u.dim() <= r]
        w, u = draw(st.sampled_from(same))
        op = draw(st.sampled_from(sorted(BINARY)))
        if draw(st.booleans()):
            return b.op(op, [v, w]), BINARY[op](t, u)
        return b.op(op, [w, v]), BINARY[op](u, t)
    if kind == "binary_param":  # a constant broadcast over some dims
        shape = tuple(d if draw(st.booleans()) else 1 for d in t.shape)
        shape = shape[draw(st.integers(0, r)):]
        p = _tensor(draw, shape)
        pv = b.add_param("p", p)
        op = draw(st.sampled_from(sorted(BINARY)))
        return b.op(op, [v, pv]), BINARY[op](t, p)
    if kind == "matmul":
        n = draw(st.integers(1, 4))
        w = _tensor(draw, (t.shape[-1], n))
        if t.numel() // t.shape[-1] * n > MAX_NUMEL:
            return None
        if draw(st.booleans()):
            return b.op("matmul", [v, b.add_param("w", w)]), torch.matmul(t, w)
        wt = w.t().contiguous()
        return b.op("linear", [v, b.add_param("w", wt)]), F.linear(t, wt)
    if kind == "reduce":
        if r < 2:
            return None
        dims = tuple(sorted(draw(st.sets(st.integers(0, r - 1), min_size=1, max_size=r - 1))))
        keep = draw(st.booleans())
        op = draw(st.sampled_from(["sum", "mean", "amax", "amin"]))
        fn = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}[op]
        return b.op(op, [v], {"dims": dims, "keepdim": keep}), fn(t, dims, keepdim=keep)
    if kind == "reshape":
        if draw(st.booleans()) and r >= 2:  # merge the last two dims
            shape = (*t.shape[:-2], t.shape[-2] * t.shape[-1])
        else:  # split or add a unit dim
            d = draw(st.integers(0, r - 1))
            k = t.shape[d]
            shape = (*t.shape[:d], 2, k // 2, *t.shape[d + 1:]) if k % 2 == 0 else (
                *t.shape[:d], 1, k, *t.shape[d + 1:])
        if draw(st.booleans()):
            shape_attr = tuple(-1 if i == 0 else s for i, s in enumerate(shape))
        else:
            shape_attr = shape
        return b.op("reshape", [v], {"shape": shape_attr}), t.reshape(shape)
    if kind == "permute":
        perm = tuple(draw(st.permutations(range(r))))
        return b.op("permute", [v], {"perm": perm}), t.permute(perm)
    if kind == "softmax":
        d = draw(st.integers(-r, r - 1))
        return b.op("softmax", [v], {"dim": d}), torch.softmax(t, d)
    if kind == "concat":
        d = draw(st.integers(0, r - 1))
        if 2 * t.numel() > MAX_NUMEL:
            return None
        same = [(w, u) for w, u in vals if u.dim() == r and all(
            u.shape[i] == t.shape[i] for i in range(r) if i != d)]
        w, u = draw(st.sampled_from(same))
        return b.op("concat", [v, w], {"dim": d}), torch.cat([t, u], d)
    if kind == "slice":
        d = draw(st.integers(0, r - 1))
        n = t.shape[d]
        start = draw(st.integers(0, n - 1))
        end = draw(st.integers(start + 1, n))
        step = draw(st.integers(1, 2))
        idx = [slice(None)] * r
        idx[d] = slice(start, end, step)
        attrs = {"dim": d, "start": start, "end": end if end < n else 2**62, "step": step}
        return b.op("slice", [v], attrs), t[tuple(idx)]
    raise AssertionError(kind)
