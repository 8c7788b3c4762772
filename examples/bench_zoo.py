"""Side-by-side CPU latency: eager PyTorch, torch.compile, ONNX Runtime, Ember.

One run, ``torch.set_num_threads(2)``, models from ``tests/zoo.py`` at real sizes, each
contender in its own worker process (``--in-process`` puts them all in one)::

    python examples/bench_zoo.py                       # every case, 10 timed runs each
    python examples/bench_zoo.py --models bert_b1,resnet50_b1 --repeats 20 --json out.json

For each case every runner is checked against eager (max |diff| / max(1, max |eager|)) before
timing. Runs are interleaved round-robin (one call of each runner per round) so load from other
processes on the machine hits every runner alike; the table shows medians. Ember speedups are
``baseline_ms / ember_ms`` (> 1 means Ember is faster); "best" is the fastest baseline per case.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import zoo  # noqa: E402  (tests/zoo.py)

THREADS = 2


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    make: Callable[[], zoo.ZooModel]


CASES: dict[str, Case] = {c.key: c for c in [
    Case("bert_b1", "BERT-base seq128 b1", lambda: zoo.bert(size="base", batch=1, seq=128)),
    Case("bert_b8", "BERT-base seq128 b8", lambda: zoo.bert(size="base", batch=8, seq=128)),
    Case("vit_b1", "ViT-B/16 224 b1", lambda: zoo.vit(size="base", batch=1)),
    Case("vit_b8", "ViT-B/16 224 b8", lambda: zoo.vit(size="base", batch=8)),
    Case("gpt2_b1", "GPT-2 small prefill seq256 b1",
         lambda: zoo.gpt2(size="base", batch=1, seq=256)),
    Case("resnet50_b1", "ResNet-50 224 b1", lambda: zoo.resnet(size="50", batch=1)),
]}


# ----------------------------------------------------------------------------- runners
def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Output tensors in pytree order (HF ModelOutput, tuples, a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in flat_tensors(o)]
    return []


def rel_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            return math.inf
        worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def ember_compile_for_bench(zm: zoo.ZooModel, mode: str = "auto",
                            ) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Compiles ``zm`` with Ember for CPU; returns (callable -> list of tensors, info)."""
    import ember

    cm = ember.compile(zm.model, zm.example_inputs, target="cpu",
                       dynamic_dims=zm.dynamic_dims, input_names=zm.input_names,
                       backend_options={"mode": mode})
    info = {"backend": cm.backend, "pipeline": cm.pipeline,
            "program": dict(getattr(cm.program, "info", {})),
            "ops": cm.graph.op_counts()}
    return cm.run, info


