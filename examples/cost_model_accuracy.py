"""How close is the cost model to measured end-to-end latency?

For zoo models NOT used to fit the learned correction (it is fit on single kernels only, see
``python -m ember.cost_models.measured``), compiles each model once for the CPU with dynamic
dims, then at several batch sizes / sequence lengths compares the predicted latency
(`ember.cost_models.predict_latency_ms`) with the measured median of >= 10 runs on 2 threads.
Reports the share of predictions within +-10% (target >= 90%) and how noisy the timings were.

    python examples/cost_model_accuracy.py                       # default models and shapes
    python examples/cost_model_accuracy.py --models gpt2,vit --repeats 20 --json out.json

Run it on a quiet machine: the 1-minute load average is printed and stored with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402  (tests/zoo.py: the model zoo)

import ember  # noqa: E402
from ember import cost_models as cm  # noqa: E402

# symbol grids per model family: text models vary batch and seq, image models batch
TEXT_GRID = [{"batch": b, "seq": s} for b in (1, 2, 4) for s in (8, 32, 64)]
IMAGE_GRID = [{"batch": b} for b in (1, 2, 4, 8)]
DEFAULT_MODELS = "vit,gpt2,llama,mobilenet_v2,bert"


def measure_ms(compiled: ember.CompiledModel, inputs: tuple, repeats: int) -> tuple[float, float]:
    """(median ms, relative IQR) of ``repeats`` calls after 3 warm-up calls."""
    for _ in range(3):
        compiled.run(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled.run(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    med = statistics.median(times)
    iqr = times[3 * len(times) // 4] - times[len(times) // 4]
    return med, iqr / med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--size", default="small", help="zoo size: small (default) or base")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="write all rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = cm.get_device("cpu")
    print(f"device: {dev.summary()}")
    corr = cm.load_correction()
    print(f"correction: {'loaded' if corr else 'none'}"
          + (f" ({corr.meta.get('n_records')} kernels)" if corr else ""))
    rows = []
    for name in args.models.split(","):
        zm = getattr(zoo, name)(size=args.size) if args.size != "small" else getattr(zoo, name)()
        t0 = time.perf_counter()
        compiled = ember.compile(zm.model, zm.example_inputs, target="cpu",
                                 dynamic_dims=zm.dynamic_dims, input_names=zm.input_names,
                                 check_fidelity=False)
        kind = compiled.placement.get("program", {}).get("kind", "aoti")
        runtime = "eager" if kind == "eager" else "inductor"
        print(f"\n{name}: compiled in {time.perf_counter() - t0:.0f} s, program {kind}, "
              f"{len(compiled.graph.nodes)} nodes")
        symbols_used = {s for dims in zm.dynamic_dims.values() for s in dims.values()}
        grid = TEXT_GRID if "seq" in symbols_used else IMAGE_GRID
        for point in grid:
            dims = {k: v for k, v in point.items() if k in symbols_used}
            inputs = zm.make_inputs(**dims)
            try:
                meas, noise = measure_ms(compiled, inputs, args.repeats)
            except Exception as e:  # a shape outside what the program supports
                print(f"  {dims}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            pred = cm.predict_latency_ms(compiled.graph, dev, inputs, runtime=runtime)
            raw = cm.predict_latency_ms(compiled.graph, dev, inputs, runtime=runtime,
                                        correction=False)
            err = pred / meas - 1
            rows.append({"model": name, "program": kind, **dims, "measured_ms": meas,
                         "noise_iqr": noise, "predicted_ms": pred, "roofline_ms": raw,
                         "rel_err": err})
            print(f"  {str(dims):28s} measured {meas:8.3f} ms (IQR {100 * noise:4.0f}%)  "
                  f"predicted {pred:8.3f} ms ({100 * err:+6.1f}%)  roofline {raw:8.3f} ms")
    if not rows:
        print("no measurements")
        return 1
    within = sum(abs(r["rel_err"]) <= 0.10 for r in rows) / len(rows)
    within_raw = sum(abs(r["roofline_ms"] / r["measured_ms"] - 1) <= 0.10 for r in rows) / len(rows)
    within25 = sum(abs(r["rel_err"]) <= 0.25 for r in rows) / len(rows)
    med_err = statistics.median(abs(r["rel_err"]) for r in rows)
    med_noise = statistics.median(r["noise_iqr"] for r in rows)
    load = os.getloadavg()[0]
    print(f"\n{len(rows)} predictions: within +-10%: {100 * within:.0f}% (roofline only "
          f"{100 * within_raw:.0f}%), within +-25%: {100 * within25:.0f}%, median |error| "
          f"{100 * med_err:.0f}%; median timing IQR {100 * med_noise:.0f}%; load average "
          f"{load:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "within10": within, "within10_roofline": within_raw,
            "within25": within25, "median_abs_err": med_err, "median_noise_iqr": med_noise,
            "loadavg_1m": load, "device": dev.to_json()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
