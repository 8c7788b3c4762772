"""The accuracy-budget planner: the fastest pass pipeline whose measured accuracy drop fits.

    plan(model, example_inputs, max_drop=0.01, calib=(inputs, labels))
      -> search knobs of the approximate passes (quantize, sparsify, merge_tokens,
         prune_tokens, skip_layers) to minimise PREDICTED latency (the cost model on the
         rewritten graph at the calibration shapes) subject to the MEASURED drop of a fidelity
         metric on a search split of the calibration data <= max_drop
      -> verify the choice on a held-out split the search never saw, and time the compiled
         result against the fp32 compile.

Search (predictions are cheap, measurements are not):

1. Sweep: every knob setting of every pass family is applied alone to the base pipeline's graph
   and its latency predicted. Within a family, candidates are measured fastest first, and only
   while they are predicted faster than the family's best accepted one (so at most one
   acceptance per family) and than the base graph.
2. Compose: starting from the fastest accepted candidate, the other families' survivors are
   added greedily (largest predicted gain first). When a composition breaks the budget, the
   family's less aggressive settings are tried in turn, as long as the composition is still
   predicted faster than the incumbent.
3. Verify: the incumbent's drop is measured on the held-out split; if it breaks the budget
   there, the next-fastest accepted candidate is verified, down to the base pipeline. Then the
   chosen and base graphs are compiled for the target and timed interleaved; a choice measured
   more than `SLOWER_MARGIN` slower than the base is dropped for the base pipeline (the
   reference target is timed and reported, not gated: nobody ships the interpreter for speed).

The metric is task accuracy (argmax of the first output) when labels are given; without labels,
top-1 agreement with the fp32 outputs for classifier-shaped outputs ``[B, C]``, else the mean
cosine similarity over the last dim (embeddings, hidden states); or a callable
``metric(outputs, reference_outputs, labels) -> score`` evaluated per batch (higher is better).
The drop is ``score(fp32) - score(candidate)``. Every candidate tried lands in `Plan.records`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CompilerError
from .ir import Graph
from .passmanager import PassContext, PassManager, PassStep, format_pipeline, parse_pipeline
from .progress import Progress

__all__ = ["plan", "Plan", "CandidateRecord", "default_space", "FAMILY_ORDER", "MetricFn"]

log = logging.getLogger(__name__)

# where each approximate pass goes in a composed pipeline: structural token/block rewrites
# first (they match transformer blocks on the float graph), weight rewrites last
FAMILY_ORDER = ("skip_layers", "prune_tokens", "merge_tokens", "sparsify", "quantize")

# a chosen plan measured this much slower than the base pipeline on the target is not shipped
# (the noise of interleaved best-of-rounds timing on a shared 2-core machine is a few percent)
SLOWER_MARGIN = 0.03

MetricFn = Callable[[list[torch.Tensor], list[torch.Tensor], "torch.Tensor | None"], float]
Batch = tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CandidateRecord:
    """One candidate the planner looked at.

    Attributes:
        stage: "baseline", "sweep", "compose" or "verify".
        pipeline: the full pipeline text (base + approximate steps).
        steps: the approximate steps alone.
        predicted_ms: the cost model's latency at the calibration shapes (None: not built).
        drop: measured metric drop on the split named by ``split`` (None: not measured).
        decision: "accepted", "rejected", "skipped" or "error".
        reason: why, in words.
        seconds: wall time spent on this candidate (passes + prediction + measurement).
    """

    stage: str
    pipeline: str
    steps: tuple[str, ...]
    predicted_ms: float | None
    drop: float | None
    decision: str
    reason: str
    split: str = "search"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "pipeline": self.pipeline, "steps": list(self.steps),
                "predicted_ms": _r(self.predicted_ms), "drop": _r(self.drop, 6),
                "decision": self.decision, "reason": self.reason, "split": self.split,
                "seconds": round(self.seconds, 3)}


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


@dataclass
class Plan:
    """The planner's result: the chosen pipeline, its verified drop and speed, every candidate.

    ``graph`` is the chosen pipeline's rewritten graph and ``pass_calib`` the calibration
    batches its passes saw (compile with them to rebuild the same graph); neither is
    serialized.
    """

    pipeline: str
    base: str
    steps: list[str]
    metric: str
    max_drop: float
    target: str
    device: str
    seed: int
    baseline_score: float
    score: float
    search_drop: float
    heldout_drop: float
    predicted_ms: float
    baseline_predicted_ms: float
    measured_ms: float | None
    baseline_measured_ms: float | None
    latency_backend: str | None
    n_search: int
    n_heldout: int
    search_s: float
    verify_s: float
    records: list[CandidateRecord] = field(default_factory=list)
    graph: Graph | None = None
    stopped_early: str = ""
    pass_calib: list[Batch] = field(default_factory=list)
    # the cost model at the timed batch (the held-out split's first; the search ranks at
    # the search split's first, which may be shaped otherwise): base and chosen, ms
    timed_predicted_ms: tuple[float, float] | None = None
    timed_shape: list[list[int]] | None = None
    # the chosen graph's program as compiled for the timing (not serialized): ember.compile
    # ships it when its own rewrite of the source is the same graph (`same_graph`)
    program: Any = None

    @property
    def within_budget(self) -> bool:
        return self.heldout_drop <= self.max_drop + 1e-12

    @property
    def speedup(self) -> float | None:
        if not self.measured_ms or not self.baseline_measured_ms:
            return None
        return self.baseline_measured_ms / self.measured_ms

    @property
    def predicted_speedup(self) -> float:
        return self.baseline_predicted_ms / self.predicted_ms if self.predicted_ms else 1.0

    @property
    def candidates_measured(self) -> int:
        return sum(1 for r in self.records if r.drop is not None and r.stage != "verify")

    def to_json(self) -> dict[str, Any]:
        """The manifest record (``CompiledModel.records["planner"]``)."""
        return {
            "pipeline": self.pipeline, "base": self.base, "steps": self.steps,
            "metric": self.metric, "max_drop": self.max_drop, "target": self.target,
            "device": self.device, "seed": self.seed,
            "baseline_score": _r(self.baseline_score, 6), "score": _r(self.score, 6),
            "search_drop": _r(self.search_drop, 6), "heldout_drop": _r(self.heldout_drop, 6),
            "within_budget": self.within_budget,
            "predicted_ms": _r(self.predicted_ms), "baseline_predicted_ms":
                _r(self.baseline_predicted_ms), "predicted_speedup": _r(self.predicted_speedup),
            "measured_ms": _r(self.measured_ms), "baseline_measured_ms":
                _r(self.baseline_measured_ms), "speedup": _r(self.speedup),
            "latency_backend": self.latency_backend,
            "timed_shape": self.timed_shape,
            "timed_predicted_ms": None if self.timed_predicted_ms is None else
                [_r(v) for v in self.timed_predicted_ms],
            "n_search": self.n_search, "n_heldout": self.n_heldout,
            "candidates": len(self.records), "candidates_measured": self.candidates_measured,
            "search_s": round(self.search_s, 2), "verify_s": round(self.verify_s, 2),
            "stopped_early": self.stopped_early,
            "records": [r.to_json() for r in self.records],
        }

    def summary(self) -> str:
        """A readable account: the choice, its verification, and the candidate table."""
        sp = f"{self.speedup:.2f}x" if self.speedup else "not measured"
        lines = [
            f"chosen: {self.pipeline}",
            f"  metric {self.metric}: fp32 {self.baseline_score:.4f}, chosen {self.score:.4f} "
            f"on {self.n_heldout} held-out samples; drop {self.heldout_drop:+.4f} "
            f"(search split {self.search_drop:+.4f}), budget {self.max_drop:.4f} -> "
            f"{'OK' if self.within_budget else 'OVER BUDGET'}",
            f"  predicted {self.baseline_predicted_ms:.3f} -> {self.predicted_ms:.3f} ms "
            f"({self.predicted_speedup:.2f}x) on {self.device}; measured speedup {sp}"
            + (f" ({self.baseline_measured_ms:.3f} -> {self.measured_ms:.3f} ms, "
               f"{self.latency_backend} backend)" if self.speedup else "")
            + (f"; predicted at the timed shape {self.timed_shape}: "
               f"{self.timed_predicted_ms[0]:.3f} -> {self.timed_predicted_ms[1]:.3f} ms"
               if self.speedup and self.timed_predicted_ms else ""),
            f"  {len(self.records)} candidates, {self.candidates_measured} measured, "
            f"search {self.search_s:.1f}s, verify {self.verify_s:.1f}s"
            + (f"; stopped early: {self.stopped_early}" if self.stopped_early else ""),
            "",
            f"{'stage':8s} {'decision':9s} {'pred ms':>9s} {'drop':>8s}  steps / reason",
        ]
        for r in self.records:
            pred = f"{r.predicted_ms:9.3f}" if r.predicted_ms is not None else f"{'-':>9s}"
            drop = f"{r.drop:+8.4f}" if r.drop is not None else f"{'-':>8s}"
            lines.append(f"{r.stage:8s} {r.decision:9s} {pred} {drop}  "
                         f"{','.join(r.steps) or '(base)'}: {r.reason}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- search space
def default_space(g: Graph, target: str = "cpu", has_calib: bool = True) -> dict[str, list[str]]:
    """Knob settings per pass family for graph ``g`` (step texts, e.g. "quantize{scheme=w8}").

    Token and layer knobs are sized from the transformer blocks `find_blocks` sees in ``g``;
    graphs without blocks get only the weight passes. Quantization is swept over schemes and,
    with calibration data, the pass's per-layer sensitivity fallback (a layer whose output
    cosine drops more than ``max_layer_drop`` alone keeps fp32 or a milder scheme).
    """
    from ember.passes._blocks import find_blocks

    # off-CPU targets cannot time their kernels here: gate the quantizer on the roofline
    gate = "" if target in ("cpu", "reference") else ",gate=predict"
    space: dict[str, list[str]] = {}
    q = [f"quantize{{scheme={s}{gate}}}" for s in ("w8a8-dynamic", "w8", "w4g32", "bf16")]
    if has_calib:
        q += [f"quantize{{scheme=w8a8-dynamic,sensitivity=true,max_layer_drop={d}{gate}}}"
              for d in (0.001, 0.005)]
    space["quantize"] = q
    sp = [f"sparsify{{pattern=channel,ratio={r}}}" for r in (0.25, 0.5, 0.75)]
    if has_calib:
        sp += [f"sparsify{{pattern=channel,ratio={r},method=wanda}}" for r in (0.25, 0.5)]
    sp += ["sparsify{pattern=2:4}", "sparsify{pattern=unstructured,ratio=0.9}"]
    space["sparsify"] = sp
    rep = find_blocks(g)
    if rep.ok and not rep.causal and not rep.parallel:
        nb = len(rep.blocks)
        space["merge_tokens"] = [f"merge_tokens{{ratio={f}}}" for f in (0.1, 0.2, 0.3)] + \
            [f"merge_tokens{{ratio={f},schedule=decreasing}}" for f in (0.25,)]
        pr = [f"prune_tokens{{keep={k},start={max(1, nb // 3)},every={max(1, nb // 3)}}}"
              for k in (0.9, 0.7, 0.5)]
        pr += [f"prune_tokens{{keep={k},layers={nb // 2}}}" for k in (0.7, 0.5, 0.3)]
        space["prune_tokens"] = pr
        if nb > 1 and has_calib:
            space["skip_layers"] = [f"skip_layers{{num_layers={k}}}"
                                    for k in range(1, max(2, nb // 2 + 1))]
            # runs of blocks replaced by linear maps fit on the calibration data; a few
            # run lengths up to half the blocks (each setting tries every run position)
            space["skip_layers"] += [f"skip_layers{{num_layers={k},bridge={b}}}"
                                     for b in ("token", "mean")
                                     for k in sorted({1, max(1, nb // 4), max(1, nb // 3),
                                                      max(1, nb // 2)})]
    return space


def _family(step: PassStep) -> str:
    return step.name


def _order(steps: Sequence[PassStep]) -> list[PassStep]:
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(steps, key=lambda s: rank.get(_family(s), len(rank)))


# ----------------------------------------------------------------------------- calibration data
def _to_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) \
        else torch.as_tensor(a)


def _as_batches(inputs: Any) -> list[Batch]:
    """Calibration inputs as a list of input tuples (each one batch)."""
    if isinstance(inputs, torch.Tensor | np.ndarray):
        return [(_to_tensor(inputs),)]
    if isinstance(inputs, tuple) and inputs and all(isinstance(x, torch.Tensor | np.ndarray)
                                                    for x in inputs):
        return [tuple(_to_tensor(x) for x in inputs)]
    if isinstance(inputs, list | tuple) and inputs:
        return [tuple(_to_tensor(x) for x in b) if isinstance(b, list | tuple)
                else (_to_tensor(b),) for b in inputs]
    raise CompilerError("calib inputs must be a tensor, a tuple of input tensors batched along "
                        "dim 0, or a list of input tuples")


def _labels_per_batch(labels: Any, batches: Sequence[Batch]) -> list[torch.Tensor] | None:
    if labels is None:
        return None
    if isinstance(labels, list | tuple) and len(labels) == len(batches) and len(batches) > 1:
        out = [_to_tensor(x).reshape(-1) for x in labels]
    else:
        flat = _to_tensor(labels if not isinstance(labels, list | tuple)
                          else np.concatenate([np.asarray(x).reshape(-1) for x in labels]))
        sizes = [int(b[0].shape[0]) for b in batches]
        if flat.numel() != sum(sizes):
            raise CompilerError(f"calib labels: {flat.numel()} labels for {sum(sizes)} samples")
        out = list(torch.split(flat.reshape(-1), sizes))
    for lab, b in zip(out, batches):
        if lab.numel() != int(b[0].shape[0]):
            raise CompilerError("calib labels do not match the batch sizes of the inputs")
    return out


def _static_batch(g: Graph) -> int | None:
    """The batch size a graph with a static dim 0 on every input demands (None: symbolic)."""
    sizes = {v.type.shape[0] for v in g.inputs if v.type.rank > 0}
    if sizes and all(isinstance(s, int) for s in sizes) and len(sizes) == 1:
        return int(next(iter(sizes)))
    return None


@dataclass
class _Split:
    batches: list[Batch]
    labels: list[torch.Tensor] | None

    @property
    def n(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)


def split_calib(g: Graph, calib: Any, holdout: float, seed: int,
                batch_size: int = 64) -> tuple[_Split, _Split]:
    """(search, held-out) splits of ``calib = (inputs, labels_or_None)``, deterministic in seed.

    A 2-tuple is always read as (inputs, labels): a two-input model's calibration data is
    ``((ids, mask), None)``. Anything else is inputs without labels.

    Same-shaped samples are pooled, shuffled and re-batched (to the graph's static batch size
    when it has one); batches of differing shapes (padded text) are split whole.
    """
    if isinstance(calib, tuple) and len(calib) == 2:
        inputs, labels = calib
    else:
        inputs, labels = calib, None
    batches = _as_batches(inputs)
    labs = _labels_per_batch(labels, batches)
    gen = torch.Generator().manual_seed(seed)
    same = all(len(b) == len(batches[0]) and all(x.shape[1:] == y.shape[1:]
                                                 for x, y in zip(b, batches[0])) for b in batches)
    static = _static_batch(g)
    if same:
        cat = tuple(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))
        lab = torch.cat(labs) if labs is not None else None
        n = int(cat[0].shape[0])
        perm = torch.randperm(n, generator=gen)
        bs = static or min(batch_size, n)
        n_hold = max(bs, int(round(n * holdout)))
        if n - n_hold < bs:
            raise CompilerError(f"calibration set of {n} samples is too small to split into "
                                f"search and held-out batches of {bs}")

        def chunk(idx: torch.Tensor) -> _Split:
            out: list[Batch] = []
            ls: list[torch.Tensor] = []
            for i in range(0, len(idx), bs):
                j = idx[i:i + bs]
                if static and len(j) != static:
                    log.info("planner: dropping %d samples (graph batch is static %d)",
                             len(j), static)
                    break
                out.append(tuple(x[j] for x in cat))
                if lab is not None:
                    ls.append(lab[j])
            return _Split(out, ls if lab is not None else None)

        return chunk(perm[n_hold:]), chunk(perm[:n_hold])
    if len(batches) < 2:
        raise CompilerError("calibration data of differently shaped batches needs >= 2 batches")
    perm = torch.randperm(len(batches), generator=gen).tolist()
    n_hold = min(len(batches) - 1, max(1, int(round(len(batches) * holdout))))
    hold, search = perm[:n_hold], perm[n_hold:]

    def pick(ix: list[int]) -> _Split:
        return _Split([batches[i] for i in ix], [labs[i] for i in ix] if labs else None)

    return pick(sorted(search)), pick(sorted(hold))


# ----------------------------------------------------------------------------- metrics
def _accuracy(out: list[torch.Tensor], ref: list[torch.Tensor],
              labels: torch.Tensor | None) -> float:
    assert labels is not None
    return float((out[0].argmax(-1).reshape(-1) == labels.reshape(-1)).float().mean())


def _agreement(out: list[torch.Tensor], ref: list[torch.Tensor],
               labels: torch.Tensor | None) -> float:
    return float((out[0].argmax(-1) == ref[0].argmax(-1)).float().mean())


def _cosine(out: list[torch.Tensor], ref: list[torch.Tensor],
            labels: torch.Tensor | None) -> float:
    a, b = out[0].float(), ref[0].float()
    if a.shape != b.shape:
        return 0.0
    if a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).mean())


BUILTIN_METRICS: dict[str, MetricFn] = {"accuracy": _accuracy, "top1_agreement": _agreement,
                                        "cosine": _cosine}


def choose_metric(metric: str | MetricFn | None, g: Graph,
                  has_labels: bool) -> tuple[str, MetricFn]:
    """(name, fn): the user's choice, or accuracy with labels, else by output 0's shape."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric is None or metric == "auto":
        if has_labels:
            metric = "accuracy"
        else:
            out = g.outputs[0].type
            metric = "top1_agreement" if out.rank == 2 and out.dtype.startswith("float") \
                else "cosine"
    if metric not in BUILTIN_METRICS:
        raise CompilerError(f"unknown metric '{metric}': accuracy, top1_agreement, cosine or "
                            f"a callable(outputs, reference, labels) -> score")
    if metric == "accuracy" and not has_labels:
        raise CompilerError("metric 'accuracy' needs labels: calib=(inputs, labels)")
    return str(metric), BUILTIN_METRICS[str(metric)]


