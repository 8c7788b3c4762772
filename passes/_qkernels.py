"""Speed gating for quantized/sparse linears: roofline prediction + cached micro-benchmarks.

A linear ``[M, K] x [N, K]^T`` is rewritten to a compressed kernel only when (1) a roofline
model of this CPU predicts the kernel is not slower and (2) a micro-benchmark on this machine
measures it faster than fp32 ``F.linear`` by ``min_speedup``. Contenders are timed interleaved
(fp32, kernel, fp32, kernel, ...) and compared by the median of per-round ratios, which is
robust to other processes sharing the cores. Results are cached per (CPU, torch, threads, M, K,
N, scheme) in memory and in ``$EMBER_CACHE_DIR/qgate.json`` (``EMBER_QGATE_CACHE=0`` disables
the file).

Measured on this project's 2-core AVX2 EPYC (no VNNI/AVX-512/AMX): fbgemm's dynamic int8
linear is 1.7-2.8x faster than fp32 MKL for M in 128..2048, K/N in 384..3072; ``torch._int_mm``
(0.1-0.6x), ``_weight_int8pack_mm`` (0.1-0.4x), bf16 ``F.linear`` (0.7-1.9x, no bf16 hardware)
and oneDNN ``qlinear_pointwise`` (0.25-1.3x) are not. See examples/eval_quant.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ember.hostinfo import cpu_flags
from ember.timing import time_interleaved

__all__ = ["GateResult", "predict_speedup", "measure_speedup", "gate",
           "clear_cache", "CPU_SPEC"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuSpec:
    """Roofline constants of the CPU (per core fp32 FMA throughput, int8 multiplier, DRAM)."""

    fp32_gflops_per_core: float
    int8_speedup: float  # int8 MAC throughput / fp32 FMA throughput
    bf16_speedup: float  # < 1 where bf16 is emulated
    mem_gbps: float
    call_overhead_us: float


def _detect() -> CpuSpec:
    flags = cpu_flags()
    wide = "avx512f" in flags
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    amx = "amx_int8" in flags
    fp32 = 2 * 2 * (16 if wide else 8) * 2.5  # 2 FMA ports x lanes x 2 flops x ~2.5 GHz
    int8 = 8.0 if amx else 4.0 if vnni else 2.0  # AVX2: vpmaddubsw pairs ~2x fp32
    bf16 = 4.0 if "amx_bf16" in flags else 2.0 if "avx512_bf16" in flags else 0.5
    return CpuSpec(fp32, int8, bf16, 20.0, 15.0)


CPU_SPEC = _detect()

# bytes per weight element and activation pre/post passes per scheme family
_SCHEME_COST: dict[str, tuple[float, float, str]] = {
    # name: (weight bytes/elem, extra activation passes, compute dtype)
    "w8a8-dynamic": (1.0, 2.0, "int8"),
    "w8a8-static": (1.0, 1.0, "int8"),
    "w8": (1.0, 0.0, "dequant"),
    "w4": (0.5, 0.0, "dequant"),
    "w4a8": (0.5, 1.0, "int8"),
    "lut": (0.4, 0.0, "dequant"),
    "bf16": (2.0, 1.0, "bf16"),
    "sparse": (2.0, 0.0, "dequant"),
}


def _family(scheme: str) -> str:
    scheme = scheme.split("+")[0]
    if scheme.startswith("w4a8"):
        return "w4a8"
    if scheme.startswith("w4"):
        return "w4"
    if scheme.startswith("lut"):
        return "lut"
    if scheme.startswith("sparse"):
        return "sparse"
    return scheme


def predict_speedup(m: int, k: int, n: int, scheme: str, spec: CpuSpec = CPU_SPEC) -> float:
    """Roofline prediction of t_fp32 / t_scheme for one linear on ``torch.get_num_threads()``."""
    cores = max(1, torch.get_num_threads())
    peak = spec.fp32_gflops_per_core * cores * 1e9 * 0.7  # 70% of peak for a tuned GEMM
    bw = spec.mem_gbps * 1e9
    flops = 2.0 * m * k * n
    act = 4.0 * (m * k + m * n)
    t32 = max(flops / peak, (act + 4.0 * k * n) / bw) + spec.call_overhead_us * 1e-6
    wbytes, passes, kind = _SCHEME_COST[_family(scheme)]
    if kind == "int8":
        tc = flops / (peak * spec.int8_speedup)
    elif kind == "bf16":
        tc = flops / (peak * spec.bf16_speedup)
    else:  # decode the weight each call, then a dense fp32 GEMM
        tc = flops / peak + 3 * 4.0 * k * n / bw
    tq = max(tc, (act + wbytes * k * n) / bw) + passes * 4.0 * m * k / bw
    tq += spec.call_overhead_us * 1e-6 * (2 if passes else 1)
    return t32 / tq


def measure_speedup(fp32: Callable[[], Any], kernel: Callable[[], Any],
                    rounds: int = 9, budget_s: float = 1.0) -> dict[str, float]:
    """Median fp32 / kernel time ratio over interleaved rounds, plus both medians."""
    with torch.inference_mode():
        t = time_interleaved({"fp32": fp32, "kernel": kernel}, rounds, budget_s)
    ratios = [a / b for a, b in zip(t["fp32"], t["kernel"])]
    return {"speedup": statistics.median(ratios), "fp32_ms": statistics.median(t["fp32"]),
            "kernel_ms": statistics.median(t["kernel"]), "rounds": len(ratios)}


@dataclass(frozen=True)
class GateResult:
    apply: bool
    predicted: float
    measured: float | None
    fp32_ms: float | None
    kernel_ms: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("predicted", "measured", "fp32_ms", "kernel_ms"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        return d


_LOCK = threading.Lock()
_MEM: dict[str, dict[str, float]] = {}
_DISK_LOADED = False


def _cache_path() -> Path | None:
    if os.environ.get("EMBER_QGATE_CACHE", "1") == "0":
        return None
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ember")
    return Path(root) / "qgate.json"


def _machine_key() -> str:
    return f"{platform.processor() or platform.machine()}|{torch.__version__}|" \
           f"t{torch.get_num_threads()}|{sorted(cpu_flags() & {'avx2', 'avx512f', 'amx_int8'})}"


def _load_disk() -> None:
    global _DISK_LOADED
    if _DISK_LOADED:
        return
    _DISK_LOADED = True
    p = _cache_path()
    if p is not None and p.exists():
        try:
            _MEM.update(json.loads(p.read_text()))
        except (OSError, ValueError):
            log.warning("ignoring unreadable gate cache %s", p)


def _save_disk() -> None:
    p = _cache_path()
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_MEM, indent=0, sort_keys=True))
        tmp.replace(p)
    except OSError as e:
        log.warning("cannot write gate cache %s: %s", p, e)


def clear_cache(disk: bool = False) -> None:
    global _DISK_LOADED
    with _LOCK:
        _MEM.clear()
        _DISK_LOADED = not disk
        p = _cache_path()
        if disk and p is not None and p.exists():
            p.unlink()


# The roofline only screens out clear losses: below this predicted speedup a layer is not
# measured. Small layers are where it is least reliable: on a Fashion-MNIST ViT (width 64, 3200
# rows) it predicted the u8 o_proj/fc2 products at 0.68x / 0.79x, and ONNX Runtime runs the
# same family of products 2.6-3.3x faster than fp32 (AVX-512 VNNI EPYC).
MEASURE_ABOVE = 0.5


def gate(m: int, k: int, n: int, scheme: str, kernel_factory: Callable[[torch.Tensor], Callable],
         *, mode: str = "measure", min_speedup: float = 1.05, cache_tag: str = "",
         weight: torch.Tensor | None = None,
         fp32_factory: Callable[[torch.Tensor], Callable] | None = None) -> GateResult:
    """Decides whether ``scheme`` should replace an fp32 linear of shape (M, K, N).

    Args:
        kernel_factory: ``x -> (() -> output)``; builds the compressed kernel call on input x.
        mode: "measure" (predict, then measure), "predict" (roofline only), "always".
        cache_tag: distinguishes kernels whose speed depends on the weights (sparsity pattern).
        weight: the fp32 weight for the fp32 contender (random of the right shape otherwise).
        fp32_factory: ``x -> (() -> output)`` for the fp32 contender when it is not torch's
            ``F.linear`` (e.g. the layer's fp32 form in ONNX Runtime); give a ``cache_tag``.
    """
    pred = predict_speedup(m, k, n, scheme)
    if mode == "always":
        return GateResult(True, pred, None, None, None, "gate=always")
    if pred < MEASURE_ABOVE and mode != "measure_all":
        return GateResult(False, pred, None, None, None,
                          f"predicted {pred:.2f}x (roofline) < {MEASURE_ABOVE}: not measured, "
                          f"kept fp32")
    if mode == "predict":
        return GateResult(True, pred, None, None, None, f"predicted {pred:.2f}x")
    key = f"{_machine_key()}|{m}x{k}x{n}|{scheme}|{cache_tag}"
    with _LOCK:
        _load_disk()
        hit = _MEM.get(key)
    if hit is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen)
        w = weight if weight is not None else torch.randn(n, k, generator=gen) * 0.05
        b = torch.zeros(n)
        fp32 = fp32_factory(x) if fp32_factory is not None else (lambda: F.linear(x, w, b))
        hit = measure_speedup(fp32, kernel_factory(x))
        with _LOCK:
            _MEM[key] = hit
            _save_disk()
        log.info("gate %s %dx%dx%d: %.2fx (fp32 %.3f ms, kernel %.3f ms)", scheme, m, k, n,
                 hit["speedup"], hit["fp32_ms"], hit["kernel_ms"])
    s = hit["speedup"]
    ok = s >= min_speedup
    why = (f"measured {s:.2f}x >= {min_speedup}" if ok
           else f"measured {s:.2f}x < {min_speedup}: kept fp32")
    return GateResult(ok, pred, s, hit["fp32_ms"], hit["kernel_ms"], why)
