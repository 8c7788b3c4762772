"""PyTorch frontend: ``torch.export`` (ATen FX graph) -> Ember IR.

The model is exported with ``torch.export.export(strict=False)`` in eval mode under
``no_grad``, then decomposed with torch's default table minus every op Ember maps directly
(linear, layer_norm, scaled_dot_product_attention, conv, batch_norm, ...), so high-level ops
survive for the fusion passes. Each ATen node is then mapped to IR ops with `GraphBuilder`,
which infers every type; the inferred shape is checked against torch's own (``meta['val']``).

Symbolic dims: torch names its symbols ``s0, s1, ...``; they are renamed after the user's
``dynamic_dims`` (``{"input_ids": {0: "batch", 1: "seq"}}``) by looking at where each symbol
first appears in an input's shape. Scalar-valued nodes (``sym_size``, SymInt arithmetic) are
read from their ``meta['val']``, so every shape argument becomes an int or a sympy expression.

Ops without a mapping are collected (all of them, with their source locations) and raised as
one `UnsupportedOpError`.

This module holds the entry points and the export step; the graph walk is `_fx_importer`, the
ATen handlers are `_fx_ops` (imported here, so the handler table is full before any import).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FrontendError, UnsupportedOpError
from ..ir import Graph
from . import _fx_ops  # noqa: F401  (importing it registers the ATen handlers)
from ._fx_importer import _HANDLERS, _first_line, _Importer

__all__ = ["import_module", "import_exported_program", "export_module", "supported_aten_ops",
           "load_pt2"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
DynamicDims = Mapping[str, Mapping[int, str]] | Sequence[Mapping[int, str] | None] | None


# ============================================================================ public entry points
def export_module(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    dynamic_dims: DynamicDims = None,
    input_names: Sequence[str] | None = None,
) -> tuple[torch.export.ExportedProgram, list[str], dict[str, dict[int, str]]]:
    """Exports ``model`` with torch.export and Ember's decomposition table.

    Returns:
        (decomposed ExportedProgram, input names, dynamic dims keyed by input name).
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names = list(input_names) if input_names is not None else _forward_arg_names(
        model, len(example_inputs))
    if len(names) != len(example_inputs):
        raise FrontendError(f"{len(names)} input names for {len(example_inputs)} example inputs")
    dyn = _normalize_dynamic_dims(dynamic_dims, names)
    # each module's own mode, restored one by one: `model.train(flag)` would set every child
    # to the top module's flag (a fresh wrapper in training mode put a wrapped model's dropout on)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ep = _export(model, example_inputs, names, dyn)
            ep = ep.run_decompositions(_decomp_table())
    except (UnsupportedOpError, FrontendError):
        raise
    except Exception as e:
        raise FrontendError(f"torch.export failed for {type(model).__name__}: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
    finally:
        for m, training in modes:
            m.training = training
    return ep, names, dyn


def import_module(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    dynamic_dims: DynamicDims = None,
    input_names: Sequence[str] | None = None,
) -> Graph:
    """Imports a PyTorch module into an Ember graph.

    Args:
        model: the module; exported in eval mode without gradients (its mode is restored).
        example_inputs: positional example inputs (tensors).
        dynamic_dims: per input (by forward-argument name or by position) a map
            ``{dim index: symbol name}``; dims sharing a name are the same symbol.
        input_names: names of the graph inputs (default: the forward argument names).

    Returns:
        The IR graph, with parameters and buffers as params and named outputs.

    Raises:
        UnsupportedOpError: listing every ATen op without a mapping, with its location.
        FrontendError: the model could not be exported, or a mapping produced a wrong shape.
    """
    ep, names, dyn = export_module(model, example_inputs, dynamic_dims, input_names)
    g = _Importer(ep, names, dyn, type(model).__name__).run()
    log.info("imported %s: %d nodes, %d params", type(model).__name__, len(g.nodes),
             len(g.params))
    return g


def import_exported_program(
    ep: torch.export.ExportedProgram,
    input_names: Sequence[str] | None = None,
    dynamic_dims: DynamicDims = None,
) -> Graph:
    """Imports an ExportedProgram (decomposing it with Ember's table first).

    Symbols are named after ``dynamic_dims`` when given; otherwise they keep torch's names.
    """
    ep = ep.run_decompositions(_decomp_table())
    n_user = sum(1 for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    names = list(input_names) if input_names is not None else [
        s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(names) != n_user:
        raise FrontendError(f"{len(names)} input names for {n_user} user inputs")
    return _Importer(ep, names, _normalize_dynamic_dims(dynamic_dims, names)).run()


def supported_aten_ops() -> list[str]:
    """The ATen op packets (``aten.add``, ...) this frontend maps, sorted."""
    return sorted(f"aten.{n}" for n in _HANDLERS)


# ============================================================================ export
def _forward_arg_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _normalize_dynamic_dims(dyn: DynamicDims, names: Sequence[str]) -> dict[str, dict[int, str]]:
    if dyn is None:
        return {}
    out: dict[str, dict[int, str]] = {}
    if isinstance(dyn, Mapping):
        for k, dims in dyn.items():
            name = names[k] if isinstance(k, int) else k
            if name not in names:
                raise FrontendError(f"dynamic_dims names '{k}', not an input "
                                    f"(inputs: {', '.join(names)})")
            out[name] = {int(d): str(s) for d, s in dict(dims).items()}
    else:
        if len(dyn) > len(names):
            raise FrontendError(f"dynamic_dims has {len(dyn)} entries for {len(names)} inputs")
        for name, dims in zip(names, dyn):
            if dims:
                out[name] = {int(d): str(s) for d, s in dict(dims).items()}
    return out


def _export(model: nn.Module, args: tuple, names: Sequence[str],
            dyn: Mapping[str, Mapping[int, str]]) -> torch.export.ExportedProgram:
    from torch.export import Dim, export

    if not dyn:
        return export(model, args, strict=False)

    def spec(make: Callable[[str], Any]) -> tuple:
        out = []
        for name, a in zip(names, args):
            dims = dyn.get(name)
            if not dims or not isinstance(a, torch.Tensor):
                out.append(None)
                continue
            out.append({d % a.dim(): make(s) for d, s in dims.items()})
        return _nest_var_positional(model, tuple(out))

    named: dict[str, Any] = {}
    try:
        return export(model, args, strict=False,
                      dynamic_shapes=spec(lambda s: named.setdefault(s, Dim(s))))
    except Exception as e:  # named Dims reject models with guards such as seq <= 512
        log.info("export with named dims failed (%s); retrying with Dim.AUTO", _first_line(e))
    # Dim.AUTO accepts the ranges the model needs; symbols are renamed from the input shapes
    return export(model, args, strict=False, dynamic_shapes=spec(lambda s: Dim.AUTO))


def _nest_var_positional(model: nn.Module, spec: tuple) -> tuple:
    """torch.export matches ``dynamic_shapes`` to the forward's signature: the inputs a
    ``*args`` parameter takes are one nested tuple there."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return spec
    n_pos = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return (*spec[:n_pos], tuple(spec[n_pos:]))
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        n_pos += 1
    return spec


def _decomp_table() -> Any:
    """torch's default decompositions minus every op that has a direct Ember mapping."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        name = op.name().split("::")[-1].split(".")[0]
        if name in _HANDLERS or name in _KEEP_EXTRA:
            try:
                del table[op]
            except KeyError:
                pass
    return table


# Ops with a handler that is reached after their own decomposition: none right now; the set
# exists so an op can be kept without a handler of the same name (e.g. aliases).
_KEEP_EXTRA: set[str] = set()


# ----------------------------------------------------------------------------- .pt2 files
_PT2_MAX_MEMBERS = 100_000


def _pt2_configs(z: Any, path: Path) -> None:
    """Refuses a .pt2 whose payload configs declare pickled tensors or opaque objects."""
    import json

    for name in z.namelist():
        if not name.endswith(("weights_config.json", "constants_config.json")):
            continue
        try:
            cfg = json.loads(z.read(name)).get("config", {})
        except (ValueError, AttributeError) as e:
            raise FrontendError(f"{path}: {name} is not valid JSON ({e})") from None
        for fqn, meta in (cfg.items() if isinstance(cfg, dict) else ()):
            pname = str((meta or {}).get("path_name", "")) if isinstance(meta, dict) else ""
            if not isinstance(meta, dict) or meta.get("use_pickle") or not pname.startswith(
                    ("weight_", "tensor_")):
                raise FrontendError(
                    f"{path}: {name} declares '{fqn}' as a pickled or opaque object "
                    f"({pname or 'no path'}); Ember loads .pt2 archives of plain tensors only "
                    f"(re-export without custom objects, or compile the nn.Module / an ONNX file)")


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """Loads a ``torch.export`` archive without running code from it.

    ``.pt2`` is a trusted-only format: torch can unpickle parts of it. Ember refuses archives
    that declare pickled weights or constants, opaque or custom objects, or compiled
    (AOTInductor) models, and loads the rest with every ``torch.load`` forced to
    ``weights_only=True`` (torch's restricted unpickler) so the sample inputs cannot run code.

    Raises:
        FrontendError: one line naming the file and what was refused.
    """
    import logging as _logging
    import os
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FrontendError(f"{path}: not a torch.export .pt2 archive ({e})") from None
    with z:
        names = z.namelist()
        if len(names) > _PT2_MAX_MEMBERS:
            raise FrontendError(f"{path}: {len(names)} members (at most {_PT2_MAX_MEMBERS})")
        native = [n for n in names if n.endswith((".so", ".dll", ".dylib", ".cpp", ".cubin"))
                  or "/data/aotinductor/" in n]
        if native:
            raise FrontendError(f"{path}: holds compiled code ({native[0]}); Ember compiles "
                                f"torch.export programs, not AOTInductor packages")
        _pt2_configs(z, path)
    export_log = _logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(_logging.CRITICAL)  # torch logs its own traceback before raising
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        return torch.export.load(str(path))
    except Exception as e:  # a corrupt or refused .pt2 must not surface as a deep traceback
        raise FrontendError(f"{path}: cannot load torch.export program: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") \
            from None
    finally:
        export_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
