"""``torch.compile(model, backend="ember")``: the Dynamo backend.

Each captured FX graph is exported and compiled by Ember for the CPU. Dynamo passes module
parameters and buffers as graph inputs; Ember binds them as constants (a snapshot of the weights,
as an inference compiler should) so constant folding, Conv+BN folding and weight prepacking see
them. When Dynamo recompiles a graph with symbolic sizes (the second input shape a user
sends), its size inputs (SymInts) are bound to the tensor dims that carry them and the graph is
compiled once with those dims symbolic, so every later shape runs Ember's program. Anything
Ember cannot compile (an unsupported op, a size that no input dim carries, a graph with side
effects) falls back to eager for that graph with one warning, never an exception.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ember_backend"]

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    key = msg.split(":")[0]
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def _concrete(x: Any) -> Any:
    """A real tensor (or int) for one Dynamo example input: fake tensors become random data of
    their current shape, SymInts their current value."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.hint is not None else None
    if not isinstance(x, torch.Tensor):
        return x if isinstance(x, int) else None
    if isinstance(x, torch.nn.Parameter):
        return x
    if type(x) is not torch.Tensor:
        return torch.randn(x.shape, dtype=x.dtype) if x.is_floating_point() else \
            torch.zeros(x.shape, dtype=x.dtype)
    # a copy: exporting marks its example tensors dynamic, and the user's tensor must not
    # carry that mark back into Dynamo
    return x.detach().clone()


def _bind_sizes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
                ) -> tuple[torch.fx.GraphModule, list[int], dict[int, dict[int, str]]] | None:
    """A copy of ``gm`` whose size (SymInt) inputs are read from the tensor inputs that carry
    them (``aten.sym_size``), the positions of the inputs it still takes, and each tensor
    input's symbolic dims by position (``{input: {dim: symbol}}``, from Dynamo's fake values).
    None when a size is carried by no tensor dim."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    carrier: dict[str, tuple[int, int]] = {}
    dyn: dict[int, dict[int, str]] = {}
    for i, (n, ex) in enumerate(zip(phs, example_inputs)):
        fake = n.meta.get("example_value")
        if not isinstance(ex, torch.Tensor) or not isinstance(fake, torch.Tensor):
            continue
        for d, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                name = str(size.node.expr)
                dyn.setdefault(i, {})[d] = name
                carrier.setdefault(name, (i, d))
    sizes = [i for i, ex in enumerate(example_inputs) if not isinstance(ex, torch.Tensor)]
    if not sizes:
        return gm, list(range(len(phs))), dyn
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for i in sizes:
        ex = example_inputs[i]
        name = str(ex.node.expr) if isinstance(ex, torch.SymInt) else None
        if name not in carrier:
            return None
        t, d = carrier[name]
        with gm.graph.inserting_before(first):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (phs[t], d))
        phs[i].replace_all_uses_with(size)
        gm.graph.erase_node(phs[i])
    gm.recompile()
    return gm, [i for i in range(len(phs)) if i not in sizes], dyn


# Dynamo names placeholders of module state L_self_modules_<path>_parameters_<name>_ (or
# _buffers_); parameters are also recognizable by type.
_STATE_RE = re.compile(r"^L_(self|mod|model)_.*(parameters|buffers)_")


def _bind_module_state(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]
                       ) -> tuple[torch.fx.GraphModule, list[int]]:
    """A copy of ``gm`` with parameter/buffer placeholders bound as constants, and the
    positions of the remaining runtime inputs. Dynamo's own ``gm`` is left untouched."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(ex, torch.nn.Parameter) or _STATE_RE.match(str(node.target)):
            attr = f"_ember_const_{i}"
            gm.register_buffer(attr, ex.detach())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(attr)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
        else:
            keep.append(i)
    gm.recompile()
    return gm, keep


def ember_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  **options: Any) -> Callable[..., Any]:
    """Compiles one Dynamo graph with Ember; returns ``gm.forward`` on failure (warned once)."""
    from .driver import compile as ember_compile
    from .errors import CompilerError

    inputs = [_concrete(x) for x in example_inputs]
    sized = _bind_sizes(gm, example_inputs) if all(x is not None for x in inputs) else None
    if sized is None:
        _warn_once("ember: a size input of this graph is carried by no tensor dim; running it "
                   "eagerly")
        return gm.forward
    tensors_gm, tensor_pos, dyn = sized
    try:
        bound, keep_local = _bind_module_state(tensors_gm, [inputs[i] for i in tensor_pos])
        keep = [tensor_pos[j] for j in keep_local]
        runtime = [inputs[i] for i in keep]
        dims = {k: dyn[i] for k, i in enumerate(keep) if i in dyn} or None
        # outside Dynamo's tracing context: Ember's own torch.export must not add its
        # constraints to the shape environment of the graph Dynamo is compiling
        with torch.no_grad(), torch._guards.tracing(None):
            cm = ember_compile(bound, tuple(runtime), target=options.get("target", "cpu"),
                               passes=options.get("passes", "O2"), check_fidelity=False,
                               dynamic_dims=dims)
    except CompilerError as e:
        _warn_once(f"ember: falling back to eager for a graph: {str(e).splitlines()[0]}")
        return gm.forward
    except Exception as e:  # never break the user's torch.compile: fall back, say why
        _warn_once(f"ember: falling back to eager for a graph ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})")
        log.debug("ember dynamo fallback", exc_info=True)
        return gm.forward
    log.info("ember: compiled a Dynamo graph%s", f" with symbolic dims {dims}" if dims else "")

    def run(*args: Any) -> Any:
        if len(args) != len(inputs) or any(
                not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim()
                for a, b in ((args[i], inputs[i]) for i in keep)):
            raise RuntimeError("ember: graph called with inputs unlike its example inputs")
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            _warn_once("ember: gradients requested; Ember compiles inference only, so this "
                       "graph returns tensors without autograd history (use torch.no_grad())")
        return tuple(cm.run(*[args[i] for i in keep]))

    return run
