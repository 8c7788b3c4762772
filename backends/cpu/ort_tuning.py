"""Per-machine choices for the ONNX Runtime program, decided by micro-benchmarks and cached.

ONNX Runtime's fused kernels are not faster on every CPU. Its ``SkipLayerNormalization``
(residual add + bias + LayerNorm in one kernel) beat the separate ops on the AVX2 Zen 3 machine
this project started on; on the AVX-512 EPYC it runs on now it is 5-10x SLOWER than
``Add`` + ``LayerNormalization`` (8 x 128 x 384, 2 threads: 0.93 ms vs 0.12 ms; at 768 wide:
1.85 vs 0.23 ms), and ORT's own optimizer fuses every Add -> LayerNorm pair into it. So the
choice is measured here, once per machine, and the CPU backend follows it twice: the exporter
writes the fused op only when it is faster, and the session disables ORT's own fusion when it
is not.

The same holds for ``MultiHeadAttention`` with a padding mask: its additive bias must be a full
[B, 1, S, L] tensor, and on the Xeon (AVX-512, no AMX) of session 6 one masked MiniLM attention
(8 x 128, 12 heads of 32) took 4.2 ms fused against 2.1 ms unmasked, while MatMul + Add of a
[B, 1, 1, L] bias + Softmax + MatMul took 3.1 ms. The masked form is measured too.

Cache: ``~/.cache/ember/ort_kernels_<key>.json`` keyed by CPU model, ORT version and threads
(the device spec's key scheme), holding the timings behind each decision.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from ember.hostinfo import cache_dir, cpu_flags, cpu_model
from ember.timing import median_ms

__all__ = ["ort_kernel_choices", "skip_layernorm_fusion", "masked_mha_fusion", "export_choices",
           "disabled_optimizers"]

log = logging.getLogger(__name__)

# a fused kernel is used while it is at most this much slower than the separate ops (noise)
FUSED_MARGIN = 1.10
_SHAPES = ((8, 128, 384), (1, 128, 768))  # MiniLM / BERT-base residual streams
# (batch, seq, heads, head dim): MiniLM batch 8 and BERT-base / ViT-B batch 1
_ATTN_SHAPES = ((8, 128, 12, 32), (1, 197, 12, 64))
CHOICES_VERSION = 2  # 2: the masked-attention form


def _cache_path(threads: int) -> Path:
    import hashlib

    import onnxruntime as ort

    raw = (f"{cpu_model()}|{' '.join(sorted(cpu_flags()))}|ort{ort.__version__}|{threads}"
           f"|v{CHOICES_VERSION}")
    key = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return cache_dir() / f"ort_kernels_{key}.json"


def _time_session(nodes: list[Any], shape: tuple[int, int, int], threads: int,
                  repeats: int = 30) -> float:
    """Median ms of the residual-add + LayerNorm graph ``nodes`` over inputs ``a``, ``b``."""
    import numpy as np

    b, s, d = shape
    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal(d).astype(np.float32) for n in ("gamma", "beta", "bias")}
    feeds = {n: rng.standard_normal((b, s, d)).astype(np.float32) for n in ("a", "b")}
    # the separate form must stay separate while it is timed
    return _time_model(nodes, feeds, threads, repeats, inits, disabled=("SkipLayerNormFusion",))


def _time_model(nodes: list[Any], feeds: dict[str, Any], threads: int, repeats: int = 30,
                inits: dict[str, Any] | None = None, disabled: tuple[str, ...] = ()) -> float:
    """Median ms of one ORT run of the graph ``nodes`` (inputs ``feeds``, output ``y``)."""
    from ember.backends.cpu.onnx.session import graph_session

    sess = graph_session(nodes, feeds, threads, inits, disabled)
    return median_ms(lambda: sess.run(None, feeds), repeats, warmup=5)


def _measure_attention(threads: int) -> dict[str, Any]:
    """Masked attention as ORT's ``MultiHeadAttention`` (q/k/v read as [B, S, H*D], the mask
    as a precomputed [B, 1, S, L] additive bias, the form the exporter writes) against the
    standard ops the exporter writes otherwise (head transposes, MatMul, scale, Add of the
    [B, 1, 1, L] bias made once per mask, Softmax, MatMul)."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    rows = []
    for b, s, h, d in _ATTN_SHAPES:
        e = h * d
        qkv = {n: rng.standard_normal((b, s, e)).astype(np.float32) for n in "qkv"}
        keep = np.ones((b, 1, 1, s), bool)
        keep[:, :, :, s - s // 4:] = False
        add = np.where(keep, 0.0, -np.inf).astype(np.float32)
        fused = [helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["y"],
                                  domain="com.microsoft", num_heads=h)]
        consts = {"shp": np.array([b, s, h, d], np.int64), "shp2": np.array([b, s, e], np.int64),
                  "sc": np.array(d ** -0.5, np.float32)}
        dec = [helper.make_node("Reshape", [n, "shp"], [n + "4"]) for n in "qkv"]
        dec += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
                helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
                helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
                helper.make_node("MatMul", ["qh", "kt"], ["s0"]),
                helper.make_node("Mul", ["s0", "sc"], ["s1"]),
                helper.make_node("Add", ["s1", "bias"], ["s2"]),
                helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
                helper.make_node("MatMul", ["p", "vh"], ["o"]),
                helper.make_node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", ["o2", "shp2"], ["y"])]
        full = np.ascontiguousarray(np.broadcast_to(add, (b, 1, s, s)))
        rows.append({"shape": [b, s, h, d],
                     "fused_ms": round(_time_model(fused, {**qkv, "bias": full}, threads), 4),
                     "separate_ms": round(_time_model(dec, {**qkv, "bias": add}, threads,
                                                      inits=consts), 4)})
    ratio = statistics.median(r["fused_ms"] / r["separate_ms"] for r in rows)
    return {"use_fused": ratio <= FUSED_MARGIN, "fused_over_separate": round(ratio, 3),
            "timings": rows}


