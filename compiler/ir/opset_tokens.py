"""Ops introduced by token merging/pruning and layer skipping.

Token reduction ops take a token stream ``x [B, N, D]`` (token axis 1) and return a shorter
stream with a *static* length, so every shape downstream stays compile-time known (a symbolic
``seq`` becomes ``seq - r``). Each returns the same four values::

    y     [B, N', D]   reduced tokens (protected leading tokens stay at positions 0..p-1)
    size  [B, N', 1]   how many original tokens each output token stands for (float)
    map   [B, N]       int64: output position each input token went to (-1: dropped)
    rep   [B, N']      int64: one input position per output token (to carry masks along)

- ``token_merge``: ToMe bipartite soft matching (Bolya et al. 2023) on a similarity metric
  (attention keys or hidden states); merges ``r`` tokens by size-weighted averaging.
- ``token_select``: keep the ``keep`` highest-scoring tokens (EViT/ATF/DART style), optionally
  fusing the dropped ones into one extra token (EViT's "inattentive token fusion"). With
  ``weighting=score`` the fused token averages the dropped tokens by score and counts (size)
  only those of nonzero score, and it takes the side data (mask entry) of the highest-scoring
  dropped token: padding (never attended, score 0) fused alone stays masked, and adds nothing
  to a fused token that holds attended tokens.
- ``token_unmerge``: scatter a reduced stream back to every original position.
- ``token_gather``: batched gather of a side tensor (an attention mask) along one axis.
- ``attention_score``: attention received per key (from one query or all), from q and k, so a
  fused ``attention`` op never has to materialize its probabilities.
- ``token_score``: representation shift ``||x - ref||`` or DART duplication scores.
- ``halt_update``: per-token halting (QuickSilver): halted tokens stop taking residual updates.
- ``early_exit``: per-sample choice between an exit head and the next stage by confidence.

Proportional attention (ToMe) needs no op of its own: the passes add ``log(size)`` to the
``attention`` op's additive mask (or to the logits before an explicit softmax).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .ops import REQUIRED, OpDef, OpTypeError, register_op
from .opset import broadcast_shapes
from .shapes import Dim, simplify
from .types import TensorType, is_float

__all__ = [
    "merge_reference",
    "select_reference",
    "unmerge_reference",
    "bipartite_map",
]

Types = Sequence[TensorType | None]
Attrs = Mapping[str, Any]
_EPS = 1e-12


def _req(types: Types, i: int, op: str) -> TensorType:
    t = types[i] if i < len(types) else None
    if t is None:
        raise OpTypeError(f"op '{op}': input {i} is required")
    return t


def _stream(types: Types, op: str) -> TensorType:
    x = _req(types, 0, op)
    if x.rank != 3 or not is_float(x.dtype):
        raise OpTypeError(f"op '{op}': expects a float token stream [B, N, D], got {x}")
    return x


def _reduced_types(x: TensorType, n_out: Dim) -> list[TensorType]:
    b, n, d = x.shape
    return [x.with_shape((b, n_out, d)), x.with_shape((b, n_out, 1)),
            TensorType("int64", (b, n)), TensorType("int64", (b, n_out))]


def _rep_from_map(mp: torch.Tensor, n_out: int) -> torch.Tensor:
    """Smallest input position mapped to each output position (deterministic)."""
    b, n = mp.shape
    pos = torch.arange(n, device=mp.device).expand(b, n)
    valid = mp >= 0
    big = torch.full((b, n_out), n, dtype=torch.int64, device=mp.device)
    rep = big.scatter_reduce(1, torch.where(valid, mp, 0), torch.where(valid, pos, n),
                             "amin", include_self=True)
    return rep.clamp_max(n - 1)


def _pool(x: torch.Tensor, size: torch.Tensor, mp: torch.Tensor, n_out: int,
          weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens that map to each output position, and the size of
    each: the summed sizes of the tokens averaged into it (those of nonzero ``weight``; a
    kept token of token_select maps to itself alone and is overwritten by its caller)."""
    b, n, d = x.shape
    w = size if weight is None else size * weight
    valid = (mp >= 0).unsqueeze(-1)
    idx = torch.where(mp >= 0, mp, 0).unsqueeze(-1)
    w = torch.where(valid, w, torch.zeros((), dtype=w.dtype))
    num = x.new_zeros(b, n_out, d).scatter_add(1, idx.expand(b, n, d), x * w)
    den = w.new_zeros(b, n_out, 1).scatter_add(1, idx, w)
    counted = valid if weight is None else valid & (weight > 0)
    s = size.new_zeros(b, n_out, 1).scatter_add(
        1, idx, torch.where(counted, size, torch.zeros((), dtype=size.dtype)))
    return num / den.clamp_min(_EPS), s