# ----------------------------------------------------------------------------- the planner
@dataclass
class _Cand:
    steps: tuple[PassStep, ...]
    graph: Graph | None
    pred: float
    drop: float | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(str(s) for s in self.steps)


class _Search:
    """State of one planning run (graphs, cached evaluations, the records)."""

    def __init__(self, g0: Graph, base: str, search: _Split, held: _Split, metric: MetricFn,
                 target: str, device: Any, runtime: str, seed: int, pr: Progress,
                 deadline: float | None, calib_batches: int,
                 example: Sequence[torch.Tensor] | None) -> None:
        from ember import cost_models
        from ember.ir import run_graph

        self.run_graph = run_graph
        self.cm = cost_models
        self.g0 = g0
        self.base_steps = parse_pipeline(base)
        self.search, self.held = search, held
        self.metric = metric
        self.target, self.device, self.runtime, self.seed = target, device, runtime, seed
        self.pr = pr
        self.deadline = deadline
        self.records: list[CandidateRecord] = []
        self.graphs: dict[tuple[str, ...], Graph | Exception] = {}
        self.pass_records: dict[tuple[str, ...], dict[str, Any]] = {}
        self.programs: dict[str, Any] = {}  # compiled for the latency check
        # shapes for the predictions: the calibration batch; for the passes (quantize gates
        # on the GEMM rows): the compile's example inputs, as ember.compile will use them
        self.example = list(search.batches[0])
        self.pass_example = list(example) if example else self.example
        self.pass_calib = list(search.batches[:calib_batches])
        self.pass_labels = search.labels[:calib_batches] if search.labels else None
        self.ref_search = self._outputs(g0, search)
        self.ref_held = self._outputs(g0, held)
        self.g_base = self._run_passes(g0, self.base_steps)
        self.stopped = ""

    # -- building and measuring
    def _run_passes(self, g: Graph, steps: Sequence[PassStep]) -> Graph:
        from .targets import pass_context_fields

        ctx = PassContext(target=self.target, calib=self.pass_calib, labels=self.pass_labels,
                          seed=self.seed, **pass_context_fields(self.target, self.pass_example))
        torch.manual_seed(self.seed)
        out = PassManager(list(steps)).run(g, ctx)
        self.pass_records[tuple(str(s) for s in steps)] = dict(ctx.records)
        return out

    def why_unchanged(self, steps: Sequence[PassStep]) -> str:
        """The passes' own account of leaving the graph as it was (their records)."""
        parts = []
        for name, rec in self.pass_records.get(tuple(str(s) for s in steps), {}).items():
            if not isinstance(rec, dict):
                continue
            gate = rec.get("model_gate") or {}
            if rec.get("reason"):
                parts.append(f"{name}: {rec['reason']}")
            elif str(gate.get("decision", "")).startswith("fp32"):
                parts.append(f"{name}: {gate['decision'][len('fp32: '):]}")
            elif "quantized" in rec and "candidates" in rec:
                text = f"{name}: {rec['quantized']}/{rec['candidates']} layers rewritten"
                reasons = sorted({str(x["reason"]) for x in rec.get("layers") or []
                                  if isinstance(x, dict) and x.get("reason")})
                if reasons and not rec["quantized"]:
                    text += f" ({reasons[0][:80]}{', ...' if len(reasons) > 1 else ''})"
                parts.append(text)
        return "; ".join(parts)

    def build(self, steps: Sequence[PassStep]) -> Graph:
        key = tuple(str(s) for s in steps)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._run_passes(self.g_base, steps) if steps else self.g_base
            except Exception as e:  # noqa: BLE001  (a knob that does not apply is a record)
                self.graphs[key] = e
        out = self.graphs[key]
        if isinstance(out, Exception):
            raise out
        return out

    def predict(self, g: Graph, example: Sequence[torch.Tensor] | None = None) -> float:
        return float(self.cm.predict_latency_ms(g, self.device, example or self.example,
                                                runtime=self.runtime))

    def _outputs(self, g: Graph, split: _Split) -> list[list[torch.Tensor]]:
        return [list(self.run_graph(g, *b)) for b in split.batches]

    def score(self, g: Graph, split: _Split, ref: list[list[torch.Tensor]] | None = None,
              outs: list[list[torch.Tensor]] | None = None) -> float:
        ref = ref if ref is not None else (self.ref_search if split is self.search
                                           else self.ref_held)
        outs = outs if outs is not None else self._outputs(g, split)
        tot, n = 0.0, 0
        for i, (o, r) in enumerate(zip(outs, ref)):
            w = int(split.batches[i][0].shape[0])
            lab = split.labels[i] if split.labels is not None else None
            tot += float(self.metric(o, r, lab)) * w
            n += w
        return tot / max(n, 1)

    def pipeline(self, steps: Sequence[PassStep]) -> str:
        return format_pipeline([*self.base_steps, *steps])

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def add(self, stage: str, steps: Sequence[PassStep], pred: float | None, drop: float | None,
            decision: str, reason: str, t0: float, split: str = "search") -> None:
        rec = CandidateRecord(stage, self.pipeline(steps), tuple(str(s) for s in steps), pred,
                              drop, decision, reason, split, time.perf_counter() - t0)
        self.records.append(rec)
        ps = f"{pred:.3f} ms" if pred is not None else "-"
        ds = f", drop {drop:+.4f}" if drop is not None else ""
        self.pr.note(f"planner [{stage}] {','.join(rec.steps) or '(base)'}: predicted {ps}"
                     f"{ds} -> {decision} ({reason})")



