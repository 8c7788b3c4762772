"""Benchmark Ember's CUDA kernels and models on a GPU machine.

    python examples/bench_cuda.py [--device-spec h100|a100] [--models mlp,gpt2] [--json out.json]

Per kernel: Ember's Triton kernel vs the torch/cuBLAS equivalent (median of CUDA-event timings),
and the fraction of the roofline it reaches: achieved bytes/s over the spec's HBM bandwidth for
memory-bound shapes (decode, gathers, norms), achieved FLOP/s over the tensor-core peak for
compute-bound ones (`ember.backends.cuda.costs` counts bytes and FLOPs). End to end: zoo models
compiled for CUDA vs eager PyTorch and ``torch.compile`` (Inductor) on the GPU.

Needs an NVIDIA GPU; exits with status 2 and one line saying so without one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("bench_cuda")


def cuda_ms(fn: Callable[[], Any], repeats: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _row(name: str, shape: str, ember_ms: float, torch_ms: float, flops: float, nbytes: float,
         dtype: str, spec: Any) -> dict[str, Any]:
    s = ember_ms / 1e3
    return {"kernel": name, "shape": shape, "ember_ms": round(ember_ms, 4),
            "torch_ms": round(torch_ms, 4), "speedup": round(torch_ms / ember_ms, 3),
            "bw_frac": round(nbytes / s / spec.mem_bw, 3),
            "peak_frac": round(flops / s / spec.peak(dtype), 3)}


def bench_kernels(spec: Any) -> list[dict[str, Any]]:
    from ember.backends.cuda import ops
    from ember.ir.opset_quant import (
        encode_sparse,
        quantize_weight_groups,
        quantize_weight_per_channel,
    )

    dev = "cuda"
    rows = []
    for m, n, k in ((1, 4096, 4096), (16, 11008, 4096), (2048, 4096, 4096)):
        x = torch.randn(m, k, device=dev)
        w = torch.randn(n, k, device=dev)
        wq, ws = (t.to(dev) for t in quantize_weight_per_channel(w.cpu()))
        ref = w.half()
        t_e = cuda_ms(lambda: ops.w8a8_linear(x, wq, ws))  # noqa: B023
        t_t = cuda_ms(lambda: F.linear(x.half(), ref))  # noqa: B023
        rows.append(_row("w8a8", f"{m}x{n}x{k}", t_e, t_t, 2 * m * n * k,
                         6 * m * k + n * k + 4 * m * n, "int8", spec))
        q4, s4 = (t.to(dev) for t in quantize_weight_groups(w.cpu(), 4, 128))
        t_e = cuda_ms(lambda: ops.woq_linear(x, q4, s4, 4, 128, tf32=True))  # noqa: B023
        rows.append(_row("int4-woq", f"{m}x{n}x{k}", t_e, t_t, 2 * m * n * k,
                         4 * m * k + n * k // 2 + 4 * n * k // 128 + 4 * m * n, "tfloat32",
                         spec))
        w24 = w.cpu().reshape(n, k // 4, 4)
        top = w24.abs().topk(2, -1).indices
        w24 = (w24 * torch.zeros_like(w24).scatter(2, top, 1.0)).reshape(n, k)
        v, p = (t.to(dev) for t in encode_sparse(w24, "nm"))
        t_e = cuda_ms(lambda: ops.nm_linear(x, v, p, 2, 4, k, tf32=True))  # noqa: B023
        t_t32 = cuda_ms(lambda: F.linear(x, w))  # noqa: B023
        rows.append(_row("sparse-2:4", f"{m}x{n}x{k}", t_e, t_t32, 2 * m * n * k,
                         4 * m * k + n * k // 2 * 5 + 4 * m * n, "tfloat32", spec))
    x = torch.randn(8, 577, 768, device=dev)
    r = torch.randn_like(x)
    g_ = torch.randn(768, device=dev)
    t_e = cuda_ms(lambda: ops.add_norm(x, r, g_, g_, 1e-5, False))
    t_t = cuda_ms(lambda: F.layer_norm(x + r, (768,), g_, g_))
    rows.append(_row("add+layernorm", "8x577x768", t_e, t_t, 8 * x.numel(), 16 * x.numel(),
                     "float32", spec))
    q = torch.randn(8, 12, 577, 64, device=dev, dtype=torch.float16)
    kv = torch.randn(8, 12, 400, 64, device=dev, dtype=torch.float16)
    size = torch.rand(8, 400, device=dev) + 1
    t_e = cuda_ms(lambda: ops.flash_attention(q, kv, kv, size=size))
    bias = size.log()[:, None, None, :].half()
    t_t = cuda_ms(lambda: F.scaled_dot_product_attention(q, kv, kv, attn_mask=bias))
    rows.append(_row("attention+size", "8x12x577x400x64", t_e, t_t, 4 * 8 * 12 * 577 * 400 * 64,
                     2 * (q.numel() + 3 * kv.numel()), "float16", spec))
    idx = torch.randint(0, 577, (8, 400), device=dev)
    t_e = cuda_ms(lambda: ops.gather_rows(x, idx))
    t_t = cuda_ms(lambda: x.gather(1, idx[..., None].expand(-1, -1, 768)))
    rows.append(_row("token-gather", "8x577->400x768", t_e, t_t, 0, 8 * 8 * 400 * 768,
                     "float32", spec))
    return rows


def bench_models(names: list[str]) -> list[dict[str, Any]]:
    import ember

    sys.path.insert(0, "tests")
    import zoo

    rows = []
    for name in names:
        z = zoo.ZOO[name]()
        model = z.model.cuda().eval()
        ins = [t.cuda() for t in z.example_inputs]
        cm = ember.compile(z.model, z.example_inputs, target="cuda",
                           dynamic_dims=z.dynamic_dims or None,
                           input_names=z.input_names or None)
        with torch.no_grad():
            t_eager = cuda_ms(lambda: model(*ins), repeats=20)  # noqa: B023
            comp = torch.compile(model)
            t_ind = cuda_ms(lambda: comp(*ins), repeats=20)  # noqa: B023
            t_emb = cuda_ms(lambda: cm.run(*ins), repeats=20)  # noqa: B023
        rows.append({"model": name, "eager_ms": round(t_eager, 3),
                     "inductor_ms": round(t_ind, 3), "ember_ms": round(t_emb, 3),
                     "predicted_ms": cm.placement.get("cost_model", {}).get("predicted_ms")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-spec", default="h100", help="roofline spec: h100 or a100")
    p.add_argument("--models", default="mlp,gpt2", help="comma-separated zoo models ('' none)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("bench_cuda: no CUDA device (torch.cuda.is_available() is False); "
                  "run this on a GPU machine")
        return 2
    from ember.cost_models import get_device

    spec = get_device(a.device_spec)
    log.info("device: %s; roofline: %s", torch.cuda.get_device_name(), spec.summary())
    result = {"kernels": bench_kernels(spec),
              "models": bench_models([m for m in a.models.split(",") if m])}
    for row in result["kernels"] + result["models"]:
        log.info("%s", json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