# ----------------------------------------------------------------------------- token_merge
def bipartite_map(metric: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """ToMe bipartite soft matching: the output position of every token ([B, N] int64).

    Tokens after the ``protect`` leading ones alternate between set A (even) and set B (odd).
    Each A token proposes its most similar B token (cosine); the ``r`` A tokens with the most
    similar proposals merge into them. Surviving tokens keep their original relative order
    (protected tokens stay first), so ``r == 0`` is the identity.
    """
    b, n, _ = metric.shape
    dev = metric.device
    m = metric[:, protect:].float()
    rest = n - protect
    na, nb = (rest + 1) // 2, rest // 2
    if r > min(na, nb):
        raise ValueError(f"token_merge: cannot merge r={r} of {rest} unprotected tokens "
                         f"(at most {min(na, nb)})")
    if r == 0:  # also when a clamped symbolic r reaches 0 on a short sequence
        return torch.arange(n, device=dev).expand(b, n)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    a, bb = m[:, 0::2], m[:, 1::2]
    node_max, node_idx = (a @ bb.transpose(1, 2)).max(dim=-1)  # [B, na]
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    src = edge[:, :r]  # A tokens (as indices into A) that merge away
    keep = torch.ones(b, rest, dtype=torch.bool, device=dev)
    keep[:, 0::2] = keep[:, 0::2].scatter(1, src, False)
    pos = keep.long().cumsum(dim=1) - 1  # surviving tokens keep their relative order
    dst = 2 * node_idx.gather(1, src) + 1  # the B token each merged A token joins
    rest_map = pos.clone()
    rest_map[:, 0::2] = rest_map[:, 0::2].scatter(1, src, pos.gather(1, dst))
    head = torch.arange(protect, device=dev).expand(b, protect)
    return torch.cat([head, protect + rest_map], dim=1)


def merge_reference(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor | None, r: int,
                    protect: int) -> tuple[torch.Tensor, ...]:
    b, n, _ = x.shape
    size = x.new_ones(b, n, 1) if size is None else size
    mp = bipartite_map(metric, r, protect)
    y, s = _pool(x, size, mp, n - r)
    return y, s, mp, _rep_from_map(mp, n - r)


def _merge_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _stream(types, "token_merge")
    metric = _req(types, 1, "token_merge")
    if metric.rank != 3:
        raise OpTypeError(f"token_merge: metric must be [B, N, C], got {metric}")
    r = attrs["r"]
    if (isinstance(r, int) and r < 0) or attrs["protect"] < 0:
        raise OpTypeError("token_merge: r and protect must be >= 0")
    n = x.shape[1]
    if isinstance(n, int) and isinstance(r, int) and r > (n - attrs["protect"]) // 2:
        raise OpTypeError(f"token_merge: r={attrs['r']} too large for {n} tokens")
    return _reduced_types(x, simplify(n - attrs["r"]))


register_op(OpDef(
    "token_merge", _merge_infer,
    lambda x, a: merge_reference(x[0], x[1], x[2] if len(x) > 2 else None, a["r"], a["protect"]),
    {"r": REQUIRED, "protect": 0}, 2, 3,
    doc="ToMe bipartite merge of r tokens: (x, metric, size?) -> (y, size, map, rep)",
    traits=frozenset({"token", "token_reduction"})))


# ----------------------------------------------------------------------------- token_select
def select_reference(x: torch.Tensor, score: torch.Tensor, size: torch.Tensor | None,
                     keep: int, protect: int, fuse: bool,
                     weighting: str = "size") -> tuple[torch.Tensor, ...]:
    b, n, _ = x.shape
    dev = x.device
    size = x.new_ones(b, n, 1) if size is None else size
    rest = n - protect
    if not 0 <= keep <= rest:
        raise ValueError(f"token_select: keep={keep} out of range for {rest} unprotected tokens")
    # stable: on ties the lower position wins (as ONNX TopK), so every backend keeps the same
    kept = score[:, protect:].float().argsort(dim=-1, descending=True, stable=True)[:, :keep]
    kept = kept.sort(-1).values
    rest_map = torch.full((b, rest), -1, dtype=torch.int64, device=dev)
    rest_map.scatter_(1, kept, torch.arange(keep, device=dev).expand(b, keep))
    fused_rep = protect + fused_representative(score[:, protect:], rest_map < 0)
    if fuse:
        rest_map = torch.where(rest_map < 0, keep, rest_map)
    head = torch.arange(protect, device=dev).expand(b, protect)
    mp = torch.cat([head, torch.where(rest_map < 0, -1, protect + rest_map)], dim=1)
    n_out = protect + keep + int(fuse)
    if not fuse:  # a pure gather: exact, and no pooling arithmetic
        idx = torch.cat([head, protect + kept], dim=1)
        y = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return y, size.gather(1, idx.unsqueeze(-1)), mp, idx
    w = score.clamp_min(0).unsqueeze(-1).to(x.dtype) if weighting == "score" else None
    y, s = _pool(x, size, mp, n_out, w)
    # kept tokens are copies (exactly), only the fused token is an average
    idx = torch.cat([head, protect + kept], dim=1)
    y[:, : protect + keep] = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    s[:, : protect + keep] = size.gather(1, idx.unsqueeze(-1))
    rep = torch.cat([idx, fused_rep.unsqueeze(1)], dim=1)
    return y, s, mp, rep


def fused_representative(score: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """[B] position (among the unprotected tokens) whose side data the fused token of
    token_select takes (its mask entry, position row): the highest-scoring dropped token,
    the lowest position on ties. A fused token of only padding (scores 0) then stays masked,
    and one holding any attended token is visible."""
    s = torch.where(dropped, score.float(), torch.tensor(float("-inf"), device=score.device))
    return s.argmax(dim=-1)


def _select_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _stream(types, "token_select")
    score = _req(types, 1, "token_select")
    if score.rank != 2:
        raise OpTypeError(f"token_select: score must be [B, N], got {score}")
    if attrs["weighting"] not in ("size", "score"):
        raise OpTypeError("token_select: weighting must be 'size' or 'score'")
    n_out = simplify(attrs["protect"] + attrs["keep"] + int(bool(attrs["fuse"])))
    return _reduced_types(x, n_out)


register_op(OpDef(
    "token_select", _select_infer,
    lambda x, a: select_reference(x[0], x[1], x[2] if len(x) > 2 else None, a["keep"],
                                  a["protect"], bool(a["fuse"]), a["weighting"]),
    {"keep": REQUIRED, "protect": 0, "fuse": False, "weighting": "size"}, 2, 3,
    doc="keep the top-`keep` tokens by score (+1 fused token): (x, score, size?) -> 4 values",
    traits=frozenset({"token", "token_reduction"})))


# ----------------------------------------------------------------------------- token_unmerge
def unmerge_reference(y: torch.Tensor, mp: torch.Tensor,
                      fallback: torch.Tensor | None) -> torch.Tensor:
    idx = mp.clamp_min(0).unsqueeze(-1).expand(-1, -1, y.shape[-1])
    out = y.gather(1, idx)
    if fallback is not None:
        out = torch.where((mp < 0).unsqueeze(-1), fallback, out)
    return out


def _unmerge_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    y = _stream(types, "token_unmerge")
    mp = _req(types, 1, "token_unmerge")
    if mp.rank != 2 or mp.dtype != "int64":
        raise OpTypeError(f"token_unmerge: map must be int64 [B, N], got {mp}")
    return [y.with_shape((y.shape[0], mp.shape[1], y.shape[2]))]


register_op(OpDef(
    "token_unmerge", _unmerge_infer,
    lambda x, a: unmerge_reference(x[0], x[1], x[2] if len(x) > 2 else None), {}, 2, 3,
    doc="y[b, map[b, i]] for every original token i; dropped tokens (-1) take fallback",
    traits=frozenset({"token"})))


# ----------------------------------------------------------------------------- token_gather
def _gather_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x, idx = _req(types, 0, "token_gather"), _req(types, 1, "token_gather")
    if idx.rank != 2 or idx.dtype != "int64":
        raise OpTypeError(f"token_gather: index must be int64 [B, K], got {idx}")
    d = attrs["dim"] % x.rank
    if d == 0:
        raise OpTypeError("token_gather: cannot gather along the batch axis")
    shape = list(x.shape)
    shape[0] = broadcast_shapes((shape[0],), (idx.shape[0],))[0]
    shape[d] = idx.shape[1]
    return [x.with_shape(tuple(shape))]


def _gather_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    t, idx = x[0], x[1]
    assert t is not None and idx is not None
    d = a["dim"] % t.dim()
    t = t.expand(idx.shape[0], *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[d] = idx.shape[0], idx.shape[1]
    full = list(t.shape)
    full[d] = idx.shape[1]
    return t.gather(d, idx.reshape(shape).expand(full))


register_op(OpDef("token_gather", _gather_infer, _gather_ref, {"dim": REQUIRED}, 2, 2,
                  doc="x gathered along `dim` with a per-batch index [B, K]",
                  traits=frozenset({"token"})))


# ----------------------------------------------------------------------------- scores
def _attention_score_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    q, k, mask = x[0], x[1], x[2] if len(x) > 2 else None
    assert q is not None and k is not None
    if a["query"] is not None:
        i = a["query"]
        q = q[..., i:i + 1, :]
        if mask is not None and mask.shape[-2] != 1:
            mask = mask[..., i:i + 1, :]
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = a["scale"] if a["scale"] is not None else q.shape[-1] ** -0.5
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = (logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else logits + mask.float())
    p = logits.softmax(-1)
    return p.mean(dim=tuple(range(1, p.dim() - 1))).to(q.dtype)


def _attention_score_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    q, k = _req(types, 0, "attention_score"), _req(types, 1, "attention_score")
    if q.rank != 4 or k.rank != 4:
        raise OpTypeError(f"attention_score: q, k must be [B, H, N, d], got {q}, {k}")
    b = broadcast_shapes((q.shape[0],), (k.shape[0],))[0]
    return [TensorType(q.dtype, (b, k.shape[2]))]


register_op(OpDef(
    "attention_score", _attention_score_infer, _attention_score_ref,
    {"scale": None, "query": None}, 2, 3,
    doc="attention each key receives (mean over heads; one query or all) -> [B, N]",
    traits=frozenset({"token", "attention"})))


def _token_score_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> torch.Tensor:
    t, ref = x[0], x[1] if len(x) > 1 else None
    assert t is not None
    if a["method"] == "shift":
        return (t if ref is None else t - ref).float().norm(dim=-1).to(t.dtype)
    # DART: pivots are the largest-norm tokens; a token duplicating a pivot scores low
    p = a["protect"]
    body = t[:, p:].float()
    norms = body.norm(dim=-1)
    k = min(a["pivots"], body.shape[1])
    piv = norms.topk(k, dim=-1).indices
    unit = body / norms.unsqueeze(-1).clamp_min(_EPS)
    pv = unit.gather(1, piv.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    dup = (unit @ pv.transpose(1, 2)).amax(dim=-1)  # [B, N - p]
    score = (-dup).scatter(1, piv, torch.full_like(piv, 2, dtype=dup.dtype))
    head = torch.full((t.shape[0], p), 2.0, dtype=score.dtype, device=t.device)
    return torch.cat([head, score], dim=1).to(t.dtype)


def _token_score_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    x = _stream(types, "token_score")
    if attrs["method"] not in ("shift", "dart"):
        raise OpTypeError("token_score: method must be 'shift' or 'dart'")
    return [TensorType(x.dtype, x.shape[:2])]


register_op(OpDef(
    "token_score", _token_score_infer, _token_score_ref,
    {"method": "shift", "pivots": 4, "protect": 0}, 1, 2,
    doc="per-token score [B, N]: ||x - ref|| (shift) or -max cos to pivot tokens (dart)",
    traits=frozenset({"token"})))


# ----------------------------------------------------------------------------- layer skipping
def _halt_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> tuple[torch.Tensor, torch.Tensor]:
    prev, new, halted = x[0], x[1], x[2]
    assert prev is not None and new is not None and halted is not None
    out = torch.where(halted.unsqueeze(-1), prev, new)
    rel = (new - prev).float().norm(dim=-1) / prev.float().norm(dim=-1).clamp_min(_EPS)
    return out, halted | (rel < a["threshold"])


def _halt_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    prev, new = _stream(types, "halt_update"), _req(types, 1, "halt_update")
    halted = _req(types, 2, "halt_update")
    if new.rank != 3 or new.shape[2:] != prev.shape[2:]:
        raise OpTypeError(f"halt_update: {prev} vs {new}")
    if halted.dtype != "bool" or halted.rank != 2:
        raise OpTypeError(f"halt_update: halted must be bool [B, N], got {halted}")
    return [prev, halted]


register_op(OpDef(
    "halt_update", _halt_infer, _halt_ref, {"threshold": REQUIRED}, 3, 3,
    doc="(prev, new, halted) -> (new unless halted, halted | rel. change < threshold)"))


def _early_exit_ref(x: Sequence[torch.Tensor | None], a: Attrs) -> tuple[torch.Tensor, ...]:
    """Per sample: the first exit whose top softmax probability reaches the threshold."""
    logits = torch.stack([t for t in x if t is not None])  # [E, B, C]
    conf = logits.float().softmax(-1).amax(-1) >= a["threshold"]  # [E, B]
    conf[-1] = True
    which = conf.int().argmax(0)  # first confident exit
    out = logits.gather(0, which.view(1, -1, 1).expand(1, *logits.shape[1:]))[0]
    return out, which


def _early_exit_infer(types: Types, attrs: Attrs) -> list[TensorType]:
    ts = [t for t in types if t is not None]
    if not ts or any(t.rank != 2 or t.shape != ts[0].shape for t in ts):
        raise OpTypeError("early_exit: needs logits [B, C] of one shape from every exit")
    return [ts[0], TensorType("int64", (ts[0].shape[0],))]


register_op(OpDef(
    "early_exit", _early_exit_infer, _early_exit_ref, {"threshold": REQUIRED}, 1, 64,
    doc="(exit logits..., final logits) -> (logits of first confident exit, exit index)"))
