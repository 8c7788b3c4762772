"""Transformer-block recognition on the IR, by graph pattern only (never by names).

``find_blocks(g) -> BlockReport``. The residual stream is found from its *residual nodes*: an
``add`` (or a ``fused_linear``/``fused_conv`` with a fused residual) where one operand, the
skip, is an ancestor of the other, the branch, and the branch path holds a matmul-like op::

    %x  ...                         block input (stream, [B, N, D])
    %a  = add(%x, attn_branch(%x))  attention residual: branch holds `attention` or a softmax
    %m  = %a | norm(%a)             block mid (post-norm models normalize here)
    %o  = add(%m, mlp_branch(%m))   MLP residual: branch holds linears, no attention
    %y  = %o | norm(%o)             block output (= next block's input)

Consecutive (attention, MLP) residual pairs are blocks; so is one residual whose branch
adds an attention path and an attention-free matmul path that both start at the skip
(a parallel block: ``%y = add(%x, add(attn(%x), mlp(%x)))``). The token axis is axis 1 of the stream.
Positions read by a ``select``/``slice`` on the token axis after the last block (a CLS pooler,
a classifier head) are reported as protected. When no block is found the report says why.

Also here: `evaluate_values`, a small evaluator over op references that returns intermediate
values (passes may not import the reference backend), used for calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.ir import Graph, Node, Value, bind_symbols, evaluate, get_op, to_torch_dtype
from ember.ir.shapes import Dim, dims_equal, simplify

__all__ = ["Block", "BlockReport", "find_blocks", "evaluate_values", "MATMUL_OPS", "NORM_OPS"]

log = logging.getLogger(__name__)

MATMUL_OPS = frozenset({"linear", "matmul", "fused_linear", "attention", "conv", "fused_conv",
                        "qlinear", "sparse_matmul", "lut_matmul"})
NORM_OPS = frozenset({"layer_norm", "rms_norm", "cast", "group_norm"})
_RESIDUAL_FUSED = frozenset({"fused_linear", "fused_conv"})
REDUCE_OPS = frozenset({"token_merge", "token_select"})
_COMPARE = frozenset({"lt", "le", "gt", "ge"})


@dataclass(frozen=True)
class Block:
    """One transformer block, by value names of the graph it was found in.

    Attributes:
        index: position in the residual stream (0 = first block).
        input / mid / output: stream values entering the block, between its attention and
            MLP sub-blocks, and leaving it ([B, N, D] each).
        attn_residual / mlp_residual: outputs of the two residual nodes.
        attn_branch: the value the attention residual adds to the stream.
        attention: output of the `attention` node, or of the softmax of an explicit attention.
        q / k / mask: operands of that attention (k is [B, H, N, d]; None when not known).
        scale: attention scale when known.
        nodes: indices of the graph nodes inside the block (both branches and residuals).
        tokens: token count of ``mid`` (after a reduction an earlier pass put there).
        reduced: ``mid`` is the output of a token reduction already in the graph.
        parallel: a parallel block (GPT-J/NeoX/Falcon: ``x + attn(ln1(x)) + mlp(ln2(x))``,
            one residual node): ``mid`` is ``input`` and both residual names are ``output``;
            there is no point between attention and MLP.
    """

    index: int
    input: str
    mid: str
    output: str
    attn_residual: str
    mlp_residual: str
    attn_branch: str
    attention: str
    fused_attention: bool
    q: str | None
    k: str | None
    mask: str | None
    scale: float | None
    causal: bool
    nodes: frozenset[int]
    tokens: Dim | None = None
    reduced: bool = False
    parallel: bool = False


@dataclass
class BlockReport:
    """What `find_blocks` found, and why not when it found nothing."""

    blocks: list[Block] = field(default_factory=list)
    token_axis: int = 1
    tokens: Dim | None = None
    hidden: Dim | None = None
    protect: int = 0
    reads_all_tokens: bool = False
    post_norm: bool = False
    causal: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.blocks)

    @property
    def parallel(self) -> bool:
        """Some block is a parallel one: no point between attention and MLP to reduce at."""
        return any(b.parallel for b in self.blocks)

    def explain(self) -> str:
        if self.ok:
            kind = "post-norm" if self.post_norm else "pre-norm"
            return (f"{len(self.blocks)} {kind} blocks, tokens={self.tokens}, "
                    f"hidden={self.hidden}, protect={self.protect}, "
                    f"reads_all_tokens={self.reads_all_tokens}, causal={self.causal}")
        return "no transformer blocks: " + "; ".join(self.reasons or ["(no reason recorded)"])


# ----------------------------------------------------------------------------- graph helpers
class _Index:
    def __init__(self, g: Graph) -> None:
        self.g = g
        self.prod: dict[str, int] = {}
        for i, n in enumerate(g.nodes):
            for v in n.outputs:
                self.prod[v.name] = i
        self.users: dict[str, list[int]] = {}
        for i, n in enumerate(g.nodes):
            for v in n.inputs:
                if v is not None:
                    self.users.setdefault(v.name, []).append(i)

    def node(self, name: str) -> Node | None:
        i = self.prod.get(name)
        return None if i is None else self.g.nodes[i]

    def between(self, src: str, dst: str) -> set[int] | None:
        """Indices of nodes on some path src -> dst (dst's producer included), or None."""
        lo = self.prod.get(src, -1)
        end = self.prod.get(dst)
        if end is None:
            return None
        seen: set[int] = set()
        reach: dict[int, bool] = {}
        stack = [end]
        order: list[int] = []
        while stack:  # nodes that are ancestors of dst and come after src
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            order.append(i)
            for v in self.g.nodes[i].inputs:
                j = None if v is None else self.prod.get(v.name)
                if j is not None and j > lo and j not in seen:
                    stack.append(j)
        for i in sorted(order):
            reach[i] = any(v is not None and (v.name == src or reach.get(
                self.prod.get(v.name, -2), False)) for v in self.g.nodes[i].inputs)
        if not reach.get(end, False):
            return None
        return {i for i, r in reach.items() if r}

    def ancestors(self, name: str, limit: int = 100_000) -> set[int]:
        out: set[int] = set()
        stack = [self.prod[name]] if name in self.prod else []
        while stack and len(out) < limit:
            i = stack.pop()
            if i in out:
                continue
            out.add(i)
            for v in self.g.nodes[i].inputs:
                if v is not None and v.name in self.prod:
                    stack.append(self.prod[v.name])
        return out


def _is_stream(t: Any) -> bool:
    return t.rank == 3 and t.dtype in ("float32", "float16", "bfloat16", "float64")


def _unflatten(ix: _Index, v: Value) -> Value:
    """The [B, N, D] value a [B*N, D] reshape was made from (fused epilogues flatten)."""
    n = ix.node(v.name)
    if n is not None and n.op == "reshape" and v.type.rank == 2 and n.inputs[0] is not None \
            and _is_stream(n.inputs[0].type):
        return n.inputs[0]
    return v


def _refold(ix: _Index, out: Value) -> Value:
    """The reshape back to [B, N, D] of a flattened residual output, when there is one."""
    us = ix.users.get(out.name, [])
    if out.type.rank == 2 and len(us) == 1:
        n = ix.g.nodes[us[0]]
        if n.op == "reshape" and _is_stream(n.output.type):
            return n.output
    return out


def _residual_nodes(ix: _Index) -> list[tuple[int, str, str, str]]:
    """(node index, skip, branch, stream output) of every residual node, in graph order."""
    out = []
    for i, n in enumerate(ix.g.nodes):
        cands: list[tuple[Value, Value]] = []
        res = n.outputs[0]
        if n.op == "add" and len(n.inputs) == 2 and all(v is not None for v in n.inputs):
            a, b = n.inputs
            assert a is not None and b is not None
            if _is_stream(n.output.type) and a.type.shape == b.type.shape == n.output.type.shape:
                cands = [(a, b), (b, a)]
        elif (n.op in _RESIDUAL_FUSED and n.attrs.get("residual", "none") != "none"
              and len(n.inputs) > 3 and n.inputs[3] is not None and n.inputs[0] is not None):
            res = _refold(ix, n.outputs[0])
            if _is_stream(res.type):
                cands = [(_unflatten(ix, n.inputs[3]), n.inputs[0])]
        for skip, branch in cands:
            path = ix.between(skip.name, branch.name)
            if n.op in _RESIDUAL_FUSED:
                path = (path or set()) | {i} if path is not None else None
            if path and any(ix.g.nodes[j].op in MATMUL_OPS for j in path):
                out.append((i, skip.name, branch.name, res.name))
                break
    return out


def _parallel_attention_side(ix: _Index, skip: str, branch: str) -> str | None:
    """For a parallel block's residual branch ``attn(skip) + mlp(skip)`` (an ``add``, or a
    ``fused_linear`` whose fused residual is the attention output), the attention operand;
    None unless one side holds the attention and the other an attention-free matmul path,
    both reading ``skip``."""
    n = ix.node(branch)
    if n is None:
        return None
    if n.op == "add" and len(n.inputs) == 2 and all(v is not None for v in n.inputs):
        sides = [(v.name, set()) for v in n.inputs]  # type: ignore[union-attr]
    elif (n.op in _RESIDUAL_FUSED and n.attrs.get("residual", "none") != "none"
          and len(n.inputs) > 3 and n.inputs[3] is not None and n.inputs[0] is not None):
        # the fused node itself is the MLP side's last matmul
        sides = [(n.inputs[0].name, {ix.prod[branch]}), (n.inputs[3].name, set())]
    else:
        return None
    paths = []
    for name, extra in sides:
        p = ix.between(skip, name)
        if p is None:
            return None
        paths.append((name, p | extra))
    att = [name for name, p in paths if _attention_in(ix, p) is not None]
    mlp = [p for name, p in paths if _attention_in(ix, p) is None
           and any(ix.g.nodes[j].op in MATMUL_OPS for j in p)]
    return att[0] if len(att) == 1 and len(mlp) == 1 else None


def _attention_in(ix: _Index, nodes: Iterable[int]) -> tuple[int, bool] | None:
    """The attention node among ``nodes``: an `attention` op, or a softmax over 4-d scores."""
    for j in sorted(nodes):
        n = ix.g.nodes[j]
        if n.op == "attention":
            return j, True
        if n.op == "softmax" and n.output.type.rank == 4:
            return j, False
    return None


def _scores_matmul(ix: _Index, softmax: Node) -> Node | None:
    """The q @ k^T matmul feeding an explicit softmax (through scale/mask/cast ops)."""
    v = softmax.inputs[0]
    for _ in range(8):
        n = None if v is None else ix.node(v.name)
        if n is None:
            return None
        if n.op == "matmul":
            return n
        if n.op not in ("add", "mul", "div", "where", "cast", "sub", "masked_fill"):
            return None
        # follow the operand that is 4-d and not a mask/constant
        nxt = [u for u in n.inputs if u is not None and u.type.rank == 4 and u.name in ix.prod
               and ix.node(u.name) is not None and ix.node(u.name).op != "expand"]  # type: ignore
        v = nxt[0] if nxt else None
    return None


def _attention_causal(ix: _Index, att: tuple[int, bool]) -> bool:
    """`_is_causal` of the attention found by `_attention_in` (as blocks compute it)."""
    j, fused = att
    an = ix.g.nodes[j]
    return _is_causal(ix, an, an.inputs[3] if fused and len(an.inputs) > 3 else None)


def _is_causal(ix: _Index, attn: Node, mask: Value | None) -> bool:
    if attn.attrs.get("is_causal"):
        return True
    if mask is None or mask.name not in ix.prod:
        return False
    for j in ix.ancestors(mask.name, limit=400):
        n = ix.g.nodes[j]
        if n.op in ("tril", "triu"):
            return True
        if n.op in _COMPARE and all(u is not None and u.name in ix.prod and any(
                ix.g.nodes[a].op == "arange" for a in ix.ancestors(u.name, limit=50))
                for u in n.inputs):
            return True
    return False


def _reduced(ix: _Index, name: str) -> str | None:
    """The reduced stream when a token op already reduces ``name`` (an earlier pass)."""
    for j in ix.users.get(name, []):
        n = ix.g.nodes[j]
        if n.op in REDUCE_OPS and n.inputs[0] is not None and n.inputs[0].name == name:
            return n.outputs[0].name
    return None


def _unreduced(ix: _Index, name: str) -> str:
    """The stream a token op reduced into ``name``, or ``name``."""
    n = ix.node(name)
    if n is not None and n.op in REDUCE_OPS and n.outputs[0].name == name \
            and n.inputs[0] is not None:
        return n.inputs[0].name
    return name


def _follow_norm(ix: _Index, name: str) -> str:
    """``name`` or its normalized form when its only user is a norm (post-norm models)."""
    us = ix.users.get(name, [])
    if len(us) == 1 and ix.g.nodes[us[0]].op in NORM_OPS - {"cast"}:
        return ix.g.nodes[us[0]].output.name
    return name


# ----------------------------------------------------------------------------- find_blocks
def find_blocks(g: Graph) -> BlockReport:
    """Finds the transformer blocks of ``g``; see the module docstring."""
    rep = BlockReport()
    ix = _Index(g)
    res = _residual_nodes(ix)
    if not res:
        rep.reasons.append("no residual add (x + f(x) with a matmul in f on a [B, N, D] "
                           "float stream) found")
        return rep
    kinds = []
    for i, skip, branch, res_out in res:
        path = ix.between(skip, branch) or set()
        att = _attention_in(ix, path)
        if res_out != ix.g.nodes[i].outputs[0].name:
            path = path | {ix.prod[res_out]}
        kinds.append((i, skip, branch, path, att, res_out))
    blocks: list[Block] = []
    k = 0
    skipped: list[str] = []
    # a causal attention outside every block (a decoder's self-attention before its cross
    # attention + MLP pair) still makes the stream causal for the token passes
    skipped_causal = False
    while k < len(kinds):
        i, skip, branch, path, att, a_out = kinds[k]
        if att is None:
            skipped.append(f"residual at %{a_out} has no attention before it")
            k += 1
            continue
        if k + 1 >= len(kinds) or kinds[k + 1][4] is not None:
            par = _parallel_attention_side(ix, skip, branch)
            if par is not None:
                j, fused = att
                an = g.nodes[j]
                blocks.append(Block(
                    index=len(blocks), input=skip, mid=skip, output=a_out,
                    attn_residual=a_out, mlp_residual=a_out, attn_branch=par,
                    attention=an.output.name, fused_attention=fused, q=None, k=None,
                    mask=None, scale=None, causal=_attention_causal(ix, att),
                    nodes=frozenset(path | {i}), tokens=g.values()[skip].type.shape[1],
                    parallel=True))
                k += 1
                continue
            skipped.append(f"attention residual %{a_out} is not followed by an MLP residual")
            skipped_causal |= _attention_causal(ix, att)
            k += 1
            continue
        i2, skip2, branch2, path2, _, m_out = kinds[k + 1]
        if skip2 not in (a_out, _follow_norm(ix, a_out), _reduced(ix, a_out),
                         _reduced(ix, _follow_norm(ix, a_out))):
            skipped.append(f"MLP residual %{m_out} does not read the attention residual "
                           f"%{a_out}")
            skipped_causal |= _attention_causal(ix, att)
            k += 1
            continue
        j, fused = att
        an = g.nodes[j]
        q = k_ = mask = None
        scale = None
        if fused:
            q, k_ = an.inputs[0], an.inputs[1]
            mask = an.inputs[3] if len(an.inputs) > 3 else None
            scale = an.attrs.get("scale")
        else:
            mm = _scores_matmul(ix, an)
            if mm is not None:
                q = mm.inputs[0]
        stream_t = g.values()[a_out].type
        if k_ is not None and (k_.type.rank != 4 or not dims_equal(k_.type.shape[2],
                                                                    stream_t.shape[1])):
            k_ = None
        blocks.append(Block(
            index=len(blocks), input=skip, mid=skip2, output=m_out,
            attn_residual=a_out, mlp_residual=m_out, attn_branch=branch,
            attention=an.output.name if fused else an.output.name, fused_attention=fused,
            q=None if q is None else q.name, k=None if k_ is None else k_.name,
            mask=None if mask is None else mask.name, scale=scale,
            causal=_is_causal(ix, an, mask), nodes=frozenset(path | path2 | {i, i2}),
            tokens=g.values()[skip2].type.shape[1], reduced=_unreduced(ix, skip2) != skip2))
        k += 2
    if not blocks:
        rep.reasons.extend(skipped or ["no (attention, MLP) residual pair found"])
        return rep
    # block outputs: the next block's input; post-norm models normalize the last one too
    mid0 = ix.node(_unreduced(ix, blocks[0].mid))
    post = mid0 is not None and mid0.op in NORM_OPS and not blocks[0].parallel
    out_blocks = []
    for b, nxt in zip(blocks, blocks[1:] + [None]):
        out = nxt.input if nxt is not None else (_follow_norm(ix, b.output) if post else b.output)
        out_blocks.append(Block(**{**b.__dict__, "output": out}))
    rep.blocks = out_blocks
    rep.post_norm = post
    vals = g.values()
    st = vals[out_blocks[0].input].type
    rep.tokens, rep.hidden = st.shape[1], st.shape[2]
    rep.causal = any(b.causal for b in out_blocks) or skipped_causal
    rep.protect, rep.reads_all_tokens, why = _readers(g, ix, out_blocks[-1].output)
    rep.reasons.extend(skipped)
    rep.reasons.extend(why)
    return rep


def _readers(g: Graph, ix: _Index, last: str) -> tuple[int, bool, list[str]]:
    """Protected leading positions read after the last block; whether outputs keep tokens."""
    protect, notes = 0, []
    outs = {v.name for v in g.outputs}
    all_tokens = False
    stack, seen = [last], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outs:
            all_tokens = True
        for j in ix.users.get(name, []):
            n = g.nodes[j]
            t = n.inputs[0].type if n.inputs and n.inputs[0] is not None else None
            if t is None or n.inputs[0].name != name:  # type: ignore[union-attr]
                if n.op in MATMUL_OPS | NORM_OPS or get_op(n.op).elementwise:
                    stack.extend(v.name for v in n.outputs if v.type.rank == 3)
                continue
            d = n.attrs.get("dim")
            if n.op == "select" and d is not None and d % t.rank == 1:
                idx = n.attrs["index"]
                if idx < 0:
                    notes.append(f"head reads token {idx} from the end (%{n.output.name})")
                protect = max(protect, idx + 1 if idx >= 0 else 0)
            elif n.op == "slice" and d is not None and d % t.rank == 1:
                s, e = n.attrs["start"], n.attrs["end"]
                if isinstance(e, int) and e < 2**40 and isinstance(s, int) and 0 <= s:
                    protect = max(protect, e)
                else:
                    stack.extend(v.name for v in n.outputs)
            elif n.output.type.rank == 3 and (dims_equal(n.output.type.shape[1], t.shape[1])
                                              or n.op == "token_unmerge"):
                stack.extend(v.name for v in n.outputs)
    return protect, all_tokens, notes


# ----------------------------------------------------------------------------- evaluation
def evaluate_values(g: Graph, inputs: Sequence[Any], names: Iterable[str]) -> dict[str, Any]:
    """Runs ``g`` on ``inputs`` with op references; returns the values called ``names``."""
    want = set(names)
    tensors = []
    for a, v in zip(inputs, g.inputs):
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
        tensors.append(t.to(to_torch_dtype(v.type.dtype)))
    env = bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in tensors],
                       list(g.input_names or [v.name for v in g.inputs]))
    vals: dict[str, Any] = {v.name: t for v, t in zip(g.inputs, tensors)}
    vals.update(g.weights)
    last_use: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if v is not None:
                last_use[v.name] = i
    out: dict[str, Any] = {k: vals[k] for k in want if k in vals}
    with torch.no_grad():
        for i, n in enumerate(g.nodes):
            attrs = {k: _concrete(a, env) for k, a in n.attrs.items()}
            res = get_op(n.op).reference([None if v is None else vals[v.name]
                                          for v in n.inputs], attrs)
            res = (res,) if isinstance(res, torch.Tensor) else tuple(res)
            for v, t in zip(n.outputs, res):
                vals[v.name] = t
                if v.name in want:
                    out[v.name] = t
            for v in n.inputs:  # free what no later node reads (long calibration runs)
                if v is not None and last_use.get(v.name) == i and v.name not in want \
                        and v.name not in g.weights:
                    vals.pop(v.name, None)
    for v in g.outputs:
        if v.name in want and v.name in vals:
            out[v.name] = vals[v.name]
    return out