def _cpu_runtime() -> str:
    """What the CPU backend ships in practice: ONNX Runtime when it is installed (its candidate
    won on every measured model), so plans are ranked with that runtime's cost model."""
    import importlib.util

    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "inductor"

def plan(
    model_or_graph: Any,
    example_inputs: Sequence[Any] | None = None,
    *,
    max_drop: float,
    calib: Any,
    metric: str | MetricFn | None = None,
    target: str = "cpu",
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: bool = True,
    base: str = "O2",
    space: Mapping[str, Sequence[str]] | None = None,
    holdout: float = 0.5,
    dynamic_dims: Any = None,
    input_names: Sequence[str] | None = None,
    min_gain: float = 0.02,
    compose_tries: int = 3,
    calib_batches: int = 4,
    measure_latency: bool = True,
    backend_options: Mapping[str, Any] | None = None,
) -> Plan:
    """Searches approximate-pass knobs for the lowest predicted latency within ``max_drop``.

    Args:
        model_or_graph: an Ember `Graph`, or anything `ember.compile` accepts.
        example_inputs: example inputs for importing a module (see `ember.compile`).
        max_drop: the largest allowed metric drop against fp32 (0.01 = one point).
        calib: ``(inputs, labels_or_None)``; inputs are a tensor / tuple of tensors batched
            along dim 0, or a list of input tuples. Split into search and held-out parts.
        metric: "accuracy", "top1_agreement", "cosine", a callable
            ``(outputs, reference_outputs, labels) -> score`` per batch, or None (automatic).
        target: the compile target; picks the cost model device and the timing backend.
        seed: the split, the pass randomness and hence the whole plan are deterministic in it.
        time_budget_s: stop searching after this long (verification still runs).
        progress: print one line per candidate on stderr.
        base: the exact pipeline every candidate starts from.
        space: knob settings per family ({"quantize": ["quantize{scheme=w8}"], ...});
            default: `default_space`.
        holdout: fraction of the calibration samples kept for verification.
        min_gain: a candidate is measured only if predicted at least this much faster (as a
            fraction) than the one it would replace.
        compose_tries: milder settings tried per family when a composition breaks the budget.
        calib_batches: search batches handed to passes that calibrate (statistics, wanda).
        measure_latency: compile the chosen and base graphs for ``target`` and time them.
        backend_options: passed to the backend's compile for the timing.
    """
    from .frontends import import_model
    from .targets import DEVICE_OF_TARGET, TARGETS

    if target not in TARGETS:
        raise CompilerError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    if not (max_drop >= 0 and math.isfinite(max_drop)):
        raise CompilerError(f"max_drop must be a finite fraction >= 0, got {max_drop}")
    if calib is None:
        raise CompilerError("the planner needs calibration data: calib=(inputs, labels or None)")
    t_start = time.perf_counter()
    pr = Progress(progress)
    g0 = model_or_graph if isinstance(model_or_graph, Graph) else import_model(
        model_or_graph, example_inputs, dynamic_dims, input_names)
    search, held = split_calib(g0, calib, holdout, seed)
    name, fn = choose_metric(metric, g0, search.labels is not None)
    device = DEVICE_OF_TARGET.get(target, "cpu")
    runtime = _cpu_runtime() if target == "cpu" else (
        "eager" if target == "reference" else "inductor")
    deadline = t_start + time_budget_s if time_budget_s is not None else None
    pr.note(f"planner: {search.n} search / {held.n} held-out samples, metric {name}, "
            f"max drop {max_drop}, device {device}")
    example = [_to_tensor(a) for a in example_inputs] if example_inputs is not None else None
    st = _Search(g0, base, search, held, fn, target, device, runtime, seed, pr, deadline,
                 calib_batches, example)
    ref_score = st.score(g0, search, outs=st.ref_search)
    t0 = time.perf_counter()
    base_pred = st.predict(st.g_base)
    base_drop = ref_score - st.score(st.g_base, search)
    baseline = _Cand((), st.g_base, base_pred, base_drop)
    st.add("baseline", (), base_pred, base_drop, "accepted", "the exact base pipeline", t0)

    steps_by_family = _space_steps(space if space is not None else default_space(
        st.g_base, target, has_calib=True))
    accepted: list[_Cand] = [baseline]
    survivors = _sweep(st, steps_by_family, baseline, max_drop, min_gain, ref_score, accepted)
    incumbent = min(accepted, key=lambda c: c.pred)
    incumbent = _compose(st, survivors, incumbent, max_drop, min_gain, ref_score, accepted,
                         compose_tries)
    search_s = time.perf_counter() - t_start

    # verify on the held-out split, walking back to milder accepted candidates if needed
    t_verify = time.perf_counter()
    ref_held_score = st.score(g0, held, outs=st.ref_held)
    chosen, held_drop = baseline, math.nan
    order = sorted({c.key: c for c in accepted}.values(), key=lambda c: (c.pred, len(c.steps)))
    for cand in order:
        t0 = time.perf_counter()
        g = st.build(cand.steps)
        d = ref_held_score - st.score(g, held)
        ok = d <= max_drop + 1e-12 or not cand.steps
        st.add("verify", cand.steps, cand.pred, d, "accepted" if ok else "rejected",
               f"held-out drop {d:+.4f} {'<=' if ok else '>'} {max_drop}" if cand.steps
               else "the base pipeline (exact)", t0, split="heldout")
        if ok:
            chosen, held_drop = cand, d
            break
    g_chosen = st.build(chosen.steps)
    measured = base_measured = None
    lat_backend = None
    if measure_latency:
        lat_backend, base_measured, measured = _time_compiled(
            st, st.g_base, g_chosen, target, held.batches[0], backend_options, pr)
        slower = (chosen.steps and measured is not None and base_measured is not None
                  and measured > base_measured * (1 + SLOWER_MARGIN))
        if slower and lat_backend == target and target != "reference":
            # the prediction was wrong on this machine: never ship a plan measured slower
            t0 = time.perf_counter()
            st.add("latency", chosen.steps, chosen.pred, held_drop, "rejected",
                   f"measured {measured:.3f} ms on {lat_backend} vs the base's "
                   f"{base_measured:.3f} ms (> {SLOWER_MARGIN:.0%} slower): shipping the base "
                   "pipeline", t0, split="heldout")
            chosen, g_chosen, measured = baseline, st.g_base, base_measured
            st.programs["chosen"] = st.programs.get("base")
            held_drop = ref_held_score - st.score(st.g_base, held)
    verify_s = time.perf_counter() - t_verify
    timed_pred = timed_shape = None
    if measured is not None:
        timed = list(held.batches[0])
        timed_shape = [list(t.shape) for t in timed]
        try:
            timed_pred = (st.predict(st.g_base, timed), st.predict(g_chosen, timed))
        except Exception as e:  # noqa: BLE001  (a report line, never a failed compile)
            log.info("planner: no prediction at the timed shape (%s)", _short(e))
    result = Plan(
        pipeline=st.pipeline(chosen.steps), base=format_pipeline(st.base_steps),
        steps=[str(s) for s in chosen.steps], metric=name, max_drop=max_drop, target=target,
        device=str(device), seed=seed, baseline_score=ref_held_score,
        score=ref_held_score - held_drop, search_drop=chosen.drop or 0.0,
        heldout_drop=held_drop, predicted_ms=chosen.pred, baseline_predicted_ms=base_pred,
        measured_ms=measured, baseline_measured_ms=base_measured, latency_backend=lat_backend,
        n_search=search.n, n_heldout=held.n, search_s=search_s, verify_s=verify_s,
        records=st.records, graph=g_chosen, stopped_early=st.stopped,
        pass_calib=st.pass_calib, timed_predicted_ms=timed_pred, timed_shape=timed_shape,
        program=st.programs.get("chosen"))
    pr.note("planner: " + result.summary().splitlines()[0])
    log.info("planner:\n%s", result.summary())
    return result


