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

Also here: `graph_flops`, the matmul FLOPs of a graph the token and layer-skipping passes
compare. The token-axis rewrite that reduces tokens at the blocks found here is
`ember.passes._token_rewrite`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.ir import Graph, Node, Value, evaluate, get_op, has_trait, ops_with
from ember.ir.shapes import Dim, dims_equal

__all__ = ["Block", "BlockReport", "NodeIndex", "find_blocks", "graph_flops", "MATMUL_OPS",
           "NORM_OPS", "REDUCE_OPS"]

log = logging.getLogger(__name__)

# matmul-like ops: a residual branch holding one is a layer body (token ops are not)
MATMUL_OPS = ops_with("gemm", "conv", "attention") - ops_with("token")
# norms, and the casts mixed-precision models put around them
NORM_OPS = ops_with("norm") | {"cast"}
# float linear/conv with a fused epilogue: the residual is operand 3
_RESIDUAL_FUSED = ops_with("fused")
REDUCE_OPS = ops_with("token_reduction")
_COMPARE = ops_with("order_compare")


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
class NodeIndex:
    """Producers (node index) and users of every value of ``g``, and path queries."""

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


def _unflatten(ix: NodeIndex, v: Value) -> Value:
    """The [B, N, D] value a [B*N, D] reshape was made from (fused epilogues flatten)."""
    n = ix.node(v.name)
    if n is not None and n.op == "reshape" and v.type.rank == 2 and n.inputs[0] is not None \
            and _is_stream(n.inputs[0].type):
        return n.inputs[0]
    return v


def _refold(ix: NodeIndex, out: Value) -> Value:
    """The reshape back to [B, N, D] of a flattened residual output, when there is one."""
    us = ix.users.get(out.name, [])
    if out.type.rank == 2 and len(us) == 1:
        n = ix.g.nodes[us[0]]
        if n.op == "reshape" and _is_stream(n.output.type):
            return n.output
    return out


def _residual_nodes(ix: NodeIndex) -> list[tuple[int, str, str, str]]:
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


def _parallel_attention_side(ix: NodeIndex, skip: str, branch: str) -> str | None:
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


def _attention_in(ix: NodeIndex, nodes: Iterable[int]) -> tuple[int, bool] | None:
    """The attention node among ``nodes``: an `attention` op, or a softmax over 4-d scores."""
    for j in sorted(nodes):
        n = ix.g.nodes[j]
        if n.op == "attention":
            return j, True
        if n.op == "softmax" and n.output.type.rank == 4:
            return j, False
    return None


def _scores_matmul(ix: NodeIndex, softmax: Node) -> Node | None:
    """The q @ k^T matmul feeding an explicit softmax (through scale/mask/cast ops)."""
    v = softmax.inputs[0]
    for _ in range(8):
        n = None if v is None else ix.node(v.name)
        if n is None:
            return None
        if n.op == "matmul":
            return n
        if n.op not in ("add", "mul", "div", "where", "cast", "sub"):
            return None
        # follow the operand that is 4-d and not a mask/constant
        nxt = [u for u in n.inputs if u is not None and u.type.rank == 4 and u.name in ix.prod
               and ix.node(u.name) is not None and ix.node(u.name).op != "expand"]  # type: ignore
        v = nxt[0] if nxt else None
    return None


def _attention_causal(ix: NodeIndex, att: tuple[int, bool]) -> bool:
    """`_is_causal` of the attention found by `_attention_in` (as blocks compute it)."""
    j, fused = att
    an = ix.g.nodes[j]
    return _is_causal(ix, an, an.inputs[3] if fused and len(an.inputs) > 3 else None)


def _is_causal(ix: NodeIndex, attn: Node, mask: Value | None) -> bool:
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


def _reduced(ix: NodeIndex, name: str) -> str | None:
    """The reduced stream when a token op already reduces ``name`` (an earlier pass)."""
    for j in ix.users.get(name, []):
        n = ix.g.nodes[j]
        if n.op in REDUCE_OPS and n.inputs[0] is not None and n.inputs[0].name == name:
            return n.outputs[0].name
    return None


def _unreduced(ix: NodeIndex, name: str) -> str:
    """The stream a token op reduced into ``name``, or ``name``."""
    n = ix.node(name)
    if n is not None and n.op in REDUCE_OPS and n.outputs[0].name == name \
            and n.inputs[0] is not None:
        return n.inputs[0].name
    return name


def _follow_norm(ix: NodeIndex, name: str) -> str:
    """``name`` or its normalized form when its only user is a norm (post-norm models)."""
    us = ix.users.get(name, [])
    if len(us) == 1 and ix.g.nodes[us[0]].op in NORM_OPS - {"cast"}:
        return ix.g.nodes[us[0]].output.name
    return name


# ----------------------------------------------------------------------------- find_blocks
def find_blocks(g: Graph) -> BlockReport:
    """Finds the transformer blocks of ``g``; see the module docstring."""
    rep = BlockReport()
    ix = NodeIndex(g)
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


def _readers(g: Graph, ix: NodeIndex, last: str) -> tuple[int, bool, list[str]]:
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


# ============================================================================ FLOPs
def graph_flops(g: Graph, env: Mapping[str, int]) -> int:
    """Multiply-add FLOPs (x2) of the matmul-like nodes of ``g`` at symbol values ``env``."""
    import math

    def ev(shape: Sequence[Dim]) -> list[int]:
        return [evaluate(d, env) for d in shape]

    total = 0
    for n in g.nodes:
        if has_trait(n.op, "linear") and n.inputs[0] is not None:
            # every linear form (fp32, fused, int8, int4, LUT, sparse): N from the output, as
            # packed weights do not show it
            x, o = ev(n.inputs[0].type.shape), ev(n.output.type.shape)
            total += 2 * math.prod(x) * o[-1]
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