def _concrete(v: Any, env: Mapping[str, int]) -> Any:
    if isinstance(v, tuple | list):
        return type(v)(_concrete(x, env) for x in v)
    if hasattr(v, "free_symbols") and not isinstance(v, int | float | str | bool):
        return evaluate(v, env)
    return v


# ============================================================================ token-axis rewrite
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

    def __init__(self, rb: _Rebuild) -> None:
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


class _Rebuild:
    def __init__(self, g: Graph, protect: int, proportional: bool) -> None:
        from ember.ir import GraphBuilder

        self.g = g
        self.protect = protect
        self.proportional = proportional
        b = GraphBuilder(g.name)
        b.meta = dict(g.meta)
        for v, nm in zip(g.inputs, g.input_names or [v.name for v in g.inputs]):
            b.reserve(v.name)
            b.inputs.append(v)
            b.input_names.append(nm)
        for v in g.params:
            b.add_existing_param(v, g.weights[v.name])
        for n in g.nodes:
            for v in n.outputs:
                b.reserve(v.name)
        self.b = b
        self.old_values = g.values()
        self.env: dict[str, Value] = {}
        self.axes: dict[str, dict[int, int]] = {}
        self.stages: list[Stage] = []
        self.new_nodes: dict[str, Node] = {}
        # token axes merged with inner axes (MultiheadAttention's [N*B, D] out-projection):
        # (value name, axis) -> (outer, inner); the axis size is outer * tokens * inner
        self.factor: dict[tuple[str, int], tuple[Dim, Dim]] = {}
        self._lifted: dict[tuple[str, tuple[int, ...], int], Value] = {}
        self._bias: dict[int, Value] = {}
        self._neg_inf: Value | None = None
        self._ix: _Index | None = None

    # ----- helpers
    def _m(self, v: Value | None) -> Value | None:
        return None if v is None else self.env.get(v.name, v)

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

    def _index(self) -> _Index:
        if self._ix is None:
            self._ix = _Index(self.g)
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
        elif get_op(n.op).elementwise or n.op in ("where", "add", "mul", "sub", "div"):
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
        if op in ("linear", "fused_linear", "qlinear"):
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
        from ember.ir.shapes import numel

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
    rb = _Rebuild(g, report.protect, proportional)
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
    rb.b.outputs = outs
    rb.b.output_names = list(g.output_names)
    return rb.b.build()


