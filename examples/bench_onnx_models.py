"""Ember vs ONNX Runtime on ONNX files written by other people's exporters.

The PP-OCR detection, recognition and classification models (paddle2onnx) ship inside the PyPI
package rapidocr-onnxruntime. Each is compiled by Ember for the CPU (batch symbolic, H/W fixed),
checked against ONNX Runtime on the same input, and both are timed in one process, interleaved,
2 threads, medians over ``--repeats`` calls::

    python examples/bench_onnx_models.py --repeats 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import ember
from ember.bench import ort_session
from ember.driver import relative_error

MODELS = {  # file, input name, shape (batch symbolic)
    "PP-OCRv4 det": ("ch_PP-OCRv4_det_infer.onnx", "x", ["batch", 3, 96, 128]),
    "PP-OCRv4 rec": ("ch_PP-OCRv4_rec_infer.onnx", "x", ["batch", 3, 48, 160]),
    "PP-OCR v2 cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", ["batch", 3, 48, 192]),
}


def model_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps rapidocr-onnxruntime==1.4.4 (make venv does)")
    return Path(spec.submodule_search_locations[0]) / "models"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings of model titles")
    ap.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for title, (fname, name, shape) in MODELS.items():
        if args.only and not any(k.strip().lower() in title.lower() for k in args.only.split(",")):
            continue
        path = model_dir() / fname
        x = np.random.default_rng(0).random([args.batch, *shape[1:]], dtype=np.float32)
        cm = ember.compile(str(path), [torch.from_numpy(x)], dynamic_dims={name: shape})
        sess = ort_session(path, args.threads)
        feeds = {name: x}
        want = [torch.from_numpy(a) for a in sess.run(None, feeds)]
        got = cm.run(torch.from_numpy(x))
        err = relative_error(got, want)
        t_ort, t_em = [], []
        for _ in range(3):
            sess.run(None, feeds)
            cm.run(torch.from_numpy(x))
        for r in range(args.repeats):  # alternate who goes first (the other's spin tail)
            for who in (("ort", "ember") if r % 2 == 0 else ("ember", "ort")):
                t0 = time.perf_counter()
                if who == "ort":
                    sess.run(None, feeds)
                else:
                    cm.run(torch.from_numpy(x))
                (t_ort if who == "ort" else t_em).append((time.perf_counter() - t0) * 1e3)
        o, e = statistics.median(t_ort), statistics.median(t_em)
        kind = cm.placement["program"].get("chosen")
        rows.append((title, o, e, o / e, err, kind))
        print(f"{title}: ORT {o:.2f} ms, Ember {e:.2f} ms ({kind}), max rel err {err:.1e}",
              flush=True)
    print("\n| model | ONNX Runtime ms | Ember ms | Ember speedup | max rel err | Ember program |")
    print("|---|---|---|---|---|---|")
    for t, o, e, r, err, kind in rows:
        print(f"| {t} b{args.batch} | {o:.2f} | {e:.2f} | {r:.2f}x | {err:.1e} | {kind} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([
            {"model": t, "batch": args.batch, "ort_ms": o, "ember_ms": e, "speedup": r,
             "max_rel_err": err, "ember_program": kind} for t, o, e, r, err, kind in rows],
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
