"""Named pipelines (the ``-O`` levels). Plain lists, in one readable place.

Order matters: constants are folded and dead code removed first so patterns see clean graphs;
Conv+BN folding and norm recognition run before attention fusion (attention patterns read
through the normalized graph); QKV fusion runs after attention fusion so it sees the three
projections feeding one attention op; linear epilogue fusion runs last, since it hides the
activations other patterns match on. QKV fusion runs once more after it: graphs imported from
ONNX hold the projections as MatMul + Add, which become linears only in epilogue fusion
(HF ViT via torch.onnx: 19 linears -> 7, as its FX import).
"""

from __future__ import annotations

__all__ = ["PIPELINES", "DEFAULT_PIPELINE"]

_CLEANUP = ["fold_constants", "dce", "cse"]

PIPELINES: dict[str, list[str]] = {
    "O0": [],
    "O1": _CLEANUP,
    "O2": _CLEANUP + [
        "fold_conv_bn",
        "fuse_norms",
        "fuse_attention",
        "fuse_qkv",
        "fuse_linear_act",
        "fuse_qkv",
        "dce",
    ],
}
PIPELINES["O3"] = PIPELINES["O2"]

DEFAULT_PIPELINE = "O2"
