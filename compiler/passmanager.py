"""Pass registry, pipeline text form, and the pass manager.

A pass is a pure function ``(Graph, Config, PassContext) -> Graph`` registered with its contract::

    @register_pass(numerics="exact", requires=("types", "shapes"))
    def fold_constants(g: Graph, cfg: FoldConstantsConfig, ctx: PassContext) -> Graph: ...

The contract: ``requires`` (graph properties the pass reads), ``provides`` (properties its
output has) and ``invalidates`` (properties its output no longer has). Before running,
`PassManager` checks that every pass's ``requires`` is met by `FRONTEND_PROVIDES` or an earlier
pass, and raises a `CompilerError` naming the pass and the property otherwise. After each pass
it records whether the pass modified the graph (``PassManager.modified``).

Pipelines have a text form that round-trips (the CLI's ``--passes``)::

    "O2,quantize{scheme=w8a8-dynamic},merge_tokens{r=8,schedule=constant}"

This module is the registry the pass modules import; it imports no pass. A pass is found by
name: the pass ``foo`` lives in the module ``ember.passes.foo``, which this module imports on
first lookup (`_load_passes`), and importing it registers the pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import pkgutil
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import CompilerError, PassError
from .ir import Graph, verify

__all__ = [
    "PassInfo",
    "PassContext",
    "TargetGate",
    "PassStep",
    "register_pass",
    "get_pass",
    "all_passes",
    "parse_pipeline",
    "format_pipeline",
    "PassManager",
    "EmptyConfig",
    "FRONTEND_PROVIDES",
    "check_contracts",
    "graph_modified",
    "VERIFY_EACH",
]

log = logging.getLogger(__name__)

# What every graph a frontend returns has: a type on every value, shapes (static or symbolic)
# that `ember.ir.verify` accepts.
FRONTEND_PROVIDES: frozenset[str] = frozenset({"types", "shapes"})

# Verify the IR after every pass in every PassManager, whatever its ``verify_each``. The test
# suite turns it on (an autouse fixture in tests/conftest.py); release runs leave it off.
VERIFY_EACH = False


@dataclass(frozen=True)
class EmptyConfig:
    """Config of a pass without knobs."""


class TargetGate(Protocol):
    """What a pass may ask its target about speed (the target's cost gate): the pass decides
    whether to rewrite, the target answers how fast a form runs there. The CPU backend
    implements it (`ember.backends.cpu.gate.CpuGate`); the driver puts it on the context.

    Methods:
        linear_runners: one ``x -> (() -> y)`` factory per one-input graph (input ``x``),
            running it as the target's program runs it (the quantize pass's per-layer gate).
            Raises ImportError or `CompilerError` where the target cannot run a graph.
        compare: ``{"before_ms", "after_ms", "speedup", ...}`` of two whole graphs on
            ``inputs`` in the target's program, or None where it cannot run them.
    """

    def linear_runners(self, graphs: Sequence[Graph]
                       ) -> list[Callable[[Any], Callable[[], Any]]]: ...

    def compare(self, before: Graph, after: Graph,
                inputs: Sequence[Any]) -> dict[str, Any] | None: ...


@dataclass
class PassContext:
    """What passes may read besides the graph, and where they record their decisions.

    Attributes:
        target: "cpu", "cuda" or "mobile".
        calib: calibration inputs (a list of input tuples) for passes that need data.
        labels: optional labels aligned with ``calib``.
        records: per-pass decision records; they go into the artifact manifest.
        seed: for passes with randomness.
        example_inputs: the compile's example inputs (symbol values, layer shapes to time).
        gate: the target's speed answers; None (a bare context, or a target without one):
            passes that would time the target's program time torch kernels instead.
    """

    target: str = "cpu"
    calib: list[tuple[Any, ...]] | None = None
    labels: Any = None
    records: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    example_inputs: list[Any] | None = None
    gate: TargetGate | None = None

    def record(self, pass_name: str, **info: Any) -> None:
        self.records.setdefault(pass_name, {}).update(info)


PassFn = Callable[[Graph, Any, PassContext], Graph]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    config: type
    numerics: str  # "exact" | "approx"
    requires: frozenset[str]
    provides: frozenset[str]
    doc: str
    invalidates: frozenset[str] = frozenset()


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str | None = None,
    *,
    config: type = EmptyConfig,
    numerics: str = "exact",
    requires: Sequence[str] = (),
    provides: Sequence[str] = (),
    invalidates: Sequence[str] = (),
) -> Callable[[PassFn], PassFn]:
    """Registers a pass under its function name (or ``name``) with its contract (see the
    module docstring)."""
    if numerics not in ("exact", "approx"):
        raise ValueError("numerics must be 'exact' or 'approx'")

    def deco(fn: PassFn) -> PassFn:
        pname = name or fn.__name__
        if pname in _PASSES and _PASSES[pname].fn is not fn:
            raise ValueError(f"pass '{pname}' registered twice")
        _PASSES[pname] = PassInfo(pname, fn, config, numerics, frozenset(requires),
                                  frozenset(provides), (fn.__doc__ or "").strip().split("\n")[0],
                                  frozenset(invalidates))
        return fn

    return deco


_PASSES_LOADED = False


def _load_passes() -> None:
    """Imports every public module of ``ember.passes`` (found on disk, by name); importing a
    module registers its passes. The pass modules import this module, never the reverse."""
    global _PASSES_LOADED
    if _PASSES_LOADED:
        return
    _PASSES_LOADED = True
    spec = importlib.util.find_spec("ember.passes")
    assert spec is not None and spec.submodule_search_locations is not None
    for mod in pkgutil.iter_modules(spec.submodule_search_locations):
        if not mod.name.startswith("_"):
            importlib.import_module(f"ember.passes.{mod.name}")


def get_pass(name: str) -> PassInfo:
    _load_passes()
    try:
        return _PASSES[name]
    except KeyError:
        known = ", ".join(sorted(_PASSES))
        raise CompilerError(f"unknown pass '{name}'; known passes: {known}") from None


def all_passes() -> dict[str, PassInfo]:
    _load_passes()
    return dict(_PASSES)


@dataclass(frozen=True)
class PassStep:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{k}={_fmt_value(v)}" for k, v in self.options.items())
        return f"{self.name}{{{body}}}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "|".join(_fmt_value(x) for x in v)
    return str(v)


def _parse_value(s: str) -> Any:
    s = s.strip()
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


_STEP_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\{([^{}]*)\})?\s*")


def parse_pipeline(text: str) -> list[PassStep]:
    """Parses ``"O2,quantize{scheme=w8a8-dynamic}"`` into steps (named pipelines expanded)."""
    from .pipelines import PIPELINES

    steps: list[PassStep] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _STEP_RE.match(text, pos)
        if not m or m.end() == pos:
            raise CompilerError(f"cannot parse pipeline at column {pos}: {text}\n"
                                f"{' ' * (len('cannot parse pipeline at column : ') + len(str(pos)) + pos)}^")
        name, body = m.group(1), m.group(3)
        opts: dict[str, Any] = {}
        if body:
            for item in body.split(","):
                if not item.strip():
                    continue
                if "=" not in item:
                    raise CompilerError(f"pass option '{item}' in '{name}' needs key=value")
                k, v = item.split("=", 1)
                opts[k.strip()] = _parse_value(v)
        if name in PIPELINES:
            if opts:
                raise CompilerError(f"named pipeline '{name}' takes no options")
            steps.extend(parse_pipeline(",".join(PIPELINES[name])) if PIPELINES[name] else [])
        else:
            steps.append(PassStep(name, opts))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise CompilerError(f"expected ',' at column {pos} of pipeline: {text}")
            pos += 1
    return steps


def format_pipeline(steps: Sequence[PassStep]) -> str:
    return ",".join(str(s) for s in steps)


def make_config(info: PassInfo, options: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(info.config)}
    unknown = set(options) - set(fields)
    if unknown:
        raise CompilerError(f"pass '{info.name}' has no option(s) {sorted(unknown)}; "
                            f"options: {', '.join(fields) or 'none'}")
    conv = {}
    for k, v in options.items():
        conv[k] = v
        want = fields[k].type if isinstance(fields[k].type, type) else None
        if want is float and isinstance(v, int):
            conv[k] = float(v)
    try:
        return info.config(**conv)
    except (TypeError, ValueError) as e:
        raise CompilerError(f"pass '{info.name}': bad options {dict(options)}: {e}") from None


class PassManager:
    """Runs steps in order: checks the contracts up front, verifies after each pass when asked,
    records timings and whether each pass modified the graph.

    Args:
        steps: the pipeline, as steps or text (``"O2,quantize{scheme=w8a8-dynamic}"``).
        verify_each: run `ember.ir.verify` after every pass (also on when `VERIFY_EACH` is).
        progress: called with (pass name, index, count) before each pass.
        given: the properties the input graph has (default: what a frontend provides).

    Attributes:
        timings: seconds per step text, summed over repeats.
        modified: per step text, whether the pass changed the graph (any of its repeats).
    """

    def __init__(self, steps: Sequence[PassStep] | str, verify_each: bool = False,
                 progress: Callable[[str, int, int], None] | None = None,
                 given: Iterable[str] = FRONTEND_PROVIDES) -> None:
        self.steps = parse_pipeline(steps) if isinstance(steps, str) else list(steps)
        self.verify_each = verify_each or VERIFY_EACH
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.modified: dict[str, bool] = {}
        # check names, options and contracts up front, before any work
        self._resolved = [(get_pass(s.name), s) for s in self.steps]
        self._configs = [make_config(info, s.options) for info, s in self._resolved]
        check_contracts([info for info, _ in self._resolved], given)

    def run(self, g: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        done: list[str] = []
        for i, ((info, step), cfg) in enumerate(zip(self._resolved, self._configs)):
            if self.progress:
                self.progress(info.name, i, len(self._resolved))
            t0 = time.perf_counter()
            try:
                out = info.fn(g, cfg, ctx)
            except CompilerError:
                raise
            except Exception as e:
                raise PassError(str(step), done, e) from e
            if not isinstance(out, Graph):
                raise PassError(str(step), done, TypeError("pass did not return a Graph"))
            if self.verify_each:
                verify(out, pass_name=info.name)
            dt = time.perf_counter() - t0
            changed = graph_modified(g, out)
            self.timings[str(step)] = self.timings.get(str(step), 0.0) + dt
            self.modified[str(step)] = self.modified.get(str(step), False) or changed
            log.info("pass %s: %d -> %d nodes in %.3fs (%s)", step, len(g.nodes),
                     len(out.nodes), dt, "modified" if changed else "unchanged")
            g = out
            done.append(str(step))
        return g


def check_contracts(passes: Sequence[PassInfo], given: Iterable[str] = FRONTEND_PROVIDES) -> None:
    """Raises a `CompilerError` when a pass requires a property that neither ``given`` (the
    input graph's properties) nor an earlier pass provides, or an earlier pass invalidated."""
    have = set(given)
    lost: dict[str, str] = {}  # property -> the pass that invalidated it
    for i, info in enumerate(passes):
        missing = sorted(info.requires - have)
        if missing:
            why = "; ".join(f"'{p}' was invalidated by '{lost[p]}'" if p in lost else
                            f"no earlier pass provides '{p}'" for p in missing)
            raise CompilerError(
                f"pass '{info.name}' (step {i + 1}) requires {', '.join(missing)}: {why} "
                f"(the input graph has: {', '.join(sorted(given)) or 'nothing'})")
        for p in info.invalidates:
            have.discard(p)
            lost[p] = info.name
        have |= info.provides
        for p in info.provides:
            lost.pop(p, None)


def graph_modified(before: Graph, after: Graph) -> bool:
    """Whether a pass changed the graph: a new graph object that differs structurally (values,
    nodes with their ops, types and attrs, or a weight tensor replaced)."""
    if after is before:
        return False
    if (after.inputs != before.inputs or after.outputs != before.outputs
            or after.params != before.params or len(after.nodes) != len(before.nodes)
            or after.weights.keys() != before.weights.keys()):
        return True
    if any(after.weights[k] is not before.weights[k] for k in before.weights):
        return True
    for a, b in zip(before.nodes, after.nodes):
        if a is b:
            continue
        if a.op != b.op or a.inputs != b.inputs or a.outputs != b.outputs \
                or a.attrs.keys() != b.attrs.keys():
            return True
        for k, v in a.attrs.items():
            w = b.attrs[k]
            if v is w:
                continue
            if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
                return True  # a new tensor attr: counted as a change
            try:
                if bool(v != w):
                    return True
            except (TypeError, ValueError):  # values without a plain truth value
                return True
    return False