def make_eager(zm: zoo.ZooModel) -> Callable[..., Any]:
    def run(*xs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return zm.model(*xs)
    return run


def make_inductor(zm: zoo.ZooModel) -> Callable[..., Any]:
    compiled = torch.compile(zm.model)

    def run(*xs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return compiled(*xs)
    return run


class _Positional(torch.nn.Module):
    """Calls the model with positional inputs and returns a flat tuple of tensors (the
    TorchScript ONNX exporter cannot bind HF keyword-heavy forwards by itself)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flat_tensors(self.model(*xs)))


def make_ort(zm: zoo.ZooModel, workdir: Path) -> Callable[..., Any]:
    import onnxruntime as ort

    path = workdir / f"{zm.name}.onnx"
    with torch.no_grad():
        torch.onnx.export(_Positional(zm.model), tuple(zm.example_inputs), str(path), dynamo=False,
                          opset_version=17, input_names=list(zm.input_names),
                          do_constant_folding=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*xs: torch.Tensor) -> Any:
        feed = {n: x.numpy() for n, x in zip(names, xs) if n in names}
        return [torch.from_numpy(o) for o in sess.run(None, feed)]
    return run


# ----------------------------------------------------------------------------- timing
def time_interleaved(runners: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int, settle_s: float = 0.05,
                     timed_by_runner: bool = False) -> dict[str, float]:
    """Median ms per runner; each round calls every runner once, in a fresh (seeded) random
    order. A runtime's idle threads keep spinning for a while after its call (ONNX Runtime's
    workers, OpenMP's), slowing whatever runs next: with a rotating order one runner follows
    the same neighbour in most rounds; a random order spreads that over all runners alike.
    ``settle_s`` of idle time before each timed call lets the previous runner's workers go
    back to sleep, so each call sees the machine as a process running only that model would
    (ResNet-50: Ember's ORT session with sleeping workers took 60 ms alone and 74 ms when
    interleaved back to back with the spinning ORT baseline). With ``timed_by_runner`` a
    runner returns its own ms (measured inside its process, without the pipe's latency)."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(repeats):
        order = rng.sample(names, len(names))
        for n in order:
            time.sleep(settle_s)
            t0 = time.perf_counter()
            ms = runners[n]()
            samples[n].append(ms if timed_by_runner else (time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(s) for n, s in samples.items()}


def _build_runner(name: str, zm: zoo.ZooModel, workdir: Path, ember_mode: str,
                  ) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(callable on the example inputs, info) for one contender."""
    if name == "eager":
        return make_eager(zm), {}
    if name == "inductor":
        return make_inductor(zm), {}
    if name == "ort":
        return make_ort(zm, workdir), {}
    if name == "ember":
        return ember_compile_for_bench(zm, ember_mode)
    if name.startswith("ember@"):  # one forced CPU program: what "auto" chose among
        return ember_compile_for_bench(zm, name.split("@", 1)[1])
    raise ValueError(f"unknown runner {name}")


def _failure(e: Exception) -> str:
    """One line naming why a runner could not be built or run."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def _worker(case_key: str, name: str, workdir: str, ember_mode: str, conn: Any) -> None:
    """One contender alone in its process: builds it, answers 'out' with its outputs and
    'run' with the ms of one call (blocked on the pipe, i.e. idle, while the others run)."""
    torch.set_num_threads(THREADS)
    zm = CASES[case_key].make()
    xs = tuple(zm.example_inputs)
    try:
        t0 = time.perf_counter()
        fn, info = _build_runner(name, zm, Path(workdir), ember_mode)
        out = [t.detach().numpy() for t in flat_tensors(fn(*xs))]  # first call compiles
        conn.send(("ok", {"out": out, "info": info,
                          "compile_s": round(time.perf_counter() - t0, 1)}))
    except Exception as e:  # a baseline that cannot run this model is reported, not fatal
        conn.send(("failed", _failure(e)))
        return
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            return
        t0 = time.perf_counter()
        fn(*xs)
        conn.send((time.perf_counter() - t0) * 1e3)


EMBER_PROGRAMS = ("aoti", "eager", "onnxruntime")


def bench_case(case: Case, repeats: int, warmup: int, workdir: Path,
               skip: set[str], ember_mode: str = "auto", isolate: bool = True,
               regret: bool = False) -> dict[str, Any]:
    """Times every contender on ``case``. With ``isolate`` each runs in its own process (as a
    user's would: no other runtime's thread pool, allocator or spinning workers beside it)
    and the parent drives them in interleaved rounds; otherwise all share this process."""
    res: dict[str, Any] = {"case": case.key, "title": case.title, "ms": {}, "error": {},
                           "compile_s": {}, "notes": {},
                           "isolation": "process per runner" if isolate else "one process"}
    zm = case.make()
    xs = tuple(zm.example_inputs)
    want = flat_tensors(make_eager(zm)(*xs))
    names = [n for n in ("eager", "inductor", "ort", "ember") if n == "eager" or n not in skip]
    if regret:  # every program Ember could have shipped, each compiled and timed on its own
        names += [f"ember@{m}" for m in EMBER_PROGRAMS]
    runners: dict[str, Callable[[], Any]] = {}
    procs = []
    ctx = mp.get_context("spawn")
    try:
        for name in names:
            if isolate:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(case.key, name, str(workdir), ember_mode,
                                                      child), daemon=True)
                p.start()
                procs.append((p, parent))
                status, payload = parent.recv()
                if status != "ok":
                    res["notes"][name] = f"failed: {payload}"
                    print(f"  {name}: {res['notes'][name]}", flush=True)
                    continue
                got = [torch.from_numpy(a) for a in payload["out"]]
                info, res["compile_s"][name] = payload["info"], payload["compile_s"]

                def call(conn: Any = parent) -> float:
                    conn.send("run")
                    return float(conn.recv())
                runners[name] = call
            else:
                t0 = time.perf_counter()
                try:
                    fn, info = _build_runner(name, zm, workdir, ember_mode)
                    got = flat_tensors(fn(*xs))
                except Exception as e:  # noqa: BLE001
                    res["notes"][name] = f"failed: {_failure(e)}"
                    print(f"  {name}: {res['notes'][name]}", flush=True)
                    continue
                res["compile_s"][name] = round(time.perf_counter() - t0, 1)
                runners[name] = lambda fn=fn: fn(*xs)
            err = rel_error(got[:1], want[:1])
            res["error"][name] = err
            if name.startswith("ember@"):
                res.setdefault("programs", {})[name] = info.get("program", {}).get("kind")
            if name == "ember":
                res["ember_info"] = info
                if not err <= 1e-3:
                    raise SystemExit(f"{case.key}: Ember output differs from eager "
                                     f"(rel err {err:.2e})")
        res["ms"] = time_interleaved(runners, repeats, warmup, timed_by_runner=isolate)
    finally:
        for p, conn in procs:
            if p.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):  # it may exit meanwhile
                    conn.send("stop")
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    del runners
    gc.collect()
    return res


# ----------------------------------------------------------------------------- report
BASELINES = ("eager", "inductor", "ort")


def table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| model | eager ms | torch.compile ms | ORT ms | Ember ms | vs eager | "
            "vs compile | vs ORT | vs best | Ember kind |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    gm: dict[str, list[float]] = {b: [] for b in (*BASELINES, "best")}
    for r in results:
        ms = r["ms"]
        e = ms.get("ember")
        cells = [r["title"]] + [f"{ms[b]:.2f}" if b in ms else "n/a"
                                for b in (*BASELINES, "ember")]
        best = min((ms[b] for b in BASELINES if b in ms), default=None)
        for b in BASELINES:
            if e and b in ms:
                cells.append(f"{ms[b] / e:.2f}x")
                gm[b].append(ms[b] / e)
            else:
                cells.append("n/a")
        if e and best:
            cells.append(f"**{best / e:.2f}x**")
            gm["best"].append(best / e)
        else:
            cells.append("n/a")
        cells.append(str(r.get("ember_info", {}).get("program", {}).get("kind", "n/a")))
        lines.append("| " + " | ".join(cells) + " |")
    geo = ["**geomean**", "", "", "", ""]
    for b in (*BASELINES, "best"):
        v = gm[b]
        geo.append(f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x" if v else "n/a")
    geo.append("")
    lines.append("| " + " | ".join(geo) + " |")
    return "\n".join(lines)


def regret_table(results: Sequence[dict[str, Any]]) -> str:
    """Ember's shipped program vs the fastest of the programs it chose among, timed in the
    same rounds (regret = shipped / fastest - 1; the target is <= 10%)."""
    lines = ["| model | " + " | ".join(f"{m} ms" for m in EMBER_PROGRAMS)
             + " | shipped | shipped ms | regret |", "|---|" + "---:|" * len(EMBER_PROGRAMS)
             + "---|---:|---:|"]
    for r in results:
        ms = r["ms"]
        cand = {m: ms.get(f"ember@{m}") for m in EMBER_PROGRAMS}
        got = [v for v in cand.values() if v]
        e = ms.get("ember")
        kind = r.get("ember_info", {}).get("program", {}).get("kind", "n/a")
        reg = f"{e / min(got) - 1:+.1%}" if e and got else "n/a"
        tail = f" | {kind} | {e:.2f} | {reg} |" if e else " | n/a | n/a | n/a |"
        lines.append(f"| {r['title']} | " + " | ".join(f"{v:.2f}" if v else "n/a"
                                                     for v in cand.values()) + tail)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(CASES),
                    help=f"comma-separated cases: {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per runner (>= 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip", default="", help="runners to skip: inductor,ort,ember")
    ap.add_argument("--json", dest="json_out", default=None, help="write results here")
    ap.add_argument("--ember-mode", default="auto",
                    help="Ember CPU program: auto (time every candidate) or one of aoti, eager, "
                         "onnxruntime (skips building the others)")
    ap.add_argument("--regret", action="store_true",
                    help="also time each CPU program Ember could ship (aoti, eager, "
                         "onnxruntime) and report the regret of its choice")
    ap.add_argument("--in-process", action="store_true",
                    help="run every contender in this one process (default: a process each)")
    ap.add_argument("--table-from", default=None, help="only print the table of a --json file")
    args = ap.parse_args(argv)
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())))
        return 0
    torch.set_num_threads(THREADS)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(CASES)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_zoo_") as tmp:
        for k in keys:
            print(f"== {CASES[k].title}", flush=True)
            r = bench_case(CASES[k], max(1, args.repeats), args.warmup, Path(tmp), skip,
                           args.ember_mode, isolate=not args.in_process, regret=args.regret)
            print("  ms: " + ", ".join(f"{n} {v:.2f}" for n, v in r["ms"].items())
                  + "  | rel err: " + ", ".join(f"{n} {v:.1e}" for n, v in r["error"].items()),
                  flush=True)
            results.append(r)
            if args.json_out:  # after every case: a long run that is cut short keeps its data
                Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    print()
    where = "all in one process" if args.in_process else "each runner in its own process"
    print(f"torch {torch.__version__}, {THREADS} threads, median of {args.repeats} interleaved "
          f"runs after {args.warmup} warm-up rounds, {where}")
    print()
    print(table(results))
    if args.regret:
        print()
        print(regret_table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
