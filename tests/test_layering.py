"""The import layering of the ``ember`` package, checked statically on every module.

Every ``.py`` file under ``compiler/``, ``passes/``, ``backends/`` and ``cost_models/`` is parsed
with `ast`; every import statement in it (module level, function-local, under ``TYPE_CHECKING``,
relative or absolute) is resolved to an ``ember.*`` module name through the ``package-dir``
mapping of ``pyproject.toml``. The tests fail on any import cycle between our modules (printed as
a ``file:line`` chain) and on any import that breaks the layer rules in `LAYERS` (printed as
``file:line``). ``ARCHITECTURE.md`` quotes the table below; change both together.

Only import statements are seen: a plugin looked up by a computed name at run time
(``importlib.import_module(f"ember.passes.{name}")``, the backend registry's optional backends)
is not an import edge.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ the rules
# A module belongs to the layer of its longest matching prefix ("ember.ir" covers ember.ir.*).
# A layer may import its own modules and the layers it names; "*" is everything.
#
# | layer      | modules                                                   | may import            |
# |------------|-----------------------------------------------------------|-----------------------|
# | leaf       | ember.ir, ember.errors, ember.hostinfo, ember.progress,   | leaf                  |
# |            | ember.timing, ember.version, ember.signing                |                       |
# | frontend   | ember.frontends                                           | leaf                  |
# | pass       | ember.passes, ember.passmanager, ember.pipelines          | leaf                  |
# | cost_model | ember.cost_models                                         | leaf, COST_MODEL_READS|
# | backend    | ember.backends (no backend imports another backend's      | leaf, cost_model      |
# |            | private `_` modules or names)                             |                       |
# | top        | ember, ember.__main__, ember.driver, ember.planner,       | *                     |
# |            | ember.compiled, ember.targets, ember.cli, ember.dynamo,   |                       |
# |            | ember.artifact, ember.report, ember.bench, ember.isolated |                       |
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "leaf": (("ember.ir", "ember.errors", "ember.hostinfo", "ember.progress", "ember.timing",
              "ember.version", "ember.signing"), ()),
    "frontend": (("ember.frontends",), ("leaf",)),
    "pass": (("ember.passes", "ember.passmanager", "ember.pipelines"), ("leaf",)),
    "cost_model": (("ember.cost_models",), ("leaf",)),
    "backend": (("ember.backends",), ("leaf", "cost_model")),
    "top": (("ember", "ember.__main__", "ember.driver", "ember.planner", "ember.compiled",
             "ember.targets", "ember.cli", "ember.dynamo", "ember.artifact", "ember.report",
             "ember.bench", "ember.isolated", "ember.generate", "ember.tokenizer", "ember.lm",
             "ember.lm_artifact"),
            ("*",)),
}
# What a cost model may read of a backend (exact module names): tables and settings that say
# what the backend runs, so the device spec times exactly that. The CPU backend's op -> kernel
# table (`lowering.LOWERINGS`: which torch call runs each op) and how it configures ONNX Runtime
# sessions (`onnx.session`: threads, spinning, disabled optimizers). Neither imports anything
# above the leaf layer.
COST_MODEL_READS: frozenset[str] = frozenset({"ember.backends.cpu.lowering",
                                              "ember.backends.cpu.onnx.session"})

# ------------------------------------------------------------------------------ the walk
_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    file: str  # repo-relative path of src
    line: int
    names: tuple[str, ...]  # names taken by `from dst import ...` (empty for `import dst`)


def _package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((_ROOT / "pyproject.toml").read_text())
    dirs = cfg["tool"]["setuptools"]["package-dir"]
    return {pkg: _ROOT / d for pkg, d in dirs.items()}


def _modules() -> dict[str, Path]:
    """Every module of ours: dotted name -> file (a package's name maps to its __init__.py)."""
    mods: dict[str, Path] = {}
    for pkg, d in _package_dirs().items():
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            # a sub-folder that is a package of its own in package-dir is walked from there
            name = ".".join([pkg, *parts])
            if any(name == p or name.startswith(p + ".") for p in _package_dirs()
                   if p != pkg and p.startswith(pkg + ".")):
                continue
            mods[name] = f
    return mods


MODULES = _modules()


def _resolve(src: str, is_pkg: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = src.split(".") if is_pkg else src.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for src, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        rel = str(path.relative_to(_ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "ember" or a.name.startswith("ember."):
                        edges.append(Edge(src, _nearest(a.name), rel, node.lineno, ()))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(src, is_pkg, node.module, node.level)
                if not (target == "ember" or target.startswith("ember.")):
                    continue
                plain: list[str] = []
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in MODULES:  # `from pkg import submodule`
                        edges.append(Edge(src, sub, rel, node.lineno, ()))
                    else:
                        plain.append(a.name)
                if plain:
                    edges.append(Edge(src, _nearest(target), rel, node.lineno, tuple(plain)))
    return edges


def _nearest(name: str) -> str:
    """The module itself, or its nearest enclosing module of ours (``ember.x.y`` -> ``ember.x``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


EDGES = _edges()


def layer_of(mod: str) -> str | None:
    best, best_len = None, -1
    for layer, (prefixes, _) in LAYERS.items():
        for p in prefixes:
            if (mod == p or (mod.startswith(p + ".") and p != "ember")) and len(p) > best_len:
                best, best_len = layer, len(p)
    return best


def _backend_of(mod: str) -> str | None:
    """``ember.backends.cuda.ops`` -> ``cuda``; shared modules (base, registry) -> None."""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[:2] == ["ember", "backends"]:
        if f"ember.backends.{parts[2]}" in MODULES and \
                MODULES[f"ember.backends.{parts[2]}"].name == "__init__.py":
            return parts[2]
    return None


def breaches() -> list[str]:
    out: list[str] = []
    for mod in MODULES:
        if layer_of(mod) is None:
            out.append(f"{MODULES[mod].relative_to(_ROOT)}: module {mod} is in no layer")
    for e in EDGES:
        src_layer, dst_layer = layer_of(e.src), layer_of(e.dst)
        if src_layer is None:
            continue
        allowed = LAYERS[src_layer][1]
        ok = ("*" in allowed or dst_layer == src_layer or dst_layer in allowed
              or (src_layer == "cost_model" and e.dst in COST_MODEL_READS))
        if not ok:
            out.append(f"{e.file}:{e.line}: {e.src} ({src_layer}) imports {e.dst} "
                       f"({dst_layer or 'no layer'})")
        sb, db = _backend_of(e.src), _backend_of(e.dst)
        if sb is not None and db is not None and sb != db:
            private = [p for p in e.dst.split(".")[3:] if p.startswith("_")]
            private += [n for n in e.names if n.startswith("_")]
            if private:
                out.append(f"{e.file}:{e.line}: backend {sb} imports backend {db}'s private "
                           f"{', '.join(private)} ({e.dst})")
    return out


def cycles() -> list[str]:
    """One `file:line` chain per strongly connected component of the import graph."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in MODULES}
    for e in EDGES:
        if e.dst != e.src and e.dst in MODULES:
            graph[e.src].setdefault(e.dst, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan, recursive is fine at this size
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out = []
    for comp in sccs:
        members = set(comp)
        start = min(comp)
        # shortest path start -> ... -> start inside the component
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        assert found is not None
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        path.append(start)
        chain = " -> ".join(f"{graph[a][b].file}:{graph[a][b].line}"
                            for a, b in zip(path, path[1:]))
        out.append(f"{' -> '.join(path)}  [{chain}]  (component: {', '.join(sorted(comp))})")
    return out


# ------------------------------------------------------------------------------ the tests
def test_walk_sees_the_package() -> None:
    """The walk finds our modules and their imports (a broken walk would pass vacuously)."""
    assert {"ember", "ember.ir.graph", "ember.passes", "ember.backends.registry",
            "ember.cost_models.analytical", "ember.driver"} <= set(MODULES)
    assert any(e.src == "ember.passmanager" and e.dst == "ember.ir" for e in EDGES)


def test_no_import_cycles() -> None:
    found = cycles()
    if found:
        pytest.fail("import cycles:\n  " + "\n  ".join(found))


def test_layer_rules() -> None:
    found = breaches()
    if found:
        pytest.fail(f"{len(found)} layering breaches:\n  " + "\n  ".join(found))