def _space_steps(space: Mapping[str, Sequence[str]]) -> dict[str, list[PassStep]]:
    out: dict[str, list[PassStep]] = {}
    for fam, texts in space.items():
        steps: list[PassStep] = []
        for t in texts:
            parsed = parse_pipeline(t)
            if len(parsed) != 1:
                raise CompilerError(f"planner space entry '{t}' must be one pass step")
            steps.append(parsed[0])
        out[fam] = steps
    return out


def _measure(st: _Search, stage: str, steps: Sequence[PassStep], pred: float, t0: float,
             max_drop: float, ref_score: float, g: Graph) -> _Cand | None:
    d = ref_score - st.score(g, st.search)
    ok = d <= max_drop + 1e-12
    st.add(stage, steps, pred, d, "accepted" if ok else "rejected",
           f"search drop {d:+.4f} {'<=' if ok else '>'} {max_drop}", t0)
    return _Cand(tuple(steps), g, pred, d) if ok else None


def _sweep(st: _Search, families: Mapping[str, list[PassStep]], baseline: _Cand,
           max_drop: float, min_gain: float, ref_score: float,
           accepted: list[_Cand]) -> dict[str, list[_Cand]]:
    """Single-pass sweeps; returns per family its candidates predicted faster than the base,
    fastest first, the accepted one (if any) marked by a measured drop."""
    ladders: dict[str, list[_Cand]] = {}
    for fam, steps in families.items():
        built: list[_Cand] = []
        for s in steps:
            t0 = time.perf_counter()
            if st.out_of_time():
                st.stopped = st.stopped or "time budget"
                st.add("sweep", [s], None, None, "skipped", "time budget exhausted", t0)
                continue
            try:
                g = st.build([s])
                pred = st.predict(g)
            except Exception as e:  # noqa: BLE001
                st.add("sweep", [s], None, None, "error", _short(e), t0)
                continue
            if pred >= baseline.pred * (1 - min_gain):
                unchanged = g is st.g_base or len(g.nodes) == len(
                    st.g_base.nodes) and g.param_bytes() == st.g_base.param_bytes()
                why = f"not predicted faster than the base ({pred:.3f} vs {baseline.pred:.3f} ms)"
                if unchanged:
                    own = st.why_unchanged([s])
                    why = "graph unchanged" + (f": {own}" if own else "")
                st.add("sweep", [s], pred, None, "skipped", why, t0)
                continue
            built.append(_Cand((s,), g, pred))
        built.sort(key=lambda c: (c.pred, str(c.steps[0])))
        best: _Cand | None = None
        for c in built:
            t0 = time.perf_counter()
            if best is not None:
                st.add("sweep", c.steps, c.pred, None, "skipped",
                       f"not faster than accepted {c.steps[0].name} setting "
                       f"({best.pred:.3f} ms)", t0)
                continue
            if st.out_of_time():
                st.stopped = st.stopped or "time budget"
                st.add("sweep", c.steps, c.pred, None, "skipped", "time budget exhausted", t0)
                continue
            assert c.graph is not None
            got = _measure(st, "sweep", c.steps, c.pred, t0, max_drop, ref_score, c.graph)
            if got is not None:
                best = got
                accepted.append(got)
                c.drop = got.drop
            else:
                c.drop = math.inf
        if best is not None:
            # the ladder for composition: the accepted setting, then milder ones
            ladders[fam] = [c for c in built if c.pred >= best.pred]
    return ladders


