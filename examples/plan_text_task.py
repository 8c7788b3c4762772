"""The accuracy-budget planner on a text task: MiniLM reviews scored by a fixed sentiment head.

all-MiniLM-L6-v2 on the Pang & Lee reviews that fill 256 tokens (no padding, as in
`eval_tokens.py --parts reviews`); the 1000 training reviews are split into 600 that fit a
logistic head on fp32 embeddings and 400 that are the planner's calibration set (half search,
half held out); the metric is that fixed head's accuracy on each candidate's mean-pooled
embeddings. The chosen pipeline is then scored on the remaining test reviews and timed against
Ember O2 (each in its own process).

    python examples/plan_text_task.py [--max-drop 0.01] [--calib-batches 25]

``--calib-batches``: search batches (of 8 reviews) handed to the passes that calibrate (the
linear bridges of ``skip_layers{bridge=...}`` fit on them); 25 = the whole search half.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_tokens import (  # noqa: E402
    _first,
    _mean_embed,
    _minilm,
    compile_cpu,
    embed_reviews,
    isolated_ms,
    load_reviews,
)

from ember.planner import plan  # noqa: E402

NAMES = ["input_ids", "attention_mask"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--calib-batches", type=int, default=25)
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(2)
    tok, enc = _minilm()
    ids_all, y_all, perm = load_reviews(tok)
    head_idx, cal_idx, te = perm[:600], perm[600:1000], perm[1000:]
    bs = 8

    def embed(run: Any, ids: torch.Tensor) -> torch.Tensor:
        return embed_reviews(run, ids, bs)

    clf = LogisticRegression(C=10, max_iter=3000).fit(embed(enc, ids_all[head_idx]).numpy(),
                                                      y_all[head_idx])
    ref_te = embed(enc, ids_all[te])
    acc32 = clf.score(ref_te.numpy(), y_all[te])
    print(f"fp32: test accuracy {acc32:.4f} on {len(te)} reviews", flush=True)
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)
    b0 = float(clf.intercept_[0])

    def head_accuracy(outs: Any, refs: Any, labels: torch.Tensor) -> float:
        pred = (_mean_embed(_first(outs)) @ w + b0 > 0).long()
        return float((pred == labels.long().view(-1)).float().mean())

    ids_c = ids_all[cal_idx]
    calib = ((ids_c, torch.ones_like(ids_c)), torch.tensor(y_all[cal_idx]))
    ex = (ids_c[:bs], torch.ones_like(ids_c[:bs]))
    t0 = time.time()
    p = plan(enc, ex, max_drop=args.max_drop, calib=calib, metric=head_accuracy,
             input_names=NAMES, seed=0, calib_batches=args.calib_batches)
    print(p.summary(), flush=True)
    print(f"planner: {time.time() - t0:.0f} s", flush=True)
    cms = {"O2": compile_cpu(enc, ex, "O2", NAMES),
           "plan": compile_cpu(enc, ex, p.pipeline, NAMES, calib=p.pass_calib)}
    e = embed(cms["plan"], ids_all[te])
    acc = clf.score(e.numpy(), y_all[te])
    ms = isolated_ms(cms, ex, args.repeats)
    print(f"test: {p.pipeline}\n  accuracy {acc:.4f} (drop {acc32 - acc:+.4f}), cosine "
          f"{float((e * ref_te).sum(-1).mean()):.4f}; O2 {ms['O2']:.1f} ms, plan "
          f"{ms['plan']:.1f} ms: {ms['O2'] / ms['plan']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