# ============================================================================ FLOPs
def graph_flops(g: Graph, env: Mapping[str, int]) -> int:
    """Multiply-add FLOPs (x2) of the matmul-like nodes of ``g`` at symbol values ``env``."""
    import math

    def ev(shape: Sequence[Dim]) -> list[int]:
        return [evaluate(d, env) for d in shape]

    total = 0
    for n in g.nodes:
        if n.op in ("linear", "fused_linear", "qlinear") and n.inputs[1] is not None:
            x, w = ev(n.inputs[0].type.shape), ev(n.inputs[1].type.shape)  # type: ignore[union-attr]
            total += 2 * math.prod(x) * w[0]
        elif n.op == "matmul":
            a, o = ev(n.inputs[0].type.shape), ev(n.output.type.shape)  # type: ignore[union-attr]
            total += 2 * math.prod(o) * a[-1]
        elif n.op == "attention":
            q, k, v = (ev(u.type.shape) for u in n.inputs[:3])  # type: ignore[union-attr]
            total += 2 * math.prod(q) * k[-2] + 2 * math.prod(q[:-1]) * k[-2] * v[-1]
        elif n.op in ("conv", "fused_conv"):
            o, w = ev(n.output.type.shape), ev(n.inputs[1].type.shape)  # type: ignore[union-attr]
            total += 2 * math.prod(o) * math.prod(w[1:])
    return total