def _compose(st: _Search, ladders: Mapping[str, list[_Cand]], incumbent: _Cand,
             max_drop: float, min_gain: float, ref_score: float, accepted: list[_Cand],
             tries: int) -> _Cand:
    """Greedy composition of the families' survivors onto the fastest accepted candidate."""
    if not incumbent.steps:
        return incumbent
    have = {s.name for s in incumbent.steps}
    order = sorted((f for f in ladders if f not in have), key=lambda f: ladders[f][0].pred)
    for fam in order:
        for c in ladders[fam][:tries]:
            t0 = time.perf_counter()
            steps = _order([*incumbent.steps, *c.steps])
            if st.out_of_time():
                st.stopped = st.stopped or "time budget"
                st.add("compose", steps, None, None, "skipped", "time budget exhausted", t0)
                return incumbent
            try:
                g = st.build(steps)
                pred = st.predict(g)
            except Exception as e:  # noqa: BLE001
                st.add("compose", steps, None, None, "error", _short(e), t0)
                break
            if pred >= incumbent.pred * (1 - min_gain):
                st.add("compose", steps, pred, None, "skipped",
                       f"not predicted faster than the incumbent ({incumbent.pred:.3f} ms)", t0)
                break  # milder settings of this family are slower still
            got = _measure(st, "compose", steps, pred, t0, max_drop, ref_score, g)
            if got is not None:
                accepted.append(got)
                incumbent = got
                break
    return incumbent


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {s}"[:240]


