"""The IR -> ONNX emitter table of the CPU backend: one emitter per IR op name.

An emitter is ``fn(exporter, node, input_names) -> output_names``: it appends ONNX nodes to the
exporter (`ember.backends.cpu.onnx.emit._Exporter`) and returns the names of the tensors that
hold the IR node's outputs; raising `NoMapping` inside it writes the node to the custom domain
``ai.ember`` instead. The standard ONNX emitters (`emit`), the ORT fusion stage (`fusions`) and
the contrib/approximate-op emitters (`attention`, `quant`, `tokens`) register here with
`register_emitter`; this module imports none of them, the package ``__init__`` imports each once.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["NoMapping", "Emit", "EMITTERS", "register_emitter", "EMBER_DOMAIN", "MS_DOMAIN"]

EMBER_DOMAIN = "ai.ember"  # ops with no ONNX mapping: need an Ember custom-op library to run
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


class NoMapping(Exception):
    """Raised by an emitter that cannot write its node in ONNX (the node goes to ``ai.ember``)."""


Emit = Callable[..., list[str]]
EMITTERS: dict[str, Emit] = {}


def register_emitter(*ops: str) -> Callable[[Emit], Emit]:
    """Registers the decorated emitter for the IR ops ``ops`` (a later registration for the same
    op replaces an earlier one: the contrib-op modules override standard emitters)."""
    def deco(fn: Emit) -> Emit:
        for o in ops:
            EMITTERS[o] = fn
        return fn
    return deco
