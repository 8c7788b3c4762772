"""``torch.compile(model, backend="ember")``: the Dynamo backend.

Each captured FX graph is exported and compiled by Ember for the CPU. Dynamo passes module
parameters and buffers as graph inputs; Ember binds them as constants (a snapshot of the weights,
as an inference compiler should) so constant folding, Conv+BN folding and weight prepacking see
them. Anything Ember cannot
compile (an unsupported op, dynamic shapes Dynamo marks symbolic, a graph with side effects)
falls back to eager for that graph with one warning, never an exception.
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


def _real_inputs(example_inputs: Sequence[Any]) -> list[torch.Tensor] | None:
    out = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            return None  # SymInt or other non-tensor inputs: dynamic graph, stay eager
        if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
            x = torch.randn(x.shape, dtype=x.dtype) if x.is_floating_point() else \
                torch.zeros(x.shape, dtype=x.dtype)
        out.append(x)
    return out


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

    inputs = _real_inputs(example_inputs)
    if inputs is None:
        _warn_once("ember: graph has symbolic (non-tensor) inputs; running it eagerly")
        return gm.forward
    try:
        bound, keep = _bind_module_state(gm, inputs)
        runtime = [inputs[i] for i in keep]
        with torch.no_grad():
            cm = ember_compile(bound, tuple(runtime), target=options.get("target", "cpu"),
                               passes=options.get("passes", "O2"), check_fidelity=False)
    except CompilerError as e:
        _warn_once(f"ember: falling back to eager for a graph: {str(e).splitlines()[0]}")
        return gm.forward
    except Exception as e:  # never break the user's torch.compile: fall back, say why
        _warn_once(f"ember: falling back to eager for a graph ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})")
        log.debug("ember dynamo fallback", exc_info=True)
        return gm.forward

    def run(*args: Any) -> Any:
        if len(args) != len(inputs) or any(
                not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim()
                for a, b in zip(args, inputs)):
            raise RuntimeError("ember: graph called with inputs unlike its example inputs")
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            _warn_once("ember: gradients requested; Ember compiles inference only, so this "
                       "graph returns tensors without autograd history (use torch.no_grad())")
        return tuple(cm.run(*[args[i] for i in keep]))

    return run