def _time_compiled(st: _Search, g_base: Graph, g_chosen: Graph, target: str, batch: Batch,
                   options: Mapping[str, Any] | None,
                   pr: Progress) -> tuple[str | None, float | None, float | None]:
    """(backend, base ms, chosen ms): both graphs compiled for ``target``, timed interleaved.
    The compiled programs are left in ``st.programs`` ("base", "chosen") when ``st`` is a
    search."""
    from ember.backends.registry import get_backend

    be = get_backend(target)
    name = target
    if not be.available().ok:
        log.warning("planner: backend '%s' unavailable here (%s); timing on the reference "
                    "interpreter", target, be.available().reason)
        be, name = get_backend("reference"), "reference"
    example = list(batch)
    try:
        with pr.stage(f"planner: compiling base and chosen graphs for {name} to time them"):
            p_base = be.compile(g_base, example, **dict(options or {}))
            p_chosen = p_base if g_chosen is g_base else be.compile(g_chosen, example,
                                                                   **dict(options or {}))
    except CompilerError as e:
        log.warning("planner: cannot compile for timing (%s)", _short(e))
        return None, None, None
    if st is not None and name == target:
        st.programs = {"base": p_base, "chosen": p_chosen}
    if p_chosen is not p_base and name != "reference":
        # each program alone in its own process, as a user runs it: in one process the
        # runtimes' idle workers (ONNX Runtime's spinning threads) slow whichever runs next
        with pr.stage("planner: timing base and chosen, each in its own process"):
            iso = _time_apart({"base": (g_base, p_base), "chosen": (g_chosen, p_chosen)},
                              name, example)
        if iso is not None:
            return name, iso["base"], iso["chosen"]
    fns = {"base": lambda: p_base(*example)}
    if p_chosen is not p_base:
        fns["chosen"] = lambda: p_chosen(*example)
    with torch.inference_mode():
        times = _interleaved(fns)
        # the best round: on a shared machine, load only ever adds time
        best = {k: min(v) for k, v in times.items()}
        if best.get("chosen", 0.0) > best["base"] * (1 + SLOWER_MARGIN):
            # confirm before a plan is dropped as slower: the first rounds run right after
            # the compiles, whose worker processes may still be winding down
            time.sleep(1.0)
            again = _interleaved(fns, rounds=15)
            best = {k: min(best[k], min(v)) for k, v in again.items()}
    return name, best["base"], best.get("chosen", best["base"])