def _measure(threads: int) -> dict[str, Any]:
    from onnx import helper

    fused = [helper.make_node("SkipLayerNormalization", ["a", "b", "gamma", "beta", "bias"],
                              ["y"], domain="com.microsoft", epsilon=1e-12)]
    separate = [helper.make_node("Add", ["a", "bias"], ["a1"]),
                helper.make_node("Add", ["a1", "b"], ["s"]),
                helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1,
                                 epsilon=1e-12)]
    rows = []
    for shape in _SHAPES:
        rows.append({"shape": list(shape), "fused_ms": round(_time_session(fused, shape, threads), 4),
                     "separate_ms": round(_time_session(separate, shape, threads), 4)})
    ratio = statistics.median(r["fused_ms"] / r["separate_ms"] for r in rows)
    return {"skip_layernorm": {"use_fused": ratio <= FUSED_MARGIN, "fused_over_separate":
                               round(ratio, 3), "timings": rows},
            "masked_mha": _measure_attention(threads),
            "threads": threads, "machine": cpu_model(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


@lru_cache(maxsize=4)
def ort_kernel_choices(threads: int) -> dict[str, Any]:
    """The measured choices for this machine at ``threads`` (cached on disk and in memory);
    ``{}`` when ONNX Runtime is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    path = _cache_path(threads)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    out = _measure(threads)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("ONNX Runtime kernel choices measured in %.1fs: SkipLayerNorm %s, masked MHA %s",
             out["seconds"], out["skip_layernorm"], out["masked_mha"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    except OSError as e:
        log.warning("cannot cache %s: %s", path, e)
    return out


def skip_layernorm_fusion(threads: int) -> bool:
    """Whether ``SkipLayerNormalization`` is the faster form here."""
    return bool(ort_kernel_choices(threads).get("skip_layernorm", {}).get("use_fused", True))


def masked_mha_fusion(threads: int) -> bool:
    """Whether ``MultiHeadAttention`` with a mask bias is the faster form of masked attention."""
    return bool(ort_kernel_choices(threads).get("masked_mha", {}).get("use_fused", True))


def export_choices(threads: int) -> dict[str, bool]:
    """The measured `ember.backends.cpu.onnx.export_onnx` options for the CPU program here."""
    return {"skip_layernorm": skip_layernorm_fusion(threads),
            "masked_mha": masked_mha_fusion(threads)}


def disabled_optimizers(threads: int) -> list[str]:
    """ORT graph transformers to switch off for Ember's sessions on this machine."""
    return [] if skip_layernorm_fusion(threads) else ["SkipLayerNormFusion"]
