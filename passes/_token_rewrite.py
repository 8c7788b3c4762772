"""The token-axis rewrite: rebuilds a graph with token reductions at block mid points.

`reduce_tokens(g, report, reducers)` walks ``g`` with an `ember.ir.Rebuilder`; at the mid point
of each block in ``reducers`` (blocks from `ember.passes._blocks.find_blocks`) the reducer emits
a token reduction (a `token_merge` / `token_select` through an `Emitter`), and every later node
is re-typed for the shorter token axis: reshape/expand/slice attributes naming the token count
are rewritten, side tensors with a token axis (masks, position tables) are gathered along
(``token_gather``), attention gets ``log(size)`` added to its logits when proportional, and graph
outputs that keep every token are unmerged. Token ops an earlier pass put in the graph become
stages of their own. A node that cannot carry the shorter axis raises `TokenRewriteError`.
The token passes (`merge_tokens`, `prune_tokens`) are its users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ember.ir import Graph, Node, Rebuilder, Value, get_op, has_trait
from ember.ir.shapes import Dim, dims_equal, numel, simplify

from ._blocks import REDUCE_OPS, BlockReport, NodeIndex

__all__ = ["TokenRewriteError", "Stage", "Emitter", "Reducer", "reduce_tokens"]


class TokenRewriteError(ValueError):
    """A token reduction cannot be carried through some node of the graph."""


@dataclass
class Stage:
    """One token reduction: ``n`` tokens after it; map/rep/size as the token ops return."""

    n: Dim
    map: Value | None = None
    rep: Value | None = None
    size: Value | None = None
    before: Value | None = None  # the stream value that was reduced (fallback for unmerge)
    drops: bool = False  # some tokens map to -1 (pruned without fusion)
    old_size: str | None = None  # an earlier pass's reduction: its size output (old name)


class Emitter:
    """What a reducer may use: emit ops, make constants, read rebuilt values."""

    def __init__(self, rb: _TokenState) -> None:
        self._rb = rb

    def op(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None,
           name: str | None = None) -> Any:
        return self._rb.b.op(op, inputs, attrs, name=name)

    def const(self, name: str, t: torch.Tensor) -> Value:
        return self._rb.b.add_param(name, t)

    def value(self, old_name: str) -> Value:
        return self._rb.env.get(old_name) or self._rb.old_values[old_name]

    def node(self, old_output: str) -> Node | None:
        return self._rb.new_nodes.get(old_output)

    @property
    def stage(self) -> Stage:
        return self._rb.stages[-1]


# reducer(emitter, block, stream value, current sizes) -> (y, size, map, rep, drops)
Reducer = Any


class _TokenState:
    """The token rewrite's walk: a `Rebuilder` plus the token axes and stages of each value."""

    def __init__(self, g: Graph, protect: int, proportional: bool) -> None:
        self.g = g
        self.protect = protect
        self.proportional = proportional
        self.rb = Rebuilder(g)
        self.b = self.rb.b
        self.old_values = g.values()
        # old name -> new value (also same-named values whose type the reduction changed)
        self.env: dict[str, Value] = self.rb.env
        self.axes: dict[str, dict[int, int]] = {}
        self.stages: list[Stage] = []
        self.new_nodes: dict[str, Node] = {}
        # token axes merged with inner axes (MultiheadAttention's [N*B, D] out-projection):
        # (value name, axis) -> (outer, inner); the axis size is outer * tokens * inner
        self.factor: dict[tuple[str, int], tuple[Dim, Dim]] = {}
        self._lifted: dict[tuple[str, tuple[int, ...], int], Value] = {}
        self._bias: dict[int, Value] = {}
        self._neg_inf: Value | None = None
        self._ix: NodeIndex | None = None

    # ----- helpers
    def _m(self, v: Value | None) -> Value | None:
        return self.rb.map(v)

    def _stage_of(self, v: Value, axis: int) -> int | None:
        return self.axes.get(v.name, {}).get(axis)

    def lift(self, v: Value, axes: Sequence[int], frm: dict[int, int], to: int) -> Value:
        """Gathers ``v`` along token ``axes`` from their stages up to stage ``to``."""
        key = (v.name, tuple(sorted(axes)), to)
        if key in self._lifted:
            return self._lifted[key]
        out = v
        start = {a: frm.get(a, 0) for a in axes}
        # continue from the value lifted to an earlier stage (a mask read by every block):
        # one gather per stage and axis, not a chain from the original at each block
        for t in range(to - 1, 0, -1):
            prev = self._lifted.get((v.name, key[1], t))
            if prev is not None and all(start[a] <= t for a in axes):
                out, start = prev, {a: t for a in axes}
                break
        for a in axes:
            for s in range(start[a] + 1, to + 1):
                rep = self.stages[s].rep
                assert rep is not None
                out = self.b.op("token_gather", [out, rep], {"dim": a}, name=f"{v.name}_tok")
        ax = dict(self.axes.get(v.name, {}))
        ax.update({a: to for a in axes})
        self.axes[out.name] = ax
        self._lifted[key] = out
        return out

    def bias(self, s: int, batch: Dim) -> Value:
        if s not in self._bias:
            size = self.stages[s].size
            assert size is not None
            # a fused token of nothing attended (padding) has size 0: clamped, so its bias
            # is finite (-27.6) and a later pass's log-size difference is not inf - inf
            lg = self.b.op("log", [self.b.op("clamp", [size], {"min": 1e-12, "max": None},
                                             name="size_floor")], name="size_log")
            t = self.b.op("permute", [lg], {"perm": (0, 2, 1)}, name="size_log")
            self._bias[s] = self.b.op("reshape", [t], {"shape": (size.type.shape[0], 1, 1,
                                                                 size.type.shape[1])},
                                      name="size_bias")
        return self._bias[s]

    def neg_inf(self) -> Value:
        if self._neg_inf is None:
            self._neg_inf = self.b.add_param("neg_inf", torch.tensor(float("-inf")))
        return self._neg_inf

    def stage_bias(self, s: int, batch: Dim, old_in: Value | None) -> Value | None:
        """log(size) bias for an attention at stage ``s`` whose old mask/logits is ``old_in``.

        None when the stage is an earlier pass's reduction (the old graph has its bias).
        When the old mask already holds an earlier pass's bias log(size_k), the difference
        log(size_s) - log(size_k) (lifted to stage s) is returned instead."""
        st = self.stages[s]
        if st.size is None or st.old_size is not None:
            return None
        bias = self.bias(s, batch)
        if old_in is None or old_in.name not in self._index().prod:
            return bias
        anc = self._index().ancestors(old_in.name, limit=2000)
        prod = self._index().prod
        for k in range(s - 1, 0, -1):
            ok = self.stages[k].old_size
            if ok is not None and prod.get(ok) in anc:
                old = self.bias(k, batch)
                self.axes.setdefault(old.name, {3: k})
                old = self.lift(old, [3], {3: k}, s)
                return self.b.op("sub", [bias, old], name="size_bias_delta")
        return bias

    def _index(self) -> NodeIndex:
        if self._ix is None:
            self._ix = NodeIndex(self.g)
        return self._ix

    def existing(self, n: Node) -> None:
        """A token op an earlier pass put in the graph: it becomes a stage of its own."""
        ins = [self._m(v) for v in n.inputs]
        tracked = [self.axes.get(v.name) if v is not None else None for v in ins]
        attrs = dict(n.attrs)
        if n.op in REDUCE_OPS:
            x = ins[0]
            assert x is not None
            s = (tracked[0] or {}).get(1, 0)
            if ins[1] is not None and (tracked[1] or {}).get(1, 0) < s:
                ins[1] = self.lift(ins[1], [1], tracked[1] or {1: 0}, s)
            if s > 0 and self.stages[s].size is not None:
                ins = [*ins[:2], self.stages[s].size]
            n_s = self.stages[s].n
            if isinstance(n_s, int):
                room = n_s - attrs["protect"]
                if n.op == "token_merge" and isinstance(attrs["r"], int):
                    attrs["r"] = max(0, min(attrs["r"], room // 2))
                if n.op == "token_select" and isinstance(attrs["keep"], int):
                    attrs["keep"] = max(1, min(attrs["keep"], room))
            outs = self.b.op(n.op, ins, attrs, name=n.outputs[0].name)
            for old, new in zip(n.outputs, outs):
                self.env[old.name] = new
            self.new_nodes[n.outputs[0].name] = self.b.nodes[-1]
            y, size, mp, rp = outs
            drops = n.op == "token_select" and not attrs["fuse"]
            self.stages.append(Stage(y.type.shape[1], mp, rp, size, x, drops,
                                     old_size=n.outputs[1].name))
            k = len(self.stages) - 1
            self.axes[y.name] = {1: k}
            self.axes[size.name] = {1: k}
            self.axes[rp.name] = {1: k}
            return
        k = next((i for i, st in enumerate(self.stages)
                  if ins[1] is not None and ins[1] in (st.rep, st.map)), None)
        if k is None:
            raise TokenRewriteError(f"{n.op} %{n.outputs[0].name} reads a token map that is "
                                    f"not a reduction of this graph")
        v = ins[0]
        assert v is not None
        if n.op == "token_gather":
            d = attrs["dim"] % v.type.rank
            frm = tracked[0] or {d: self._prev_existing(k)}
            if frm.get(d, 0) < k - 1:
                v = self.lift(v, [d], frm, k - 1)
            out = self.b.op("token_gather", [v, ins[1]], attrs, name=n.outputs[0].name)
            ax = dict(self.axes.get(v.name, {}))
            ax[d] = k
            self.axes[out.name] = ax
        else:  # token_unmerge: undo the later reductions first
            st = (tracked[0] or {}).get(1, k)
            for j in range(st, k, -1):
                stg = self.stages[j]
                assert stg.map is not None
                fb = stg.before if stg.drops else None
                v = self.b.op("token_unmerge", [v, stg.map, fb], name=f"{v.name}_full")
            fb = self._m(n.inputs[2]) if len(n.inputs) > 2 else None
            out = self.b.op("token_unmerge", [v, ins[1], fb], name=n.outputs[0].name)
            if k - 1 > 0:
                self.axes[out.name] = {1: k - 1}
        self.env[n.outputs[0].name] = out
        self.new_nodes[n.outputs[0].name] = self.b.nodes[-1]

    def _prev_existing(self, k: int) -> int:
        """The stage an earlier pass's side tensor sits at before its reduction ``k``."""
        return max((i for i in range(k) if self.stages[i].old_size is not None), default=0)

    # ----- per node
    def node(self, n: Node) -> None:
        if n.op in REDUCE_OPS | {"token_unmerge", "token_gather"}:
            self.existing(n)
            return
        ins = [self._m(v) for v in n.inputs]
        tracked = [self.axes.get(v.name) if v is not None else None for v in ins]
        stage_max = max((s for t in tracked if t for s in t.values()), default=-1)
        if stage_max <= 0:
            n2 = Node(n.op, tuple(ins), n.outputs, n.attrs, n.loc)
            self._emit_plain(n2, tracked)
            return
        s = stage_max
        n0 = self.stages[0].n
        # bring every input with a token axis up to stage s
        for i, v in enumerate(ins):
            if v is None:
                continue
            t = tracked[i] or {}
            axes = {a: st for a, st in t.items() if st < s}
            if not t:
                axes = {a: 0 for a in self._side_axes(n, i, v, ins, tracked, n0)}
            if axes:
                ins[i] = self.lift(v, list(axes), axes, s)
                tracked[i] = self.axes[ins[i].name]  # type: ignore[union-attr]
        attrs = dict(n.attrs)
        out_axes = self._out_axes(n, ins, tracked, attrs, s)
        if self.proportional and self.stages[s].size is not None:
            if n.op == "attention":
                q = ins[0]
                assert q is not None
                bias = self.stage_bias(s, q.type.shape[0],
                                       n.inputs[3] if len(n.inputs) > 3 else None)
                mask = ins[3] if len(ins) > 3 else None
                if bias is not None and mask is None:
                    ins = [*ins[:3], bias]
                elif bias is not None and mask.type.dtype == "bool":
                    ins[3] = self.b.op("where", [mask, bias, self.neg_inf()], name="size_mask")
                elif bias is not None:
                    ins[3] = self.b.op("add", [mask, bias], name="size_mask")
            elif n.op == "softmax" and tracked[0] and (tracked[0].get(
                    ins[0].type.rank - 1) is not None) and (  # type: ignore[union-attr]
                    n.attrs.get("dim", -1) % ins[0].type.rank == ins[0].type.rank - 1):  # type: ignore[union-attr]
                bias = self.stage_bias(s, ins[0].type.shape[0], n.inputs[0])  # type: ignore[union-attr]
                if bias is not None:
                    ins[0] = self.b.op("add", [ins[0], bias], name="size_logits")
                    self.axes[ins[0].name] = dict(tracked[0])  # type: ignore[union-attr]
        types = get_op(n.op).infer([None if v is None else v.type for v in ins], attrs)
        outs = tuple(Value(v.name, t) for v, t in zip(n.outputs, types))
        n2 = Node(n.op, tuple(ins), outs, attrs, n.loc)
        self.b.nodes.append(n2)
        self.new_nodes[n.outputs[0].name] = n2
        for v in outs:
            if v.type != self.old_values[v.name].type:
                self.env[v.name] = v
        if out_axes is not None:
            for v in outs[:1]:
                self.axes[v.name] = {a: s for a in out_axes}
                self._carry_factor(n, ins, v, out_axes, attrs)

    def _carry_factor(self, n: Node, ins: Sequence[Value | None], out: Value,
                      out_axes: set[int], attrs: Mapping[str, Any]) -> None:
        x0 = ins[0]
        if x0 is None or n.op == "reshape":
            return
        if n.op == "permute":
            perm = [p % out.type.rank for p in attrs["perm"]]
            for i, p in enumerate(perm):
                if (x0.name, p) in self.factor and i in out_axes:
                    self.factor[(out.name, i)] = self.factor[(x0.name, p)]
            return
        if x0.type.rank == out.type.rank:
            for a in out_axes:
                if (x0.name, a) in self.factor:
                    self.factor[(out.name, a)] = self.factor[(x0.name, a)]

    def _emit_plain(self, n2: Node, tracked: list[dict[int, int] | None]) -> None:
        self.b.nodes.append(n2)
        self.new_nodes[n2.outputs[0].name] = n2
        if any(tracked):  # stage-0 tracked input: keep tracking where the rules allow
            try:
                attrs = dict(n2.attrs)
                ax = self._out_axes(n2, list(n2.inputs), tracked, attrs, 0)
            except TokenRewriteError:
                ax = None
            if ax is not None:
                self.axes[n2.outputs[0].name] = {a: 0 for a in ax}

    def _side_axes(self, n: Node, i: int, v: Value, ins: Sequence[Value | None],
                   tracked: Sequence[dict[int, int] | None], n0: Dim) -> list[int]:
        """Token axes of an untracked operand (a mask, a position table) by alignment."""
        r = v.type.rank
        cand: set[int] = set()
        if (n.op == "attention" and i == 3) or (n.op == "attention_score" and i == 2):
            cand = {r - 2, r - 1}
        elif get_op(n.op).elementwise:
            for t, u in zip(tracked, ins):
                if t and u is not None:
                    cand |= {a - u.type.rank + r for a in t if a - u.type.rank + r >= 0}
        return sorted(a for a in cand if 0 <= a < r and not dims_equal(v.type.shape[a], 1)
                      and dims_equal(v.type.shape[a], n0))

    def _out_axes(self, n: Node, ins: Sequence[Value | None],
                  tracked: Sequence[dict[int, int] | None], attrs: dict[str, Any],
                  s: int) -> set[int] | None:
        op = n.op
        old_out = self.old_values[n.outputs[0].name].type
        R = old_out.rank
        t0 = tracked[0] or {}
        x0 = n.inputs[0]
        n_s = self.stages[s].n if self.stages else None
        if op == "attention_score":  # [B, Nk]: the keys' token axis
            return {1} if 2 in (tracked[1] or {}) else set()
        if op == "token_score":
            return {1} if 1 in t0 else set()
        if has_trait(op, "linear"):
            if x0 is not None and (x0.type.rank - 1) in t0:
                raise TokenRewriteError(f"linear %{n.outputs[0].name} contracts the token axis")
            return set(t0) if t0 else None
        if op == "matmul":
            a, b = ins[0], ins[1]
            assert a is not None and b is not None
            ta, tb = tracked[0] or {}, tracked[1] or {}
            out = {ax + R - a.type.rank for ax in ta if ax != a.type.rank - 1}
            for ax in tb:
                if ax == b.type.rank - 1:
                    out.add(R - 1)
                elif ax < b.type.rank - 2:
                    out.add(ax + R - b.type.rank)
            return out
        if op == "attention":
            return {ax for ax in t0 if ax != R - 1}
        if op == "permute":
            perm = [p % R for p in attrs["perm"]]
            return {i for i, p in enumerate(perm) if p in t0}
        if op == "reshape":
            return self._reshape_axes(n, t0, attrs, n_s)
        if op == "expand":
            shape = list(attrs["shape"])
            assert x0 is not None
            off = len(shape) - x0.type.rank
            out = {a + off for a in t0}
            for a in out:
                if not (isinstance(shape[a], int) and shape[a] == -1) and n_s is not None:
                    shape[a] = n_s
            attrs["shape"] = tuple(shape)
            return out
        if op in ("select", "slice"):
            assert x0 is not None
            d = attrs["dim"] % x0.type.rank
            if d not in t0:
                shift = {a - 1 if (op == "select" and a > d) else a for a in t0}
                return shift
            if op == "select":
                if not 0 <= attrs["index"] < max(self.protect, 1 if s == 0 else self.protect):
                    raise TokenRewriteError(f"select %{n.outputs[0].name} reads token "
                                            f"{attrs['index']}, which is not protected")
                return {a - 1 if a > d else a for a in t0 if a != d}
            st, e = attrs["start"], attrs["end"]
            old_n = self.old_values[x0.name].type.shape[d]
            if st == 0 and attrs["step"] == 1 and (isinstance(e, int) and e >= 2**40
                                                   or dims_equal(e, old_n)):
                if n_s is not None:
                    attrs["end"] = 2**62
                return set(t0)
            if isinstance(e, int) and 0 <= st and e <= self.protect:
                return {a for a in t0 if a != d}
            end = "" if isinstance(e, int) and e >= 2**40 else e  # [1:] not [1:2**62]
            raise TokenRewriteError(f"slice %{n.outputs[0].name} reads token range "
                                    f"[{st}:{end}], which is not protected")
        if op == "concat":
            d = attrs["dim"] % R
            out = set()
            for t in tracked:
                out |= set(t or {})
            if d in out:
                raise TokenRewriteError(f"concat %{n.outputs[0].name} along the token axis")
            return out
        if op in ("sum", "mean", "amax", "amin", "var"):
            assert x0 is not None
            r = x0.type.rank
            dims = attrs.get("dims") or tuple(range(r))
            dims = {d % r for d in dims}
            if attrs.get("keepdim"):
                return {a for a in t0 if a not in dims}
            return {a - sum(1 for d in dims if d < a) for a in t0 if a not in dims}
        if get_op(op).elementwise or len([t for t in tracked if t]) > 1:
            out = set()
            for t, u in zip(tracked, ins):
                if t and u is not None:
                    out |= {a + R - u.type.rank for a in t}
            return out
        if x0 is not None and self.old_values[x0.name].type.shape == old_out.shape:
            return set(t0)
        raise TokenRewriteError(f"cannot carry the token axis through {op} "
                                f"%{n.outputs[0].name} ({n.loc})")

    def _reshape_axes(self, n: Node, t0: dict[int, int], attrs: dict[str, Any],
                      n_s: Dim | None) -> set[int]:
        x0 = n.inputs[0]
        assert x0 is not None
        si = self.old_values[x0.name].type.shape
        so = self.old_values[n.outputs[0].name].type.shape
        shape = list(attrs["shape"])
        out = set()
        new_in = self._m(x0)
        assert new_in is not None
        for a in t0:
            # the token axis may be fused with outer/inner axes: size = outer * tokens * inner
            fo_in, fi_in = self.factor.get((new_in.name, a), (1, 1))
            n_old = _ratio(si[a], simplify(fo_in * fi_in))
            before = simplify(numel(si[:a]) * fo_in)  # elements (rows) before the token axis
            hit = None
            for j in range(len(so)):
                fo = _ratio(before, numel(so[:j]))
                fi = None if fo is None or n_old is None else _ratio(so[j], simplify(fo * n_old))
                if fo is not None and fi is not None:
                    hit = (j, fo, fi)
                    break
            if hit is None:
                raise TokenRewriteError(f"reshape %{n.outputs[0].name} {tuple(si)} -> "
                                        f"{tuple(so)} splits the token axis")
            j, fo, fi = hit
            out.add(j)
            if not (fo == 1 and fi == 1):
                self.factor[(n.outputs[0].name, j)] = (fo, fi)
            if n_s is not None and not (isinstance(shape[j], int) and shape[j] == -1):
                shape[j] = simplify(fo * n_s * fi)
        attrs["shape"] = tuple(shape)
        return out


def _ratio(a: Dim, b: Dim) -> Dim | None:
    """a / b when it is a whole number (or an integer expression), else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    if dims_equal(a, b):
        return 1
    r = simplify(a / b)
    return r if isinstance(r, int) or getattr(r, "is_integer", False) else None


def reduce_tokens(g: Graph, report: BlockReport, reducers: Mapping[int, Reducer],
                  proportional: bool = True) -> Graph:
    """Rebuilds ``g`` with a token reduction at the mid point of the blocks in ``reducers``.

    Every node after a reduction is re-typed; reshape/expand/slice attributes that name the
    token count are rewritten; masks and other side tensors with a token axis are gathered
    along (``token_gather``); attention gets ``log(size)`` added to its logits when
    ``proportional``; graph outputs that keep every token are unmerged.

    Raises:
        TokenRewriteError: some node cannot carry the shorter token axis.
    """
    rb = _TokenState(g, report.protect, proportional)
    em = Emitter(rb)
    points = {report.blocks[i].mid: i for i in reducers}
    assert report.tokens is not None
    rb.stages.append(Stage(report.tokens))
    for n in g.nodes:
        rb.node(n)
        name = n.outputs[0].name
        if name in points:
            blk = report.blocks[points[name]]
            x = rb.env.get(name) or rb.old_values[name]
            rb.axes.setdefault(x.name, {1: len(rb.stages) - 1})
            cur = rb.stages[-1]
            y, size, mp, rep, drops = reducers[points[name]](em, blk, x, cur.size)
            rb.stages.append(Stage(y.type.shape[1], mp, rep, size, x, drops))
            rb.axes[y.name] = {1: len(rb.stages) - 1}
            rb.env[name] = y
    outs = []
    for v in g.outputs:
        nv = rb.env.get(v.name, v)
        ax = rb.axes.get(nv.name, {})
        st = max(ax.values(), default=0)
        if st > 0:
            if set(ax) != {1} or nv.type.rank != 3:
                raise TokenRewriteError(f"output %{v.name} has token axes {sorted(ax)}; "
                                        f"only [B, N, D] outputs can be unmerged")
            for k in range(st, 0, -1):
                stg = rb.stages[k]
                fb = stg.before if (stg.drops and stg.before is not None and dims_equal(
                    stg.before.type.shape[2], nv.type.shape[2])) else None
                assert stg.map is not None
                nv = rb.b.op("token_unmerge", [nv, stg.map, fb], name=f"{v.name}_full")
        outs.append(nv)
    return rb.rb.finish(outs)