def same_graph(a: Graph, b: Graph) -> bool:
    """Whether two graphs are the same program: equal IR text (ops, attributes, types, value
    names) and bit-equal weights."""
    from ember.ir.printer import format_graph

    if a is b:
        return True
    if a.weights.keys() != b.weights.keys() or format_graph(a) != format_graph(b):
        return False
    return all(a.weights[k].dtype == b.weights[k].dtype and a.weights[k].shape ==
               b.weights[k].shape and torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def _time_apart(progs: Mapping[str, tuple[Graph, Any]], backend: str,
                example: Sequence[torch.Tensor]) -> dict[str, float] | None:
    """Median ms of each compiled program saved as an artifact and loaded in its own worker
    process (`ember.isolated`), or None when that cannot run here (then the caller times
    in process)."""
    import tempfile

    from .compiled import CompiledModel
    from .isolated import artifact_contenders, time_isolated

    try:
        with tempfile.TemporaryDirectory(prefix="ember_plan_") as work:
            cms = {k: CompiledModel(g, p, target=backend, backend=backend, pipeline="",
                                    records={}) for k, (g, p) in progs.items()}
            res = time_isolated(artifact_contenders(cms, work), list(example), repeats=9)
    except Exception as e:  # noqa: BLE001  (a timing method, never a failed plan)
        log.info("planner: isolated timing unavailable (%s); timing in process", _short(e))
        return None
    if any(r.ms is None for r in res.values()):
        log.info("planner: isolated timing failed (%s); timing in process",
                 "; ".join(f"{k}: {r.error}" for k, r in res.items() if r.error))
        return None
    return {k: float(r.ms) for k, r in res.items()}  # type: ignore[arg-type]


def _interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int = 9,
                 budget_s: float = 4.0) -> dict[str, list[float]]:
    """Per-round wall times in ms, the functions alternating round by round (load drifts on
    a shared machine hit both alike)."""
    for f in fns.values():
        f()
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    one = max(time.perf_counter() - t0, 1e-6)
    rounds = max(3, min(rounds, int(budget_s / one)))
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            s = time.perf_counter()
            f()
            out[k].append((time.perf_counter() - s) * 1e3)
    return out
