"""Hardware descriptions for the cost model: peak FLOP/s per dtype, bandwidth, overheads.

Three kinds of entry:

- ``cpu``: THIS machine, measured by micro-benchmarks of the libraries Ember's CPU backend
  calls (oneDNN/MKL fp32 and bf16 GEMMs through ``torch.mm``, int8 through ``torch._int_mm``,
  STREAM-like copy/add bandwidth with torch, the dispatch overhead of a tiny op). Measured once
  and cached as JSON under ``~/.cache/ember/`` keyed by CPU model, torch version and threads.
- ``h100``, ``a100``: NVIDIA datacenter GPUs from their published data sheets.
- ``phone``: one phone-class Arm big core (Cortex-X3 class), from published micro-architecture
  figures; what the mobile backend's single-threaded TVM kernels run on.

Peaks are the *attainable* numbers the roofline divides by; per-op-class efficiencies
(`DeviceSpec.efficiency`) scale them for kernels that do not reach the GEMM peak.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.hostinfo import cache_dir as ember_cache_dir
from ember.hostinfo import cpu_model
from ember.timing import call_samples_s, pass_time_s

__all__ = [
    "DeviceSpec",
    "get_device",
    "known_devices",
    "measure_cpu",
    "cpu_cache_path",
    "cpu_key",
    "H100_SXM",
    "A100_80GB",
    "PHONE_X3",
    "SPEC_VERSION",
    "with_efficiency",
    "load_cached_cpu",
    "probe_point",
    "probe_runner",
    "probe_expected_s",
    "stream_probe",
    "stream_probe_runner",
    "host_speed",
    "OP_CLASSES",
]

log = logging.getLogger(__name__)

# 2: the fp32 peak is the best of torch.mm and ONNX Runtime's MatMul
# 3: ONNX Runtime's own kernels measured at several shapes (``measured["ort"]``: a GEMM grid,
#    depthwise / dense conv, attention, per-node and per-call overhead) for the ORT program
# 4: ORT kernels timed inside graphs (GEMM pairs, Add chains), medians not bests; grids for
#    dense and depthwise convs; a memory-bound table (bytes -> s per node) with per-op factors
# 5: int4 MatMulNBits grids at accuracy levels 0 and 4; the fp32 GEMM grid gains M = 1
# 6: a second fp32 GEMM grid with weights that are not in cache ("gemm_cold", read for a
#    weight bigger than the L3)
# 7: GEMM and conv grids timed in interleaved passes (each point the median over passes), the
#    GEMM rows a symbolic dim as in a model's program
# 8: a denser conv grid: wide 1x1s at every resolution, batch 4 at the large ones; convs
#    timed in chains of four (ORT's NCHWc reorders at the chain's edges only, as in a model)
SPEC_VERSION = 8

# Op classes the analytical model distinguishes; every DeviceSpec has an efficiency for each.
OP_CLASSES = ("gemm", "conv", "dwconv", "attention", "elementwise", "reduction", "norm",
              "data", "gather", "quant")

_DEFAULT_EFF: dict[str, float] = {
    # fraction of the dtype's peak FLOP/s (compute-bound classes) ...
    "gemm": 0.85, "conv": 0.60, "dwconv": 0.10, "attention": 0.45,
    # ... and of memory bandwidth (memory-bound classes)
    "elementwise": 0.80, "reduction": 0.70, "norm": 0.60, "data": 0.60, "gather": 0.40,
    "quant": 0.60,
}


@dataclass(frozen=True)
class DeviceSpec:
    """One device the cost model can predict for.

    Attributes:
        name: short id ("cpu", "h100", "a100", "phone").
        kind: "cpu", "cuda" or "mobile".
        peak_flops: dtype ("float32", "bfloat16", "float16", "int8") -> attainable FLOP/s
            (int8: integer ops/s, one multiply-add = 2 ops).
        mem_bw: attainable DRAM/HBM bandwidth, bytes/s.
        launch_overhead_s: fixed cost of one kernel launch / op dispatch.
        cores: cores (CPU) or SMs (GPU) the kernels use.
        l1_bytes, l2_bytes, l3_bytes: cache sizes per core (L1, L2) and shared (L3; GPU L2).
        efficiency: op class -> fraction of peak that class reaches (see `OP_CLASSES`).
        host_link_bw: bytes/s between host memory and this device (PCIe for a GPU);
            0 for the host itself.
        host_link_latency_s: fixed latency of one host<->device copy.
        source: "measured" or "published", with the citations in ``notes``.
        notes: where the numbers come from.
        measured: raw micro-benchmark results (measured devices only).
    """

    name: str
    kind: str
    peak_flops: Mapping[str, float]
    mem_bw: float
    launch_overhead_s: float
    cores: int
    l1_bytes: int = 0
    l2_bytes: int = 0
    l3_bytes: int = 0
    efficiency: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_EFF))
    host_link_bw: float = 0.0
    host_link_latency_s: float = 0.0
    source: str = "published"
    notes: str = ""
    measured: Mapping[str, Any] = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        """Attainable FLOP/s for ``dtype``; unknown dtypes fall back to float32."""
        if dtype in self.peak_flops:
            return float(self.peak_flops[dtype])
        if dtype in ("int32", "int64", "uint8", "int16", "bool", "float64"):
            return float(self.peak_flops["float32"]) / (2.0 if dtype == "float64" else 1.0)
        return float(self.peak_flops["float32"])

    def eff(self, op_class: str) -> float:
        return float(self.efficiency.get(op_class, _DEFAULT_EFF.get(op_class, 0.5)))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        d["efficiency"] = dict(self.efficiency)
        d["version"] = SPEC_VERSION
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> DeviceSpec:
        d = dict(d)
        d.pop("version", None)
        return DeviceSpec(**d)

    def summary(self) -> str:
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.peak_flops.items())
        return (f"{self.name} ({self.kind}, {self.source}): GFLOP/s {peaks}; "
                f"bandwidth {self.mem_bw / 1e9:.1f} GB/s; "
                f"overhead {self.launch_overhead_s * 1e6:.1f} us; {self.cores} cores")


# ----------------------------------------------------------------------------- published specs
# NVIDIA H100 Tensor Core GPU data sheet (H100 SXM column), dense (non-sparse) figures:
#   FP32 67 TFLOPS; TF32 Tensor Core 494.5 TFLOPS (989 with sparsity); BF16/FP16 Tensor Core
#   989.5 TFLOPS (1,979 with sparsity); INT8 Tensor Core 1,979 TOPS (3,958 with sparsity);
#   GPU memory 80 GB HBM3, bandwidth 3.35 TB/s; 132 SMs; 50 MB L2; PCIe Gen5 x16 = 128 GB/s
#   bidirectional (64 GB/s each way). Float32 matmuls run on TF32 tensor cores when allowed;
#   Ember keeps full fp32 and uses the 67 TFLOPS CUDA-core figure.
H100_SXM = DeviceSpec(
    name="h100", kind="cuda",
    peak_flops={"float32": 67e12, "tfloat32": 494.5e12, "bfloat16": 989.5e12,
                "float16": 989.5e12, "int8": 1979e12},
    mem_bw=3.35e12,
    # a CUDA kernel launch costs about 2-5 us of CPU time; with CUDA graphs about 1 us.
    launch_overhead_s=4e-6,
    cores=132, l1_bytes=256 * 1024, l2_bytes=50 * 2**20, l3_bytes=0,
    efficiency={**_DEFAULT_EFF, "gemm": 0.70, "conv": 0.50, "dwconv": 0.05, "attention": 0.40,
                "elementwise": 0.85, "reduction": 0.75, "norm": 0.70, "data": 0.70},
    host_link_bw=64e9 * 0.8,   # PCIe Gen5 x16, 64 GB/s per direction, ~80% achievable
    host_link_latency_s=10e-6,
    notes="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TF, BF16/FP16 989.5 TF "
          "dense, INT8 1979 TOPS dense, HBM3 3.35 TB/s, PCIe Gen5 128 GB/s bidirectional",
)

# NVIDIA A100 Tensor Core GPU data sheet (A100 80GB SXM column), dense figures:
#   FP32 19.5 TFLOPS; TF32 156 TFLOPS; BF16/FP16 Tensor Core 312 TFLOPS; INT8 624 TOPS;
#   80 GB HBM2e at 2,039 GB/s; 108 SMs; 40 MB L2; PCIe Gen4 = 64 GB/s bidirectional.
A100_80GB = DeviceSpec(
    name="a100", kind="cuda",
    peak_flops={"float32": 19.5e12, "tfloat32": 156e12, "bfloat16": 312e12,
                "float16": 312e12, "int8": 624e12},
    mem_bw=2.039e12,
    launch_overhead_s=4e-6,
    cores=108, l1_bytes=192 * 1024, l2_bytes=40 * 2**20, l3_bytes=0,
    efficiency={**_DEFAULT_EFF, "gemm": 0.75, "conv": 0.55, "dwconv": 0.05, "attention": 0.45,
                "elementwise": 0.85, "reduction": 0.75, "norm": 0.70, "data": 0.70},
    host_link_bw=32e9 * 0.8,   # PCIe Gen4 x16, 32 GB/s per direction
    host_link_latency_s=10e-6,
    notes="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: FP32 19.5 TF, BF16/FP16 312 "
          "TF dense, INT8 624 TOPS dense, HBM2e 2,039 GB/s, PCIe Gen4 64 GB/s bidirectional",
)

# One Arm Cortex-X3 core (e.g. Snapdragon 8 Gen 2 prime core, 3.2 GHz):
#   Arm's Cortex-X3 product brief / software optimization guide: 4x 128-bit NEON/SVE2 FP/ASIMD
#   pipes, so fp32 FMA = 4 pipes x 4 lanes x 2 FLOP = 32 FLOP/cycle -> 102 GFLOP/s at 3.2 GHz;
#   fp16 (FEAT_FP16) doubles lanes -> 205 GFLOP/s; bf16 (BFDOT/BFMMLA) 2x fp32 -> 205;
#   int8 SDOT = 4 pipes x 16 MACs x 2 ops = 128 ops/cycle -> 410 GOPS (I8MM SMMLA could double
#   it; not assumed). Caches: 64 KB L1D, 1 MB L2 (per core), 8 MB shared L3 (Snapdragon 8 Gen 2).
#   Memory: LPDDR5X-4200, 64-bit bus -> 67 GB/s for the SoC; one core sustains about a third of
#   that in STREAM-type measurements, so 25 GB/s is used.
PHONE_X3 = DeviceSpec(
    name="phone", kind="mobile",
    peak_flops={"float32": 102.4e9, "bfloat16": 204.8e9, "float16": 204.8e9, "int8": 409.6e9},
    mem_bw=25e9,
    launch_overhead_s=2e-6,    # TVM graph-executor per-op dispatch, no kernel launch
    cores=1, l1_bytes=64 * 1024, l2_bytes=1 * 2**20, l3_bytes=8 * 2**20,
    efficiency={**_DEFAULT_EFF, "gemm": 0.70, "conv": 0.50, "dwconv": 0.20, "attention": 0.35},
    notes="Arm Cortex-X3 (4x128b SIMD, 3.2 GHz in Snapdragon 8 Gen 2): fp32 102 GFLOP/s, "
          "fp16/bf16 205, int8 SDOT 410 GOPS; LPDDR5X-4200 67 GB/s SoC, ~25 GB/s one core",
)

_PUBLISHED: dict[str, DeviceSpec] = {d.name: d for d in (H100_SXM, A100_80GB, PHONE_X3)}
_ALIASES = {"cuda": "h100", "gpu": "h100", "h100_sxm": "h100", "a100_80gb": "a100",
            "mobile": "phone", "arm": "phone", "cortex-x3": "phone", "host": "cpu"}


# ----------------------------------------------------------------------------- measured CPU
def _cache_sizes() -> tuple[int, int, int]:
    """(L1d per core, L2 per core, L3 shared) in bytes from sysfs; zeros where unknown."""
    out = {1: 0, 2: 0, 3: 0}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in base.glob("index*"):
            level = int((idx / "level").read_text())
            kind = (idx / "type").read_text().strip()
            if kind == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
            mult = {"K": 1024, "M": 2**20, "G": 2**30}.get(size[-1], 1)
            out[level] = int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return out[1], out[2], out[3]


def cpu_key(threads: int | None = None) -> str:
    """Cache key of the measured CPU spec: CPU model, torch version, threads."""
    import torch

    threads = threads or torch.get_num_threads()
    raw = f"{cpu_model()}|{torch.__version__}|{threads}|{torch.backends.cpu.get_cpu_capability()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cpu_cache_path(cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> Path:
    d = Path(cache_dir) if cache_dir is not None else ember_cache_dir()
    return d / f"device_cpu_{cpu_key(threads)}.json"


def _ort_sgemm_flops(n: int, threads: int, repeats: int) -> float | None:
    """Best fp32 FLOP/s of an n x n x n ONNX Runtime MatMul (None without onnxruntime)."""
    try:
        import numpy as np
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    from ember.backends.cpu.onnx.session import open_session, session_options

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "sgemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")])
    sess = open_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                        .SerializeToString(), session_options(threads))
    feed = {"x": rng.standard_normal((n, n)).astype(np.float32)}
    t = _best_time(lambda: sess.run(None, feed), min_time=0.03, repeats=repeats)
    return 2 * n**3 / t


# GEMM shapes ONNX Runtime is timed at (M rows, K, N): transformer projections and MLPs from
# one short sequence to a batch of long ones, and the narrow layers of small CNNs / tiny ViTs
_ORT_GEMM_M = (1, 16, 64, 256, 1024, 4096)  # 1: a decode step's products
_ORT_GEMM_KN = ((64, 64), (128, 512), (384, 384), (384, 1536), (768, 768), (768, 3072),
                (3072, 768))
_ORT_GEMM_M_QUICK = (64, 1024)
# the cold grid: M where a product reads its weights from DRAM for longer than it computes
_ORT_GEMM_COLD_M = (1, 16, 64, 256, 1024)
_ORT_GEMM_COLD_M_QUICK = (16, 256)
_COLD_MAX_GEMMS = 128
# the GEMM and conv grids are timed in this many interleaved passes, each point the median
# (spec 8: five; two specs of three passes minutes apart moved a 20 ms LLaMA prediction 15%)
_GRID_PASSES = 5
_GEMM_CHAIN = 4  # GEMMs in one cached-grid chain (and in the host-speed probe)
_CONV_CHAIN = 4  # convs in one conv-grid chain
_ORT_GEMM_KN_QUICK = ((384, 384), (768, 3072))
# int4 MatMulNBits (group 32) at accuracy level 0 (fp32 compute on dequantized blocks) and 4
# (int8 activations, MLAS's int8 kernels): decode steps to prefill, small LMs' projections
_ORT_NBITS_M = (1, 16, 256)
_ORT_NBITS_KN = ((576, 1536), (1024, 1024), (2048, 5632))
_ORT_NBITS_M_QUICK = (1,)
_ORT_NBITS_KN_QUICK = ((1024, 1024),)
# memory-bound kernels: elements of the [rows, 768]-like tensors a chain of Adds is timed on,
# from one tiny vector (dispatch only) through L2- and L3-resident sizes to DRAM-bound ones
_ORT_STREAM_NUMEL = (64, 768, 6144, 24576, 98304, 393216, 1572864, 6291456)
_ORT_STREAM_NUMEL_QUICK = (768, 98304, 1572864)
# convolutions (stride 1): (cin, cout, hw, kernel, batch) dense, (channels, hw, batch)
# depthwise 3x3, MobileNet/ResNet-like; the 1x1s are most of a MobileNet's FLOPs and run far
# below a 3x3's rate. Spec 8 adds 4x expand / project 1x1s at every resolution (wide N and K)
# and batch 4 at the large resolutions, whose activations leave the L3 (M = batch x hw^2)
_ORT_CONV = ((3, 32, 112, 3, 1), (64, 64, 56, 3, 1), (16, 96, 112, 1, 1), (96, 24, 56, 1, 1),
             (144, 32, 28, 1, 1), (384, 64, 14, 1, 1), (960, 160, 7, 1, 1), (256, 256, 14, 3, 1),
             (64, 256, 56, 1, 1), (256, 64, 56, 1, 1), (128, 512, 28, 1, 1),
             (512, 128, 28, 1, 1), (256, 1024, 14, 1, 1), (1024, 256, 14, 1, 1),
             (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1), (128, 128, 28, 3, 1),
             (512, 512, 7, 3, 1), (16, 96, 112, 1, 4), (96, 24, 56, 1, 4), (64, 64, 56, 3, 4))
_ORT_DWCONV = ((32, 112, 1), (144, 56, 1), (192, 28, 1), (384, 14, 1), (960, 7, 1),
               (32, 112, 4), (144, 56, 4))
_ORT_CONV_QUICK = ((64, 64, 56, 3, 1), (144, 32, 28, 1, 1))
_ORT_DWCONV_QUICK = ((144, 56, 1),)


def _gemm_chain(k: int, n: int, count: int, rnd: Callable[..., Any]
                ) -> tuple[list[Any], dict[str, Any]]:
    """ONNX nodes and weights of ``count`` MatMuls x[*, K] -> [*, N] -> [*, K] -> ..., each
    with its own weight (the GEMM grid's chains and the host-speed probe): input ``x``,
    output ``y``."""
    from onnx import helper

    inits = {f"w{i}": rnd(k, n) if i % 2 == 0 else rnd(n, k) for i in range(count)}
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"],
                              ["y" if i == count - 1 else f"h{i}"]) for i in range(count)]
    return nodes, inits


def _node_chain(make: Callable[[str, str], Any], length: int) -> list[Any]:
    """``length`` ONNX nodes ``make(input, output)`` in a chain from ``x`` to ``y`` (the
    memory-bound table's graphs and the stream probe)."""
    return [make("x" if i == 0 else f"a{i - 1}", "y" if i == length - 1 else f"a{i}")
            for i in range(length)]


def _add_node(a: str, b: str) -> Any:
    """``b = a + c`` (``c`` a row vector): the node of the memory-bound table's chains and of
    the stream probe."""
    from onnx import helper

    return helper.make_node("Add", [a, "c"], [b])


def _add_operands(numel: int, rnd: Callable[..., Any]) -> tuple[Any, dict[str, Any]]:
    """(x, {"c": row}) of an Add chain over ``numel`` floats: rows of up to 768."""
    w = min(768, numel)
    x = rnd(numel // w, w)
    return x, {"c": rnd(w)}


def _cold_pairs(k: int, n: int, l3_bytes: int) -> int:
    """K -> N -> K pairs in a cold-grid chain: weights twice the L3, at most
    `_COLD_MAX_GEMMS` GEMMs (the chain is cold when they reach 1.5x the L3)."""
    return max(2, min(_COLD_MAX_GEMMS // 2, -(-2 * l3_bytes // (2 * 4 * k * n))))


def _conv_chain(cin: int, cout: int, kk: int, groups: int, rnd: Callable[..., Any]
                ) -> tuple[list[Any], dict[str, Any]]:
    """``_CONV_CHAIN`` stride-1 "same" Convs with bias, x[cin] -> [cout] -> [cin] -> ...
    (depthwise: ``groups`` = channels), each with its own weights: input ``x``, output
    ``y``."""
    from onnx import helper

    nodes, inits = [], {}
    for i in range(_CONV_CHAIN):
        ci, co = (cin, cout) if i % 2 == 0 else (cout, cin)
        inits[f"w{i}"], inits[f"b{i}"] = rnd(co, ci // groups, kk, kk), rnd(co)
        nodes.append(helper.make_node(
            "Conv", ["x" if i == 0 else f"h{i - 1}", f"w{i}", f"b{i}"],
            ["y" if i == _CONV_CHAIN - 1 else f"h{i}"], pads=[kk // 2] * 4, group=groups))
    return nodes, inits


def _measure_ort_kernels(threads: int, quick: bool, reps: int,
                         l3_bytes: int = 0) -> dict[str, Any] | None:
    """ONNX Runtime's own kernels, the ones the CPU backend's ORT program runs, at several
    shapes: the cost model's per-op efficiency for that runtime (`ember.cost_models.ort`).

    Kernels are timed *inside* graphs the way a model runs them (a chain of GEMM pairs with
    distinct weights, a chain of Adds), each figure the median of ``reps`` (a model's call is
    timed by its median), the session's own call overhead taken off.

    Returns ``{"gemm": [[M, K, N, FLOP/s], ...], "conv": [[M, K, N, FLOP/s], ...],
    "dwconv": [[M, 9, C, FLOP/s], ...], "nbits": {"0"|"4": [[M, K, N, FLOP/s], ...]},
    "stream": [[bytes, s per node], ...],
    "stream_factor": {ir op: x}, "attention_flops", "node_overhead_s", "call_overhead_s",
    "in_graph": True}`` or None without onnxruntime."""
    try:
        import numpy as np
        import onnxruntime  # noqa: F401
        from onnx import helper

        from ember.backends.cpu.onnx.session import graph_session
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    l3_bytes = l3_bytes or 32 * 2**20  # unknown cache size: a typical server L3

    def rnd(*shape: int) -> Any:
        return rng.standard_normal(shape).astype(np.float32)

    def typical(sess: Any, feed: dict[str, Any]) -> float:
        return _typical_time(lambda: sess.run(None, feed), min_time=0.02, repeats=reps)

    out: dict[str, Any] = {"gemm": [], "conv": [], "dwconv": [], "stream": [],
                           "stream_factor": {}, "in_graph": True}
    # overheads: one call of a 1-node graph, and the slope of a chain of 64 tiny Adds
    one = {"x": rnd(1, 8)}
    chain = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", "x"],
                              ["y" if i == 63 else f"a{i}"]) for i in range(64)]
    call = typical(graph_session([helper.make_node("Add", ["x", "x"], ["y"])], one, threads), one)
    t64 = typical(graph_session(chain, one, threads), one)
    out["call_overhead_s"] = call
    out["node_overhead_s"] = max(0.0, (t64 - call) / 63)
    ms = _ORT_GEMM_M_QUICK if quick else _ORT_GEMM_M
    kns = _ORT_GEMM_KN_QUICK if quick else _ORT_GEMM_KN
    # every grid point is a job: (table, row prefix, flops, kernels per call, session, feed);
    # jobs are timed in `_GRID_PASSES` interleaved passes and each point takes its median
    # over the passes: on a shared host one point's time moved +-20% between minutes, and a
    # grid timed in one sweep carried that noise into every prediction read from it
    jobs: list[tuple[str, list[float], float, int, Any, dict[str, Any]]] = []
    for k, n in kns:
        # two K->N->K pairs with their own weights: each GEMM reads weights the previous one
        # did not, and the thread pool hands over between kernels as in a model. Rows are a
        # symbolic dim (as a model's batch x seq), so one session serves every M.
        nodes, inits = _gemm_chain(k, n, _GEMM_CHAIN, rnd)
        sess = graph_session(nodes, {"x": rnd(ms[0], k)}, threads, inits, dynamic_rows=True)
        for m in ms:
            jobs.append(("gemm", [m, k, n], 2.0 * m * k * n, _GEMM_CHAIN, sess,
                         {"x": rnd(m, k)}))
        # the same products in a chain whose weights are twice the L3 (at most 128 GEMMs),
        # none of them cached when it runs: at M <= 64 0.2-0.8x the rate of the 4-GEMM chain
        # above (AVX-512 EPYC). Read for every GEMM of a model whose GEMM weights together
        # exceed the L3 (`ember.cost_models.ort.weights_exceed_l3`)
        pairs = _cold_pairs(k, n, l3_bytes)
        if 2 * pairs * 4 * k * n >= 1.5 * l3_bytes:
            chain, cold = _gemm_chain(k, n, 2 * pairs, rnd)
            cms = _ORT_GEMM_COLD_M_QUICK if quick else _ORT_GEMM_COLD_M
            sess = graph_session(chain, {"x": rnd(cms[0], k)}, threads, cold,
                                 dynamic_rows=True)
            del cold
            for m in cms:
                jobs.append(("gemm_cold", [m, k, n], 2.0 * m * k * n, 2 * pairs, sess,
                             {"x": rnd(m, k)}))
    # convs are timed in chains of `_CONV_CHAIN` with their own weights and biases, as a
    # model runs them: ORT moves a conv graph into its blocked NCHWc layout and reorders
    # only at the graph's edges, which a one-conv session pays on every call (a grid of
    # one-conv sessions over-predicted MobileNetV2 by 12-34%). Dense chains alternate
    # cin -> cout -> cin (every conv the same FLOPs); depthwise ones keep their channels.
    convs = [("dwconv", c, c, hw, 3, c, b)
             for c, hw, b in (_ORT_DWCONV_QUICK if quick else _ORT_DWCONV)]
    convs += [("conv", cin, cout, hw, kk, 1, b)
              for cin, cout, hw, kk, b in (_ORT_CONV_QUICK if quick else _ORT_CONV)]
    for key, cin, cout, hw, kk, groups, b in convs:
        x = rnd(b, cin, hw, hw)
        nodes, inits = _conv_chain(cin, cout, kk, groups, rnd)
        sess = graph_session(nodes, {"x": x}, threads, inits)
        red = cin // groups * kk * kk  # the GEMM view's K (9 for a depthwise 3x3)
        jobs.append((key, [b * hw * hw, red, cout], 2.0 * b * hw * hw * red * cout,
                     _CONV_CHAIN, sess, {"x": x}))
    passes = 1 if quick else _GRID_PASSES
    times: list[list[float]] = [[] for _ in jobs]
    for _ in range(passes):
        for j, job in enumerate(jobs):
            # the previous job's session leaves its workers spinning for a while: they took
            # half the cores from a session timed right after (conv rates measured 2x low)
            time.sleep(0.05)
            times[j].append(typical(job[4], job[5]))
    for (key, row, flops, kernels, _, _), ts in zip(jobs, times):
        t = max(statistics.median(ts) - call, 1e-7) / kernels
        out.setdefault(key, []).append(row + [round(flops / t)])
    if passes > 1:
        # how far a point moved between passes (median over points of max / min - 1)
        out["grid_pass_spread"] = round(statistics.median(max(ts) / min(ts) - 1
                                                          for ts in times), 3)
    del jobs, sess
    try:
        out["nbits"] = _measure_nbits(threads, quick, typical, call, rnd)
    except Exception as e:  # noqa: BLE001  (an ORT build without the contrib op)
        log.info("ORT MatMulNBits not timed: %s", e)
    out["conv_flops"] = max(r[3] for r in out["conv"])      # spec version 3's figures
    out["dwconv_flops"] = max(r[3] for r in out["dwconv"])

    def per_node(make: Callable[[str, str], Any], x: Any, inits: dict[str, Any],
                 length: int = 16) -> float:
        nodes = _node_chain(make, length)
        t1 = typical(graph_session([make("x", "y")], {"x": x}, threads, inits), {"x": x})
        tl = typical(graph_session(nodes, {"x": x}, threads, inits), {"x": x})
        return max((tl - t1) / (length - 1), 1e-8)

    d = 768
    add = {}
    for numel in (_ORT_STREAM_NUMEL_QUICK if quick else _ORT_STREAM_NUMEL):
        x, c = _add_operands(numel, rnd)
        add[numel] = per_node(_add_node, x, c)
        out["stream"].append([2 * 4 * numel, add[numel]])
    # other memory-bound kernels as multiples of the Add at one L3-resident size
    numel = 393216 if 393216 in add else max(add)
    x = rnd(numel // d, d)
    vec = {"s": rnd(d), "c": rnd(d)}
    for key, make in (
            ("layer_norm", lambda a, b: helper.make_node("LayerNormalization", [a, "s", "c"],
                                                         [b], axis=-1)),
            ("rms_norm", lambda a, b: helper.make_node("SimplifiedLayerNormalization",
                                                       [a, "s"], [b], axis=-1)),
            ("softmax", lambda a, b: helper.make_node("Softmax", [a], [b], axis=-1)),
            ("gelu", lambda a, b: helper.make_node("Gelu", [a], [b], domain="com.microsoft"))):
        try:
            out["stream_factor"][key] = round(per_node(make, x, vec) / add[numel], 3)
        except Exception as e:  # noqa: BLE001  (an op this ORT build lacks: factor 1)
            log.info("ORT %s not timed: %s", key, e)
    # attention: ORT's MultiHeadAttention, 12 heads of 64 at 128 tokens
    b, s_, h, dh = 1, 128, 12, 64
    qkv = {n: rnd(b, s_, h * dh) for n in "qkv"}
    sess = graph_session([helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"],
                                           domain="com.microsoft", num_heads=h)], qkv, threads)
    out["attention_flops"] = round(4.0 * b * h * s_ * s_ * dh / max(typical(sess, qkv) - call,
                                                                   1e-7))
    return out


def _measure_nbits(threads: int, quick: bool, typical: Callable[[Any, dict[str, Any]], float],
                   call: float, rnd: Callable[..., Any]) -> dict[str, list[list[float]]]:
    """``{accuracy level: [[M, K, N, FLOP/s], ...]}`` of int4 MatMulNBits (group 32), each
    timed in a chain of two K -> N -> K pairs with distinct weights like the fp32 GEMMs."""
    import numpy as np
    from onnx import helper

    from ember.backends.cpu.onnx.session import graph_session

    g = 32
    rng = np.random.default_rng(1)
    out: dict[str, list[list[float]]] = {}
    for level in (0, 4):
        rows = out.setdefault(str(level), [])
        for k, n in (_ORT_NBITS_KN_QUICK if quick else _ORT_NBITS_KN):
            inits: dict[str, Any] = {}
            nodes = []
            for i in range(4):
                kk, nn = (k, n) if i % 2 == 0 else (n, k)
                inits[f"b{i}"] = rng.integers(0, 256, (nn, kk // g, g // 2), dtype=np.uint8)
                inits[f"s{i}"] = (rng.random(nn * kk // g, dtype=np.float32) * 0.02 + 0.01)
                nodes.append(helper.make_node(
                    "MatMulNBits", ["x" if i == 0 else f"h{i - 1}", f"b{i}", f"s{i}"],
                    ["y" if i == 3 else f"h{i}"], domain="com.microsoft", K=kk, N=nn, bits=4,
                    block_size=g, accuracy_level=level))
            for m in (_ORT_NBITS_M_QUICK if quick else _ORT_NBITS_M):
                x = rnd(m, k)
                sess = graph_session(nodes, {"x": x}, threads, inits)
                t = max(typical(sess, {"x": x}) - call, 1e-7) / 4
                rows.append([m, k, n, round(2.0 * m * k * n / t)])
    return out


def _repeat_times(fn: Callable[[], Any], min_time: float, repeats: int) -> list[float]:
    """``repeats`` per-call means of ``fn``, each over enough calls for ``min_time``."""
    fn()
    one = max(pass_time_s([fn]), 1e-7)
    return call_samples_s(fn, repeats, inner=max(1, int(min_time / one)))


def _best_time(fn: Callable[[], Any], min_time: float = 0.05, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds per call, each repeat timing enough calls for ``min_time``.

    The minimum is the right statistic for peak figures: other load only ever adds time.
    """
    return min(_repeat_times(fn, min_time, repeats))


def _typical_time(fn: Callable[[], Any], min_time: float = 0.02, repeats: int = 5) -> float:
    """Median of ``repeats`` per-call means (each over enough calls for ``min_time``): the
    cost model predicts the median call, so kernel rates are typical ones, not the best."""
    return statistics.median(_repeat_times(fn, min_time, repeats))


def measure_cpu(threads: int | None = None, quick: bool = False) -> DeviceSpec:
    """Measures this CPU with the libraries the CPU backend calls. Takes 5-20 s.

    Args:
        threads: torch intra-op threads to measure with (default: the current setting).
        quick: smaller problems and fewer repeats (for tests).
    """
    import torch

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(prev)


def _measure(quick: bool) -> DeviceSpec:
    import torch

    t_start = time.perf_counter()
    raw: dict[str, Any] = {}
    reps = 2 if quick else 5
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        # GEMM peaks: the best of growing square sizes, stopping once one call takes
        # longer than ~60 ms (emulated bf16 / int8 kernels can be 100x slower than fp32)
        peaks: dict[str, float] = {}
        sizes = (128, 256, 512) if quick else (256, 512, 1024, 1536)
        kernels: dict[str, Callable[[int], Callable[[], Any]]] = {
            # fp32: MKL/oneDNN sgemm
            "float32": lambda n: _mm(torch.randn(n, n, generator=gen)),
            # bf16 / fp16: oneDNN (AMX/AVX512-BF16/FP16 where the CPU has them, else emulated)
            "bfloat16": lambda n: _mm(torch.randn(n, n, generator=gen).to(torch.bfloat16)),
            "float16": lambda n: _mm(torch.randn(n, n, generator=gen).to(torch.float16)),
            # int8 x int8 -> int32 (torch._int_mm: oneDNN, VNNI/AMX where available)
            "int8": lambda n: _int_mm(torch.randint(-128, 127, (n, n), dtype=torch.int8,
                                                    generator=gen)),
        }
        for key, make in kernels.items():
            best = 0.0
            for n in sizes:
                try:
                    fn = make(n)
                    t = _best_time(fn, min_time=0.03, repeats=reps)
                except RuntimeError as e:  # no kernel for this dtype here
                    log.info("%s GEMM unavailable (%s)", key, e)
                    break
                raw[f"{key}_gemm_{n}_gflops"] = 2 * n**3 / t / 1e9
                best = max(best, 2 * n**3 / t)
                if t > 0.06 and key != "float32":
                    break
            peaks[key] = best or peaks.get("float32", 1e9)
        # fp32 through ONNX Runtime's MLAS too: the CPU backend ships ORT (or AOTI's prepacked
        # oneDNN) where faster, and on the AVX-512 EPYC MLAS ran 378 GFLOP/s against torch.mm's
        # 184 (MKL on an AMD part); the roofline divides by the best library Ember calls
        ort_peak = _ort_sgemm_flops(sizes[-1], torch.get_num_threads(), reps)
        if ort_peak:
            raw["float32_gemm_ort_gflops"] = ort_peak / 1e9
            peaks["float32"] = max(peaks["float32"], ort_peak)
        ort_k = _measure_ort_kernels(torch.get_num_threads(), quick, reps, _cache_sizes()[2])
        if ort_k is not None:
            raw["ort"] = ort_k
        # STREAM-like bandwidth: copy (2 x bytes) and add (3 x bytes) on arrays >> L3
        numel = (16 if quick else 32) * 2**20 // 4 * 4   # 64 / 128 MiB of fp32
        x = torch.randn(numel, generator=gen)
        y = torch.empty_like(x)
        z = torch.randn(numel, generator=gen)
        t_copy = _best_time(lambda: y.copy_(x), repeats=reps)
        t_add = _best_time(lambda: torch.add(x, z, out=y), repeats=reps)
        bw_copy = 2 * 4 * numel / t_copy
        bw_add = 3 * 4 * numel / t_add
        raw.update(copy_gbs=bw_copy / 1e9, add_gbs=bw_add / 1e9)
        bw = max(bw_copy, bw_add)
        # per-op overhead: a 1-element add through the dispatcher (median, not min: the
        # overhead every op pays, including allocator and dispatch)
        s = torch.ones(1)
        times = []
        for _ in range(7):
            n_calls = 2000 if not quick else 500
            t0 = time.perf_counter()
            for _ in range(n_calls):
                torch.add(s, s)
            times.append((time.perf_counter() - t0) / n_calls)
        overhead = statistics.median(times)
        raw["tiny_op_us"] = overhead * 1e6
    l1, l2, l3 = _cache_sizes()
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    raw.update(threads=threads, loadavg_1m=load, seconds=time.perf_counter() - t_start,
               cpu_model=cpu_model(), torch=torch.__version__,
               capability=torch.backends.cpu.get_cpu_capability(), quick=quick)
    spec = DeviceSpec(
        name="cpu", kind="cpu", peak_flops=peaks, mem_bw=bw, launch_overhead_s=overhead,
        cores=threads, l1_bytes=l1, l2_bytes=l2, l3_bytes=l3,
        efficiency=dict(_DEFAULT_EFF), source="measured",
        notes=f"measured on {cpu_model()} with torch {torch.__version__}, {threads} threads",
        measured=raw,
    )
    log.info("measured CPU: %s (%.1f s, load %.1f)", spec.summary(), raw["seconds"], load)
    if load > 1.5 * (os.cpu_count() or 1):
        log.warning("the CPU spec was measured under load (1-min load average %.1f on %d "
                    "CPUs); re-measure on a quiet machine with get_device('cpu', refresh=True)",
                    load, os.cpu_count() or 1)
    return spec


def _mm(a: Any) -> Callable[[], Any]:
    import torch

    return lambda: torch.mm(a, a)


def _int_mm(a: Any) -> Callable[[], Any]:
    import torch

    return lambda: torch._int_mm(a, a)


def load_cached_cpu(cache_dir: str | os.PathLike | None = None,
                    threads: int | None = None) -> DeviceSpec | None:
    path = cpu_cache_path(cache_dir, threads)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != SPEC_VERSION:
            return None
        return DeviceSpec.from_json(doc)
    except (ValueError, TypeError, KeyError) as e:
        log.warning("ignoring unreadable device cache %s: %s", path, e)
        return None


LOADED = 1.0  # load average per core above which a measurement is not a device's own speed


def _taken_under_load(spec: DeviceSpec) -> bool:
    """True when ``spec`` was measured on a busy machine and this one is now at most half as
    busy: micro-benchmarks measured at load 13.6 on 2 cores said 16 GFLOP/s fp32 and 4.4 GB/s,
    the idle machine does 170 GFLOP/s and 27 GB/s, and the cache kept the bad numbers."""
    m = spec.measured or {}
    then = float(m.get("loadavg_1m") or 0.0)
    cores = max(1, int(spec.cores or 1))
    return then > LOADED * cores and os.getloadavg()[0] < then / 2


def _measured_cpu(cache_dir: str | os.PathLike | None, threads: int | None,
                  refresh: bool, quick: bool) -> DeviceSpec:
    if not refresh:
        cached = load_cached_cpu(cache_dir, threads)
        if cached is not None and not _taken_under_load(cached):
            return cached
    spec = measure_cpu(threads, quick=quick)
    path = cpu_cache_path(cache_dir, threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec.to_json(), indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot cache the CPU spec at %s: %s", path, e)
    return spec


_MEMO: dict[tuple[str, str | None, int | None], DeviceSpec] = {}


def get_device(name: str = "cpu", *, cache_dir: str | os.PathLike | None = None,
               threads: int | None = None, refresh: bool = False,
               quick: bool = False) -> DeviceSpec:
    """The spec of device ``name``: "cpu" (measured, cached), "h100", "a100" or "phone".

    Args:
        name: device id or alias ("cuda" -> h100, "mobile" -> phone).
        cache_dir: where measured specs are cached (default ``~/.cache/ember``).
        threads: CPU threads to measure with (default: torch's current setting).
        refresh: re-measure even when a cached spec exists.
        quick: smaller micro-benchmarks (tests).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _PUBLISHED:
        return _PUBLISHED[key]
    if key != "cpu":
        raise KeyError(f"unknown device '{name}'; known: {', '.join(known_devices())}")
    memo_key = ("cpu", None if cache_dir is None else str(cache_dir), threads)
    if not refresh and memo_key in _MEMO:
        return _MEMO[memo_key]
    spec = _measured_cpu(cache_dir, threads, refresh, quick)
    _MEMO[memo_key] = spec
    return spec


# ----------------------------------------------------------------------------- host probe
# A shared host's speed moves 10-30% within minutes (a spec measured at one minute predicted
# every model 10-25% low a quarter of an hour later). The probe is one of the spec's own GEMM
# grid jobs, timed again now: its time over the time the spec implies for it is the host's
# current slowdown. Two probes, because the host slows in two ways: the cached probe (the
# 4-GEMM chain nearest `_PROBE_MKN`, weights in the L3) sees the CPU taken from us; the cold
# probe (the cold-grid chain nearest `_PROBE_COLD_MKN`, weights twice the L3, read from DRAM)
# also sees a neighbour's traffic in the shared L3 and memory. In two 33-point runs the
# models whose weights exceed the L3 ran 1.2-1.8x slower than in an earlier run while the
# cached probe said 1.06-1.21x. Neither probe is reliable alone (BENCHMARKS.md section 6,
# session 16: the cold one fixed GPT-2, BERT and the LLaMA in two runs of three and misread
# the compute-bound ViT in two).
_PROBE_MKN = (256, 768, 768)
_PROBE_COLD_MKN = (64, 768, 768)


def probe_point(spec: DeviceSpec, cold: bool = False) -> tuple[int, int, int, float] | None:
    """(M, K, N, FLOP/s) of the spec's GEMM grid point the probe times (``cold``: of its cold
    grid), or None when the spec has no such grid (a published device, a build without
    onnxruntime, no L3 size to exceed)."""
    ortk = (spec.measured or {}).get("ort") or {}
    if cold and not spec.l3_bytes:
        return None
    grid = ortk.get("gemm_cold" if cold else "gemm") or []
    if not grid:
        return None
    want = _PROBE_COLD_MKN if cold else _PROBE_MKN

    def dist(r: list[float]) -> float:
        return sum(abs(math.log(r[i] / want[i])) for i in range(3))

    m, k, n, rate = min(grid, key=dist)
    return int(m), int(k), int(n), float(rate)


def probe_gemms(spec: DeviceSpec, cold: bool = False) -> int:
    """GEMMs in one call of the probe graph (the chain its grid point was timed in)."""
    pt = probe_point(spec, cold)
    if not cold or pt is None:
        return _GEMM_CHAIN
    return 2 * _cold_pairs(pt[1], pt[2], spec.l3_bytes)


def probe_expected_s(spec: DeviceSpec, cold: bool = False) -> float | None:
    """Seconds one probe call takes at the speed the spec was measured at."""
    pt = probe_point(spec, cold)
    if pt is None:
        return None
    m, k, n, rate = pt
    call = float(spec.measured["ort"].get("call_overhead_s", 0.0))
    return call + probe_gemms(spec, cold) * 2.0 * m * k * n / rate


def _calls_runner(sess: Any, feed: dict[str, Any], calls: int) -> Callable[..., Any]:
    """A probe runner: each call runs ``sess`` on ``feed`` ``calls`` times back to back."""
    def run(*_: Any) -> Any:
        for _ in range(calls - 1):
            sess.run(None, feed)
        return sess.run(None, feed)[0]

    return run


def probe_runner(m: int, k: int, n: int, threads: int = 2, calls: int = 20, gemms: int = 0
                 ) -> Callable[..., Any]:
    """A runner for `ember.isolated` (``"ember.cost_models.devices:probe_runner"``): each call
    runs the probe graph ``calls`` times back to back, as the spec's grid timed it (one sample
    / ``calls`` is one probe call). ``gemms``: GEMMs in the chain (`probe_gemms`; 0: the
    cached probe's `_GEMM_CHAIN`)."""
    import numpy as np

    from ember.backends.cpu.onnx.session import graph_session

    rng = np.random.default_rng(0)

    def rnd(*shape: int) -> Any:
        return rng.standard_normal(shape).astype(np.float32)

    nodes, inits = _gemm_chain(k, n, gemms or _GEMM_CHAIN, rnd)
    x = rnd(m, k)
    sess = graph_session(nodes, {"x": x}, threads, inits, dynamic_rows=True)
    del inits
    return _calls_runner(sess, {"x": x}, calls)


# the stream probe: a chain of Adds at one row of the spec's memory-bound table, the kernels
# every node that is not a GEMM, conv or attention is priced by
_PROBE_STREAM_BYTES = 196608  # 24576 floats in, 24576 out: in cache, split over the threads
_STREAM_CHAIN = 32


def stream_probe(spec: DeviceSpec) -> tuple[int, float] | None:
    """(floats per Add, seconds one call of the `_STREAM_CHAIN`-Add probe graph takes at the
    spec's speed) of the stream probe, or None when the spec has no memory-bound table."""
    ortk = (spec.measured or {}).get("ort") or {}
    table = ortk.get("stream") or []
    if not table:
        return None
    b, t = min(table, key=lambda r: abs(math.log(float(r[0]) / _PROBE_STREAM_BYTES)))
    call = float(ortk.get("call_overhead_s", 0.0))
    return int(b) // 8, call + _STREAM_CHAIN * float(t)


def stream_probe_runner(numel: int, threads: int = 2, calls: int = 20) -> Callable[..., Any]:
    """A runner for `ember.isolated` (``"ember.cost_models.devices:stream_probe_runner"``):
    each call runs the stream probe graph (`_STREAM_CHAIN` Adds of ``numel`` floats, the
    graph the spec's memory-bound table was timed with) ``calls`` times back to back."""
    import numpy as np

    from ember.backends.cpu.onnx.session import graph_session

    rng = np.random.default_rng(0)
    x, c = _add_operands(numel, lambda *shape: rng.standard_normal(shape).astype(np.float32))
    sess = graph_session(_node_chain(_add_node, _STREAM_CHAIN), {"x": x}, threads, c)
    return _calls_runner(sess, {"x": x}, calls)


def host_speed(spec: DeviceSpec, threads: int | None = None, cold: bool = False,
               stream: bool = False) -> float | None:
    """The host's slowdown now against when ``spec`` was measured: the probe's median time
    now over the time the spec implies (1.0: as fast; 1.2: calls take 20% longer). ``cold``:
    the cold GEMM probe (weights from DRAM); ``stream``: the stream probe (memory-bound Adds).
    Takes about a second. None when the spec has no such grid."""
    import torch

    nthreads = threads or torch.get_num_threads()
    if stream:
        sp = stream_probe(spec)
        if sp is None:
            return None
        run = stream_probe_runner(sp[0], threads=nthreads, calls=1)
        want = sp[1]
    else:
        pt, want = probe_point(spec, cold), probe_expected_s(spec, cold)
        if pt is None or want is None:
            return None
        run = probe_runner(*pt[:3], threads=nthreads, calls=1, gemms=probe_gemms(spec, cold))
    time.sleep(0.05)
    return _typical_time(run, min_time=0.02, repeats=9) / want


def known_devices() -> list[str]:
    return ["cpu", *_PUBLISHED]


def with_efficiency(spec: DeviceSpec, **eff: float) -> DeviceSpec:
    """A copy of ``spec`` with some op-class efficiencies replaced."""
    return replace(spec, efficiency={**spec.efficiency, **eff})
